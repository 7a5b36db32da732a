//! The SDS server: serves the workload certificate to Envoy over
//! `envoy.service.secret.v3.SecretDiscoveryService` on a Unix socket, like
//! Istio's agent (istio/istio: security/pkg/nodeagent/sds/sdsservice.go).
//!
//! Two resources: `default` (the workload's chain and key, a
//! `tls_certificate`) and `ROOTCA` (the root bundle, a `validation_context`).
//! The identity manager publishes the current secret into a
//! [`tokio::sync::watch`] channel; every change is pushed to every open
//! stream (state of the world, one response carrying each requested name).
//!
//! Until the first secret is published, requests are held, never answered
//! with an empty secret. Unknown names are logged and ignored. A NACK is
//! logged and the stream keeps serving; the rejected version is not sent
//! again (the next change is). Key material is never logged.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};
use zeroize::Zeroizing;

use crate::identity::{IssuedCert, WorkloadKey};

/// Istio's SDS socket on a VM (`WORKLOAD_IDENTITY_SOCKET_FILE` = `socket`).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/secrets/workload-spiffe-uds/socket";
/// The workload certificate and key.
pub const WORKLOAD_RESOURCE: &str = "default";
/// The root bundle.
pub const ROOT_RESOURCE: &str = "ROOTCA";
/// The SDS resource type.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What the SDS server serves: the workload's chain (leaf first), its key and
/// the root bundle, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkloadSecret {
    pub cert_chain_pem: String,
    pub private_key_pem: Zeroizing<String>,
    pub root_pem: String,
}

impl fmt::Debug for WorkloadSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadSecret")
            .field("version", &self.version())
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

impl WorkloadSecret {
    /// The secret for `key` and the certificate issued for it.
    pub fn new(key: &WorkloadKey, cert: &IssuedCert) -> Self {
        Self {
            cert_chain_pem: cert.chain_pem().to_owned(),
            private_key_pem: key.private_key_pem(),
            root_pem: cert.root_pem().to_owned(),
        }
    }

    /// The version sent to Envoy: a digest of the chain, the root and the
    /// key (a digest, so nothing about the key can be read from it). The same
    /// content has the same version on every stream and across restarts.
    pub fn version(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            self.cert_chain_pem.as_bytes(),
            self.root_pem.as_bytes(),
            self.private_key_pem.as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.finish().as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The Envoy `Secret` named `name`, or `None` for an unknown name.
    pub fn to_envoy(&self, name: &str) -> Option<Secret> {
        let inline = |bytes: &[u8]| DataSource {
            specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
            ..Default::default()
        };
        let r#type = match name {
            WORKLOAD_RESOURCE => secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(self.cert_chain_pem.as_bytes())),
                private_key: Some(inline(self.private_key_pem.as_bytes())),
                ..Default::default()
            }),
            ROOT_RESOURCE => secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(inline(self.root_pem.as_bytes())),
                ..Default::default()
            }),
            _ => return None,
        };
        Some(Secret {
            name: name.to_owned(),
            r#type: Some(r#type),
        })
    }
}

/// The channel the identity manager publishes into (`None`: no certificate yet).
pub type SecretReceiver = watch::Receiver<Option<Arc<WorkloadSecret>>>;

/// The SDS gRPC service (also usable without the socket, e.g. in-process).
#[derive(Clone)]
pub struct SdsService {
    secrets: SecretReceiver,
    nonces: Arc<AtomicU64>,
}

impl SdsService {
    pub fn new(secrets: SecretReceiver) -> Self {
        Self {
            secrets,
            nonces: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }
}

/// A response carrying each known name of `names`; `None` if none is known.
fn build_response(
    secret: &WorkloadSecret,
    version: &str,
    names: &[String],
    nonce: String,
) -> Option<DiscoveryResponse> {
    let resources: Vec<Any> = names
        .iter()
        .filter_map(|n| secret.to_envoy(n))
        .map(|s| Any {
            type_url: SECRET_TYPE_URL.to_owned(),
            value: s.encode_to_vec(),
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    Some(DiscoveryResponse {
        version_info: version.to_owned(),
        resources,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        ..Default::default()
    })
}

/// Logs each name we do not serve.
fn warn_unknown(names: &[String]) {
    for name in names {
        if name != WORKLOAD_RESOURCE && name != ROOT_RESOURCE {
            tracing::warn!(resource = %name, "SDS: unknown resource name requested; ignored");
        }
    }
}

/// One StreamSecrets stream.
struct SecretStream {
    secrets: SecretReceiver,
    nonces: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    node: String,
    names: Vec<String>,
    /// The version and nonce of the last response sent.
    sent: Option<(String, String)>,
    /// The last version Envoy rejected.
    rejected: Option<String>,
}

impl SecretStream {
    fn next_nonce(&self) -> String {
        self.nonces.fetch_add(1, Ordering::Relaxed).to_string()
    }

    /// Sends the current secret for the requested names, unless it is not
    /// there yet, was already sent (`force` = false) or was rejected.
    /// Returns false when the client is gone.
    async fn push(&mut self, force: bool) -> bool {
        let Some(secret) = self.secrets.borrow_and_update().clone() else {
            tracing::debug!(node = %self.node, "SDS: no certificate yet; holding the request");
            return true;
        };
        let version = secret.version();
        if self.rejected.as_deref() == Some(version.as_str()) {
            tracing::debug!(node = %self.node, %version, "SDS: not resending a rejected version");
            return true;
        }
        if !force && self.sent.as_ref().is_some_and(|(v, _)| *v == version) {
            return true;
        }
        let nonce = self.next_nonce();
        let Some(response) = build_response(&secret, &version, &self.names, nonce.clone()) else {
            return true;
        };
        tracing::info!(
            node = %self.node,
            resources = ?self.names,
            %version,
            %nonce,
            "SDS: pushing secrets"
        );
        self.sent = Some((version, nonce));
        self.tx.send(Ok(response)).await.is_ok()
    }

    /// Handles one request; returns false when the stream should end.
    async fn on_request(&mut self, req: DiscoveryRequest) -> bool {
        if self.node.is_empty()
            && let Some(node) = &req.node
        {
            self.node = node.id.clone();
        }
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            tracing::warn!(node = %self.node, type_url = %req.type_url, "SDS: unexpected type URL");
            let _ = self
                .tx
                .send(Err(Status::invalid_argument(format!(
                    "unsupported type URL {}",
                    req.type_url
                ))))
                .await;
            return false;
        }
        let names_changed = req.resource_names != self.names;
        if names_changed {
            warn_unknown(&req.resource_names);
            self.names = req.resource_names.clone();
        }
        if !req.response_nonce.is_empty() {
            let current = self.sent.as_ref().map(|(_, n)| n.as_str());
            if current != Some(req.response_nonce.as_str()) {
                tracing::debug!(node = %self.node, nonce = %req.response_nonce, "SDS: stale nonce; ignored");
                return true;
            }
            if let Some(error) = &req.error_detail {
                let version = self.sent.as_ref().map(|(v, _)| v.clone());
                tracing::warn!(
                    node = %self.node,
                    resources = ?self.names,
                    version = version.as_deref().unwrap_or(""),
                    code = error.code,
                    error = %error.message,
                    "SDS: Envoy rejected the secrets (NACK)"
                );
                self.rejected = version;
                // A NACK with new names still asks for those names.
                return !names_changed || self.push(true).await;
            }
            tracing::debug!(node = %self.node, version = %req.version_info, "SDS: ACK");
            return !names_changed || self.push(true).await;
        }
        // A first request (or a new request after a reconnect).
        tracing::info!(node = %self.node, resources = ?self.names, "SDS: request");
        self.push(true).await
    }

    async fn run(mut self, mut requests: Streaming<DiscoveryRequest>) {
        let mut watching = true;
        loop {
            tokio::select! {
                req = requests.message() => match req {
                    Ok(Some(req)) => {
                        if !self.on_request(req).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %self.node, %status, "SDS: stream error");
                        break;
                    }
                },
                changed = self.secrets.changed(), if watching => {
                    if changed.is_err() {
                        // The publisher is gone: keep serving the last secret.
                        watching = false;
                        continue;
                    }
                    if !self.names.is_empty() && !self.push(false).await {
                        break;
                    }
                }
                _ = self.tx.closed() => break,
            }
        }
        tracing::debug!(node = %self.node, "SDS: stream closed");
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = DeltaStream;
    type StreamSecretsStream = ResponseStream;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("DeltaSecrets is not implemented"))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut secrets = self.secrets.clone();
        // Whatever is current is sent on the first request, not as a change.
        secrets.mark_unchanged();
        let stream = SecretStream {
            secrets,
            nonces: self.nonces.clone(),
            tx,
            node: String::new(),
            names: Vec::new(),
            sent: None,
            rejected: None,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "unsupported type URL {}",
                req.type_url
            )));
        }
        warn_unknown(&req.resource_names);
        let Some(secret) = self.secrets.borrow().clone() else {
            return Err(Status::unavailable("no workload certificate yet"));
        };
        let nonce = self.nonces.fetch_add(1, Ordering::Relaxed).to_string();
        build_response(&secret, &secret.version(), &req.resource_names, nonce)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no known resource requested"))
    }
}

/// The SDS server bound to its Unix socket.
pub struct SdsServer {
    listener: UnixListener,
    path: PathBuf,
    service: SdsService,
}

impl fmt::Debug for SdsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SdsServer")
            .field("path", &self.path)
            .finish()
    }
}

impl SdsServer {
    /// Binds `path` (see [`crate::uds::bind_private`]). Must be called inside
    /// a Tokio runtime.
    pub fn bind(path: impl AsRef<Path>, secrets: SecretReceiver) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let listener = crate::uds::bind_private(&path, "SDS")?;
        Ok(Self {
            listener,
            path,
            service: SdsService::new(secrets),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until the listener fails.
    pub async fn serve(self) -> Result<(), tonic::transport::Error> {
        self.serve_with_shutdown(std::future::pending()).await
    }

    /// Serves until `signal` completes, then removes the socket.
    pub async fn serve_with_shutdown(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tracing::info!(path = %self.path.display(), "SDS: serving");
        let result = tonic::transport::Server::builder()
            .add_service(self.service.into_server())
            .serve_with_incoming_shutdown(UnixListenerStream::new(self.listener), signal)
            .await;
        let _ = std::fs::remove_file(&self.path);
        result
    }
}

pub mod client;

#[cfg(test)]
mod tests;
