//! Envoy's configuration for one proxy (LDS, CDS, EDS), generated from the
//! [`MeshModel`] the way istiod shapes a sidecar's, without traffic capture:
//!
//! - **Inbound**: for every port the proxy's workload serves (the target
//!   ports of the Services that select it, and its own named ports), a
//!   listener on `<workload address>:<port>` that terminates mTLS with the
//!   SDS secrets `default` and `ROOTCA`, requires a client certificate from
//!   the mesh, runs the meshvm filter inbound and forwards to the app on
//!   `<app address>:<port>` (cluster `inbound|<port>||`). The app listens
//!   on loopback, so nothing reaches it except through Envoy.
//! - **Outbound**: for every port of every Service with a cluster IP, a
//!   listener on the Service's loopback address ([`vip`]) at the Service
//!   port that runs the meshvm filter outbound and balances over cluster
//!   `outbound|<port>||<hostname>`: the Service's endpoints from EDS, over
//!   mTLS with the SPIFFE identities of the Service's workloads checked.
//!
//! HTTP ports get an HTTP connection manager (routes inline, so no RDS);
//! TCP ports a TCP proxy. The filter is added when the control plane was
//! given its `.wasm` (see [`EnvoyOptions`]).

mod listeners;
mod tls;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Http1ProtocolOptions,
    Http2ProtocolOptions, SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;

use super::NamedResource;
use crate::mesh::vip::{AddressBlock, OUTBOUND_ADDRESSES_METADATA};
use crate::mesh::{MeshModel, MeshService, Protocol, Workload};
use crate::node::ProxyNode;

pub use listeners::wasm_filter;

pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The node metadata key (`ISTIO_META_MESHVM_APP_ADDRESS` on the agent)
/// naming where the proxy's app listens; default 127.0.0.1.
pub const APP_ADDRESS_METADATA: &str = "MESHVM_APP_ADDRESS";

/// How long Envoy waits to connect to an app or a peer (istiod's default
/// `connectTimeout`).
const CONNECT_TIMEOUT_SECS: i64 = 10;

/// Control plane settings for the generated configuration.
#[derive(Debug, Clone, Default)]
pub struct EnvoyOptions {
    /// Where the proxies get the meshvm filter; without it the listeners
    /// carry no Wasm filter (plain mTLS).
    pub filter: Option<FilterSource>,
}

/// Where the proxies' meshvm filter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterSource {
    /// A path on the proxies' hosts, inline in the listeners.
    File(PathBuf),
    /// An image or http(s) URL, as istiod sends a WasmPlugin: the listeners
    /// name the filter, ECDS serves it with remote code, and the proxy's
    /// agent fetches the module and points Envoy at its cached copy.
    Remote {
        url: String,
        /// The WasmPlugin's `sha256` (an image's manifest digest).
        sha256: Option<String>,
        /// `IfNotPresent` or `Always` (WasmPlugin `imagePullPolicy`).
        pull_policy: Option<String>,
    },
}

pub use listeners::{EXTENSION_CONFIG_TYPE_URL, extension_configs};

/// What a proxy's configuration depends on besides the mesh: where it
/// runs, where its app listens, which loopback block its outbound
/// listeners take.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyView {
    pub namespace: String,
    pub address: IpAddr,
    pub app_address: IpAddr,
    pub outbound: AddressBlock,
}

impl ProxyView {
    /// From the proxy's node; a malformed meshvm metadata value is an error
    /// naming the key (the stream is refused, as for istiod's own keys).
    pub fn from_node(node: &ProxyNode) -> Result<ProxyView, String> {
        let address: IpAddr = node
            .first_ip()
            .parse()
            .map_err(|_| format!("the node's IP `{}` is not an IP address", node.first_ip()))?;
        let text = |key: &str| node.metadata.raw.get(key).and_then(|v| v.as_str());
        let app_address = match text(APP_ADDRESS_METADATA) {
            None | Some("") => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(v) => v.parse().map_err(|_| {
                format!("metadata {APP_ADDRESS_METADATA}: `{v}` is not an IP address")
            })?,
        };
        let outbound = match text(OUTBOUND_ADDRESSES_METADATA) {
            None | Some("") => AddressBlock::default(),
            Some(v) => v
                .parse()
                .map_err(|e| format!("metadata {OUTBOUND_ADDRESSES_METADATA}: {e}"))?,
        };
        Ok(ProxyView {
            namespace: node.config_namespace.clone(),
            address,
            app_address,
            outbound,
        })
    }
}

/// One inbound port of a proxy's workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// The ports a workload serves: every Service target port resolved on it,
/// then its named ports not already covered (a port's protocol comes from
/// the Service port, else from the port's own name).
pub fn inbound_ports(model: &MeshModel, workload: &Workload) -> Vec<InboundPort> {
    let mut ports: BTreeMap<u16, Protocol> = BTreeMap::new();
    for service in model.services_of(workload) {
        for port in &service.ports {
            if let Some(target) = workload.resolve(&port.target) {
                ports.entry(target).or_insert(port.protocol);
            }
        }
    }
    for (name, port) in &workload.named_ports {
        ports
            .entry(*port)
            .or_insert_with(|| Protocol::select(name, None));
    }
    ports
        .into_iter()
        .map(|(port, protocol)| InboundPort { port, protocol })
        .collect()
}

/// What decides a proxy's listeners and clusters, as a digest: a stream
/// regenerates them only when it changes (a VM joining elsewhere changes
/// endpoints, not this proxy's listeners).
pub fn config_key(model: &MeshModel, view: &ProxyView) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    view.hash(&mut hasher);
    if let Some(workload) = model.workload_at(&view.namespace, view.address) {
        inbound_ports(model, workload).hash(&mut hasher);
    }
    for service in &model.services {
        (&service.hostname, service.cluster_ip, &service.identities).hash(&mut hasher);
        for port in &service.ports {
            (port.port, port.protocol).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// The listeners of the proxy `view`.
pub fn listeners(
    model: &MeshModel,
    view: &ProxyView,
    options: &EnvoyOptions,
) -> Vec<NamedResource> {
    let mut out = Vec::new();
    if let Some(workload) = model.workload_at(&view.namespace, view.address) {
        for port in inbound_ports(model, workload) {
            let listener = listeners::inbound(view, &port, options);
            out.push(named(listener.name.clone(), pack_any(listener)));
        }
    }
    let vips = view.outbound.assign(&model.services);
    for service in &model.services {
        let Some(vip) = vips.get(&service.hostname) else {
            continue;
        };
        for port in &service.ports {
            let listener = listeners::outbound(*vip, service, port, options);
            out.push(named(listener.name.clone(), pack_any(listener)));
        }
    }
    out
}

/// The clusters of the proxy `view`: its inbound ones, then every Service
/// port's outbound one.
pub fn clusters(model: &MeshModel, view: &ProxyView) -> Vec<NamedResource> {
    let mut out = Vec::new();
    if let Some(workload) = model.workload_at(&view.namespace, view.address) {
        for port in inbound_ports(model, workload) {
            let cluster = inbound_cluster(view, &port);
            out.push(named(cluster.name.clone(), pack_any(cluster)));
        }
    }
    for service in &model.services {
        if service.cluster_ip.is_none() {
            continue;
        }
        for port in &service.ports {
            let cluster = outbound_cluster(service, port.port, port.protocol);
            out.push(named(cluster.name.clone(), pack_any(cluster)));
        }
    }
    out
}

/// Every outbound cluster's endpoints (the same for every proxy).
pub fn endpoints(model: &MeshModel) -> Vec<NamedResource> {
    let mut out = Vec::new();
    for service in &model.services {
        if service.cluster_ip.is_none() {
            continue;
        }
        for port in &service.ports {
            let name = service.cluster_name(port.port);
            let lb_endpoints = port
                .endpoints
                .iter()
                .map(|e| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(SocketAddr::new(e.address, e.port))),
                        ..Default::default()
                    })),
                    load_balancing_weight: (e.weight > 0)
                        .then_some(UInt32Value { value: e.weight }),
                    ..Default::default()
                })
                .collect();
            let assignment = ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints,
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.push(named(name, pack_any(assignment)));
        }
    }
    out
}

fn named(name: String, resource: envoy_types::pb::google::protobuf::Any) -> NamedResource {
    NamedResource { name, resource }
}

/// Istio's inbound cluster name, `inbound|<port>||`.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

fn socket_address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn seconds(secs: i64) -> PbDuration {
    PbDuration {
        seconds: secs,
        nanos: 0,
    }
}

/// istiod's breakers: effectively unlimited, so the proxy never queues or
/// refuses on Envoy's small defaults (1024).
fn unlimited_breakers() -> CircuitBreakers {
    let max = || Some(UInt32Value { value: u32::MAX });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: max(),
            max_pending_requests: max(),
            max_requests: max(),
            max_retries: max(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// HTTP/1.1 or HTTP/2 towards the upstream; nothing for TCP.
fn protocol_options(
    protocol: Protocol,
) -> std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any> {
    let config = match protocol {
        Protocol::Tcp => return Default::default(),
        Protocol::Http => explicit_http_config::ProtocolConfig::HttpProtocolOptions(
            Http1ProtocolOptions::default(),
        ),
        Protocol::Http2 => explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
            Http2ProtocolOptions::default(),
        ),
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(config),
            },
        )),
        ..Default::default()
    };
    [(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        pack_any(options),
    )]
    .into()
}

fn inbound_cluster(view: &ProxyView, port: &InboundPort) -> Cluster {
    let name = inbound_cluster_name(port.port);
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECS)),
        circuit_breakers: Some(unlimited_breakers()),
        typed_extension_protocol_options: protocol_options(port.protocol),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(SocketAddr::new(view.app_address, port.port))),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        name,
        ..Default::default()
    }
}

fn outbound_cluster(service: &MeshService, port: u16, protocol: Protocol) -> Cluster {
    let name = service.cluster_name(port);
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: name.clone(),
        }),
        connect_timeout: Some(seconds(CONNECT_TIMEOUT_SECS)),
        lb_policy: LbPolicy::RoundRobin as i32,
        circuit_breakers: Some(unlimited_breakers()),
        typed_extension_protocol_options: protocol_options(protocol),
        transport_socket: Some(tls::upstream(
            &service.identities,
            &format!("outbound_.{port}_._.{}", service.hostname),
        )),
        name,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
