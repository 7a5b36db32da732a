//! `meshvm-harness`: a proxy-wasm ABI v0.2.1 host on wasmtime for testing
//! proxy-wasm filters without Envoy.
//!
//! It loads any proxy-wasm module (built for `wasm32-wasip1` with the Rust SDK
//! 0.2.5, or `wasm32-unknown-unknown`), calls it the way Envoy does and
//! emulates what Envoy provides: properties, header maps, buffers, shared data
//! with CAS, shared queues, HTTP calls to known clusters, metrics, logs, a fake
//! clock with tick timers, and the WASI subset Envoy implements.
//!
//! ```no_run
//! use meshvm_harness::{Harness, HttpRequest};
//!
//! let harness = Harness::load("target/wasm32-wasip1/release/filter.wasm")?;
//! let mut plugin = harness
//!     .plugin()
//!     .root_id("filter")
//!     .configuration(r#"{"header":"x-identity"}"#)
//!     .node_metadata("NAME", "vm-1")
//!     .start()?;
//! let exchange = plugin.http_request(
//!     HttpRequest::get("/api").mtls_peer("spiffe://cluster.local/ns/a/sa/b"),
//! )?;
//! assert!(exchange.request_header("x-identity").is_some());
//! # Ok::<(), meshvm_harness::HarnessError>(())
//! ```
//!
//! Each [`Plugin`] owns its own `wasmtime::Store`, so tests run in parallel;
//! VMs started from one [`Harness`] share its compiled module, shared data,
//! queues and clock, like VMs inside one Envoy process.

#![warn(missing_docs)]

pub mod abi;
mod clock;
mod error;
mod harness;
mod header_map;
mod host;
mod memory;
mod pairs;
mod plugin;
pub mod property;
mod records;
mod request;
mod shared;
mod state;
mod stream;

pub use abi::{Action, LogLevel};
pub use clock::{Clock, START_NANOS};
pub use error::HarnessError;
pub use harness::{Harness, PluginBuilder};
pub use pairs::{decode_pairs, encode_pairs};
pub use plugin::Plugin;
pub use records::{ForeignCall, GrpcCall, HttpCall, LocalResponse, LogEntry};
pub use request::{HttpExchange, HttpRequest};
pub use stream::HttpStream;
