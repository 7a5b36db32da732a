//! `istio.v1.auth.IstioCertificateService` for tonic: authenticate the caller
//! (TLS client certificate, else `authorization: Bearer`), sign its CSR for
//! that identity, answer the chain (leaf first, root last).
//!
//! Status codes as istiod's: authentication failure → `Unauthenticated`
//! ("request authenticate failure: ..."); bad CSR or TTL over the maximum →
//! `InvalidArgument`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshvm_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshvm_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use super::auth::{Authenticator, Caller};
use super::{IssueError, MeshCa};

/// The CA as a gRPC service.
#[derive(Debug, Clone)]
pub struct CaService {
    ca: Arc<MeshCa>,
    authenticator: Authenticator,
}

impl CaService {
    /// The service for `ca`, authenticating tokens for cluster `cluster_id`.
    pub fn new(ca: Arc<MeshCa>, cluster_id: impl Into<String>) -> Self {
        Self {
            ca,
            authenticator: Authenticator::new(cluster_id),
        }
    }

    /// Wrapped for a tonic server.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }
}

fn header<'a, T>(request: &'a Request<T>, name: &str) -> Option<&'a str> {
    request.metadata().get(name).and_then(|v| v.to_str().ok())
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        // Present only when served over TLS and the client sent a certificate.
        let peer_certs = request.peer_certs();
        let caller = Caller {
            peer_certs: peer_certs.as_deref().map(Vec::as_slice),
            authorization: header(&request, "authorization"),
            cluster_id: header(&request, "clusterid"),
        };
        let identity = self
            .authenticator
            .authenticate(&self.ca, &caller, SystemTime::now())
            .map_err(|e| {
                tracing::warn!(error = %e, "CA request refused");
                Status::unauthenticated(e.to_string())
            })?;
        let req = request.into_inner();
        let ttl = u64::try_from(req.validity_duration)
            .ok()
            .map(Duration::from_secs);
        match self.ca.issue(&req.csr, &identity, ttl) {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(e) => {
                tracing::warn!(%identity, error = %e, "CA request failed");
                Err(match e {
                    IssueError::Csr(_)
                    | IssueError::TtlTooLong { .. }
                    | IssueError::ForeignIdentity { .. } => Status::invalid_argument(e.to_string()),
                    IssueError::Sign(_) => Status::internal(e.to_string()),
                })
            }
        }
    }
}
