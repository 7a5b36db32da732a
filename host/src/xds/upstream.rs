//! The xDS proxy's connection to the control plane (reference §4.2, §6):
//! TLS to the discovery address verified against the onboarding roots with
//! Istio's server-name rule, the workload certificate as client certificate
//! (the control plane's identity check and auto-registration rest on it),
//! and the `ClusterID` header.

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::watch;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ca_client::{error_chain, find_tls_error, server_name};
use crate::config::{Config, RootCerts};
use crate::identity_manager::CurrentIdentity;

/// Istio's agent dials istiod for 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// `host:port` (mesh.yaml `discoveryAddress`).
    pub address: String,
    /// The name expected in the control plane's certificate.
    pub server_name: String,
    pub roots: RootCerts,
    /// Sent as the `ClusterID` header.
    pub cluster_id: Option<String>,
    pub connect_timeout: Duration,
}

impl UpstreamOptions {
    /// The discovery address of `config`, `ISTIOD_SAN` or Istio's rule for
    /// the server name, the onboarding roots and `ISTIO_META_CLUSTER_ID`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            address: config.discovery_address.clone(),
            server_name: server_name(&config.discovery_address, config.istiod_san.as_deref()),
            roots: config.root_certs.clone(),
            cluster_id: config.cluster_id.clone().filter(|c| !c.is_empty()),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why there is no upstream stream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("discovery address `{address}` is invalid: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("cannot connect to the control plane at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error(
        "TLS handshake with the control plane at {address} (expecting server name \
         `{server_name}`) failed: {reason}"
    )]
    Tls {
        address: String,
        server_name: String,
        reason: String,
    },
    /// The control plane answered the stream with an error (e.g. the
    /// identity check or auto-registration refused this proxy).
    #[error("the control plane refused the stream: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
}

/// Waits for a workload certificate, then dials the control plane with it.
pub async fn connect(
    options: &UpstreamOptions,
    mut identities: watch::Receiver<CurrentIdentity>,
) -> Result<Channel, UpstreamError> {
    let identity = {
        let current =
            identities
                .wait_for(Option::is_some)
                .await
                .map_err(|_| UpstreamError::Connect {
                    address: options.address.clone(),
                    reason: "the identity manager stopped".into(),
                })?;
        current.clone().expect("checked")
    };
    let uri = if options.address.contains("://") {
        options.address.replacen("http://", "https://", 1)
    } else {
        format!("https://{}", options.address)
    };
    let key_pem = identity.private_key_pem();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(options.roots.pem()))
        .domain_name(options.server_name.clone())
        .identity(Identity::from_pem(identity.chain_pem(), key_pem.as_bytes()));
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| UpstreamError::InvalidAddress {
            address: options.address.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .tls_config(tls)
        .map_err(|e| transport_error(options, &e))?;
    endpoint
        .connect()
        .await
        .map_err(|e| transport_error(options, &e))
}

fn transport_error(
    options: &UpstreamOptions,
    error: &(dyn std::error::Error + 'static),
) -> UpstreamError {
    match find_tls_error(error) {
        Some(reason) => UpstreamError::Tls {
            address: options.address.clone(),
            server_name: options.server_name.clone(),
            reason,
        },
        None => UpstreamError::Connect {
            address: options.address.clone(),
            reason: error_chain(error),
        },
    }
}

/// Adds the `ClusterID` header istiod reads.
pub fn add_metadata(options: &UpstreamOptions, metadata: &mut MetadataMap) {
    if let Some(cluster_id) = &options.cluster_id
        && let Ok(value) = MetadataValue::try_from(cluster_id.as_str())
    {
        metadata.insert("clusterid", value);
    }
}

/// The ADS client on `channel`, accepting large pushes (full configs of a
/// big mesh exceed tonic's 4 MiB default).
pub fn ads_client(channel: Channel) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024)
}
