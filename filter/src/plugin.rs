//! The proxy-wasm contexts: a root context per plugin configuration and an
//! HTTP context per request.
//!
//! Every host call goes through the `Result`-returning `hostcalls` functions:
//! the trait helpers unwrap and would abort the VM on an unexpected status.

use crate::config::{Direction, FilterConfig, HeaderNames};
use crate::inbound::{self, MetadataMemo};
use crate::metrics::{self, Counter};
use crate::pairs;
use crate::peer_metadata::{self, NodeMetadata};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;

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

/// One per plugin configuration (Envoy `root_id`).
#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
}

impl Context for Root {}

impl RootContext for Root {
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
        let config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("meshvm: invalid {e}");
                return false;
            }
        };
        metrics::define_all();
        let outbound = (config.direction == Direction::Outbound).then(outbound_headers);
        log::info!("meshvm: configured {:?} filter", config.direction);
        self.plugin = Some(Rc::new(Plugin { config, outbound }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy does not create streams for a root whose configuration failed;
        // a stream without a plugin passes requests through untouched.
        Some(Box::new(Stream {
            plugin: self.plugin.clone(),
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
