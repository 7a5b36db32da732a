//! The host functions a proxy-wasm module imports, one module per ABI area.
//!
//! Signatures follow the Rust SDK 0.2.5's `extern "C"` declarations on wasm32:
//! pointers, `usize` and enums are `i32`, `i64`/`u64` values are `i64`, and
//! every `env` function returns a [`crate::abi::Status`] as `i32`.

pub(crate) mod buffers;
pub(crate) mod context;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod http_call;
pub(crate) mod log;
pub(crate) mod metrics;
pub(crate) mod properties;
pub(crate) mod shared;
pub(crate) mod stream;
pub(crate) mod time;
pub(crate) mod wasi;

use wasmtime::Linker;

use crate::state::HostState;

/// The import module of the proxy-wasm ABI.
pub(crate) const ENV: &str = "env";

/// Defines every host function of the ABI and the WASI subset Envoy provides.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::add_to_linker(linker)?;
    time::add_to_linker(linker)?;
    buffers::add_to_linker(linker)?;
    headers::add_to_linker(linker)?;
    properties::add_to_linker(linker)?;
    shared::add_to_linker(linker)?;
    stream::add_to_linker(linker)?;
    http_call::add_to_linker(linker)?;
    grpc::add_to_linker(linker)?;
    metrics::add_to_linker(linker)?;
    context::add_to_linker(linker)?;
    wasi::add_to_linker(linker)?;
    Ok(())
}
