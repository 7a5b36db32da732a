//! The ADS server over TLS, in-process, against a gRPC client playing a VM's
//! agent: who is refused and with which status, the WorkloadEntry a
//! registered VM gets (and loses after the grace period), the NameTable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use meshvm_controlplane::ca::server::ServeOptions;
use meshvm_controlplane::ca::{MeshCa, SpiffeId};
use meshvm_controlplane::config::watcher::DEFAULT_POLL_INTERVAL;
use meshvm_controlplane::config::{ConfigWatcher, ObjectKey};
use meshvm_controlplane::registry::{Registry, RegistryOptions};
use meshvm_controlplane::server;
use meshvm_controlplane::xds::XdsServer;
use meshvm_proto::NAME_TABLE_TYPE_URL;
use meshvm_proto::istio::networking::nds::v1::NameTable;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Liveness bound for each expected event; not a timing expectation.
const LIMIT: Duration = Duration::from_secs(30);
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

struct ControlPlane {
    _dir: tempfile::TempDir,
    ca: Arc<MeshCa>,
    registry: Arc<Registry>,
    port: u16,
    _watcher: ConfigWatcher,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn control_plane() -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/controlplane/mesh");
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    for entry in std::fs::read_dir(&mesh).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), config_dir.join(entry.file_name())).unwrap();
    }
    let ca = Arc::new(MeshCa::load_or_create(&dir.path().join("ca"), None).unwrap());
    let watcher = ConfigWatcher::start(&config_dir, DEFAULT_POLL_INTERVAL).unwrap();
    let options = RegistryOptions {
        grace_period: Duration::from_millis(500),
        ..RegistryOptions::default()
    };
    let registry =
        Arc::new(Registry::open(dir.path().join("state"), watcher.subscribe(), options).unwrap());
    let xds = XdsServer::new(
        ca.clone(),
        registry.clone(),
        watcher.subscribe(),
        Default::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(
        ca.clone(),
        Some(xds),
        listener,
        ServeOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    ControlPlane {
        _dir: dir,
        ca,
        registry,
        port,
        _watcher: watcher,
        _stop: stop,
    }
}

/// A TLS channel to the control plane, with a workload certificate for
/// `identity` unless `None`.
async fn channel(cp: &ControlPlane, identity: Option<&str>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cp.ca.root_cert_pem()))
        .domain_name("istiod.istio-system.svc");
    if let Some(identity) = identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let chain = cp
            .ca
            .issue(&csr, &SpiffeId::parse(identity).unwrap(), None)
            .unwrap();
        tls = tls.identity(Identity::from_pem(chain.concat(), key.serialize_pem()));
    }
    Endpoint::from_shared(format!("https://localhost:{}", cp.port))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// The node ratings-vm's agent sends, with `metadata` changes applied.
fn node(changes: &[(&str, Value)]) -> Node {
    let mut fields: std::collections::BTreeMap<String, Value> = [
        ("NAMESPACE", string("vm-ns")),
        ("SERVICE_ACCOUNT", string("ratings-sa")),
        ("AUTO_REGISTER_GROUP", string("ratings-vm")),
        ("INSTANCE_IPS", string("10.0.0.12")),
        ("NETWORK", string("vm-network")),
        ("ISTIO_VERSION", string("1.28.0")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in changes {
        fields.insert(k.to_string(), v.clone());
    }
    Node {
        id: "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

struct Stream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

/// Opens a SotW stream whose first request (for listeners) carries `node`.
async fn open(channel: Channel, node: Option<Node>) -> Result<Stream, tonic::Status> {
    let (requests, rx) = mpsc::channel(8);
    requests
        .send(DiscoveryRequest {
            node,
            type_url: LDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The first answer, or the refusal.
    let first = tokio::time::timeout(LIMIT, responses.message())
        .await
        .expect("an answer")?
        .expect("a response");
    assert_eq!(first.type_url, LDS);
    Ok(Stream {
        requests,
        responses,
    })
}

async fn refused(channel: Channel, node: Option<Node>) -> tonic::Status {
    match open(channel, node).await {
        Ok(_) => panic!("the stream was accepted"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_istiods_status_codes() {
    let cp = control_plane().await;
    let me = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";

    let s = refused(channel(&cp, Some(me)).await, None).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(s.message(), "missing node information");

    let s = refused(channel(&cp, None).await, Some(node(&[]))).await;
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");

    let labels_as_string = node(&[("LABELS", string("app=ratings"))]);
    let s = refused(channel(&cp, Some(me)).await, Some(labels_as_string)).await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("LABELS"), "{}", s.message());

    let other = "spiffe://cluster.local/ns/vm-ns/sa/someone-else";
    let s = refused(channel(&cp, Some(other)).await, Some(node(&[]))).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");

    let unknown = node(&[("AUTO_REGISTER_GROUP", string("no-such-group"))]);
    let s = refused(channel(&cp, Some(me)).await, Some(unknown)).await;
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("no-such-group"), "{}", s.message());

    assert!(
        cp.registry
            .workload_entries()
            .iter()
            .all(|e| { e.metadata.name != "ratings-vm-10.0.0.12-vm-network" })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_vm_gets_its_entry_and_the_name_table_and_loses_the_entry_after_the_grace_period()
 {
    let cp = control_plane().await;
    let me = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";
    let mut stream = open(channel(&cp, Some(me)).await, Some(node(&[])))
        .await
        .unwrap();
    let key = ObjectKey::new("vm-ns", "ratings-vm-10.0.0.12-vm-network");
    let entry = cp.registry.workload_entry(&key).expect("registered");
    assert_eq!(entry.spec.address, "10.0.0.12");
    assert_eq!(
        entry.metadata.labels.get("app").map(String::as_str),
        Some("ratings")
    );
    assert!(
        entry
            .metadata
            .annotations
            .contains_key("istio.io/connectedAt")
    );

    stream
        .requests
        .send(DiscoveryRequest {
            type_url: NAME_TABLE_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The VM's own entry may reach the mesh model after the first listeners
    // were sent: an updated LDS push can come first.
    let response = loop {
        let response = tokio::time::timeout(LIMIT, stream.responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if response.type_url != LDS {
            break response;
        }
    };
    assert_eq!(response.type_url, NAME_TABLE_TYPE_URL);
    let table = NameTable::decode(response.resources[0].value.as_slice()).unwrap();
    let product = &table.table["product.default.svc.cluster.local"];
    // The Service's loopback address, where the VM's Envoy listens for it.
    assert_eq!(product.ips, vec!["127.240.88.12"]);
    assert_eq!(product.registry, "Kubernetes");
    assert!(table.table.contains_key("ratings.vm-ns.svc.cluster.local"));

    // The stream ends: the entry is marked disconnected, then deleted.
    drop(stream);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while cp.registry.workload_entry(&key).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry was not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
