//! The ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`,
//! state of the world and Delta) on the control plane's TLS port, as istiod
//! serves it to a VM (reference §2, §3.5, §5.2):
//!
//! 1. The first request must carry a node (`InvalidArgument "missing node
//!    information"`); the caller must present a client certificate from the
//!    mesh CA (`Unauthenticated`); the node is parsed as istiod parses it
//!    (`InvalidArgument` naming the key); the [`Registry`] checks the
//!    identity and auto-registers the VM (`PermissionDenied`,
//!    `FailedPrecondition`). Any of these ends the stream with that status.
//! 2. Requests are answered per type: the NameTable ([`name_table`]) from
//!    the Services of the config directory, pushed again when it changes;
//!    Envoy's own types with what this control plane generates for the
//!    proxy (nothing yet: an empty, valid answer); `HealthInformation`
//!    never gets an answer.
//! 3. When the stream ends, the registry is told, which starts the grace
//!    period of an auto-registered WorkloadEntry.

pub mod name_table;
mod protocol;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use meshvm_proto::{HEALTH_INFORMATION_TYPE_URL, NAME_TABLE_TYPE_URL};
use prost::Message as _;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::MeshCa;
use crate::config::ConfigSnapshot;
use crate::node::ProxyNode;
use crate::registry::{Proxy, Registry};
use protocol::{Delta, ServerProtocol, Sotw};

/// One named resource of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedResource {
    pub name: String,
    pub resource: Any,
}

/// The ADS service. Cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

/// A response's content, built once per change and shared by all streams.
#[derive(Debug, Clone, Default)]
struct Built {
    version: String,
    resources: Vec<NamedResource>,
}

struct Inner {
    ca: Arc<MeshCa>,
    registry: Arc<Registry>,
    /// The NameTable of the current config and registered entries.
    name_table: watch::Receiver<Arc<Built>>,
    nonces: AtomicU64,
    connections: watch::Sender<usize>,
    /// Set when the control plane shuts down: every stream ends.
    closing: watch::Sender<bool>,
}

impl XdsServer {
    /// Serves proxies authenticated by `ca`, registered in `registry`,
    /// configured from `config`. Must be called inside a Tokio runtime: a
    /// task rebuilds what the streams send when the config or the
    /// registered entries change (once per change, not once per stream).
    pub fn new(
        ca: Arc<MeshCa>,
        registry: Arc<Registry>,
        config: watch::Receiver<Arc<ConfigSnapshot>>,
    ) -> Self {
        let name_table = spawn_name_table_builder(config, registry.subscribe());
        Self {
            inner: Arc::new(Inner {
                ca,
                registry,
                name_table,
                nonces: AtomicU64::new(1),
                connections: watch::channel(0).0,
                closing: watch::channel(false).0,
            }),
        }
    }

    /// The number of connected proxies (streams past registration).
    pub fn connections(&self) -> watch::Receiver<usize> {
        self.inner.connections.subscribe()
    }

    /// Ends every stream with `Unavailable` (the proxies reconnect, to this
    /// control plane once it is back or to another): for shutdown, since a
    /// server waits for open streams before it stops.
    pub fn close_all_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Wrapped for a tonic server; accepts pushes as large as a big mesh's.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 * 1024 * 1024)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start::<Sotw>(request)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start::<Delta>(request)))
    }
}

impl XdsServer {
    fn start<P: ServerProtocol>(
        &self,
        request: Request<Streaming<P::Request>>,
    ) -> ResponseStream<P::Response> {
        let peer_certs: Vec<CertificateDer<'static>> = request
            .peer_certs()
            .map(|certs| {
                certs
                    .iter()
                    .map(|c| CertificateDer::from(c.as_ref().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_stream::<P>(
            self.inner.clone(),
            peer_certs,
            request.into_inner(),
            tx,
        ));
        Box::pin(ReceiverStream::new(rx))
    }
}

/// What one stream has been sent, per type.
#[derive(Default)]
struct Sent {
    /// Type URL → (version, resource names) of the last response.
    types: BTreeMap<String, (String, Vec<String>)>,
}

/// Authenticates, registers, then answers until the stream ends.
async fn serve_stream<P: ServerProtocol>(
    inner: Arc<Inner>,
    peer_certs: Vec<CertificateDer<'static>>,
    mut requests: Streaming<P::Request>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let first = match requests.message().await {
        Ok(Some(first)) => first,
        _ => return,
    };
    let (proxy, connection) = match admit::<P>(&inner, &peer_certs, &first).await {
        Ok(admitted) => admitted,
        Err(status) => {
            tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                "ADS: stream refused"
            );
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let node_id = proxy.node.node_id.clone();
    tracing::info!(
        node = %node_id,
        identity = %proxy.identities[0],
        workload_entry = connection.as_ref().map(|c| c.entry().to_string()),
        stream = P::NAME,
        "ADS: proxy connected"
    );
    inner.connections.send_modify(|n| *n += 1);

    let mut name_table = inner.name_table.clone();
    let mut closing = inner.closing.subscribe();
    let mut sent = Sent::default();
    let mut request = Some(first);
    loop {
        if let Some(r) = request.take()
            && !handle::<P>(&inner, &proxy, &mut sent, &tx, r).await
        {
            break;
        }
        tokio::select! {
            message = requests.message() => match message {
                Ok(Some(r)) => request = Some(r),
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(node = %node_id, %status, "ADS: stream error");
                    break;
                }
            },
            () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
                let _ = tx.send(Err(Status::unavailable("the control plane is shutting down"))).await;
                break;
            }
            changed = name_table.changed() => {
                if changed.is_err() || !push_changes::<P>(&inner, &mut sent, &tx).await {
                    break;
                }
            }
        }
    }
    inner.connections.send_modify(|n| *n -= 1);
    tracing::info!(node = %node_id, "ADS: proxy disconnected");
    if let Some(connection) = connection {
        inner.registry.disconnect_async(connection).await;
    }
}

/// The first request: node present, client certificate from the mesh, node
/// well formed, identity and registration accepted.
async fn admit<P: ServerProtocol>(
    inner: &Inner,
    peer_certs: &[CertificateDer<'static>],
    first: &P::Request,
) -> Result<(Proxy, Option<crate::registry::Connection>), Status> {
    let node = P::node(first)
        .filter(|n| !n.id.is_empty())
        .ok_or_else(|| Status::invalid_argument("missing node information"))?;
    if peer_certs.is_empty() {
        return Err(Status::unauthenticated(
            "authentication failure: no client certificate (the xDS stream is authenticated \
             by the workload certificate)",
        ));
    }
    let identity = inner
        .ca
        .verify_client_chain(peer_certs, SystemTime::now())
        .map_err(|e| Status::unauthenticated(format!("authentication failure: {e}")))?;
    let parsed = ProxyNode::parse(node)
        .map_err(|e| Status::invalid_argument(format!("node {}: {e}", node.id)))?;
    let proxy = Proxy {
        node: parsed,
        identities: vec![identity],
    };
    let connection = inner
        .registry
        .connect(&proxy)
        .await
        .map_err(|e| Status::new(e.code(), e.to_string()))?;
    Ok((proxy, connection))
}

/// Answers one request. `false` when the stream is gone.
async fn handle<P: ServerProtocol>(
    inner: &Inner,
    proxy: &Proxy,
    sent: &mut Sent,
    tx: &mpsc::Sender<Result<P::Response, Status>>,
    request: P::Request,
) -> bool {
    let type_url = P::type_url(&request).to_string();
    if type_url == HEALTH_INFORMATION_TYPE_URL {
        match P::error_detail(&request) {
            None => tracing::info!(node = %proxy.node.node_id, "ADS: health report: healthy"),
            Some(error) => tracing::info!(
                node = %proxy.node.node_id,
                error,
                "ADS: health report: unhealthy"
            ),
        }
        return true;
    }
    if let Some(error) = P::error_detail(&request) {
        tracing::warn!(
            node = %proxy.node.node_id,
            type_url,
            error,
            "ADS: the proxy rejected (NACKed) a response"
        );
        return true;
    }
    if P::is_ack(&request) {
        return true;
    }
    respond::<P>(inner, sent, tx, &type_url, true).await
}

/// Re-sends every subscribed type whose content changed.
async fn push_changes<P: ServerProtocol>(
    inner: &Inner,
    sent: &mut Sent,
    tx: &mpsc::Sender<Result<P::Response, Status>>,
) -> bool {
    let types: Vec<String> = sent.types.keys().cloned().collect();
    for type_url in types {
        if !respond::<P>(inner, sent, tx, &type_url, false).await {
            return false;
        }
    }
    true
}

/// Sends the resources of `type_url`, unless `always` is false and they
/// have not changed since the last response.
async fn respond<P: ServerProtocol>(
    inner: &Inner,
    sent: &mut Sent,
    tx: &mpsc::Sender<Result<P::Response, Status>>,
    type_url: &str,
    always: bool,
) -> bool {
    let built = built_for(inner, type_url);
    let previous = sent.types.get(type_url);
    if !always && previous.is_some_and(|(v, _)| *v == built.version) {
        return true;
    }
    let names: Vec<String> = built.resources.iter().map(|r| r.name.clone()).collect();
    let removed: Vec<String> = previous
        .map(|(_, old)| old.iter().filter(|n| !names.contains(n)).cloned().collect())
        .unwrap_or_default();
    let nonce = inner.nonces.fetch_add(1, Ordering::Relaxed).to_string();
    let response = P::response(
        type_url,
        &built.version,
        &nonce,
        built.resources.clone(),
        removed,
    );
    sent.types
        .insert(type_url.to_string(), (built.version.clone(), names));
    tx.send(Ok(response)).await.is_ok()
}

/// What this control plane serves for `type_url`.
fn built_for(inner: &Inner, type_url: &str) -> Arc<Built> {
    if type_url == NAME_TABLE_TYPE_URL {
        return inner.name_table.borrow().clone();
    }
    // Envoy's types: the mesh configuration issue generates listeners,
    // clusters and endpoints; until then an empty, valid answer.
    static EMPTY: std::sync::LazyLock<Arc<Built>> = std::sync::LazyLock::new(|| {
        Arc::new(Built {
            version: version_of(&[]),
            resources: Vec::new(),
        })
    });
    EMPTY.clone()
}

/// Keeps the NameTable of the config and the registered entries current:
/// rebuilt once per change (bursts of changes coalesce), published only
/// when its content changed.
fn spawn_name_table_builder(
    mut config: watch::Receiver<Arc<ConfigSnapshot>>,
    mut entries: watch::Receiver<Arc<Vec<crate::config::WorkloadEntry>>>,
) -> watch::Receiver<Arc<Built>> {
    let build =
        |config: &watch::Receiver<Arc<ConfigSnapshot>>,
         entries: &watch::Receiver<Arc<Vec<crate::config::WorkloadEntry>>>| {
            let snapshot = config.borrow().clone();
            let registered = entries.borrow().clone();
            let table = name_table::build(&snapshot, &registered);
            let resources = vec![NamedResource {
                name: String::new(),
                resource: Any {
                    type_url: NAME_TABLE_TYPE_URL.into(),
                    value: table.encode_to_vec(),
                },
            }];
            Arc::new(Built {
                version: version_of(&resources),
                resources,
            })
        };
    let (tx, rx) = watch::channel(build(&config, &entries));
    tokio::spawn(async move {
        loop {
            let config_changed = tokio::select! {
                changed = config.changed() => if changed.is_err() { break } else { true },
                changed = entries.changed() => if changed.is_err() { break } else { false },
            };
            let config_changed = config_changed || config.has_changed().unwrap_or(false);
            config.mark_unchanged();
            entries.mark_unchanged();
            // Registered entries only matter to headless Services (their
            // names resolve to endpoint addresses): without one, a
            // registration or disconnect changes nothing here.
            if !config_changed && !name_table::has_headless_service(&config.borrow()) {
                continue;
            }
            let built = build(&config, &entries);
            tx.send_if_modified(|current| {
                let changed = current.version != built.version;
                if changed {
                    *current = built;
                }
                changed
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}

/// A digest of the resources, as the version.
fn version_of(resources: &[NamedResource]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for r in resources {
        for part in [
            r.name.as_bytes(),
            r.resource.type_url.as_bytes(),
            &r.resource.value,
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
