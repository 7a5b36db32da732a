//! The proxy-wasm contexts: a root context per plugin configuration and an
//! HTTP context per request.
//!
//! Every host call goes through the `Result`-returning `hostcalls` functions:
//! the trait helpers unwrap and would abort the VM on an unexpected status.

use crate::config::{Direction, FilterConfig, HeaderNames};
use crate::metrics::{self, Counter};
use crate::pairs;
use crate::peer_metadata::{self, NodeMetadata, PeerInfo};
use crate::spiffe;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
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

/// What an inbound request brought that the filter cares about.
struct Incoming<'a> {
    /// Distinct names of reserved identity headers the caller sent.
    forged: Vec<&'a str>,
    /// How many reserved header values arrived (a name may repeat).
    forged_count: i64,
    peer_metadata: Option<&'a [u8]>,
    has_peer_metadata_id: bool,
}

fn scan_headers<'a>(names: &HeaderNames, headers: &'a [(String, Vec<u8>)]) -> Incoming<'a> {
    let mut incoming = Incoming {
        forged: Vec::new(),
        forged_count: 0,
        peer_metadata: None,
        has_peer_metadata_id: false,
    };
    for (name, value) in headers {
        if names.is_reserved(name) {
            incoming.forged_count += 1;
            if !incoming.forged.contains(&name.as_str()) {
                incoming.forged.push(name);
            }
        } else if *name == names.peer_metadata {
            incoming.peer_metadata.get_or_insert(value);
        } else if *name == names.peer_metadata_id {
            incoming.has_peer_metadata_id = true;
        }
    }
    incoming
}

/// The caller's URI SAN, only from a client certificate Envoy verified
/// (`connection.mtls`); plaintext callers have none.
fn authenticated_uri_san() -> Option<String> {
    let mtls = property(&["connection", "mtls"]).is_some_and(|v| v.first() == Some(&1));
    if !mtls {
        return None;
    }
    let san = property(&["connection", "uri_san_peer_certificate"])?;
    String::from_utf8(san).ok()
}

fn inbound_request(config: &FilterConfig) {
    let names = &config.headers;
    let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
        Ok(headers) => headers,
        Err(status) => {
            log::warn!("meshvm: cannot read request headers: {status:?}");
            return;
        }
    };
    let incoming = scan_headers(names, &headers);

    // 1. Nothing the caller sent may look like our labels.
    for name in &incoming.forged {
        remove_header(name);
    }
    if incoming.forged_count > 0 {
        log::debug!(
            "meshvm: removed {} identity header(s) sent by the caller",
            incoming.forged_count
        );
        metrics::add(Counter::SpoofedHeadersRemoved, incoming.forged_count);
    }

    // 2. The caller's identity, only from its verified certificate.
    let san = authenticated_uri_san();
    let identity = san.as_deref().and_then(|uri| {
        spiffe::parse(uri)
            .inspect_err(|e| log::debug!("meshvm: peer URI SAN is not a workload identity: {e}"))
            .ok()
    });
    match &identity {
        Some(id) => {
            set_header(&names.identity, id.uri);
            set_header(&names.namespace, id.namespace);
            set_header(&names.service_account, id.service_account);
            metrics::add(Counter::InboundLabeled, 1);
        }
        None => metrics::add(Counter::PeerIdentityMissing, 1),
    }

    // 3. Peer metadata describes the caller only when the caller is authenticated.
    if let (Some(id), Some(raw)) = (&identity, incoming.peer_metadata) {
        match peer_metadata::decode_header(raw, config.max_peer_metadata_bytes) {
            Ok(info) => label_with_peer_info(names, &info, id.namespace),
            Err(e) => {
                log::debug!("meshvm: ignoring peer metadata from {}: {e}", id.uri);
                metrics::add(Counter::PeerMetadataMalformed, 1);
            }
        }
    }
    if config.remove_peer_metadata_headers {
        if incoming.peer_metadata.is_some() {
            remove_header(&names.peer_metadata);
        }
        if incoming.has_peer_metadata_id {
            remove_header(&names.peer_metadata_id);
        }
    }
}

fn label_with_peer_info(names: &HeaderNames, info: &PeerInfo, authenticated_namespace: &str) {
    // The certificate is the authority on the namespace; metadata that claims
    // another one is not about this caller.
    if let Some(ns) = &info.namespace
        && ns != authenticated_namespace
    {
        log::debug!(
            "meshvm: ignoring peer metadata claiming namespace {ns:?}; certificate says {authenticated_namespace:?}"
        );
        metrics::add(Counter::PeerMetadataMalformed, 1);
        return;
    }
    for (name, value) in [
        (&names.workload, &info.workload),
        (&names.app, &info.app),
        (&names.version, &info.version),
        (&names.cluster, &info.cluster),
    ] {
        if let Some(value) = value {
            set_header(name, value);
        }
    }
}
