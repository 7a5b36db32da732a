//! mTLS between proxies, with the workload certificate and the mesh root
//! that the agent serves over SDS (`default`, `ROOTCA`) as istiod
//! configures a sidecar: the server requires a client certificate from the
//! mesh, the client checks the server's SPIFFE identity.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, GrpcService, TransportSocket, api_config_source,
    config_source, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

/// The SDS secret holding the workload certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// The SDS secret holding the mesh root.
pub const ROOT_SECRET: &str = "ROOTCA";
/// The bootstrap cluster that reaches the agent's SDS server.
pub const SDS_CLUSTER: &str = "sds-grpc";

/// An SDS secret from the agent, as istiod references it.
fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// Our certificate, and peers verified against the root; `identities`
/// (exact SPIFFE URIs) restricts the peer, empty accepts any mesh identity.
fn common(identities: &BTreeSet<String>, alpn: &[&str]) -> CommonTlsContext {
    let default_validation_context = CertificateValidationContext {
        match_typed_subject_alt_names: identities
            .iter()
            .map(|id| SubjectAltNameMatcher {
                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds_secret(WORKLOAD_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(default_validation_context),
                    validation_context_sds_secret_config: Some(sds_secret(ROOT_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: alpn.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

/// The server side of an inbound listener: our certificate, a client
/// certificate from the mesh required.
pub fn downstream(http: bool) -> TransportSocket {
    let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { &[] };
    let context = DownstreamTlsContext {
        common_tls_context: Some(common(&BTreeSet::new(), alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

/// The client side towards a Service's endpoints: our certificate as the
/// client's, the server's identity one of `identities`.
pub fn upstream(identities: &BTreeSet<String>, sni: &str) -> TransportSocket {
    let context = UpstreamTlsContext {
        common_tls_context: Some(common(identities, &[])),
        sni: sni.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}
