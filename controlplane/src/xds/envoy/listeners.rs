//! Inbound and outbound listeners, and the meshvm filter in them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{
    AsyncDataSource, DataSource, TrafficDirection, async_data_source, data_source,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, retry_policy,
    route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config};
use envoy_types::pb::google::protobuf::{
    BoolValue, Duration as PbDuration, StringValue, UInt32Value,
};
use envoy_types::util::pack_any;

use super::{EnvoyOptions, InboundPort, ProxyView, inbound_cluster_name, socket_address, tls};
use crate::mesh::{MeshPort, MeshService};

/// Which way the filter faces; its plugin configuration's `direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// `<address>_<port>`, istiod's listener naming.
fn listener_name(addr: SocketAddr) -> String {
    format!("{}_{}", addr.ip(), addr.port())
}

/// The listener on the workload's address for one of its ports.
pub fn inbound(view: &ProxyView, port: &InboundPort, options: &EnvoyOptions) -> Listener {
    let addr = SocketAddr::new(view.address, port.port);
    let mut listener = listener(
        addr,
        &inbound_cluster_name(port.port),
        &format!("inbound_{}", port.port),
        port.protocol.is_http(),
        Direction::Inbound,
        options,
    );
    listener.filter_chains[0].transport_socket = Some(tls::downstream(port.protocol.is_http()));
    listener
}

/// The listener on a Service's loopback address for one of its ports.
pub fn outbound(
    vip: Ipv4Addr,
    service: &MeshService,
    port: &MeshPort,
    options: &EnvoyOptions,
) -> Listener {
    listener(
        SocketAddr::new(vip.into(), port.port),
        &service.cluster_name(port.port),
        &format!("outbound_{}_{}", port.port, service.hostname),
        port.protocol.is_http(),
        Direction::Outbound,
        options,
    )
}

/// A listener on `addr` whose one filter chain sends everything to
/// `cluster`: routed HTTP with the filter, or a TCP proxy.
fn listener(
    addr: SocketAddr,
    cluster: &str,
    stat_prefix: &str,
    http: bool,
    direction: Direction,
    options: &EnvoyOptions,
) -> Listener {
    let filter = if http {
        http_connection_manager(stat_prefix, cluster, direction, options)
    } else {
        tcp_proxy(stat_prefix, cluster)
    };
    Listener {
        name: listener_name(addr),
        address: Some(socket_address(addr)),
        enable_reuse_port: exclusive_port(),
        traffic_direction: match direction {
            Direction::Inbound => TrafficDirection::Inbound,
            Direction::Outbound => TrafficDirection::Outbound,
        } as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// istiod's default retries on outbound routes: twice, on another host,
/// when a connection fails or is refused or the upstream answers 503 (an
/// endpoint that just left, or is not serving yet).
fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                pack_any(PreviousHostsPredicate::default()),
            )),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

/// No `SO_REUSEPORT`: with it, a second Envoy (a stale one, another
/// proxy's) could bind the same address and silently take a share of the
/// connections; without it the second bind fails and says so.
fn exclusive_port() -> Option<BoolValue> {
    Some(BoolValue { value: false })
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(proxy))),
    }
}

/// An HTTP connection manager routing everything to `cluster`, with the
/// meshvm filter (when configured) before the router.
fn http_connection_manager(
    stat_prefix: &str,
    cluster: &str,
    direction: Direction,
    options: &EnvoyOptions,
) -> Filter {
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            // istiod disables the route timeout (0s): long requests and
            // streams are the app's business.
            timeout: Some(PbDuration {
                seconds: 0,
                nanos: 0,
            }),
            retry_policy: (direction == Direction::Outbound).then(default_retry_policy),
            ..Default::default()
        })),
        ..Default::default()
    };
    let route_config = RouteConfiguration {
        name: cluster.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: cluster.to_string(),
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut http_filters = Vec::new();
    if let Some(wasm) = &options.filter_wasm {
        http_filters.push(wasm_filter(wasm, direction == Direction::Inbound));
    }
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    });
    let manager = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        http_filters,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(manager))),
    }
}

/// The meshvm filter from `wasm` (a local file on the proxy's host), facing
/// inbound or outbound. Every listener shares one Wasm VM per worker
/// (`vm_id` `meshvm`); each direction is its own plugin.
pub fn wasm_filter(wasm: &Path, inbound: bool) -> HttpFilter {
    let direction = if inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let configuration = serde_json::json!({ "direction": direction.as_str() }).to_string();
    let plugin = PluginConfig {
        name: format!("meshvm-{}", direction.as_str()),
        root_id: "meshvm".into(),
        configuration: Some(pack_any(StringValue {
            value: configuration,
        })),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: "meshvm".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(wasm.display().to_string())),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        // FAIL_CLOSED (0, the default): a broken filter refuses requests
        // rather than letting them through unlabelled.
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.wasm".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Wasm {
            config: Some(plugin),
        }))),
        ..Default::default()
    }
}
