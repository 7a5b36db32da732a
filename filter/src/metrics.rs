//! The filter's counters, defined once per Wasm VM.
//!
//! Envoy exposes them under the `wasmcustom.` stat prefix (Prometheus output
//! strips it), e.g. `wasmcustom.meshvm.inbound.requests_labeled`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::sync::OnceLock;

/// One of the filter's counters.
#[derive(Debug, Clone, Copy)]
pub enum Counter {
    /// Inbound requests labeled with an authenticated peer identity.
    InboundLabeled,
    /// Inbound requests without a usable peer identity (plaintext, no SAN, not SPIFFE).
    PeerIdentityMissing,
    /// Inbound peer metadata headers that could not be used.
    PeerMetadataMalformed,
    /// Incoming identity headers removed because only the filter may set them.
    SpoofedHeadersRemoved,
    /// Outbound requests that carried our peer metadata.
    OutboundLabeled,
}

const NAMES: [&str; 5] = [
    "meshvm.inbound.requests_labeled",
    "meshvm.inbound.peer_identity_missing",
    "meshvm.inbound.peer_metadata_malformed",
    "meshvm.inbound.spoofed_headers_removed",
    "meshvm.outbound.requests_labeled",
];

static IDS: OnceLock<[Option<u32>; 5]> = OnceLock::new();

fn ids() -> &'static [Option<u32>; 5] {
    IDS.get_or_init(|| NAMES.map(|name| hostcalls::define_metric(MetricType::Counter, name).ok()))
}

/// Defines every counter now, so they show up in Envoy's stats at zero.
pub fn define_all() {
    ids();
}

/// Adds `by` to a counter; failures to reach the host are ignored.
pub fn add(counter: Counter, by: i64) {
    if let Some(id) = ids()[counter as usize] {
        let _ = hostcalls::increment_metric(id, by);
    }
}
