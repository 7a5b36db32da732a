//! The CA served over gRPC + TLS, as istiod serves it on port 15012: rustls
//! (ring), the serving certificate from [`MeshCa::serving_cert`], and
//! optional client certificates verified against the mesh root (a VM renews
//! with its current certificate; a first request has only its token). The
//! verified chain reaches [`CaService`] as `Request::peer_certs()`.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::{CaError, CaService, MeshCa};

/// What `serve` needs besides the CA.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The cluster this control plane is (`clusterid` headers must name it).
    pub cluster_id: String,
    /// DNS names for the serving certificate besides istiod's and `localhost`.
    pub extra_dns_names: Vec<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            cluster_id: crate::onboard::DEFAULT_CLUSTER_ID.to_string(),
            extra_dns_names: Vec::new(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving certificate: {0}")]
    Ca(CaError),
    /// tonic's error says little itself ("transport error"); its sources
    /// tell what failed.
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
}

from_error!(CaError => ServeError::Ca);
from_error!(tonic::transport::Error => ServeError::Transport);

/// The TLS configuration the CA is served with.
pub fn tls_config(ca: &MeshCa, options: &ServeOptions) -> Result<ServerTlsConfig, CaError> {
    let serving = ca.serving_cert(&options.extra_dns_names)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(serving.cert_chain_pem, serving.key_pem))
        .client_ca_root(Certificate::from_pem(ca.root_cert_pem()))
        .client_auth_optional(true))
}

/// The connections `listener` accepts, with `TCP_NODELAY` as grpc-go
/// (istiod) sets it: without it, a small response written before the
/// request's ACK went out waits for the peer's delayed ACK (40 ms on Linux).
pub(crate) fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves the CA on `listener` until `shutdown` completes.
pub async fn serve(
    ca: Arc<MeshCa>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = tls_config(&ca, &options)?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let service = CaService::new(ca, options.cluster_id.clone()).into_server();
    tracing::info!(
        %addr,
        cluster_id = %options.cluster_id,
        "CA serving istio.v1.auth.IstioCertificateService over TLS"
    );
    Server::builder()
        .tls_config(tls)?
        .serve_with_incoming_shutdown(service, incoming(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
