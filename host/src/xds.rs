//! The xDS proxy (reference §3.4, §5.2, §6; Istio's
//! pkg/istio-agent/xds_proxy.go): Envoy's ADS stream arrives on the agent's
//! Unix socket and goes on to the control plane over TLS, authenticated with
//! the workload certificate, on one upstream stream per Envoy stream.
//!
//! On that stream the agent also speaks for itself:
//! - **NameTable** (`istio.networking.nds.v1.NameTable`): requested right
//!   after Envoy's first LDS request has been forwarded, consumed, ACKed or
//!   NACKed by the agent, never forwarded to Envoy, and published on a
//!   [`NameTableReceiver`] for the DNS proxy.
//! - **HealthInformation**: the latest [`HealthReport`] is sent after
//!   Envoy's first LDS request, on every change, and again on every new
//!   upstream stream.
//! - **Wasm filters with remote code** (ECDS, as istiod sends a WasmPlugin,
//!   or inline in LDS): the module is fetched into the cache
//!   ([`crate::wasm`]) and the filter pointed at the local file before
//!   Envoy sees the response; if the module cannot be had, the agent NACKs
//!   on Envoy's behalf (with the reason, and the version Envoy still runs)
//!   and Envoy keeps its current filters.
//!
//! If the upstream stream fails, Envoy's stream stays open: the agent
//! reconnects with capped, jittered backoff and replays what Envoy has
//! subscribed to (and, for Delta, the versions it holds), so the control
//! plane sees the same proxy come back. Both ADS flavours are carried:
//! state of the world and Delta (Istio's default).

pub mod protocol;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use meshvm_proto::istio::networking::nds::v1::NameTable;
use meshvm_proto::{HEALTH_INFORMATION_TYPE_URL, NAME_TABLE_TYPE_URL};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::identity::random_jitter;
use crate::identity_manager::{Backoff, CurrentIdentity};
use crate::wasm::WasmRewriter;
use protocol::{Delta, Protocol, Sotw};
use upstream::{UpstreamError, UpstreamOptions};

/// Envoy's listener type: its first request gates NDS and health.
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The NameTable the DNS proxy answers from (`None` until the first one).
pub type NameTableReceiver = watch::Receiver<Option<Arc<NameTable>>>;

/// The workload's health as the prober sees it, for `HealthInformation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthReport {
    Healthy,
    /// With the probe's error.
    Unhealthy(String),
}

impl HealthReport {
    fn error(&self) -> Option<String> {
        match self {
            Self::Healthy => None,
            Self::Unhealthy(e) => Some(e.clone()),
        }
    }
}

/// What the proxy needs.
#[derive(Debug, Clone)]
pub struct XdsProxyOptions {
    pub upstream: UpstreamOptions,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Ask for the NameTable (the DNS proxy is on: `ISTIO_META_DNS_CAPTURE`).
    pub name_table: bool,
    /// Fetch Wasm filters with remote code (ECDS, LDS) and point them at the
    /// cached file; without it they are forwarded as they are.
    pub wasm: Option<Arc<WasmRewriter>>,
}

impl XdsProxyOptions {
    /// The discovery address, server name, roots and cluster of `config`;
    /// 1 s doubling to 30 s between reconnects.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            upstream: UpstreamOptions::from_config(config),
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.2,
            },
            name_table: config.dns_capture,
            wasm: None,
        }
    }
}

/// Counters of the proxy's life, for status pages and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// Envoy streams open now.
    pub downstreams: usize,
    /// Upstream streams open now.
    pub upstreams: usize,
    /// Upstream streams opened so far.
    pub upstreams_opened: u64,
    /// NameTables received and accepted.
    pub name_tables_accepted: u64,
    /// NameTables refused (NACKed).
    pub name_tables_rejected: u64,
    /// Health reports sent.
    pub health_reports_sent: u64,
    /// Responses whose Wasm filters were rewritten to cached modules.
    pub wasm_rewritten: u64,
    /// Responses NACKed because a Wasm module could not be had.
    pub wasm_rejected: u64,
}

struct Shared {
    options: XdsProxyOptions,
    identities: watch::Receiver<CurrentIdentity>,
    name_table: watch::Sender<Option<Arc<NameTable>>>,
    health: watch::Sender<Option<HealthReport>>,
    status: watch::Sender<XdsStatus>,
}

/// The proxy. Cheap to clone; every clone is the same proxy.
#[derive(Clone)]
pub struct XdsProxy {
    shared: Arc<Shared>,
}

impl XdsProxy {
    /// A proxy that authenticates upstream with the identity `identities`
    /// carries (it waits for one before dialling).
    pub fn new(options: XdsProxyOptions, identities: watch::Receiver<CurrentIdentity>) -> Self {
        Self {
            shared: Arc::new(Shared {
                options,
                identities,
                name_table: watch::channel(None).0,
                health: watch::channel(None).0,
                status: watch::channel(XdsStatus::default()).0,
            }),
        }
    }

    /// The NameTables the control plane sends, for the DNS proxy.
    pub fn name_tables(&self) -> NameTableReceiver {
        self.shared.name_table.subscribe()
    }

    /// Sets the workload's health; it reaches the control plane as
    /// `HealthInformation` on every upstream stream (once Envoy has asked
    /// for listeners).
    pub fn report_health(&self, report: HealthReport) {
        self.shared.health.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&report);
            *current = Some(report);
            changed
        });
    }

    /// The proxy's counters.
    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.shared.status.subscribe()
    }

    /// The gRPC service, for a server of the caller's choosing.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    /// Serves Envoy on the Unix socket `path` (0600) until `shutdown`, then
    /// removes the socket.
    pub async fn serve(
        self,
        path: &Path,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsProxyError> {
        let listener =
            crate::uds::bind_private(path, "xDS").map_err(|error| XdsProxyError::Bind {
                path: path.to_path_buf(),
                error,
            })?;
        tracing::info!(
            path = %path.display(),
            upstream = %self.shared.options.upstream.address,
            "xDS proxy: serving"
        );
        let result = tonic::transport::Server::builder()
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await;
        let _ = std::fs::remove_file(path);
        result.map_err(XdsProxyError::Serve)
    }
}

/// Why the proxy could not serve.
#[derive(Debug, thiserror::Error)]
pub enum XdsProxyError {
    #[error("cannot bind the xDS socket {}: {error}", path.display())]
    Bind {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("xDS proxy server")]
    Serve(#[source] tonic::transport::Error),
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsProxy {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(proxy_stream::<Sotw>(
            self.shared.clone(),
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(proxy_stream::<Delta>(
            self.shared.clone(),
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What Envoy's side of one proxied stream has said so far.
struct Downstream<P: Protocol> {
    requests: Streaming<P::Request>,
    subscriptions: P::Subscriptions,
    node: Option<Node>,
    /// Envoy has sent an LDS request (on any upstream stream).
    asked_for_listeners: bool,
}

impl<P: Protocol> Downstream<P> {
    /// Records a request from Envoy. `false` when Envoy has gone.
    fn record(&mut self, request: &P::Request) {
        if self.node.is_none() {
            let mut r = request.clone();
            self.node = P::node_mut(&mut r).take();
        }
        if P::request_type_url(request) == LISTENER_TYPE_URL {
            self.asked_for_listeners = true;
        }
        P::track_request(&mut self.subscriptions, request);
    }
}

/// How an upstream stream ended.
enum Ended {
    /// Envoy closed its stream (or went away): stop.
    Envoy,
    /// The upstream stream failed or was closed: reconnect.
    Upstream,
}

fn update_status(shared: &Shared, f: impl FnOnce(&mut XdsStatus)) {
    shared.status.send_modify(f);
}

/// Proxies one Envoy stream until Envoy closes it.
async fn proxy_stream<P: Protocol>(
    shared: Arc<Shared>,
    requests: Streaming<P::Request>,
    to_envoy: mpsc::Sender<Result<P::Response, Status>>,
) {
    update_status(&shared, |s| s.downstreams += 1);
    let mut downstream = Downstream::<P> {
        requests,
        subscriptions: P::Subscriptions::default(),
        node: None,
        asked_for_listeners: false,
    };
    let mut failures: u32 = 0;
    loop {
        // Dial, still listening to Envoy (its requests are replayed).
        let connected = tokio::select! {
            connected = upstream::connect(&shared.options.upstream, shared.identities.clone()) => connected,
            ended = drain_while_disconnected(&mut downstream) => {
                let Ended::Envoy = ended else { unreachable!("only Envoy ends the drain") };
                break;
            }
        };
        let ended = match connected {
            Ok(channel) => {
                let (ended, served) =
                    run_upstream(&shared, &mut downstream, &to_envoy, channel).await;
                if served {
                    failures = 0;
                }
                ended
            }
            Err(error) => {
                log_upstream_error(&shared, &error);
                Ended::Upstream
            }
        };
        if let Ended::Envoy = ended {
            break;
        }
        failures = failures.saturating_add(1);
        let delay = shared.options.backoff.delay(failures, random_jitter());
        tracing::info!(
            attempt = failures,
            retry_in_ms = delay.as_millis() as u64,
            "xDS proxy: reconnecting to the control plane"
        );
        let ended = tokio::select! {
            () = tokio::time::sleep(delay) => None,
            ended = drain_while_disconnected(&mut downstream) => Some(ended),
        };
        if ended.is_some() {
            break;
        }
    }
    update_status(&shared, |s| s.downstreams -= 1);
    tracing::info!(stream = P::NAME, "xDS proxy: Envoy closed its stream");
}

fn log_upstream_error(shared: &Shared, error: &UpstreamError) {
    tracing::warn!(
        %error,
        upstream = %shared.options.upstream.address,
        "xDS proxy: no connection to the control plane"
    );
}

/// Reads Envoy's requests while there is no upstream stream; returns when
/// Envoy goes away (never otherwise).
async fn drain_while_disconnected<P: Protocol>(downstream: &mut Downstream<P>) -> Ended {
    loop {
        match downstream.requests.message().await {
            Ok(Some(request)) => downstream.record(&request),
            Ok(None) | Err(_) => return Ended::Envoy,
        }
    }
}

/// Runs one upstream stream. Returns how it ended and whether the control
/// plane answered at all (which resets the backoff).
async fn run_upstream<P: Protocol>(
    shared: &Shared,
    downstream: &mut Downstream<P>,
    to_envoy: &mpsc::Sender<Result<P::Response, Status>>,
    channel: tonic::transport::Channel,
) -> (Ended, bool) {
    let (up, up_rx) = mpsc::channel::<P::Request>(64);
    // Replay first (the node on the very first message), so the control
    // plane sees the proxy's state before anything new.
    let mut node_pending = true;
    let mut set_node = |request: &mut P::Request, node: &Option<Node>| {
        if std::mem::take(&mut node_pending) {
            *P::node_mut(request) = node.clone();
        }
    };
    let replay = P::replay(&downstream.subscriptions);
    let replayed = !replay.is_empty();
    for mut request in replay {
        set_node(&mut request, &downstream.node);
        let _ = up.try_send(request);
    }
    let mut own_sent = false;
    let send_own = |up: &mpsc::Sender<P::Request>, health: Option<HealthReport>| {
        if shared.options.name_table {
            let _ = up.try_send(P::subscribe(NAME_TABLE_TYPE_URL));
        }
        if let Some(report) = health {
            let _ = up.try_send(P::health(HEALTH_INFORMATION_TYPE_URL, report.error()));
            update_status(shared, |s| s.health_reports_sent += 1);
        }
    };
    let mut health = shared.health.subscribe();
    if downstream.asked_for_listeners && replayed {
        send_own(&up, health.borrow_and_update().clone());
        own_sent = true;
    }

    let mut request = Request::new(ReceiverStream::new(up_rx));
    upstream::add_metadata(&shared.options.upstream, request.metadata_mut());
    let client = upstream::ads_client(channel);
    let mut responses = match P::open(client, request).await {
        Ok(responses) => responses,
        Err(status) => {
            log_upstream_error(shared, &UpstreamError::Refused(status));
            return (Ended::Upstream, false);
        }
    };
    update_status(shared, |s| {
        s.upstreams += 1;
        s.upstreams_opened += 1;
    });
    tracing::info!(
        stream = P::NAME,
        upstream = %shared.options.upstream.address,
        "xDS proxy: upstream stream open"
    );
    let mut served = false;
    let ended = loop {
        tokio::select! {
            message = downstream.requests.message() => match message {
                Ok(Some(mut request)) => {
                    downstream.record(&request);
                    let lds = P::request_type_url(&request) == LISTENER_TYPE_URL;
                    set_node(&mut request, &downstream.node);
                    if up.send(request).await.is_err() {
                        break Ended::Upstream;
                    }
                    if lds && !own_sent {
                        send_own(&up, health.borrow_and_update().clone());
                        own_sent = true;
                    }
                }
                Ok(None) => break Ended::Envoy,
                Err(status) => {
                    tracing::debug!(%status, "xDS proxy: Envoy's stream failed");
                    break Ended::Envoy;
                }
            },
            message = responses.message() => match message {
                Ok(Some(response)) => {
                    served = true;
                    if P::response_type_url(&response) == NAME_TABLE_TYPE_URL {
                        let verdict = accept_name_table::<P>(shared, &response);
                        if up.send(P::ack(&response, verdict)).await.is_err() {
                            break Ended::Upstream;
                        }
                        continue;
                    }
                    let mut response = response;
                    if let Err(error) = rewrite_wasm::<P>(shared, &mut response).await {
                        let reject = P::reject(&downstream.subscriptions, &response, error);
                        if up.send(reject).await.is_err() {
                            break Ended::Upstream;
                        }
                        continue;
                    }
                    P::track_response(&mut downstream.subscriptions, &response);
                    if to_envoy.send(Ok(response)).await.is_err() {
                        break Ended::Envoy;
                    }
                }
                Ok(None) => {
                    tracing::warn!(stream = P::NAME, "xDS proxy: the control plane closed the stream");
                    break Ended::Upstream;
                }
                Err(status) => {
                    log_upstream_error(shared, &UpstreamError::Refused(status));
                    break Ended::Upstream;
                }
            },
            changed = health.changed(), if own_sent => {
                if changed.is_err() {
                    continue;
                }
                let report = health.borrow_and_update().clone();
                if let Some(report) = report {
                    let _ = up.send(P::health(HEALTH_INFORMATION_TYPE_URL, report.error())).await;
                    update_status(shared, |s| s.health_reports_sent += 1);
                }
            }
        }
    };
    update_status(shared, |s| s.upstreams -= 1);
    (ended, served)
}

/// Points the response's remote Wasm code at cached modules. `Err` (the
/// reason) when a module could not be had: the response must not reach
/// Envoy, which keeps the filters it runs.
async fn rewrite_wasm<P: Protocol>(
    shared: &Shared,
    response: &mut P::Response,
) -> Result<(), String> {
    let Some(rewriter) = shared.options.wasm.as_ref() else {
        return Ok(());
    };
    let type_url = P::response_type_url(response).to_string();
    if !WasmRewriter::handles(&type_url) {
        return Ok(());
    }
    match rewriter
        .rewrite(&type_url, P::resources_mut(response))
        .await
    {
        Ok(0) => Ok(()),
        Ok(n) => {
            tracing::debug!(
                type_url,
                filters = n,
                "xDS proxy: Wasm filters point at cached modules"
            );
            update_status(shared, |s| s.wasm_rewritten += 1);
            Ok(())
        }
        Err(error) => {
            let reason = error.to_string();
            tracing::error!(
                type_url,
                %reason,
                "xDS proxy: NACKing on Envoy's behalf; Envoy keeps its current filters"
            );
            update_status(shared, |s| s.wasm_rejected += 1);
            Err(reason)
        }
    }
}

/// Takes a NameTable response: `None` to ACK, `Some(reason)` to NACK.
fn accept_name_table<P: Protocol>(shared: &Shared, response: &P::Response) -> Option<String> {
    let resources = P::resources(response);
    let Some(first) = resources.first() else {
        tracing::debug!("xDS proxy: empty NameTable response ignored");
        return None;
    };
    match NameTable::decode(first.value.as_slice()) {
        Ok(table) => {
            tracing::info!(hosts = table.table.len(), "xDS proxy: NameTable received");
            shared.name_table.send_replace(Some(Arc::new(table)));
            update_status(shared, |s| s.name_tables_accepted += 1);
            None
        }
        Err(error) => {
            let reason = format!("cannot decode the NameTable: {error}");
            tracing::warn!(%reason, "xDS proxy: NACKing the NameTable; keeping the previous one");
            update_status(shared, |s| s.name_tables_rejected += 1);
            Some(reason)
        }
    }
}

#[cfg(test)]
mod tests;
