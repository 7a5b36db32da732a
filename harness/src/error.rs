//! Errors of the harness.

use std::path::PathBuf;

/// Everything that can go wrong while loading or driving a proxy-wasm module.
///
/// A guest trap is an error, never a host panic, and it marks the VM failed
/// (later calls give [`HarnessError::VmFailed`]), mirroring Envoy's fail-closed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The `.wasm` file could not be read.
    #[error("cannot read wasm module {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid module, or its imports cannot be linked.
    #[error("cannot load wasm module: {0}")]
    Load(String),
    /// The module could not be instantiated (e.g. an import signature differs from the ABI).
    #[error("cannot instantiate wasm module: {0}")]
    Instantiate(String),
    /// The module lacks an export the ABI requires (`memory`, `proxy_abi_version_0_2_1`).
    #[error("wasm module does not export `{0}`")]
    MissingExport(String),
    /// An export the host calls has a signature that differs from the ABI.
    #[error("wasm export `{name}` has the wrong signature: {reason}")]
    BadExport {
        /// The export's name.
        name: String,
        /// What wasmtime said.
        reason: String,
    },
    /// The guest trapped (a Rust panic with `panic = "abort"` ends in `unreachable`).
    #[error("guest trapped in {context}: {message}")]
    Trap {
        /// The callback the host was in, e.g. `proxy_on_request_headers(context 2)`.
        context: String,
        /// The trap reason followed by what the guest wrote to stderr during the
        /// call (the panic message, if any).
        message: String,
    },
    /// An earlier trap marked this VM failed; Envoy would not call it again.
    #[error("the VM failed earlier and accepts no more calls")]
    VmFailed,
    /// A test answered an HTTP call that is unknown or was already answered.
    #[error("no pending HTTP call with token {0}")]
    UnknownHttpCall(u32),
    /// A test addressed a context id that does not exist (or is of the wrong kind).
    #[error("no {kind} context with id {id}")]
    UnknownContext {
        /// "root" or "HTTP".
        kind: &'static str,
        /// The id that was asked for.
        id: u32,
    },
    /// A test used the API in a way the harness cannot emulate.
    #[error("invalid use of the harness: {0}")]
    Usage(String),
}
