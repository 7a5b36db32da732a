//! The proxy between an in-process "Envoy" (a gRPC client on the Unix
//! socket) and an in-process control plane that records what it receives
//! and sends what the test tells it to, over TLS with the local control
//! plane's CA.

use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use meshvm_controlplane::ca::MeshCa;
use meshvm_controlplane::ca::server::{ServeOptions, tls_config};
use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

use super::*;
use crate::config::RootCerts;
use crate::identity::{KeyAlgorithm, WorkloadKey, verify_issued};
use crate::identity_manager::WorkloadIdentity;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Liveness bound for each expected message; not a timing expectation.
const LIMIT: Duration = Duration::from_secs(30);

/// One upstream stream as the fake control plane sees it.
struct UpstreamStream<Req, Resp> {
    requests: mpsc::UnboundedReceiver<Req>,
    responses: mpsc::UnboundedSender<Result<Resp, Status>>,
    /// The `clusterid` header and the client certificate's presence.
    cluster_id: Option<String>,
    client_cert: bool,
}

type SotwStream = UpstreamStream<DiscoveryRequest, DiscoveryResponse>;
type DeltaStream = UpstreamStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// The fake control plane: hands each new stream to the test.
#[derive(Clone)]
struct FakeControlPlane {
    sotw: mpsc::UnboundedSender<SotwStream>,
    delta: mpsc::UnboundedSender<DeltaStream>,
}

fn accept<Req: Send + 'static, Resp: Send + 'static>(
    request: Request<Streaming<Req>>,
    streams: &mpsc::UnboundedSender<UpstreamStream<Req, Resp>>,
) -> ResponseStream<Resp> {
    let cluster_id = request
        .metadata()
        .get("clusterid")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let client_cert = request.peer_certs().is_some_and(|c| !c.is_empty());
    let mut incoming = request.into_inner();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (resp_tx, resp_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(r)) = incoming.message().await {
            if req_tx.send(r).is_err() {
                break;
            }
        }
    });
    let _ = streams.send(UpstreamStream {
        requests: req_rx,
        responses: resp_tx,
        cluster_id,
        client_cert,
    });
    Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(
        resp_rx,
    ))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeControlPlane {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(accept(request, &self.sotw)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(accept(request, &self.delta)))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    proxy: XdsProxy,
    socket: PathBuf,
    sotw: mpsc::UnboundedReceiver<SotwStream>,
    delta: mpsc::UnboundedReceiver<DeltaStream>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn setup(name_table: bool) -> Setup {
    setup_with(name_table, None).await
}

async fn setup_with(name_table: bool, wasm: Option<Arc<WasmRewriter>>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(MeshCa::load_or_create(&dir.path().join("ca"), None).unwrap());
    let roots = RootCerts::parse(ca.root_cert_pem()).unwrap();

    // The workload identity, issued by the CA for our key.
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = meshvm_controlplane::ca::SpiffeId::parse(SPIFFE_ID).unwrap();
    let chain = ca
        .issue(&key.csr_pem(SPIFFE_ID).unwrap(), &id, None)
        .unwrap();
    let cert = verify_issued(&chain, &key, SPIFFE_ID, &roots, SystemTime::now()).unwrap();
    let identity = Arc::new(WorkloadIdentity {
        key: Arc::new(key),
        cert,
    });
    let (_, identities) = watch::channel(Some(identity));

    // The fake control plane on TLS, as the real one serves.
    let (sotw_tx, sotw) = mpsc::unbounded_channel();
    let (delta_tx, delta) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = tls_config(&ca, &ServeOptions::default()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeControlPlane {
                sotw: sotw_tx,
                delta: delta_tx,
            }))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );

    let options = XdsProxyOptions {
        upstream: UpstreamOptions {
            address: format!("localhost:{port}"),
            server_name: crate::ca_client::ISTIOD_SERVER_NAME.into(),
            roots,
            cluster_id: Some("cluster1".into()),
            connect_timeout: Duration::from_secs(5),
        },
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            jitter: 0.2,
        },
        name_table,
        wasm,
    };
    let proxy = XdsProxy::new(options, identities);
    let socket = dir.path().join("XDS");
    let serving = proxy.clone();
    let path = socket.clone();
    tokio::spawn(async move { serving.serve(&path, std::future::pending()).await });
    Setup {
        _dir: dir,
        proxy,
        socket,
        sotw,
        delta,
        _stop: stop,
    }
}

async fn envoy(socket: &Path) -> AggregatedDiscoveryServiceClient<Channel> {
    let path = socket.to_path_buf();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "no xDS socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let channel = Endpoint::from_static("http://xds")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    AggregatedDiscoveryServiceClient::new(channel)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
}

/// "Envoy"'s state-of-the-world stream to the proxy: where its requests go,
/// and what the proxy forwards.
async fn envoy_sotw(
    socket: &Path,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let mut client = envoy(socket).await;
    let (to_proxy, rx) = mpsc::channel(16);
    let from_proxy = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (to_proxy, from_proxy)
}

/// The next response the proxy forwards to "Envoy".
async fn from_control_plane<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("timed out waiting for a response forwarded to Envoy")
        .expect("Envoy's stream failed")
        .expect("Envoy's stream ended")
}

fn node() -> Node {
    Node {
        id: "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local".into(),
        ..Default::default()
    }
}

fn name_table_any(hosts: &[(&str, &str)]) -> Any {
    let table = NameTable {
        table: hosts
            .iter()
            .map(|(host, ip)| {
                (
                    host.to_string(),
                    NameInfo {
                        ips: vec![ip.to_string()],
                        registry: "Kubernetes".into(),
                        ..Default::default()
                    },
                )
            })
            .collect(),
    };
    Any {
        type_url: NAME_TABLE_TYPE_URL.into(),
        value: table.encode_to_vec(),
    }
}

#[tokio::test]
async fn sotw_forwards_consumes_the_name_table_reports_health_and_replays_after_reconnect() {
    let mut s = setup(true).await;
    s.proxy
        .report_health(HealthReport::Unhealthy("connection refused".into()));
    let (to_proxy, mut from_proxy) = envoy_sotw(&s.socket).await;
    to_proxy
        .send(DiscoveryRequest {
            node: Some(node()),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut up = next(&mut s.sotw, "the upstream stream").await;
    assert_eq!(up.cluster_id.as_deref(), Some("cluster1"));
    assert!(
        up.client_cert,
        "the workload certificate authenticates the stream"
    );
    let first = next(&mut up.requests, "CDS").await;
    assert_eq!(first.type_url, CDS);
    assert_eq!(first.node.unwrap().id, node().id);

    // After Envoy's first LDS request: the NameTable request, then health.
    to_proxy
        .send(DiscoveryRequest {
            type_url: LISTENER_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut up.requests, "LDS").await.type_url,
        LISTENER_TYPE_URL
    );
    let nds = next(&mut up.requests, "NDS").await;
    assert_eq!(nds.type_url, NAME_TABLE_TYPE_URL);
    assert!(nds.node.is_none());
    let health = next(&mut up.requests, "health").await;
    assert_eq!(health.type_url, HEALTH_INFORMATION_TYPE_URL);
    let detail = health.error_detail.unwrap();
    assert_eq!(
        (detail.code, detail.message.as_str()),
        (13, "connection refused")
    );

    // The NameTable is the agent's: ACKed upstream, published, not forwarded.
    let mut tables = s.proxy.name_tables();
    up.responses
        .send(Ok(DiscoveryResponse {
            type_url: NAME_TABLE_TYPE_URL.into(),
            version_info: "nds-1".into(),
            nonce: "n1".into(),
            resources: vec![name_table_any(&[(
                "product.default.svc.cluster.local",
                "10.96.0.20",
            )])],
            ..Default::default()
        }))
        .unwrap();
    let ack = next(&mut up.requests, "the NameTable ACK").await;
    assert_eq!(ack.type_url, NAME_TABLE_TYPE_URL);
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none());
    let table = tokio::time::timeout(LIMIT, tables.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(
        table.table["product.default.svc.cluster.local"].ips,
        vec!["10.96.0.20".to_string()]
    );

    // A malformed NameTable is NACKed and the previous one kept.
    up.responses
        .send(Ok(DiscoveryResponse {
            type_url: NAME_TABLE_TYPE_URL.into(),
            version_info: "nds-2".into(),
            nonce: "n2".into(),
            resources: vec![Any {
                type_url: NAME_TABLE_TYPE_URL.into(),
                value: vec![0x0a, 0xff, 0xff],
            }],
            ..Default::default()
        }))
        .unwrap();
    let nack = next(&mut up.requests, "the NameTable NACK").await;
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.unwrap();
    assert_eq!(detail.code, 13);
    assert!(
        detail.message.contains("cannot decode the NameTable"),
        "{}",
        detail.message
    );
    assert!(s.proxy.name_tables().borrow().is_some());

    // Envoy's types are forwarded; Envoy gets exactly that, first.
    up.responses
        .send(Ok(DiscoveryResponse {
            type_url: CDS.into(),
            version_info: "c1".into(),
            nonce: "n3".into(),
            ..Default::default()
        }))
        .unwrap();
    let got = from_control_plane(&mut from_proxy).await;
    assert_eq!((got.type_url.as_str(), got.nonce.as_str()), (CDS, "n3"));
    to_proxy
        .send(DiscoveryRequest {
            type_url: CDS.into(),
            version_info: "c1".into(),
            response_nonce: "n3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let envoy_ack = next(&mut up.requests, "Envoy's ACK").await;
    assert_eq!(envoy_ack.response_nonce, "n3");

    // Health changes are sent at once.
    s.proxy.report_health(HealthReport::Healthy);
    let healthy = next(&mut up.requests, "the healthy report").await;
    assert_eq!(healthy.type_url, HEALTH_INFORMATION_TYPE_URL);
    assert!(healthy.error_detail.is_none());

    // The control plane ends the stream: the proxy reconnects and replays,
    // Envoy's stream stays open.
    up.responses
        .send(Err(Status::unavailable("control plane restarting")))
        .unwrap();
    drop(up);
    let mut up = next(&mut s.sotw, "the second upstream stream").await;
    let replayed_cds = next(&mut up.requests, "replayed CDS").await;
    assert_eq!(replayed_cds.type_url, CDS);
    assert_eq!(replayed_cds.node.unwrap().id, node().id);
    assert_eq!(replayed_cds.version_info, "c1");
    assert_eq!(replayed_cds.response_nonce, "");
    let replayed_lds = next(&mut up.requests, "replayed LDS").await;
    assert_eq!(replayed_lds.type_url, LISTENER_TYPE_URL);
    assert!(replayed_lds.node.is_none());
    assert_eq!(
        next(&mut up.requests, "NDS again").await.type_url,
        NAME_TABLE_TYPE_URL
    );
    let health = next(&mut up.requests, "health again").await;
    assert_eq!(health.type_url, HEALTH_INFORMATION_TYPE_URL);
    assert!(health.error_detail.is_none(), "the latest report");
    let mut status = s.proxy.status();
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| s.upstreams_opened == 2 && s.upstreams == 1),
    )
    .await
    .unwrap()
    .unwrap();

    // Envoy leaves: the upstream stream is closed too.
    drop(to_proxy);
    drop(from_proxy);
    let end = tokio::time::timeout(LIMIT, up.requests.recv())
        .await
        .unwrap();
    assert!(end.is_none(), "the upstream stream ends with Envoy's");
}

#[tokio::test]
async fn delta_forwards_and_replays_subscriptions_with_versions() {
    let mut s = setup(false).await;
    let mut client = envoy(&s.socket).await;
    let (to_proxy, rx) = mpsc::channel(16);
    let mut from_proxy = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    to_proxy
        .send(DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut up = next(&mut s.delta, "the upstream stream").await;
    let first = next(&mut up.requests, "CDS").await;
    assert_eq!(first.node.unwrap().id, node().id);
    to_proxy
        .send(DeltaDiscoveryRequest {
            type_url: LISTENER_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        next(&mut up.requests, "LDS").await.type_url,
        LISTENER_TYPE_URL
    );
    up.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "d1".into(),
            resources: vec![Resource {
                name: "outbound|9080||ratings.vm-ns.svc.cluster.local".into(),
                version: "7".into(),
                ..Default::default()
            }],
            ..Default::default()
        }))
        .unwrap();
    let got = from_control_plane(&mut from_proxy).await;
    assert_eq!(got.nonce, "d1");
    drop(up);
    let mut up = next(&mut s.delta, "the second upstream stream").await;
    let replayed = next(&mut up.requests, "replayed CDS").await;
    assert_eq!(replayed.type_url, CDS);
    assert_eq!(replayed.node.unwrap().id, node().id);
    assert_eq!(
        replayed
            .initial_resource_versions
            .get("outbound|9080||ratings.vm-ns.svc.cluster.local")
            .map(String::as_str),
        Some("7")
    );
    assert_eq!(
        next(&mut up.requests, "replayed LDS").await.type_url,
        LISTENER_TYPE_URL
    );
    // Without DNS capture, no NameTable is asked for.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), up.requests.recv())
            .await
            .is_err(),
        "nothing else is sent"
    );
}

/// Until there is a workload certificate nothing is dialled; Envoy's
/// requests wait and are then sent.
#[tokio::test]
async fn no_upstream_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::load_or_create(&dir.path().join("ca"), None).unwrap();
    let (_tx, identities) = watch::channel(None);
    let options = XdsProxyOptions {
        upstream: UpstreamOptions {
            address: "localhost:1".into(),
            server_name: "istiod.istio-system.svc".into(),
            roots: RootCerts::parse(ca.root_cert_pem()).unwrap(),
            cluster_id: None,
            connect_timeout: Duration::from_secs(1),
        },
        backoff: Backoff::default(),
        name_table: true,
        wasm: None,
    };
    let proxy = XdsProxy::new(options, identities);
    let socket = dir.path().join("XDS");
    let serving = proxy.clone();
    let path = socket.clone();
    tokio::spawn(async move { serving.serve(&path, std::future::pending()).await });
    let (to_proxy, _responses) = envoy_sotw(&socket).await;
    to_proxy
        .send(DiscoveryRequest {
            node: Some(node()),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut status = proxy.status();
    tokio::time::timeout(LIMIT, status.wait_for(|s| s.downstreams == 1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.status().borrow().upstreams_opened, 0);
}

/// The workload's aggregate health (crate::health) reaches the control
/// plane on a Delta stream: nothing while no source has spoken, then each
/// change of the aggregate, unhealthy with code 13 and the failing source.
#[tokio::test]
async fn delta_carries_the_aggregate_health_of_posted_sources() {
    use crate::health::{Health, HealthUpdate};

    let mut s = setup(false).await;
    let health = {
        let proxy = s.proxy.clone();
        Health::new(move |report| proxy.report_health(report))
    };
    let mut client = envoy(&s.socket).await;
    let (to_proxy, rx) = mpsc::channel(16);
    let _from_proxy = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for type_url in [CDS, LISTENER_TYPE_URL] {
        to_proxy
            .send(DeltaDiscoveryRequest {
                node: Some(node()),
                type_url: type_url.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut up = next(&mut s.delta, "the upstream stream").await;
    assert_eq!(next(&mut up.requests, "CDS").await.type_url, CDS);
    assert_eq!(
        next(&mut up.requests, "LDS").await.type_url,
        LISTENER_TYPE_URL
    );

    // No probe, no post: no HealthInformation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(up.requests.try_recv().is_err(), "health sent unasked");

    let post = |body: &str| health.apply(&HealthUpdate::parse(body.as_bytes()).unwrap());
    post(r#"{"healthy":false,"message":"db down"}"#).unwrap();
    let report = next(&mut up.requests, "the unhealthy report").await;
    assert_eq!(report.type_url, HEALTH_INFORMATION_TYPE_URL);
    let detail = report.error_detail.unwrap();
    assert_eq!(
        (detail.code, detail.message.as_str()),
        (13, "filter: db down")
    );

    // Another healthy source does not make the workload healthy.
    post(r#"{"healthy":true,"source":"traffic"}"#).unwrap();
    post(r#"{"healthy":true}"#).unwrap();
    let report = next(&mut up.requests, "the healthy report").await;
    assert_eq!(report.type_url, HEALTH_INFORMATION_TYPE_URL);
    assert!(report.error_detail.is_none(), "{report:?}");
}

/// A WasmPlugin over ECDS: remote code reaches Envoy as the cached file;
/// a module that cannot be had is NACKed upstream with the reason and the
/// version Envoy still runs, and Envoy sees nothing.
#[tokio::test]
async fn ecds_wasm_is_rewritten_to_the_cache_or_nacked_on_envoys_behalf() {
    use crate::wasm::cache::tests_support::seed;
    use crate::wasm::convert::{EXTENSION_CONFIG_TYPE_URL, WASM_HTTP_FILTER_TYPE_URL};
    use crate::wasm::{CacheOptions, WasmCache};
    use envoy_types::pb::envoy::config::core::v3::{
        AsyncDataSource, HttpUri, RemoteDataSource, TypedExtensionConfig, async_data_source,
    };
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config};

    // The registry (port 9) is down; the cache holds one image.
    const CACHED: &str = "oci://127.0.0.1:9/meshvm/filter:v1";
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = WasmCache::new(CacheOptions {
        attempts: 1,
        ..CacheOptions::new(cache_dir.path().to_path_buf())
    });
    let module = b"\0asm\x01\0\0\0 filter";
    seed(&cache, CACHED, module);
    let rewriter = Arc::new(WasmRewriter::new(Arc::new(cache)));
    let mut s = setup_with(false, Some(rewriter)).await;

    let extension = |url: &str| {
        let wasm = Wasm {
            config: Some(PluginConfig {
                name: "ns.meshvm".into(),
                vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                    code: Some(AsyncDataSource {
                        specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                            http_uri: Some(HttpUri {
                                uri: url.into(),
                                ..Default::default()
                            }),
                            sha256: "nil".into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        };
        Any {
            type_url: EXTENSION_CONFIG_TYPE_URL.into(),
            value: TypedExtensionConfig {
                name: "ns.meshvm".into(),
                typed_config: Some(Any {
                    type_url: WASM_HTTP_FILTER_TYPE_URL.into(),
                    value: wasm.encode_to_vec(),
                }),
            }
            .encode_to_vec(),
        }
    };

    let (to_proxy, mut from_proxy) = envoy_sotw(&s.socket).await;
    let request = DiscoveryRequest {
        node: Some(node()),
        type_url: EXTENSION_CONFIG_TYPE_URL.into(),
        resource_names: vec!["ns.meshvm".into()],
        ..Default::default()
    };
    to_proxy.send(request.clone()).await.unwrap();
    let mut up = next(&mut s.sotw, "the upstream stream").await;
    next(&mut up.requests, "ECDS").await;

    up.responses
        .send(Ok(DiscoveryResponse {
            type_url: EXTENSION_CONFIG_TYPE_URL.into(),
            version_info: "v1".into(),
            nonce: "n1".into(),
            resources: vec![extension(CACHED)],
            ..Default::default()
        }))
        .unwrap();
    let got = from_control_plane(&mut from_proxy).await;
    assert_eq!(got.version_info, "v1");
    let config = TypedExtensionConfig::decode(got.resources[0].value.as_slice()).unwrap();
    let wasm = Wasm::decode(config.typed_config.unwrap().value.as_slice()).unwrap();
    let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
        panic!()
    };
    let Some(async_data_source::Specifier::Local(local)) = vm.code.unwrap().specifier else {
        panic!("Envoy got remote code")
    };
    let Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::Filename(path)) =
        local.specifier
    else {
        panic!()
    };
    assert_eq!(std::fs::read(path).unwrap(), module);
    to_proxy
        .send(DiscoveryRequest {
            node: None,
            version_info: "v1".into(),
            response_nonce: "n1".into(),
            ..request.clone()
        })
        .await
        .unwrap();
    assert_eq!(next(&mut up.requests, "the ACK").await.version_info, "v1");

    // v2 names a module nobody has: NACKed for Envoy, which still runs v1.
    up.responses
        .send(Ok(DiscoveryResponse {
            type_url: EXTENSION_CONFIG_TYPE_URL.into(),
            version_info: "v2".into(),
            nonce: "n2".into(),
            resources: vec![extension("oci://127.0.0.1:9/meshvm/filter:v2")],
            ..Default::default()
        }))
        .unwrap();
    let nack = next(&mut up.requests, "the NACK").await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n2")
    );
    assert_eq!(nack.resource_names, ["ns.meshvm"]);
    let detail = nack.error_detail.unwrap();
    assert!(
        detail
            .message
            .contains("Wasm filter `ns.meshvm` of `ns.meshvm`")
            && detail
                .message
                .contains("cannot fetch oci://127.0.0.1:9/meshvm/filter:v2"),
        "{}",
        detail.message
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), from_proxy.message())
            .await
            .is_err(),
        "Envoy must not see the response it cannot load"
    );
    let status = *s.proxy.status().borrow();
    assert_eq!((status.wasm_rewritten, status.wasm_rejected), (1, 1));
}
