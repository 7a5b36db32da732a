//! meshvm's proxy-wasm HTTP filter.
//!
//! Inbound, it labels each request with the caller's mesh identity, taken
//! from the mTLS peer certificate (never from headers the caller sent).
//! Outbound, it attaches the VM's own Istio peer metadata. Loaded as a
//! singleton service under the root id `meshvm-health`, it probes the app
//! ([`health`]) and reports to the agent. See README.md for the
//! configuration.
//!
//! The pure logic (SPIFFE IDs, peer metadata, configuration) lives in modules
//! that build for any target and are tested natively and under
//! `wasm-bindgen-test`; [`plugin`] holds the proxy-wasm contexts.

extern crate alloc;

pub mod base64;
pub mod config;
pub mod health;
pub mod inbound;
pub mod pairs;
pub mod pbstruct;
pub mod peer_metadata;
pub mod spiffe;

#[cfg(target_os = "wasi")]
mod metrics;
#[cfg(target_os = "wasi")]
mod plugin;

#[cfg(target_os = "wasi")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(plugin::Root::default())
    });
}}
