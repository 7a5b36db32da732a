//! Inbound and outbound listeners, and the meshvm filter in them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, AsyncDataSource, ConfigSource, DataSource,
    ExtensionConfigSource, HttpUri, RemoteDataSource, TrafficDirection, TypedExtensionConfig,
    async_data_source, config_source, data_source, http_uri,
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
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::google::protobuf::{
    BoolValue, Duration as PbDuration, StringValue, UInt32Value,
};
use envoy_types::util::pack_any;

use super::{
    EnvoyOptions, FilterSource, InboundPort, NamedResource, ProxyView, inbound_cluster_name,
    socket_address, tls,
};
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
    match &options.filter {
        Some(FilterSource::File(wasm)) => {
            http_filters.push(wasm_filter(wasm, direction == Direction::Inbound));
        }
        Some(FilterSource::Remote { .. }) => http_filters.push(discovered_filter(direction)),
        None => {}
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
    let code = AsyncDataSource {
        specifier: Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(wasm.display().to_string())),
            ..Default::default()
        })),
    };
    HttpFilter {
        name: "envoy.filters.http.wasm".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Wasm {
            config: Some(plugin_config(direction, code, None)),
        }))),
        ..Default::default()
    }
}

/// The filter's plugin: one per direction, one Wasm VM per worker shared
/// by every listener (`vm_id` `meshvm`).
fn plugin_config(
    direction: Direction,
    code: AsyncDataSource,
    environment: Option<EnvironmentVariables>,
) -> PluginConfig {
    let configuration = serde_json::json!({ "direction": direction.as_str() }).to_string();
    PluginConfig {
        name: extension_config_name(direction),
        root_id: "meshvm".into(),
        configuration: Some(pack_any(StringValue {
            value: configuration,
        })),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: "meshvm".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(code),
            environment_variables: environment,
            ..Default::default()
        })),
        // FAIL_CLOSED (0, the default): a broken filter refuses requests
        // rather than letting them through unlabelled.
        ..Default::default()
    }
}

/// ECDS: Envoy's type for an extension's configuration.
pub const EXTENSION_CONFIG_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const WASM_HTTP_FILTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const RBAC_HTTP_FILTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// The ECDS resource of one direction (istiod names a WasmPlugin's
/// `<namespace>.<name>`).
fn extension_config_name(direction: Direction) -> String {
    format!("meshvm-{}", direction.as_str())
}

/// A listener's meshvm filter when the module is remote: its configuration
/// comes over ECDS, as istiod attaches a WasmPlugin; Envoy waits for it
/// (no initial fetch timeout) rather than serve without the filter.
fn discovered_filter(direction: Direction) -> HttpFilter {
    HttpFilter {
        name: extension_config_name(direction),
        config_type: Some(http_filter::ConfigType::ConfigDiscovery(
            ExtensionConfigSource {
                config_source: Some(ConfigSource {
                    config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource::default(),
                    )),
                    resource_api_version: ApiVersion::V3 as i32,
                    initial_fetch_timeout: Some(PbDuration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                type_urls: vec![
                    WASM_HTTP_FILTER_TYPE_URL.into(),
                    RBAC_HTTP_FILTER_TYPE_URL.into(),
                ],
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The ECDS resources of a remote filter, shaped as istiod shapes a
/// WasmPlugin's: `code.remote.http_uri` with the URL (30 s timeout, the
/// placeholder cluster `_`: the agent fetches, not Envoy) and `sha256`
/// ("nil" when unknown), the pull settings for the agent in
/// `ISTIO_META_WASM_*` VM variables. None for a local file.
pub fn extension_configs(options: &EnvoyOptions) -> Vec<NamedResource> {
    let Some(FilterSource::Remote {
        url,
        sha256,
        pull_policy,
    }) = &options.filter
    else {
        return Vec::new();
    };
    [Direction::Inbound, Direction::Outbound]
        .into_iter()
        .map(|direction| {
            let code = AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: Some(HttpUri {
                        uri: url.clone(),
                        timeout: Some(PbDuration {
                            seconds: 30,
                            nanos: 0,
                        }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                    }),
                    sha256: sha256.clone().unwrap_or_else(|| "nil".into()),
                    ..Default::default()
                })),
            };
            let mut env = std::collections::HashMap::new();
            // The plugin's "resource version": the URL and digest it names.
            env.insert(
                "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION".to_string(),
                format!("{url}@{}", sha256.as_deref().unwrap_or("")),
            );
            if let Some(policy) = pull_policy {
                env.insert("ISTIO_META_WASM_IMAGE_PULL_POLICY".into(), policy.clone());
            }
            let environment = EnvironmentVariables {
                key_values: env,
                ..Default::default()
            };
            let name = extension_config_name(direction);
            let config = TypedExtensionConfig {
                name: name.clone(),
                typed_config: Some(pack_any(Wasm {
                    config: Some(plugin_config(direction, code, Some(environment))),
                })),
            };
            NamedResource {
                name,
                resource: pack_any(config),
            }
        })
        .collect()
}
