//! Per-VM host state: the `T` of each VM's `wasmtime::Store<HostState>`.
//!
//! Every VM owns its state, so tests run in parallel without global locks; only
//! shared data, queues and the clock live in the Harness-wide [`SharedState`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Memory, TypedFunc};

use crate::abi::{LogLevel, StreamType};
use crate::header_map::HeaderMap;
use crate::host::metrics::Metrics;
use crate::property::{self, PropertyMap};
use crate::records::{ForeignCall, GrpcCall, HttpCall, LocalResponse, LogEntry};
use crate::shared::SharedState;

/// Default stream properties every HTTP stream starts with (before the test's own),
/// because Envoy always knows them for a downstream connection.
pub(crate) fn default_stream_properties(context_id: u32) -> PropertyMap {
    let mut props = PropertyMap::default();
    let set = |props: &mut PropertyMap, path: &[&str], value: Vec<u8>| {
        props.set(property::owned_path(path), value);
    };
    set(
        &mut props,
        &["source", "address"],
        property::string("127.0.0.1:52000"),
    );
    set(&mut props, &["source", "port"], property::int(52000));
    set(
        &mut props,
        &["destination", "address"],
        property::string("127.0.0.1:8080"),
    );
    set(&mut props, &["destination", "port"], property::int(8080));
    set(&mut props, &["connection", "mtls"], property::bool(false));
    set(
        &mut props,
        &["connection", "id"],
        property::uint(u64::from(context_id)),
    );
    props
}

/// The state of a VM, reachable from every host function through `Caller::data`.
pub(crate) struct HostState {
    pub(crate) shared: Arc<SharedState>,
    pub(crate) instance_id: u64,
    pub(crate) vm_id: String,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) clusters: BTreeSet<String>,
    /// VM-level properties (node metadata, `plugin_vm_id`, test-provided ones).
    pub(crate) properties: PropertyMap,
    pub(crate) contexts: BTreeMap<u32, Context>,
    /// The context the host called into; `proxy_set_effective_context` changes
    /// `effective_context` only.
    pub(crate) current_context: u32,
    pub(crate) effective_context: u32,
    pub(crate) log_level: LogLevel,
    pub(crate) echo_logs: bool,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) metrics: Metrics,
    pub(crate) http_calls: Vec<HttpCall>,
    /// Token → root context that receives `proxy_on_http_call_response`.
    pub(crate) pending_http_calls: BTreeMap<u32, u32>,
    pub(crate) last_http_token: u32,
    /// Set only while `proxy_on_http_call_response` runs, as in Envoy.
    pub(crate) http_call_response: Option<CallResponse>,
    /// What `proxy_get_status` reports during a callback (None: code 0, no message).
    pub(crate) call_status: Option<(u32, String)>,
    pub(crate) grpc_calls: Vec<GrpcCall>,
    pub(crate) last_grpc_token: u32,
    pub(crate) foreign_calls: Vec<ForeignCall>,
    /// The root whose plugin configuration is readable (during vm_start/configure).
    pub(crate) plugin_config_visible: Option<u32>,
    pub(crate) memory: Option<Memory>,
    pub(crate) allocator: Option<TypedFunc<i32, i32>>,
    pub(crate) rng: u64,
    pub(crate) done_calls: u32,
}

/// Response of an HTTP call, visible to the guest during the callback only.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallResponse {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: HeaderMap,
}

/// A context known to the host.
pub(crate) enum Context {
    Root(RootState),
    Http(Box<StreamState>),
}

/// A root context (one per plugin / `root_id` in Envoy).
#[derive(Debug, Clone, Default)]
pub(crate) struct RootState {
    pub(crate) configuration: Vec<u8>,
    /// `plugin_root_id` and `plugin_name`.
    pub(crate) properties: PropertyMap,
    pub(crate) tick_period: Option<Duration>,
    pub(crate) next_tick_nanos: Option<u64>,
    pub(crate) vm_started: bool,
    pub(crate) configured: bool,
}

/// Which of a stream's maps and buffers the guest may touch right now.
///
/// Envoy hands the filter a map only during its callback, or while the filter
/// keeps the stream paused; after `Continue` (or `proxy_continue_stream`) the
/// map is gone and the ABI answers BadArgument. In `proxy_on_log` request and
/// response headers are readable but not writable.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Access {
    pub(crate) request_headers: bool,
    pub(crate) request_body: bool,
    pub(crate) request_trailers: bool,
    pub(crate) response_headers: bool,
    pub(crate) response_body: bool,
    pub(crate) response_trailers: bool,
    pub(crate) log_phase: bool,
}

/// An HTTP stream context.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamState {
    pub(crate) root: u32,
    pub(crate) properties: PropertyMap,
    pub(crate) request_headers: Option<HeaderMap>,
    pub(crate) request_trailers: Option<HeaderMap>,
    pub(crate) response_headers: Option<HeaderMap>,
    pub(crate) response_trailers: Option<HeaderMap>,
    /// The body chunk(s) the filter currently sees (buffered while paused).
    pub(crate) request_body: Vec<u8>,
    /// Body bytes the filter let through.
    pub(crate) request_body_sent: Vec<u8>,
    pub(crate) response_body: Vec<u8>,
    pub(crate) response_body_sent: Vec<u8>,
    pub(crate) request_end_of_stream: bool,
    pub(crate) response_end_of_stream: bool,
    pub(crate) access: Access,
    pub(crate) local_response: Option<LocalResponse>,
    /// Set when the guest sent a local response during the running callback:
    /// Envoy then stops iteration whatever the callback returns.
    pub(crate) local_response_in_call: bool,
    pub(crate) continued: Vec<StreamType>,
    pub(crate) closed: Vec<StreamType>,
    pub(crate) properties_set: Vec<(Vec<String>, Vec<u8>)>,
}

impl StreamState {
    pub(crate) fn new(root: u32, properties: PropertyMap) -> Self {
        Self {
            root,
            properties,
            ..Self::default()
        }
    }

    /// Attributes Envoy derives from the headers (`request.path`, `response.code`, ...).
    pub(crate) fn derived_property(&self, path: &[String]) -> Option<Vec<u8>> {
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        let req = self.request_headers.as_ref();
        let header =
            |map: Option<&HeaderMap>, name: &str| map?.get(name.as_bytes()).map(<[u8]>::to_vec);
        match segments.as_slice() {
            ["request", "path"] => header(req, ":path"),
            ["request", "url_path"] => header(req, ":path").map(|p| {
                let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
                p[..end].to_vec()
            }),
            ["request", "host"] => header(req, ":authority"),
            ["request", "method"] => header(req, ":method"),
            ["request", "scheme"] => header(req, ":scheme"),
            ["request", "id"] => header(req, "x-request-id"),
            ["request", "useragent"] => header(req, "user-agent"),
            ["request", "referer"] => header(req, "referer"),
            ["request", "headers"] => req.map(HeaderMap::encode),
            ["request", "headers", name] => header(req, name),
            ["response", "code"] => {
                let status = header(self.response_headers.as_ref(), ":status")?;
                let code: i64 = std::str::from_utf8(&status).ok()?.parse().ok()?;
                Some(property::int(code))
            }
            ["response", "headers"] => self.response_headers.as_ref().map(HeaderMap::encode),
            ["response", "headers", name] => header(self.response_headers.as_ref(), name),
            _ => None,
        }
    }
}

impl HostState {
    /// The effective context's stream, if it is an HTTP stream.
    pub(crate) fn effective_stream(&self) -> Option<&StreamState> {
        match self.contexts.get(&self.effective_context) {
            Some(Context::Http(s)) => Some(s),
            _ => None,
        }
    }

    /// Mutable access to the effective context's stream.
    pub(crate) fn effective_stream_mut(&mut self) -> Option<&mut StreamState> {
        match self.contexts.get_mut(&self.effective_context) {
            Some(Context::Http(s)) => Some(s),
            _ => None,
        }
    }

    /// The root context a context belongs to (itself for a root).
    pub(crate) fn root_of(&self, context_id: u32) -> Option<u32> {
        match self.contexts.get(&context_id)? {
            Context::Root(_) => Some(context_id),
            Context::Http(s) => Some(s.root),
        }
    }

    pub(crate) fn root_mut(&mut self, context_id: u32) -> Option<&mut RootState> {
        match self.contexts.get_mut(&context_id) {
            Some(Context::Root(r)) => Some(r),
            _ => None,
        }
    }

    /// Property lookup for the effective context: the stream's own properties,
    /// then what Envoy derives from its headers, then the root's (`plugin_root_id`,
    /// `plugin_name`), then the VM's.
    pub(crate) fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        self.property_in(self.effective_context, path)
    }

    /// Property lookup as seen from `context_id`.
    pub(crate) fn property_in(&self, context_id: u32, path: &[String]) -> Option<Vec<u8>> {
        let mut root = context_id;
        if let Some(Context::Http(stream)) = self.contexts.get(&context_id) {
            if let Some(v) = stream.properties.get(path) {
                return Some(v);
            }
            if let Some(v) = stream.derived_property(path) {
                return Some(v);
            }
            root = stream.root;
        }
        if let Some(Context::Root(r)) = self.contexts.get(&root)
            && let Some(v) = r.properties.get(path)
        {
            return Some(v);
        }
        self.properties.get(path)
    }

    /// `proxy_set_property`: into the effective stream, or the VM when no stream is effective.
    pub(crate) fn set_property(&mut self, path: Vec<String>, value: Vec<u8>) {
        if let Some(stream) = self.effective_stream_mut() {
            stream.properties_set.push((path.clone(), value.clone()));
            stream.properties.set(path, value);
        } else {
            self.properties.set(path, value);
        }
    }

    /// Captures a log message if it passes the VM's log level.
    pub(crate) fn log(&mut self, level: LogLevel, message: String) {
        if level < self.log_level {
            return;
        }
        if self.echo_logs {
            let vm = if self.vm_id.is_empty() {
                "-"
            } else {
                &self.vm_id
            };
            eprintln!(
                "[wasm vm={vm} ctx={} {level:?}] {message}",
                self.effective_context
            );
        }
        self.logs.push(LogEntry { level, message });
    }

    /// Deterministic pseudo-random bytes for WASI `random_get` (xorshift64*), so
    /// test runs are reproducible.
    pub(crate) fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_request_and_response_properties() {
        let mut s = StreamState::new(1, PropertyMap::default());
        s.request_headers = Some(HeaderMap::from_pairs(&[
            (":path", "/a/b?x=1"),
            (":method", "GET"),
            (":authority", "svc"),
            ("x-request-id", "r1"),
        ]));
        s.response_headers = Some(HeaderMap::from_pairs(&[(":status", "503")]));
        let p = |xs: &[&str]| property::owned_path(xs);
        assert_eq!(
            s.derived_property(&p(&["request", "path"])),
            Some(b"/a/b?x=1".to_vec())
        );
        assert_eq!(
            s.derived_property(&p(&["request", "url_path"])),
            Some(b"/a/b".to_vec())
        );
        assert_eq!(
            s.derived_property(&p(&["request", "host"])),
            Some(b"svc".to_vec())
        );
        assert_eq!(
            s.derived_property(&p(&["request", "id"])),
            Some(b"r1".to_vec())
        );
        assert_eq!(
            s.derived_property(&p(&["request", "headers", ":method"])),
            Some(b"GET".to_vec())
        );
        assert_eq!(
            s.derived_property(&p(&["response", "code"])),
            Some(property::int(503))
        );
        assert_eq!(s.derived_property(&p(&["request", "nope"])), None);
    }
}
