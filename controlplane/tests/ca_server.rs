//! The CA over gRPC + TLS, end to end: a tonic client dials the server over
//! TCP with rustls, as the agent does (server name `istiod.istio-system.svc`,
//! the mesh root as trust anchor), first with its bootstrap token, then
//! renewing with the certificate it got; `openssl verify` checks the issued
//! chain independently of our code.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvm_controlplane::ca::server::{ServeOptions, serve};
use meshvm_controlplane::ca::{MeshCa, SpiffeId};
use meshvm_proto::istio::v1::auth::IstioCertificateRequest;
use meshvm_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{CertificateParams, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

const SERVER_NAME: &str = "istiod.istio-system.svc";

/// A CSR for a fresh P-256 key, asking (in vain) for another identity.
fn csr() -> (String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(vec![
        "spiffe://cluster.local/ns/kube-system/sa/admin".to_string(),
    ])
    .unwrap();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

struct Running {
    addr: SocketAddr,
    ca: Arc<MeshCa>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(MeshCa::load_or_create(dir.path(), None).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        cluster_id: "cluster1".into(),
        extra_dns_names: Vec::new(),
    };
    let task = tokio::spawn(serve(ca.clone(), listener, options, async {
        let _ = stopped.await;
    }));
    let task = tokio::spawn(async move { task.await.unwrap().unwrap() });
    Running {
        addr,
        ca,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

async fn client(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<Identity>,
) -> Result<IstioCertificateServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(SERVER_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

fn request(
    csr: &str,
    ttl: i64,
    token: Option<&str>,
    cluster: &str,
) -> Request<IstioCertificateRequest> {
    let mut req = Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: ttl,
        metadata: None,
    });
    req.metadata_mut()
        .insert("clusterid", cluster.parse().unwrap());
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req
}

fn leaf_identity(pem: &str) -> Vec<String> {
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// `openssl verify -CAfile root leaf`, our code not involved.
fn openssl_verify(dir: &Path, root_pem: &str, leaf_pem: &str) {
    let root = dir.join("root.pem");
    let leaf = dir.join("leaf.pem");
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&leaf, leaf_pem).unwrap();
    meshvm_testing::pki::assert_openssl_verifies(&root, &leaf);
}

#[tokio::test(flavor = "current_thread")]
async fn token_then_certificate_renewal() {
    let server = start().await;
    let root = server.ca.root_cert_pem().to_string();
    let token = server
        .ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    let want = SpiffeId::new("cluster.local", "vm-ns", "ratings-sa")
        .unwrap()
        .uri();

    // First certificate: bootstrap token, no client certificate.
    let mut first = client(server.addr, &root, None).await.unwrap();
    let (csr_pem, key) = csr();
    let chain = first
        .create_certificate(request(&csr_pem, 3600, Some(&token), "cluster1"))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], root, "root last");
    assert_eq!(leaf_identity(&chain[0]), vec![want.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    openssl_verify(tmp.path(), &root, &chain[0]);

    // Renewal: authenticated by that certificate alone.
    let identity = Identity::from_pem(chain.concat(), key.serialize_pem());
    let mut renewing = client(server.addr, &root, Some(identity)).await.unwrap();
    let (csr_pem, _) = csr();
    let renewed = renewing
        .create_certificate(request(&csr_pem, 0, None, ""))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_identity(&renewed[0]), vec![want]);
    openssl_verify(tmp.path(), &root, &renewed[0]);

    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn refusals_have_istiod_status_codes() {
    let server = start().await;
    let root = server.ca.root_cert_pem().to_string();
    let token = server
        .ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = MeshCa::load_or_create(other_dir.path(), None).unwrap();
    let foreign_token = other
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    let (csr_pem, _) = csr();
    let mut c = client(server.addr, &root, None).await.unwrap();

    let cases = [
        (
            request(&csr_pem, 0, None, "cluster1"),
            Code::Unauthenticated,
            "no bearer token",
        ),
        (
            request(&csr_pem, 0, Some(&foreign_token), "cluster1"),
            Code::Unauthenticated,
            "signature does not verify",
        ),
        (
            request(&csr_pem, 0, Some(&token), "cluster9"),
            Code::Unauthenticated,
            "cluster `cluster9` is not known",
        ),
        (
            request("garbage", 0, Some(&token), "cluster1"),
            Code::InvalidArgument,
            "invalid CSR",
        ),
        (
            request(&csr_pem, 91 * 86400, Some(&token), "cluster1"),
            Code::InvalidArgument,
            "is greater than the max allowed TTL 2160h0m0s",
        ),
    ];
    for (req, code, message) in cases {
        let status = c.create_certificate(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
        if code == Code::Unauthenticated {
            assert!(status.message().starts_with("request authenticate failure"));
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn client_certificate_from_another_ca_is_refused() {
    let server = start().await;
    let root = server.ca.root_cert_pem().to_string();
    let other_dir = tempfile::tempdir().unwrap();
    let other = MeshCa::load_or_create(other_dir.path(), None).unwrap();
    let (csr_pem, key) = csr();
    let id = SpiffeId::new("cluster.local", "vm-ns", "ratings-sa").unwrap();
    let chain = other.issue(&csr_pem, &id, None).unwrap();
    let identity = Identity::from_pem(chain.concat(), key.serialize_pem());
    // The TLS handshake (or, with TLS 1.3, the first request) fails.
    let result = match client(server.addr, &root, Some(identity)).await {
        Err(_) => Err(()),
        Ok(mut c) => c
            .create_certificate(request(&csr_pem, 0, None, ""))
            .await
            .map(|_| ())
            .map_err(|_| ()),
    };
    assert!(result.is_err(), "a foreign client certificate was accepted");
    server.stop().await;
}

/// Kills the child on drop (a failing assertion must not leak the server).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_binary_serves_what_onboard_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let out = tmp.path().join("vm");
    let bin = env!("CARGO_BIN_EXE_meshvm-controlplane");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/controlplane/workloadgroup-ratings.yaml");
    let status = Command::new(bin)
        .args(["onboard", "--cluster-id", "cluster1", "-f"])
        .arg(&manifest)
        .arg("-o")
        .arg(&out)
        .arg("--ca-dir")
        .arg(&ca_dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");

    // A free port: bind, read, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _server = ChildGuard(
        Command::new(bin)
            .args(["serve", "--cluster-id", "cluster1", "--listen"])
            .arg(addr.to_string())
            .arg("--ca-dir")
            .arg(&ca_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let root = std::fs::read_to_string(out.join("root-cert.pem")).unwrap();
    let token = std::fs::read_to_string(out.join("istio-token")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        match client(addr, &root, None).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("server not up: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (csr_pem, _) = csr();
    let chain = c
        .create_certificate(request(&csr_pem, 0, Some(&token), "cluster1"))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        leaf_identity(&chain[0]),
        vec!["spiffe://cluster.local/ns/vm-ns/sa/ratings-sa".to_string()]
    );
    assert_eq!(chain[1], root);
}
