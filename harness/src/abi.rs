//! Numeric constants of the proxy-wasm ABI v0.2.1 and the WASI errno values the
//! host returns.
//!
//! The values match the Rust SDK 0.2.5 (`proxy_wasm::types`) and
//! proxy-wasm-cpp-host's `WasmResult`, so a guest sees exactly the numbers
//! Envoy would give it.

/// Result code of every `env` host call (`WasmResult` in proxy-wasm-cpp-host).
///
/// The SDK only knows a subset and panics on the others, which is why the host
/// is careful to return the same codes Envoy returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The call succeeded.
    Ok = 0,
    /// The key, property, queue, metric or value does not exist.
    NotFound = 1,
    /// An argument is invalid (unknown cluster, unavailable header map, ...).
    BadArgument = 2,
    /// A value could not be serialized.
    SerializationFailure = 3,
    /// A value could not be parsed.
    ParseFailure = 4,
    /// An expression is invalid.
    BadExpression = 5,
    /// A guest pointer or length is outside the guest's memory.
    InvalidMemoryAccess = 6,
    /// A queue is empty.
    Empty = 7,
    /// Shared data was modified since the caller read its CAS value.
    CasMismatch = 8,
    /// A result does not match.
    ResultMismatch = 9,
    /// The host failed internally.
    InternalFailure = 10,
    /// A connection is broken.
    BrokenConnection = 11,
    /// The call is not implemented by this host.
    Unimplemented = 12,
}

impl Status {
    /// The value returned to the guest.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Header maps addressed by `proxy_*_header_map_*` (`MapType` in the SDK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapType {
    /// Headers of the downstream request.
    HttpRequestHeaders,
    /// Trailers of the downstream request.
    HttpRequestTrailers,
    /// Headers of the upstream response.
    HttpResponseHeaders,
    /// Trailers of the upstream response.
    HttpResponseTrailers,
    /// gRPC initial metadata received by a gRPC call.
    GrpcReceiveInitialMetadata,
    /// gRPC trailing metadata received by a gRPC call.
    GrpcReceiveTrailingMetadata,
    /// Headers of an `proxy_http_call` response.
    HttpCallResponseHeaders,
    /// Trailers of an `proxy_http_call` response.
    HttpCallResponseTrailers,
}

impl MapType {
    /// Decodes the guest's number; `None` for values above the ABI's maximum.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::HttpRequestHeaders,
            1 => Self::HttpRequestTrailers,
            2 => Self::HttpResponseHeaders,
            3 => Self::HttpResponseTrailers,
            4 => Self::GrpcReceiveInitialMetadata,
            5 => Self::GrpcReceiveTrailingMetadata,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffers addressed by `proxy_*_buffer_*` (`BufferType` in the SDK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferType {
    /// Body of the downstream request.
    HttpRequestBody,
    /// Body of the upstream response.
    HttpResponseBody,
    /// L4 downstream data.
    DownstreamData,
    /// L4 upstream data.
    UpstreamData,
    /// Body of an `proxy_http_call` response.
    HttpCallResponseBody,
    /// Message received by a gRPC call.
    GrpcReceiveBuffer,
    /// The VM configuration (`vm_config.configuration`).
    VmConfiguration,
    /// The plugin configuration (`config.configuration`).
    PluginConfiguration,
    /// Arguments of a foreign function call.
    CallData,
}

impl BufferType {
    /// Decodes the guest's number; `None` for values above the ABI's maximum.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::HttpRequestBody,
            1 => Self::HttpResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::HttpCallResponseBody,
            5 => Self::GrpcReceiveBuffer,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::CallData,
            _ => return None,
        })
    }
}

/// Streams addressed by `proxy_continue_stream` / `proxy_close_stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    /// The HTTP request direction (`resume_http_request`, `reset_http_request`).
    HttpRequest,
    /// The HTTP response direction.
    HttpResponse,
    /// L4 downstream connection.
    Downstream,
    /// L4 upstream connection.
    Upstream,
}

impl StreamType {
    /// Decodes the guest's number; `None` for unknown values.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::HttpRequest,
            1 => Self::HttpResponse,
            2 => Self::Downstream,
            3 => Self::Upstream,
            _ => return None,
        })
    }
}

/// Metric kinds of `proxy_define_metric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// Monotonic counter.
    Counter,
    /// Gauge that can go up and down or be set.
    Gauge,
    /// Histogram of recorded values.
    Histogram,
}

impl MetricType {
    /// Decodes the guest's number; `None` for unknown values.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }

    /// The ABI number, also stored in the low two bits of a metric id (as Envoy does).
    pub fn code(self) -> u32 {
        match self {
            Self::Counter => 0,
            Self::Gauge => 1,
            Self::Histogram => 2,
        }
    }
}

/// Log levels of `proxy_log` / `proxy_get_log_level`, ordered from the most verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum LogLevel {
    /// Most verbose; the default level so that tests see everything.
    #[default]
    Trace,
    /// Debug messages.
    Debug,
    /// Informational messages (WASI stdout lands here, like in Envoy).
    Info,
    /// Warnings.
    Warn,
    /// Errors (WASI stderr, e.g. Rust panic messages, lands here, like in Envoy).
    Error,
    /// Critical errors.
    Critical,
}

impl LogLevel {
    /// Decodes the guest's number; `None` for unknown values.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }

    /// The ABI number.
    pub fn code(self) -> u32 {
        match self {
            Self::Trace => 0,
            Self::Debug => 1,
            Self::Info => 2,
            Self::Warn => 3,
            Self::Error => 4,
            Self::Critical => 5,
        }
    }
}

/// What an HTTP callback asked the host to do with the stream.
///
/// Guests return `Continue` (0) or `Pause` (1); any other non-zero value (the
/// C++ SDK's `StopAllIteration*`) is reported as `Pause` too, because Envoy stops
/// iteration for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the stream go on to the next filter.
    Continue,
    /// Stop iteration until the filter resumes (or replies locally).
    Pause,
}

impl Action {
    /// Decodes the guest's return value.
    pub fn from_raw(raw: i32) -> Self {
        if raw == 0 {
            Self::Continue
        } else {
            Self::Pause
        }
    }
}

/// WASI `errno` values used by the `wasi_snapshot_preview1` stubs.
pub(crate) mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOENT: i32 = 44;
    pub const NOSYS: i32 = 52;
    pub const NOTSUP: i32 = 58;
    pub const SPIPE: i32 = 70;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_values_and_rejects_others() {
        assert_eq!(MapType::from_raw(6), Some(MapType::HttpCallResponseHeaders));
        assert_eq!(MapType::from_raw(8), None);
        assert_eq!(
            BufferType::from_raw(7),
            Some(BufferType::PluginConfiguration)
        );
        assert_eq!(BufferType::from_raw(-1), None);
        assert_eq!(StreamType::from_raw(1), Some(StreamType::HttpResponse));
        assert_eq!(LogLevel::from_raw(5), Some(LogLevel::Critical));
        assert!(LogLevel::Trace < LogLevel::Error);
        assert_eq!(Action::from_raw(0), Action::Continue);
        assert_eq!(Action::from_raw(4), Action::Pause);
        assert_eq!(Status::CasMismatch.code(), 8);
    }
}
