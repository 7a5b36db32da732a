//! The proxy-wasm contexts: a root context per plugin configuration and an
//! HTTP context per request.
//!
//! Every host call goes through the `Result`-returning `hostcalls` functions:
//! the trait helpers unwrap and would abort the VM on an unexpected status.

use crate::config::{Direction, FilterConfig, HeaderNames};
use crate::health::{
    self, HEALTH_ROOT_ID, HealthConfig, Probe, TRAFFIC_QUEUE, TRAFFIC_VM_ID, Tracker, TrafficWindow,
};
use crate::inbound::{self, MetadataMemo};
use crate::metrics::{self, Counter};
use crate::pairs;
use crate::peer_metadata::{self, NodeMetadata};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// Reads a property, treating any failure as absent.
fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// Reads a node property: `xds.node.*` on Envoy ≥ 1.33, `node.*` before.
fn node_property(path: &[&str]) -> Option<Vec<u8>> {
    let mut xds = vec!["xds", "node"];
    xds.extend_from_slice(path);
    let mut legacy = vec!["node"];
    legacy.extend_from_slice(path);
    property(&xds).or_else(|| property(&legacy))
}

fn node_string(path: &[&str]) -> Option<String> {
    node_property(path).and_then(|b| String::from_utf8(b).ok())
}

/// Reads the VM's own metadata from Envoy's node.
fn read_node_metadata() -> NodeMetadata {
    let fields = peer_metadata::EXCHANGED_KEYS
        .iter()
        .filter_map(|key| Some((key.to_string(), node_string(&["metadata", key])?)))
        .collect();
    let labels = node_property(&["metadata", "LABELS"])
        .and_then(|bytes| pairs::decode(&bytes))
        .unwrap_or_default();
    NodeMetadata { fields, labels }
}

/// Outbound headers, computed once per configuration.
struct OutboundHeaders {
    peer_metadata: String,
    peer_metadata_id: Option<String>,
}

/// Everything a request needs, shared by the root and its HTTP contexts.
struct Plugin {
    config: FilterConfig,
    outbound: Option<OutboundHeaders>,
}

/// One per plugin configuration (Envoy `root_id`): the HTTP filter's, or
/// the health service's.
#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
    health: Option<HealthService>,
}

/// The health service's state (one per Envoy: a singleton).
struct HealthService {
    config: HealthConfig,
    /// The active probe and its thresholds, if there is one.
    probe: Option<(Probe, Tracker)>,
    /// Health from real traffic, if on, and the queue its counts come on.
    traffic: Option<(TrafficWindow, u32)>,
    /// The probe request in flight.
    probing: Option<u32>,
    /// Reports in flight: token → whether it is the traffic verdict (else
    /// the probe's), and the verdict.
    reporting: Vec<(u32, bool, bool)>,
    /// The first round has run (the tick period is the probe period now).
    started: bool,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let Some(health) = self.health.as_mut() else {
            return;
        };
        // No headers: the call failed (timeout, refused, reset); there is
        // no response map to read.
        let status = if headers == 0 {
            None
        } else {
            hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
        };
        if health.probing == Some(token) {
            health.probing = None;
            health.observe_probe(health::outcome(status.as_deref()));
        } else if let Some(i) = health.reporting.iter().position(|(t, _, _)| *t == token) {
            let (_, traffic, verdict) = health.reporting.remove(i);
            if !status.as_deref().is_some_and(|s| s.starts_with('2')) {
                log::warn!(
                    "meshvm: the agent did not take the health report ({}); sent again",
                    status.as_deref().unwrap_or("no response")
                );
                health.forget(traffic, verdict);
            }
        }
    }
}

impl HealthService {
    /// Starts a probe round.
    fn probe(&mut self) {
        let Some((probe, _)) = &self.probe else {
            return;
        };
        if self.probing.is_some() {
            return;
        }
        let headers: Vec<(&str, &str)> = probe
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        match hostcalls::dispatch_http_call(
            &self.config.app_cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(probe.timeout_ms),
        ) {
            Ok(token) => self.probing = Some(token),
            Err(status) => self.observe_probe(Err(format!(
                "HTTP probe not sent to cluster {}: {status:?}",
                self.config.app_cluster
            ))),
        }
    }

    fn observe_probe(&mut self, outcome: Result<(), String>) {
        let Some((_, tracker)) = self.probe.as_mut() else {
            return;
        };
        if let Some(verdict) = tracker.observe(outcome.is_ok()) {
            let source = self.config.source.clone();
            self.report(false, verdict, outcome.err(), &source);
        }
    }

    /// Takes the outcome counts the inbound filters queued, and judges.
    fn drain_traffic(&mut self) {
        let Some((window, queue)) = self.traffic.as_mut() else {
            return;
        };
        let now = now_ms();
        while let Ok(Some(bytes)) = hostcalls::dequeue_shared_queue(*queue) {
            if let Some((ok, failed)) = health::decode_counts(&bytes) {
                window.record(now, ok, failed);
            }
        }
        if let Some((healthy, message)) = window.evaluate(now) {
            let source = window.source().to_string();
            self.report(true, healthy, message, &source);
        }
    }

    fn forget(&mut self, traffic: bool, verdict: bool) {
        if traffic {
            if let Some((window, _)) = self.traffic.as_mut() {
                window.forget();
            }
        } else if let Some((_, tracker)) = self.probe.as_mut() {
            tracker.forget(verdict);
        }
    }

    /// Posts a verdict to the agent.
    fn report(&mut self, traffic: bool, healthy: bool, message: Option<String>, source: &str) {
        log::info!(
            "meshvm: workload {} ({source}){}",
            if healthy { "healthy" } else { "unhealthy" },
            message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
        let body = health::report_body(healthy, message.as_deref(), source);
        let headers = vec![
            (":method", "POST"),
            (":path", health::HEALTH_PATH),
            (":authority", "agent"),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(
            &self.config.agent_cluster,
            headers,
            Some(&body),
            vec![],
            Duration::from_secs(5),
        ) {
            Ok(token) => self.reporting.push((token, traffic, healthy)),
            Err(status) => {
                log::warn!(
                    "meshvm: health report not sent to cluster {}: {status:?}",
                    self.config.agent_cluster
                );
                self.forget(traffic, healthy);
            }
        }
    }
}

/// Milliseconds since the epoch, from the host's clock.
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

impl Root {
    fn configure_health(&mut self, bytes: &[u8]) -> bool {
        let config = match HealthConfig::parse(bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("meshvm: invalid health {e}");
                return false;
            }
        };
        let probe = match config.probe.is_some().then(|| config.probe()) {
            None => None,
            Some(Ok(probe)) => Some(probe),
            Some(Err(e)) => {
                log::error!("meshvm: invalid health {e}");
                return false;
            }
        };
        let traffic = match &config.traffic {
            None => None,
            Some(traffic) => match hostcalls::register_shared_queue(TRAFFIC_QUEUE) {
                Ok(queue) => Some((TrafficWindow::new(traffic.clone()), queue)),
                Err(status) => {
                    log::error!("meshvm: cannot register the traffic queue: {status:?}");
                    return false;
                }
            },
        };
        // The probe's first round after its initial delay, then every
        // period; traffic alone is judged every second.
        let first = match &probe {
            Some(probe) => {
                log::info!(
                    "meshvm: health probe {} every {} ms",
                    probe.headers[1].1,
                    probe.period_ms
                );
                probe.initial_delay_ms.max(1)
            }
            None => 1000,
        };
        if traffic.is_some() {
            log::info!("meshvm: health from inbound traffic on");
        }
        let _ = hostcalls::set_tick_period(Duration::from_millis(first));
        self.health = Some(HealthService {
            probe: probe.map(|p| {
                let tracker = Tracker::new(&p);
                (p, tracker)
            }),
            traffic,
            config,
            probing: None,
            reporting: Vec::new(),
            started: false,
        });
        true
    }
}

impl RootContext for Root {
    fn on_tick(&mut self) {
        let Some(health) = self.health.as_mut() else {
            // An inbound filter's root: hand this worker's counts over.
            if self
                .plugin
                .as_ref()
                .is_some_and(|p| p.config.direction == Direction::Inbound)
            {
                flush_traffic();
            }
            return;
        };
        if !health.started {
            health.started = true;
            let period = health.probe.as_ref().map_or(1000, |(p, _)| p.period_ms);
            let _ = hostcalls::set_tick_period(Duration::from_millis(period));
        }
        health.probe();
        health.drain_traffic();
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some(health) = self.health.as_mut() {
            health.drain_traffic();
        }
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        // Log no more than Envoy will print: formatting a message that the
        // host then drops costs a host call on the request path.
        let level = match hostcalls::get_log_level() {
            Ok(LogLevel::Critical) => LogLevel::Error,
            Ok(level) => level,
            Err(_) => LogLevel::Info,
        };
        proxy_wasm::set_log_level(level);
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!("meshvm: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        let is_health =
            property(&["plugin_root_id"]).is_some_and(|id| id == HEALTH_ROOT_ID.as_bytes());
        if is_health {
            return self.configure_health(&bytes);
        }
        let config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("meshvm: invalid {e}");
                return false;
            }
        };
        metrics::define_all();
        let outbound = (config.direction == Direction::Outbound).then(outbound_headers);
        if config.direction == Direction::Inbound {
            // Every second: hand request outcomes to the health service.
            let _ = hostcalls::set_tick_period(Duration::from_secs(1));
        }
        log::info!("meshvm: configured {:?} filter", config.direction);
        self.plugin = Some(Rc::new(Plugin { config, outbound }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy does not create streams for a root whose configuration failed;
        // a stream without a plugin passes requests through untouched.
        Some(Box::new(Stream {
            plugin: self.plugin.clone(),
            counted: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn outbound_headers() -> OutboundHeaders {
    let node = read_node_metadata();
    if node.fields.is_empty() {
        log::warn!(
            "meshvm: node metadata has none of NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, OWNER"
        );
    }
    let peer_metadata_id = node_string(&["id"]).filter(|id| {
        let safe = peer_metadata::is_header_safe(id);
        if !safe {
            log::warn!("meshvm: node id contains characters not allowed in a header; not sent");
        }
        safe
    });
    OutboundHeaders {
        peer_metadata: node.encode_header(),
        peer_metadata_id,
    }
}

/// One per HTTP request.
struct Stream {
    plugin: Option<Rc<Plugin>>,
    /// Inbound with traffic health on: the response's outcome is counted.
    counted: bool,
}

thread_local! {
    /// This worker's inbound outcomes since the last flush: (ok, failed).
    static TRAFFIC: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    /// The health service takes traffic outcomes (its queue exists).
    static TRAFFIC_ON: Cell<bool> = const { Cell::new(false) };
}

fn count_outcome(ok: bool) {
    TRAFFIC.with(|t| {
        let (o, f) = t.get();
        t.set(if ok {
            (o.saturating_add(1), f)
        } else {
            (o, f.saturating_add(1))
        });
    });
}

/// Sends this worker's counts to the health service's queue, if it has one.
fn flush_traffic() {
    let queue = hostcalls::resolve_shared_queue(TRAFFIC_VM_ID, TRAFFIC_QUEUE)
        .ok()
        .flatten();
    TRAFFIC_ON.with(|on| on.set(queue.is_some()));
    let (ok, failed) = TRAFFIC.with(|t| t.replace((0, 0)));
    if let Some(queue) = queue
        && ok + failed > 0
    {
        let _ = hostcalls::enqueue_shared_queue(queue, Some(&health::encode_counts(ok, failed)));
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(plugin) = &self.plugin {
            match plugin.config.direction {
                Direction::Inbound => inbound_request(&plugin.config),
                Direction::Outbound => {
                    if let Some(headers) = &plugin.outbound {
                        outbound_request(&plugin.config.headers, headers);
                    }
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.counts_traffic() {
            let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
                .ok()
                .flatten();
            count_outcome(!status.as_deref().is_some_and(|s| s.starts_with('5')));
            self.counted = true;
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Reset before any response: a failure too.
        if !self.counted && self.counts_traffic() {
            count_outcome(false);
        }
    }
}

impl Stream {
    fn counts_traffic(&self) -> bool {
        self.plugin
            .as_ref()
            .is_some_and(|p| p.config.direction == Direction::Inbound)
            && TRAFFIC_ON.with(Cell::get)
    }
}

fn set_header(name: &str, value: &str) {
    if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
        log::warn!("meshvm: cannot set header {name}: {status:?}");
    }
}

fn remove_header(name: &str) {
    if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None) {
        log::warn!("meshvm: cannot remove header {name}: {status:?}");
    }
}

fn outbound_request(names: &HeaderNames, headers: &OutboundHeaders) {
    set_header(&names.peer_metadata, &headers.peer_metadata);
    match &headers.peer_metadata_id {
        Some(id) => set_header(&names.peer_metadata_id, id),
        None => remove_header(&names.peer_metadata_id),
    }
    metrics::add(Counter::OutboundLabeled, 1);
}

/// Connections remembered per Wasm VM (i.e. per worker), direct-mapped by id.
const CONNECTION_SLOTS: usize = 256;

/// What the filter remembers about one downstream connection.
#[derive(Clone)]
struct ConnectionMemo {
    id: u64,
    uri_san: Option<Vec<u8>>,
    metadata: MetadataMemo,
}

thread_local! {
    static CONNECTIONS: RefCell<Vec<Option<ConnectionMemo>>> =
        RefCell::new(vec![None; CONNECTION_SLOTS]);
}

const URI_SAN: [&str; 2] = ["connection", "uri_san_peer_certificate"];

/// Runs `f` with the caller's URI SAN and the connection's metadata memo,
/// reading the SAN once per connection.
///
/// `connection.uri_san_peer_certificate` is present only when the caller
/// presented a client certificate that the listener's TLS context verified,
/// i.e. on mTLS connections (so `connection.mtls` would add nothing). TLS
/// attributes are among the most expensive host calls (the peer certificate
/// is examined on each read), while a connection's peer certificate never
/// changes and Envoy never reuses a connection id: so both the SAN and the
/// last decoded peer metadata are kept per connection id.
fn with_connection<R>(f: impl FnOnce(Option<&[u8]>, &mut MetadataMemo) -> R) -> R {
    let id = property(&["connection", "id"])
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes);
    let Some(id) = id else {
        return f(property(&URI_SAN).as_deref(), &mut MetadataMemo::default());
    };
    let slot = (id % CONNECTION_SLOTS as u64) as usize;
    let known = CONNECTIONS.with(|c| c.borrow_mut()[slot].take().filter(|m| m.id == id));
    let mut memo = known.unwrap_or_else(|| ConnectionMemo {
        id,
        uri_san: property(&URI_SAN),
        metadata: MetadataMemo::default(),
    });
    let result = f(memo.uri_san.as_deref(), &mut memo.metadata);
    CONNECTIONS.with(|c| c.borrow_mut()[slot] = Some(memo));
    result
}

fn inbound_request(config: &FilterConfig) {
    let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
        Ok(headers) => headers,
        Err(status) => {
            log::warn!("meshvm: cannot read request headers: {status:?}");
            return;
        }
    };
    let labeling =
        with_connection(|uri_san, memo| inbound::label_request(config, headers, uri_san, memo));

    if let Some(headers) = &labeling.headers {
        let pairs = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect();
        if let Err(status) = hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs) {
            log::warn!("meshvm: cannot rewrite request headers: {status:?}");
        }
    }
    if labeling.forged_removed > 0 {
        log::debug!(
            "meshvm: removed {} identity header(s) sent by the caller",
            labeling.forged_removed
        );
        metrics::add(
            Counter::SpoofedHeadersRemoved,
            labeling.forged_removed as i64,
        );
    }
    match &labeling.identity {
        Ok(_) => metrics::add(Counter::InboundLabeled, 1),
        Err(why) => {
            log::debug!("meshvm: no peer identity: {why}");
            metrics::add(Counter::PeerIdentityMissing, 1);
        }
    }
    if let Some(why) = &labeling.metadata_problem {
        log::debug!("meshvm: ignoring peer metadata: {why}");
        metrics::add(Counter::PeerMetadataMalformed, 1);
    }
}
