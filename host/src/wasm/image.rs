//! Fetching one Wasm module from where a WasmPlugin's `url` points: an OCI
//! image (`oci://registry/repo:tag`, `...@sha256:...`, or no scheme) through
//! the distribution API, or a file over `http(s)://`.
//!
//! Images are read as Istio's agent reads them (pkg/wasm/imagefetcher.go):
//! a Docker manifest's last layer must be a Docker tar+gzip layer holding
//! `plugin.wasm`; an OCI manifest is tried as compat (last layer
//! `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`),
//! then as oci (a layer `application/vnd.module.wasm.content.layer.v1+wasm`,
//! the raw module). Every byte is checked against the digest it was asked
//! for, and nothing larger than the module limit is read.

use std::io::Read as _;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tokio_stream::StreamExt as _;

use super::{Hasher, Sha256, WasmError, check_module};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_TAR_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The file a compat layer holds.
pub const COMPAT_FILE: &str = "plugin.wasm";
/// Manifests are small; a registry sending more is not serving an image.
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Where a module comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Oci {
        /// The URL as written.
        url: String,
        reference: Reference,
    },
    Http {
        url: String,
    },
}

impl Source {
    /// `oci://…` or a bare image reference (Istio's default scheme), or
    /// `http(s)://…`.
    pub fn parse(url: &str) -> Result<Source, WasmError> {
        let bad = |reason: String| WasmError::BadUrl {
            url: url.to_string(),
            reason,
        };
        match url.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() => Ok(Source::Http {
                url: url.to_string(),
            }),
            Some(("oci", rest)) => Self::oci(url, rest).map_err(bad),
            Some((scheme, _)) => Err(bad(format!(
                "unsupported scheme `{scheme}` (oci, http or https)"
            ))),
            None => Self::oci(url, url).map_err(bad),
        }
    }

    fn oci(url: &str, reference: &str) -> Result<Source, String> {
        if reference.is_empty() {
            return Err("no image reference".into());
        }
        // Only sha256 digests parse, so `pinned` cannot fail.
        let parsed = super::reference::parse(reference)
            .map_err(|e| format!("not an image reference: {e}"))?;
        Ok(Source::Oci {
            url: url.to_string(),
            reference: parsed,
        })
    }

    /// The URL as written.
    pub fn url(&self) -> &str {
        match self {
            Source::Oci { url, .. } | Source::Http { url } => url,
        }
    }

    /// What identifies the module apart from its version: `registry/repo`
    /// for an image (Istio keys its cache by the URL without the tag), the
    /// URL for a file.
    pub fn repository(&self) -> String {
        match self {
            Source::Oci { reference, .. } => {
                format!("{}/{}", reference.registry(), reference.repository())
            }
            Source::Http { url } => url.clone(),
        }
    }

    /// The image's tag (`latest` when the reference names neither tag nor
    /// digest); none for a file.
    pub fn tag(&self) -> Option<String> {
        match self {
            Source::Oci { reference, .. } => match (reference.tag(), reference.digest()) {
                (Some(tag), _) => Some(tag.to_string()),
                (None, Some(_)) => None,
                (None, None) => Some("latest".into()),
            },
            Source::Http { .. } => None,
        }
    }

    /// The digest pinned in the reference (`@sha256:…`).
    pub fn pinned(&self) -> Option<Sha256> {
        match self {
            Source::Oci { reference, .. } => reference.digest().and_then(|d| Sha256::parse(d).ok()),
            Source::Http { .. } => None,
        }
    }
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP; `*` for all
    /// (Istio's `WASM_INSECURE_REGISTRIES`).
    pub insecure_registries: Vec<String>,
    /// The largest module (and layer) read.
    pub max_module_bytes: u64,
    /// For the whole fetch of one module.
    pub timeout: Duration,
}

/// A fetched, verified module.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The manifest digest for an image (what a WasmPlugin's `sha256`
    /// names), the module's own for a file.
    pub digest: Sha256,
    pub module: Vec<u8>,
    /// `compat`, `oci` or `http`.
    pub variant: &'static str,
}

/// Fetches and verifies the module `source` names; `expected` is the digest
/// asked for (a WasmPlugin's `sha256`, or the reference's own).
pub async fn fetch(
    source: &Source,
    expected: Option<Sha256>,
    auth: &RegistryAuth,
    options: &FetchOptions,
) -> Result<Fetched, WasmError> {
    let url = source.url().to_string();
    let work = async {
        match source {
            Source::Oci { reference, .. } => {
                fetch_image(&url, reference, expected, auth, options).await
            }
            Source::Http { url } => fetch_file(url, expected, options).await,
        }
    };
    match tokio::time::timeout(options.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(WasmError::Unavailable {
            url,
            reason: format!("no answer within {:?}", options.timeout),
        }),
    }
}

fn client(options: &FetchOptions) -> Client {
    super::ensure_crypto_provider();
    let protocol = if options.insecure_registries.iter().any(|r| r == "*") {
        ClientProtocol::Http
    } else {
        ClientProtocol::HttpsExcept(options.insecure_registries.clone())
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(options.timeout),
        // An index is not a Wasm image: refuse it rather than pick a
        // platform.
        platform_resolver: None,
        user_agent: concat!("meshvm-agent/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
}

/// Classifies the registry client's errors: unreachable or failing servers
/// may be stood in for by the cache; answers are verdicts.
fn registry_error(url: &str, error: OciDistributionError) -> WasmError {
    let reason = error.to_string();
    let unavailable = match &error {
        OciDistributionError::RequestError(e) => {
            e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        OciDistributionError::IoError(_) => true,
        _ => false,
    };
    if unavailable {
        WasmError::Unavailable {
            url: url.to_string(),
            reason,
        }
    } else {
        WasmError::Refused {
            url: url.to_string(),
            reason,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: i64,
}

async fn fetch_image(
    url: &str,
    reference: &Reference,
    expected: Option<Sha256>,
    auth: &RegistryAuth,
    options: &FetchOptions,
) -> Result<Fetched, WasmError> {
    let client = client(options);
    let (raw, _) = client
        .pull_manifest_raw(reference, auth, &[OCI_MANIFEST, DOCKER_MANIFEST])
        .await
        .map_err(|e| registry_error(url, e))?;
    if raw.len() > MAX_MANIFEST_BYTES {
        return Err(WasmError::TooLarge {
            url: url.to_string(),
            what: format!("the manifest ({} bytes)", raw.len()),
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    let digest = Sha256::of(&raw);
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(WasmError::DigestMismatch {
            url: url.to_string(),
            what: "the image's manifest digest",
            expected,
            actual: digest,
        });
    }
    let manifest: Manifest = serde_json::from_slice(&raw).map_err(|e| WasmError::Manifest {
        url: url.to_string(),
        reason: format!("not a manifest: {e}"),
    })?;
    let (layer, variant) = choose_layer(url, &manifest)?;
    let blob = pull_layer(url, &client, reference, &layer, options).await?;
    let module = match variant {
        "oci" => blob,
        _ => extract_compat(url, &blob, options.max_module_bytes)?,
    };
    check_module(url, &module, options.max_module_bytes)?;
    Ok(Fetched {
        digest,
        module,
        variant,
    })
}

/// The layer holding the module, and which variant the image is.
fn choose_layer(url: &str, manifest: &Manifest) -> Result<(Descriptor, &'static str), WasmError> {
    let refuse = |reason: String| WasmError::Manifest {
        url: url.to_string(),
        reason,
    };
    if manifest.schema_version != 2 {
        return Err(refuse(format!(
            "schema version {} (expected 2)",
            manifest.schema_version
        )));
    }
    let Some(last) = manifest.layers.last() else {
        return Err(refuse("it has no layers".into()));
    };
    if manifest.media_type.as_deref() == Some(DOCKER_MANIFEST) {
        if last.media_type != DOCKER_TAR_GZIP_LAYER {
            return Err(refuse(format!(
                "a Docker image whose last layer is `{}`, not `{DOCKER_TAR_GZIP_LAYER}`",
                last.media_type
            )));
        }
        return Ok((last.clone(), "compat"));
    }
    if last.media_type == OCI_TAR_GZIP_LAYER {
        return Ok((last.clone(), "compat"));
    }
    if let Some(wasm) = manifest.layers.iter().find(|l| l.media_type == WASM_LAYER) {
        return Ok((wasm.clone(), "oci"));
    }
    let types: Vec<&str> = manifest
        .layers
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    Err(refuse(format!(
        "no layer of a type Istio accepts (layers: {}; expected a last layer `{OCI_TAR_GZIP_LAYER}` \
         holding {COMPAT_FILE}, or a `{WASM_LAYER}` layer)",
        types.join(", ")
    )))
}

/// Downloads one layer, refusing it past the limit and checking its digest.
async fn pull_layer(
    url: &str,
    client: &Client,
    reference: &Reference,
    layer: &Descriptor,
    options: &FetchOptions,
) -> Result<Vec<u8>, WasmError> {
    let limit = options.max_module_bytes;
    let too_large = |what: String| WasmError::TooLarge {
        url: url.to_string(),
        what,
        limit,
    };
    let expected = Sha256::parse(&layer.digest).map_err(|e| WasmError::Manifest {
        url: url.to_string(),
        reason: format!("layer digest: {e}"),
    })?;
    if layer.size < 0 {
        return Err(WasmError::Manifest {
            url: url.to_string(),
            reason: format!("layer {} has a negative size", layer.digest),
        });
    }
    if layer.size as u64 > limit {
        return Err(too_large(format!(
            "layer {} ({} bytes, as the manifest says)",
            layer.digest, layer.size
        )));
    }
    let descriptor = OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
        ..Default::default()
    };
    let mut stream = client
        .pull_blob_stream(reference, &descriptor)
        .await
        .map_err(|e| registry_error(url, e))?;
    let mut hasher = Hasher::new();
    let mut blob = Vec::with_capacity(layer.size as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            // The client's own digest check fails the stream's last read.
            if e.to_string().contains("digest") {
                WasmError::Layer {
                    url: url.to_string(),
                    reason: format!("layer {}: {e}", layer.digest),
                }
            } else {
                WasmError::Unavailable {
                    url: url.to_string(),
                    reason: format!("reading layer {}: {e}", layer.digest),
                }
            }
        })?;
        if (blob.len() + chunk.len()) as u64 > limit.min(layer.size as u64) {
            return Err(too_large(format!(
                "layer {} (more bytes than the {} the manifest says)",
                layer.digest, layer.size
            )));
        }
        hasher.update(&chunk);
        blob.extend_from_slice(&chunk);
    }
    let actual = hasher.finish();
    if actual != expected {
        return Err(WasmError::DigestMismatch {
            url: url.to_string(),
            what: "the layer's content digest",
            expected,
            actual,
        });
    }
    Ok(blob)
}

/// `plugin.wasm` from a tar+gzip layer, reading at most `limit` bytes of it.
fn extract_compat(url: &str, layer: &[u8], limit: u64) -> Result<Vec<u8>, WasmError> {
    let bad = |reason: String| WasmError::Layer {
        url: url.to_string(),
        reason,
    };
    let gunzip = flate2::read::GzDecoder::new(layer);
    let mut archive = tar::Archive::new(gunzip);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar+gzip layer: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar+gzip layer: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("a tar entry: {e}")))?
            .into_owned();
        if path.file_name().and_then(|n| n.to_str()) != Some(COMPAT_FILE)
            || !entry.header().entry_type().is_file()
        {
            continue;
        }
        if entry.size() > limit {
            return Err(WasmError::TooLarge {
                url: url.to_string(),
                what: format!("{COMPAT_FILE} ({} bytes)", entry.size()),
                limit,
            });
        }
        let mut module = Vec::with_capacity(entry.size() as usize);
        (&mut entry)
            .take(limit + 1)
            .read_to_end(&mut module)
            .map_err(|e| bad(format!("reading {COMPAT_FILE}: {e}")))?;
        return Ok(module);
    }
    Err(bad(format!("the tar+gzip layer holds no {COMPAT_FILE}")))
}

/// A module over http(s); `expected` is the sha256 of the file itself.
async fn fetch_file(
    url: &str,
    expected: Option<Sha256>,
    options: &FetchOptions,
) -> Result<Fetched, WasmError> {
    super::ensure_crypto_provider();
    let unavailable = |reason: String| WasmError::Unavailable {
        url: url.to_string(),
        reason,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("meshvm-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| unavailable(e.to_string()))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let status = response.status();
    if status.is_server_error() {
        return Err(unavailable(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(WasmError::Refused {
            url: url.to_string(),
            reason: format!("HTTP {status}"),
        });
    }
    let limit = options.max_module_bytes;
    if let Some(length) = response.content_length()
        && length > limit
    {
        return Err(WasmError::TooLarge {
            url: url.to_string(),
            what: format!("the file ({length} bytes)"),
            limit,
        });
    }
    let mut stream = response.bytes_stream();
    let mut module = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| unavailable(e.to_string()))?;
        if (module.len() + chunk.len()) as u64 > limit {
            return Err(WasmError::TooLarge {
                url: url.to_string(),
                what: "the file".into(),
                limit,
            });
        }
        module.extend_from_slice(&chunk);
    }
    let digest = Sha256::of(&module);
    if let Some(expected) = expected
        && expected != digest
    {
        return Err(WasmError::DigestMismatch {
            url: url.to_string(),
            what: "the file's digest",
            expected,
            actual: digest,
        });
    }
    check_module(url, &module, limit)?;
    Ok(Fetched {
        digest,
        module,
        variant: "http",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = Source::parse("oci://127.0.0.1:5000/meshvm/filter:v1").unwrap();
        assert_eq!(s.repository(), "127.0.0.1:5000/meshvm/filter");
        assert_eq!(s.tag().as_deref(), Some("v1"));
        assert_eq!(s.pinned(), None);
        let d = Sha256::of(b"x");
        let s = Source::parse(&format!("registry.example/f@{d}")).unwrap();
        assert!(matches!(s, Source::Oci { .. }));
        assert_eq!(s.tag(), None);
        assert_eq!(s.pinned(), Some(d));
        assert_eq!(
            Source::parse("oci://example.com/f")
                .unwrap()
                .tag()
                .as_deref(),
            Some("latest")
        );
        assert!(matches!(
            Source::parse("https://example.com/f.wasm").unwrap(),
            Source::Http { .. }
        ));
        for (url, reason) in [
            ("ftp://x/y", "unsupported scheme `ftp`"),
            ("oci://", "no image reference"),
            ("oci://Bad Name/x", "not an image reference"),
        ] {
            let e = Source::parse(url).unwrap_err().to_string();
            assert!(e.contains(reason), "{url}: {e}");
        }
    }

    fn manifest(media_type: Option<&str>, layers: &[&str]) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: media_type.map(str::to_string),
            layers: layers
                .iter()
                .map(|t| Descriptor {
                    media_type: t.to_string(),
                    digest: Sha256::of(t.as_bytes()).to_string(),
                    size: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn layers_are_chosen_as_istio_does() {
        let pick = |m: &Manifest| choose_layer("u", m).map(|(l, v)| (l.media_type, v));
        assert_eq!(
            pick(&manifest(Some(OCI_MANIFEST), &["x", OCI_TAR_GZIP_LAYER])).unwrap(),
            (OCI_TAR_GZIP_LAYER.into(), "compat")
        );
        assert_eq!(
            pick(&manifest(None, &[WASM_CONFIG, WASM_LAYER])).unwrap(),
            (WASM_LAYER.into(), "oci")
        );
        assert_eq!(
            pick(&manifest(Some(DOCKER_MANIFEST), &[DOCKER_TAR_GZIP_LAYER])).unwrap(),
            (DOCKER_TAR_GZIP_LAYER.into(), "compat")
        );
        let e = pick(&manifest(Some(DOCKER_MANIFEST), &[WASM_LAYER])).unwrap_err();
        assert!(
            e.to_string().contains("Docker image whose last layer"),
            "{e}"
        );
        // oci-client's and oci-wasm's Wasm types are not Istio's.
        let e = pick(&manifest(
            None,
            &["application/vnd.wasm.content.layer.v1+wasm"],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no layer of a type Istio accepts")
                && e.contains("application/vnd.wasm.content.layer.v1+wasm"),
            "{e}"
        );
        assert!(
            pick(&manifest(None, &[]))
                .unwrap_err()
                .to_string()
                .contains("no layers")
        );
    }

    fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn compat_layers_give_up_plugin_wasm() {
        let module = b"\0asm\x01\0\0\0rest";
        let layer = tar_gz(&[("README", b"hi"), ("plugin.wasm", module)]);
        assert_eq!(extract_compat("u", &layer, 1 << 20).unwrap(), module);
        let e = extract_compat("u", &tar_gz(&[("other.wasm", module)]), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("holds no plugin.wasm"), "{e}");
        let e = extract_compat("u", b"not gzip at all", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not a tar+gzip layer"), "{e}");
        let e = extract_compat("u", &layer, 4).unwrap_err();
        assert!(e.to_string().contains("larger than the limit of 4"), "{e}");
    }
}
