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
//! 2. Requests are answered per type from the [`MeshModel`] (rebuilt once
//!    per change of the config directory or the registered entries): the
//!    NameTable ([`name_table`]), and Envoy's listeners, clusters and
//!    endpoints for this proxy ([`envoy`]); each is pushed again when what
//!    the proxy subscribed to changed. Other types get an empty, valid
//!    answer; `HealthInformation` never gets an answer: it sets the
//!    `Healthy` condition of the proxy's WorkloadEntry (when health checks
//!    are enabled on it), which takes the VM out of or back into its
//!    Services' endpoints.
//! 3. When the stream ends, the registry is told, which starts the grace
//!    period of an auto-registered WorkloadEntry.

pub mod envoy;
pub mod name_table;
mod protocol;

use std::collections::{BTreeMap, BTreeSet};
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
use crate::mesh::{MeshModel, WorkloadCache};
use crate::node::ProxyNode;
use crate::registry::{Proxy, Registry};
use envoy::{
    CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, EXTENSION_CONFIG_TYPE_URL, EnvoyOptions,
    LISTENER_TYPE_URL, ProxyView,
};
use protocol::{Delta, ServerProtocol, Sotw, Subscription};

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

/// The mesh at one moment, and what every proxy gets alike from it.
struct MeshState {
    model: MeshModel,
    /// Every outbound cluster's endpoints (EDS).
    endpoints: Arc<Built>,
}

struct Inner {
    ca: Arc<MeshCa>,
    registry: Arc<Registry>,
    /// The mesh of the current config and registered entries.
    mesh: watch::Receiver<Arc<MeshState>>,
    envoy: EnvoyOptions,
    /// ECDS: the meshvm filter's configuration when its module is remote
    /// (the same for every proxy).
    extension_configs: Arc<Built>,
    nonces: AtomicU64,
    connections: watch::Sender<usize>,
    /// Set when the control plane shuts down: every stream ends.
    closing: watch::Sender<bool>,
}

impl XdsServer {
    /// Serves proxies authenticated by `ca`, registered in `registry`,
    /// configured from `config`, Envoy's resources shaped by `envoy`. Must
    /// be called inside a Tokio runtime: a task rebuilds the mesh model when
    /// the config or the registered entries change (once per change, not
    /// once per stream).
    pub fn new(
        ca: Arc<MeshCa>,
        registry: Arc<Registry>,
        config: watch::Receiver<Arc<ConfigSnapshot>>,
        envoy: EnvoyOptions,
    ) -> Self {
        let mesh = spawn_mesh_builder(config, registry.subscribe(), ca.trust_domain().to_string());
        Self {
            inner: Arc::new(Inner {
                ca,
                registry,
                mesh,
                extension_configs: Arc::new(Built::new(envoy::extension_configs(&envoy))),
                envoy,
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

/// What one stream has asked for and been sent, per type.
#[derive(Default)]
struct Sent {
    /// Type URL → (version, resource names) of the last response.
    types: BTreeMap<String, (String, Vec<String>)>,
    /// Type URL → the names subscribed to (`None`: all of them).
    subscriptions: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Sent {
    /// Applies a request's subscription change; whether it changed.
    fn subscribe(&mut self, type_url: &str, change: Subscription) -> bool {
        let current = self.subscriptions.get(type_url);
        let next = match change {
            Subscription::Replace(names) => names_or_wildcard(names),
            Subscription::Change {
                subscribe,
                unsubscribe,
            } => {
                let mut set = match current {
                    // A first Delta request without names is a wildcard one.
                    None if subscribe.is_empty() => None,
                    None => Some(BTreeSet::new()),
                    Some(set) => set.clone(),
                };
                if subscribe.iter().any(|n| n == "*") {
                    set = None;
                }
                if let Some(set) = set.as_mut() {
                    set.extend(subscribe);
                    for name in &unsubscribe {
                        set.remove(name);
                    }
                }
                set
            }
        };
        let changed = current != Some(&next);
        self.subscriptions.insert(type_url.to_string(), next);
        changed
    }

    fn wants_all(&self, type_url: &str) -> bool {
        !matches!(self.subscriptions.get(type_url), Some(Some(_)))
    }

    fn wants(&self, type_url: &str, name: &str) -> bool {
        match self.subscriptions.get(type_url) {
            Some(Some(names)) => names.contains(name),
            _ => true,
        }
    }
}

fn names_or_wildcard(names: Vec<String>) -> Option<BTreeSet<String>> {
    if names.is_empty() || names.iter().any(|n| n == "*") {
        None
    } else {
        Some(names.into_iter().collect())
    }
}

/// What one stream's proxy is sent, generated from the mesh when what it
/// depends on changes.
struct ProxyConfig {
    view: ProxyView,
    key: Option<u64>,
    listeners: Arc<Built>,
    clusters: Arc<Built>,
    name_table: Arc<Built>,
    extension_configs: Arc<Built>,
}

impl ProxyConfig {
    fn new(view: ProxyView, extension_configs: Arc<Built>) -> Self {
        let empty = Arc::new(Built::default());
        Self {
            view,
            key: None,
            listeners: empty.clone(),
            clusters: empty.clone(),
            name_table: empty,
            extension_configs,
        }
    }

    /// Regenerates from `mesh` if the proxy's part of it changed.
    fn refresh(&mut self, mesh: &MeshState, options: &EnvoyOptions) {
        let model = &mesh.model;
        let key = envoy::config_key(model, &self.view);
        let headless = model.services.iter().any(|s| s.cluster_ip.is_none());
        if self.key == Some(key) && !headless {
            return;
        }
        if self.key != Some(key) {
            self.listeners = Arc::new(Built::new(envoy::listeners(model, &self.view, options)));
            self.clusters = Arc::new(Built::new(envoy::clusters(model, &self.view)));
            self.key = Some(key);
        }
        let table = name_table::build(model, &self.view.outbound.assign(&model.services));
        self.name_table = Arc::new(Built::new(vec![NamedResource {
            name: String::new(),
            resource: Any {
                type_url: NAME_TABLE_TYPE_URL.into(),
                value: table.encode_to_vec(),
            },
        }]));
    }

    fn built_for(&self, mesh: &MeshState, type_url: &str) -> Arc<Built> {
        match type_url {
            NAME_TABLE_TYPE_URL => self.name_table.clone(),
            LISTENER_TYPE_URL => self.listeners.clone(),
            CLUSTER_TYPE_URL => self.clusters.clone(),
            ENDPOINT_TYPE_URL => mesh.endpoints.clone(),
            EXTENSION_CONFIG_TYPE_URL => self.extension_configs.clone(),
            // Routes are inline, secrets come from the agent; anything else
            // gets an empty, valid answer.
            _ => {
                static EMPTY: std::sync::LazyLock<Arc<Built>> =
                    std::sync::LazyLock::new(|| Arc::new(Built::new(Vec::new())));
                EMPTY.clone()
            }
        }
    }
}

impl Built {
    fn new(resources: Vec<NamedResource>) -> Self {
        Built {
            version: version_of(&resources),
            resources,
        }
    }
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
    let (proxy, view, connection) = match admit::<P>(&inner, &peer_certs, &first).await {
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

    let mut mesh = inner.mesh.clone();
    let mut closing = inner.closing.subscribe();
    let mut config = ProxyConfig::new(view, inner.extension_configs.clone());
    let current = mesh.borrow_and_update().clone();
    config.refresh(&current, &inner.envoy);
    let mut stream = ProxyStream::<P> {
        inner: &inner,
        proxy,
        connection,
        config,
        mesh: current,
        sent: Sent::default(),
        tx: tx.clone(),
    };
    let mut request = Some(first);
    loop {
        if let Some(r) = request.take()
            && !stream.handle(r).await
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
            changed = mesh.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = mesh.borrow_and_update().clone();
                if !stream.update(current).await {
                    break;
                }
            }
        }
    }
    let connection = stream.connection.take();
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
) -> Result<(Proxy, ProxyView, Option<crate::registry::Connection>), Status> {
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
    let view = ProxyView::from_node(&parsed)
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
    Ok((proxy, view, connection))
}

/// One admitted stream: its proxy, what it asked for and was sent.
struct ProxyStream<'a, P: ServerProtocol> {
    inner: &'a Inner,
    proxy: Proxy,
    connection: Option<crate::registry::Connection>,
    config: ProxyConfig,
    mesh: Arc<MeshState>,
    sent: Sent,
    tx: mpsc::Sender<Result<P::Response, Status>>,
}

impl<P: ServerProtocol> ProxyStream<'_, P> {
    /// Takes a new mesh: regenerates what changed for this proxy and pushes
    /// it. `false` when the stream is gone.
    async fn update(&mut self, mesh: Arc<MeshState>) -> bool {
        self.mesh = mesh;
        self.config.refresh(&self.mesh, &self.inner.envoy);
        let types: Vec<String> = self.sent.types.keys().cloned().collect();
        for type_url in types {
            if !self.respond(&type_url, false).await {
                return false;
            }
        }
        true
    }

    /// Answers one request. `false` when the stream is gone.
    async fn handle(&mut self, request: P::Request) -> bool {
        let type_url = P::type_url(&request).to_string();
        let node = &self.proxy.node.node_id;
        if type_url == HEALTH_INFORMATION_TYPE_URL {
            let error = P::error_detail(&request);
            tracing::info!(node = %node, healthy = error.is_none(), error, "ADS: health report");
            // Reports go to the entry the stream registered or controls; a
            // proxy without one (a Pod) has no condition to set.
            if let Some(connection) = &self.connection
                && let Err(e) =
                    self.inner
                        .registry
                        .report_health(connection, error.is_none(), error)
            {
                tracing::warn!(entry = %connection.entry(), "ADS: health report not stored: {e}");
            }
            return true;
        }
        let is_ack = P::is_ack(&request);
        if let Some(error) = P::error_detail(&request) {
            tracing::warn!(
                node = %node,
                type_url,
                error,
                "ADS: the proxy rejected (NACKed) a response"
            );
            self.sent.subscribe(&type_url, P::subscription(request));
            return true;
        }
        let subscription_changed = self.sent.subscribe(&type_url, P::subscription(request));
        // An ACK that also changes what is subscribed (Envoy asking for the
        // endpoints of new clusters) is a new request.
        if is_ack && !subscription_changed {
            return true;
        }
        self.respond(&type_url, true).await
    }

    /// Sends the subscribed resources of `type_url`, unless `always` is
    /// false and they have not changed since the last response.
    async fn respond(&mut self, type_url: &str, always: bool) -> bool {
        let built = self.config.built_for(&self.mesh, type_url);
        let sent = &mut self.sent;
        // The common case, a push to a wildcard subscription that changed
        // nothing for this proxy, costs a comparison.
        if !always
            && sent.wants_all(type_url)
            && sent
                .types
                .get(type_url)
                .is_some_and(|(v, _)| *v == built.version)
        {
            return true;
        }
        let resources: Vec<NamedResource> = built
            .resources
            .iter()
            .filter(|r| sent.wants(type_url, &r.name))
            .cloned()
            .collect();
        // The version of what this stream gets: a subscription to a few
        // endpoints does not change when others do.
        let version = if resources.len() == built.resources.len() {
            built.version.clone()
        } else {
            version_of(&resources)
        };
        let previous = sent.types.get(type_url);
        if !always && previous.is_some_and(|(v, _)| *v == version) {
            return true;
        }
        let names: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
        let removed: Vec<String> = previous
            .map(|(_, old)| old.iter().filter(|n| !names.contains(n)).cloned().collect())
            .unwrap_or_default();
        let nonce = self
            .inner
            .nonces
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let response = P::response(type_url, &version, &nonce, resources, removed);
        sent.types.insert(type_url.to_string(), (version, names));
        self.tx.send(Ok(response)).await.is_ok()
    }
}

/// Keeps the mesh model of the config and the registered entries current:
/// rebuilt once per change (bursts of changes coalesce), published only
/// when it changed.
fn spawn_mesh_builder(
    mut config: watch::Receiver<Arc<ConfigSnapshot>>,
    mut entries: watch::Receiver<crate::registry::PublishedEntries>,
    trust_domain: String,
) -> watch::Receiver<Arc<MeshState>> {
    let mut cache = WorkloadCache::default();
    let mut build =
        move |config: &watch::Receiver<Arc<ConfigSnapshot>>,
              entries: &watch::Receiver<crate::registry::PublishedEntries>| {
            let snapshot = config.borrow().clone();
            let registered = entries.borrow().clone();
            let model = MeshModel::build_shared(&snapshot, &registered, &trust_domain, &mut cache);
            let endpoints = Arc::new(Built::new(envoy::endpoints(&model)));
            Arc::new(MeshState { model, endpoints })
        };
    let (tx, rx) = watch::channel(build(&config, &entries));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = config.changed() => if changed.is_err() { break },
                changed = entries.changed() => if changed.is_err() { break },
            }
            config.mark_unchanged();
            entries.mark_unchanged();
            let built = build(&config, &entries);
            tx.send_if_modified(|current| {
                let changed = current.model != built.model;
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
