//! What the host records about a guest's requests, for tests to assert on.

use std::time::Duration;

use crate::abi::LogLevel;

/// One `proxy_log` message (or one WASI stdout/stderr write, logged at Info/Error
/// as Envoy does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The level the guest logged at.
    pub level: LogLevel,
    /// The message, lossily decoded as UTF-8.
    pub message: String,
}

/// An outgoing `proxy_http_call` (the SDK's `dispatch_http_call`) that the host accepted.
///
/// Exists so tests can check what the filter asked for and answer it with
/// `Plugin::respond_to_http_call` or `Plugin::fail_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// The token the guest got back; pass it to `respond_to_http_call`.
    pub token: u32,
    /// The upstream cluster.
    pub cluster: String,
    /// The request headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// The request trailers.
    pub trailers: Vec<(String, String)>,
    /// The timeout; zero means none (as in Envoy).
    pub timeout: Duration,
    /// The context that was effective when the call was made.
    pub context_id: u32,
}

/// An outgoing `proxy_grpc_call` or `proxy_grpc_stream`. The harness records
/// them but never answers (no gRPC emulation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    /// The token the guest got back.
    pub token: u32,
    /// The cluster (or serialized `GrpcService`) the guest named.
    pub service: Vec<u8>,
    /// The gRPC service name.
    pub service_name: String,
    /// The gRPC method name.
    pub method: String,
    /// Initial metadata.
    pub initial_metadata: Vec<(String, String)>,
    /// The request message (empty for streams).
    pub message: Vec<u8>,
    /// The timeout (zero for streams).
    pub timeout: Duration,
    /// Whether this is a stream (`proxy_grpc_stream`) rather than a unary call.
    pub stream: bool,
    /// Messages sent on the stream with `proxy_grpc_send`.
    pub sent: Vec<Vec<u8>>,
    /// Whether the guest cancelled or closed it.
    pub closed: bool,
}

/// A `proxy_send_local_response` (the SDK's `send_http_response`) recorded on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Envoy's response code details string.
    pub details: String,
    /// The body.
    pub body: Vec<u8>,
    /// Additional headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// gRPC status; -1 means none (the SDK's default).
    pub grpc_status: i32,
}

impl LocalResponse {
    /// First value of a header of the local response.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A `proxy_call_foreign_function` call. The harness knows no foreign functions
/// and answers NotFound, like an Envoy without that extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCall {
    /// Function name.
    pub name: String,
    /// Argument bytes.
    pub arguments: Vec<u8>,
}
