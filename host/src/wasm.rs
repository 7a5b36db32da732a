//! Wasm modules from registries (reference §5; Istio's pkg/wasm): what a
//! WasmPlugin's `url` names, fetched by the agent so that Envoy only ever
//! loads a local, verified file.
//!
//! - [`image`]: fetching one module: an OCI image in either variant Istio
//!   accepts (compat: `plugin.wasm` in a tar+gzip layer; oci: the Wasm
//!   content layer), or an `http(s)://` file; digests, the `\0asm` magic and
//!   size limits are checked before anything is kept.
//! - [`cache`]: modules on disk by digest, reused across restarts and while
//!   the registry is unreachable, expired when unused, bounded in size.
//! - [`convert`]: rewriting the remote code source of Wasm filters in ECDS
//!   and LDS resources to the cached file, as Istio's agent does before
//!   Envoy sees them.

pub mod cache;
pub mod convert;
pub mod image;
pub mod reference;

use std::fmt;

pub use cache::{CacheOptions, CachedModule, ModuleRequest, PullPolicy, WasmCache};
pub use convert::WasmRewriter;

/// The first four bytes of every WebAssembly module.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Istio's limit on a module (`ISTIO_WASM_MAX_BINARY_SIZE_BYTES`, 256 MiB).
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 << 20;

/// Whether `text` names a module by URL (`oci://`, `http://`, `https://`)
/// rather than as a local file.
pub fn is_url(text: &str) -> bool {
    ["oci://", "http://", "https://"]
        .iter()
        .any(|scheme| text.starts_with(scheme))
}

/// A SHA-256 digest, written `sha256:<hex>` as in image references.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(bytes);
        Self::from_context(context)
    }

    fn from_context(context: ring::digest::Context) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        Self(out)
    }

    /// `sha256:<64 hex digits>` or the 64 hex digits alone (a WasmPlugin's
    /// `sha256` field).
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex = text.strip_prefix("sha256:").unwrap_or(text);
        if hex.len() != 64 {
            return Err(format!(
                "`{text}` is not a SHA-256 digest (64 hex digits, optionally after `sha256:`)"
            ));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("`{text}` is not a SHA-256 digest (not hex)"))?;
        }
        Ok(Self(out))
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// SHA-256 over data that arrives in pieces.
pub(crate) struct Hasher(ring::digest::Context);

impl Hasher {
    pub(crate) fn new() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> Sha256 {
        Sha256::from_context(self.0)
    }
}

/// Why a module could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("`{url}` is not a Wasm module URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: image pull secret: {reason}")]
    PullSecret { url: String, reason: String },
    #[error("cannot fetch {url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("{url}: the registry refused: {reason}")]
    Refused { url: String, reason: String },
    #[error("{url}: {what} is {actual}, but {expected} was asked for")]
    DigestMismatch {
        url: String,
        what: &'static str,
        expected: Sha256,
        actual: Sha256,
    },
    #[error("{url}: {what} is larger than the limit of {limit} bytes")]
    TooLarge {
        url: String,
        what: String,
        limit: u64,
    },
    #[error("{url}: unusable image manifest: {reason}")]
    Manifest { url: String, reason: String },
    #[error("{url}: unusable layer: {reason}")]
    Layer { url: String, reason: String },
    #[error("{url}: not a WebAssembly module ({reason})")]
    NotWasm { url: String, reason: String },
    #[error("Wasm module cache {path}: {error}")]
    Cache {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

impl WasmError {
    /// The registry or server could not be reached or failed (not a verdict
    /// on the module): a cached copy may stand in.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Checks what was fetched before it is kept: at least 8 bytes, the
/// `\0asm` magic, within `limit`.
pub fn check_module(url: &str, module: &[u8], limit: u64) -> Result<(), WasmError> {
    if module.len() as u64 > limit {
        return Err(WasmError::TooLarge {
            url: url.to_string(),
            what: format!("the module ({} bytes)", module.len()),
            limit,
        });
    }
    if module.len() < 8 {
        return Err(WasmError::NotWasm {
            url: url.to_string(),
            reason: format!("{} bytes, shorter than a module header", module.len()),
        });
    }
    if &module[..4] != WASM_MAGIC {
        return Err(WasmError::NotWasm {
            url: url.to_string(),
            reason: format!(
                "it starts with {:02x?}, not the \\0asm magic",
                &module[..4.min(module.len())]
            ),
        });
    }
    Ok(())
}

/// rustls needs a process-wide crypto provider for the registry clients
/// (the same ring the rest of the agent uses); installing it twice is fine.
pub(crate) fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print() {
        let d = Sha256::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Sha256::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Sha256::parse(&d.hex()).unwrap(), d);
        assert!(Sha256::parse("sha256:abc").unwrap_err().contains("64 hex"));
        assert!(
            Sha256::parse(&"zz".repeat(32))
                .unwrap_err()
                .contains("not hex")
        );
        let mut h = Hasher::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
    }

    #[test]
    fn modules_are_checked() {
        assert!(check_module("u", b"\0asm\x01\0\0\0", 100).is_ok());
        let e = check_module("u", b"<html></html>", 100).unwrap_err();
        assert!(e.to_string().contains("not the \\0asm magic"), "{e}");
        let e = check_module("u", b"\0asm", 100).unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
        let e = check_module("u", &[0u8; 200], 100).unwrap_err();
        assert!(
            e.to_string().contains("larger than the limit of 100"),
            "{e}"
        );
    }
}
