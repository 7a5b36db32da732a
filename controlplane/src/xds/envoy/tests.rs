use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::{Any, StringValue, Struct, Value, value::Kind};
use prost::Message;

use super::*;
use crate::config::{ConfigSnapshot, WorkloadEntry, parse_manifests, snapshot_of};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: product, namespace: default}
spec:
  selector: {app: product}
  clusterIP: 10.96.88.12
  ports:
  - {name: http, port: 9080, targetPort: http}
  - {name: tcp-db, port: 5432, targetPort: 5432}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  selector: {app: product}
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: product-v1, namespace: default, labels: {app: product}}
spec:
  serviceAccountName: product
  containers: [{name: app, ports: [{name: http, containerPort: 9081}]}]
status: {podIP: 127.0.10.1}
"#;

fn snapshot() -> ConfigSnapshot {
    snapshot_of(MESH)
}

fn vm_entry(address: &str) -> WorkloadEntry {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm-{address}, namespace: default}}\n\
         spec: {{address: {address}, labels: {{app: product}}, ports: {{http: 9082, metrics: 9100}}, serviceAccount: product-vm}}\n"
    );
    let (mut objects, errors) = parse_manifests(Path::new("we.yaml"), &yaml);
    assert!(errors.is_empty(), "{errors:?}");
    match objects.remove(0).0 {
        crate::config::Object::WorkloadEntry(entry) => entry,
        other => panic!("{other:?}"),
    }
}

fn view(address: &str) -> ProxyView {
    ProxyView {
        namespace: "default".into(),
        address: address.parse().unwrap(),
        app_address: "127.0.0.1".parse().unwrap(),
        outbound: AddressBlock::default(),
    }
}

fn decode<M: Message + Default>(any: &Any) -> M {
    M::decode(any.value.as_slice()).unwrap()
}

fn manager(listener: &Listener) -> Option<HttpConnectionManager> {
    match &listener.filter_chains[0].filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(any))
            if any.type_url.ends_with("HttpConnectionManager") =>
        {
            Some(decode(any))
        }
        _ => None,
    }
}

fn wasm_directions(manager: &HttpConnectionManager) -> Vec<String> {
    manager
        .http_filters
        .iter()
        .filter_map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any))
                if f.name == "envoy.filters.http.wasm" =>
            {
                let wasm: Wasm = decode(any);
                let config = wasm.config.unwrap().configuration.unwrap();
                Some(decode::<StringValue>(&config).value)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_vm_gets_inbound_listeners_for_its_ports_and_outbound_ones_per_service_port() {
    let model = MeshModel::build(&snapshot(), &[vm_entry("127.0.20.1")], "cluster.local");
    let options = EnvoyOptions {
        filter: Some(FilterSource::File("/opt/meshvm/meshvm_filter.wasm".into())),
    };
    let listeners: Vec<Listener> = listeners(&model, &view("127.0.20.1"), &options)
        .iter()
        .map(|r| decode(&r.resource))
        .collect();
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    // Inbound: the Services' target ports resolved on the entry (http →
    // 9082, 5432 and the headless Service's 80 as they are) and its other
    // named port (metrics 9100). Outbound: each port of the Service with a
    // cluster IP; the headless one has none.
    assert_eq!(
        names,
        [
            "127.0.20.1_80",
            "127.0.20.1_5432",
            "127.0.20.1_9082",
            "127.0.20.1_9100",
            "127.240.88.12_9080",
            "127.240.88.12_5432",
        ]
    );

    let inbound = &listeners[2];
    let chain = &inbound.filter_chains[0];
    let Some(transport_socket::ConfigType::TypedConfig(tls)) =
        &chain.transport_socket.as_ref().unwrap().config_type
    else {
        panic!("no TLS on the inbound listener");
    };
    let tls: DownstreamTlsContext = decode(tls);
    assert!(tls.require_client_certificate.unwrap().value);
    let common = tls.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(validation)) =
        common.validation_context_type
    else {
        panic!("no validation context");
    };
    assert_eq!(
        validation
            .validation_context_sds_secret_config
            .unwrap()
            .name,
        "ROOTCA"
    );
    let inbound_manager = manager(inbound).unwrap();
    assert_eq!(
        wasm_directions(&inbound_manager),
        [r#"{"direction":"inbound"}"#]
    );
    assert_eq!(
        inbound_manager.http_filters.last().unwrap().name,
        "envoy.filters.http.router"
    );
    // The TCP port is proxied as bytes, still behind mTLS.
    assert!(manager(&listeners[1]).is_none());
    assert!(listeners[1].filter_chains[0].transport_socket.is_some());

    let outbound = &listeners[4];
    assert!(outbound.filter_chains[0].transport_socket.is_none());
    assert_eq!(
        wasm_directions(&manager(outbound).unwrap()),
        [r#"{"direction":"outbound"}"#]
    );

    // Without the filter: plain mTLS.
    let plain = super::listeners(&model, &view("127.0.20.1"), &EnvoyOptions::default());
    let plain: Listener = decode(&plain[2].resource);
    assert!(wasm_directions(&manager(&plain).unwrap()).is_empty());
}

#[test]
fn a_remote_filter_is_discovered_over_ecds_as_istiod_sends_a_wasm_plugin() {
    use envoy_types::pb::envoy::config::core::v3::{TypedExtensionConfig, async_data_source};
    use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;

    let model = MeshModel::build(&snapshot(), &[vm_entry("127.0.20.1")], "cluster.local");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let options = EnvoyOptions {
        filter: Some(FilterSource::Remote {
            url: "oci://registry.example/meshvm/filter:0.1.0".into(),
            sha256: Some(digest.clone()),
            pull_policy: Some("Always".into()),
        }),
    };
    // The listeners name the filter; its configuration comes over ADS.
    let inbound: Listener = decode(&listeners(&model, &view("127.0.20.1"), &options)[2].resource);
    let filters = manager(&inbound).unwrap().http_filters;
    let Some(http_filter::ConfigType::ConfigDiscovery(discovery)) = &filters[0].config_type else {
        panic!("{:?}", filters[0]);
    };
    assert_eq!(filters[0].name, "meshvm-inbound");
    assert_eq!(
        discovery.type_urls,
        [
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
        ]
    );
    let source = discovery.config_source.as_ref().unwrap();
    assert_eq!(source.initial_fetch_timeout.unwrap().seconds, 0);
    assert_eq!(filters.last().unwrap().name, "envoy.filters.http.router");

    // ECDS: remote code with the URL, digest and the agent's pull settings.
    let configs = extension_configs(&options);
    let names: Vec<&str> = configs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["meshvm-inbound", "meshvm-outbound"]);
    for resource in &configs {
        assert_eq!(resource.resource.type_url, EXTENSION_CONFIG_TYPE_URL);
        let config: TypedExtensionConfig = decode(&resource.resource);
        let wasm: Wasm = decode(config.typed_config.as_ref().unwrap());
        let plugin = wasm.config.unwrap();
        let Some(plugin_config::Vm::VmConfig(vm)) = plugin.vm else {
            panic!()
        };
        let Some(async_data_source::Specifier::Remote(remote)) = vm.code.unwrap().specifier else {
            panic!("not remote")
        };
        let uri = remote.http_uri.unwrap();
        assert_eq!(uri.uri, "oci://registry.example/meshvm/filter:0.1.0");
        assert_eq!(uri.timeout.unwrap().seconds, 30);
        assert_eq!(remote.sha256, digest);
        let env = vm.environment_variables.unwrap().key_values;
        assert_eq!(env["ISTIO_META_WASM_IMAGE_PULL_POLICY"], "Always");
        assert!(env.contains_key("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"));
    }
    // Without a digest istiod sends "nil"; a local file needs no ECDS.
    let no_digest = EnvoyOptions {
        filter: Some(FilterSource::Remote {
            url: "oci://registry.example/meshvm/filter:0.1.0".into(),
            sha256: None,
            pull_policy: None,
        }),
    };
    let config: TypedExtensionConfig = decode(&extension_configs(&no_digest)[0].resource);
    let wasm: Wasm = decode(config.typed_config.as_ref().unwrap());
    let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
        panic!()
    };
    let Some(async_data_source::Specifier::Remote(remote)) = vm.code.unwrap().specifier else {
        panic!()
    };
    assert_eq!(remote.sha256, "nil");
    let file = EnvoyOptions {
        filter: Some(FilterSource::File("/x.wasm".into())),
    };
    assert!(extension_configs(&file).is_empty());
}

#[test]
fn clusters_check_the_peers_identities_and_endpoints_come_from_the_model() {
    let model = MeshModel::build(&snapshot(), &[vm_entry("127.0.20.1")], "cluster.local");
    let clusters: Vec<Cluster> = clusters(&model, &view("127.0.20.1"))
        .iter()
        .map(|r| decode(&r.resource))
        .collect();
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "inbound|80||",
            "inbound|5432||",
            "inbound|9082||",
            "inbound|9100||",
            "outbound|9080||product.default.svc.cluster.local",
            "outbound|5432||product.default.svc.cluster.local",
        ]
    );
    let inbound = clusters[2].load_assignment.as_ref().unwrap();
    assert_eq!(inbound.endpoints[0].lb_endpoints.len(), 1);

    let outbound = &clusters[4];
    let Some(transport_socket::ConfigType::TypedConfig(tls)) =
        &outbound.transport_socket.as_ref().unwrap().config_type
    else {
        panic!("no TLS towards the endpoints");
    };
    let tls: UpstreamTlsContext = decode(tls);
    assert_eq!(
        tls.sni,
        "outbound_.9080_._.product.default.svc.cluster.local"
    );
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(validation)) =
        tls.common_tls_context.unwrap().validation_context_type
    else {
        panic!("no validation context");
    };
    let sans: Vec<String> = validation
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names
        .into_iter()
        .map(|m| format!("{:?}", m.matcher.unwrap().match_pattern.unwrap()))
        .collect();
    assert_eq!(
        sans,
        [
            r#"Exact("spiffe://cluster.local/ns/default/sa/product")"#,
            r#"Exact("spiffe://cluster.local/ns/default/sa/product-vm")"#,
        ]
    );

    let endpoints: Vec<ClusterLoadAssignment> = endpoints(&model)
        .iter()
        .map(|r| decode(&r.resource))
        .collect();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(
        endpoints[0].cluster_name,
        "outbound|9080||product.default.svc.cluster.local"
    );
    assert_eq!(endpoints[0].endpoints[0].lb_endpoints.len(), 2);
}

#[test]
fn a_vm_joining_elsewhere_changes_endpoints_not_this_proxys_configuration() {
    let snapshot = snapshot();
    let before = MeshModel::build(&snapshot, &[vm_entry("127.0.20.1")], "cluster.local");
    let after = MeshModel::build(
        &snapshot,
        &[vm_entry("127.0.20.1"), vm_entry("127.0.20.2")],
        "cluster.local",
    );
    let pod = view("127.0.10.1");
    assert_eq!(config_key(&before, &pod), config_key(&after, &pod));
    assert_ne!(endpoints(&before), endpoints(&after));
    // Its own block, a different key.
    let mut other = pod.clone();
    other.outbound = "127.11.0.0/16".parse().unwrap();
    assert_ne!(config_key(&before, &pod), config_key(&before, &other));
}

fn node(fields: &[(&str, &str)]) -> ProxyNode {
    ProxyNode::parse(&Node {
        id: "sidecar~127.0.20.1~vm.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }),
        ..Node::default()
    })
    .unwrap()
}

#[test]
fn the_proxy_view_comes_from_node_metadata_and_bad_values_are_named() {
    let view = ProxyView::from_node(&node(&[("NAMESPACE", "default")])).unwrap();
    assert_eq!(view.address.to_string(), "127.0.20.1");
    assert_eq!(view.app_address.to_string(), "127.0.0.1");
    assert_eq!(view.outbound, AddressBlock::default());
    let view = ProxyView::from_node(&node(&[
        ("MESHVM_APP_ADDRESS", "127.0.21.1"),
        ("MESHVM_OUTBOUND_ADDRESSES", "127.11.0.0/16"),
    ]))
    .unwrap();
    assert_eq!(view.app_address.to_string(), "127.0.21.1");
    assert_eq!(view.outbound.to_string(), "127.11.0.0/16");
    let error = ProxyView::from_node(&node(&[("MESHVM_APP_ADDRESS", "here")])).unwrap_err();
    assert!(
        error.contains("MESHVM_APP_ADDRESS: `here` is not an IP address"),
        "{error}"
    );
    let error =
        ProxyView::from_node(&node(&[("MESHVM_OUTBOUND_ADDRESSES", "10.0.0.0/16")])).unwrap_err();
    assert!(error.contains("loopback"), "{error}");
}
