//! Protocol definitions shared by the meshvm agent and the local control
//! plane: Istio's CA service (`istio.v1.auth`) and the DNS NameTable
//! (`istio.networking.nds.v1`), generated at build time from `proto/` by
//! `protox` + `tonic-prost-build` (no system `protoc`). Envoy's xDS types come
//! from the `envoy-types` crate, not from here.
//!
//! Module paths mirror the protobuf packages. Every message implements
//! [`prost::Name`] with a `type.googleapis.com/` type URL, so
//! [`prost_types::Any::from_msg`] and [`prost_types::Any::to_msg`] work on them.
//!
//! The CA client is generated without tonic's transport helpers (no
//! `connect(uri)`): build a `tonic::transport::Channel` with the TLS setup the
//! agent needs and pass it to `IstioCertificateServiceClient::new`.

/// Packages under `istio.*`.
pub mod istio {
    /// Package `istio.v1`.
    pub mod v1 {
        /// Package `istio.v1.auth`: the Istio CA (istiod's certificate-signing
        /// service, on the same port as ADS, 15012).
        ///
        /// - [`IstioCertificateRequest`](auth::IstioCertificateRequest),
        ///   [`IstioCertificateResponse`](auth::IstioCertificateResponse)
        /// - client: [`istio_certificate_service_client::IstioCertificateServiceClient`](auth::istio_certificate_service_client::IstioCertificateServiceClient)
        /// - server: [`istio_certificate_service_server::IstioCertificateService`](auth::istio_certificate_service_server::IstioCertificateService)
        ///   (trait) and [`istio_certificate_service_server::IstioCertificateServiceServer`](auth::istio_certificate_service_server::IstioCertificateServiceServer)
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }

    /// Packages under `istio.networking`.
    pub mod networking {
        /// Packages under `istio.networking.nds`.
        pub mod nds {
            /// Package `istio.networking.nds.v1`: the name table istiod sends
            /// to the agent's DNS proxy over xDS ([`NAME_TABLE_TYPE_URL`](crate::NAME_TABLE_TYPE_URL)).
            pub mod v1 {
                tonic::include_proto!("istio.networking.nds.v1");

                impl name_table::NameInfo {
                    /// A host's entry: its addresses, its registry
                    /// (`Kubernetes` for Services) and, for Kubernetes, the
                    /// Service's short name and namespace.
                    pub fn new(
                        ips: &[&str],
                        registry: &str,
                        shortname: &str,
                        namespace: &str,
                    ) -> Self {
                        Self {
                            ips: ips.iter().map(|ip| ip.to_string()).collect(),
                            registry: registry.into(),
                            shortname: shortname.into(),
                            namespace: namespace.into(),
                            alt_hosts: Vec::new(),
                        }
                    }
                }
            }
        }
    }
}

/// Prefix of every type URL Istio and Envoy use in `google.protobuf.Any` and
/// in xDS `type_url` fields.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// xDS type URL of [`NameTable`](istio::networking::nds::v1::NameTable)
/// ("NDS"). The agent sends a `DiscoveryRequest`/`DeltaDiscoveryRequest` with
/// this type after forwarding Envoy's first LDS request, consumes the
/// response itself (never forwarded to Envoy) and ACKs/NACKs it; the control
/// plane answers with one resource of this type.
pub const NAME_TABLE_TYPE_URL: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// xDS type URL under which the agent reports workload health to istiod
/// (istio/istio `pkg/model` `HealthInfoType`). No message of this name
/// exists: the report is a bare `DiscoveryRequest` (`type_url` field 4) or
/// `DeltaDiscoveryRequest` (field 2) with this type URL, carrying
/// `error_detail` (a `google.rpc.Status` with code 13 and the probe error)
/// only when unhealthy. istiod never responds to it.
pub const HEALTH_INFORMATION_TYPE_URL: &str = "type.googleapis.com/istio.v1.HealthInformation";

/// Fully qualified gRPC service name of the Istio CA. Both the client and the
/// server derive their routes from it.
pub const CA_SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";

/// gRPC method path (HTTP/2 `:path`) of the CA's only RPC. Useful for logs,
/// authorisation rules and per-method routing outside the generated code.
pub const CA_CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
