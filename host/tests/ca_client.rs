//! The CA client and the identity manager against the real local CA
//! (`meshvm-controlplane`'s, in-process over TLS on 127.0.0.1), dialled as
//! `localhost:<port>` so that Istio's server-name rule applies
//! (`istiod.istio-system.svc`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshvm_agent::ca_client::{CaAuth, CaClient, CaClientError, CaClientOptions};
use meshvm_agent::config::RootCerts;
use meshvm_agent::identity::{CertStore, KeyAlgorithm, REQUESTED_TTL, WorkloadKey, verify_issued};
use meshvm_agent::identity_manager::{Backoff, IdentityManager, IdentityOptions};
use meshvm_controlplane::ca::MeshCa;
use meshvm_controlplane::ca::server::{ServeOptions, serve};

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";
const CLUSTER: &str = "cluster1";
/// Generous liveness bound for anything that should happen "soon".
const PATIENCE: Duration = Duration::from_secs(60);

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn new_ca(dir: &Path) -> Arc<MeshCa> {
    Arc::new(MeshCa::load_or_create(dir, None).unwrap())
}

async fn serve_on(ca: Arc<MeshCa>, listener: tokio::net::TcpListener) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        cluster_id: CLUSTER.into(),
        extra_dns_names: Vec::new(),
    };
    let task = tokio::spawn(serve(ca, listener, options, async {
        let _ = stopped.await;
    }));
    let task = tokio::spawn(async move { task.await.unwrap().unwrap() });
    Running {
        stop: Some(stop),
        task,
    }
}

async fn start(ca: Arc<MeshCa>) -> (SocketAddr, Running) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve_on(ca, listener).await)
}

fn roots(ca: &MeshCa) -> RootCerts {
    RootCerts::parse(ca.root_cert_pem()).unwrap()
}

fn client(addr: SocketAddr, roots: RootCerts) -> CaClient {
    let mut options = CaClientOptions::new(
        format!("localhost:{}", addr.port()),
        roots,
        Some(CLUSTER.into()),
    );
    assert_eq!(options.server_name, "istiod.istio-system.svc");
    options.connect_timeout = Duration::from_secs(5);
    CaClient::new(options).unwrap()
}

fn write_token(ca: &MeshCa, path: &Path) {
    let token = ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    std::fs::write(path, token).unwrap();
}

fn fast_options(dir: &Path, roots: RootCerts, ttl: Duration) -> IdentityOptions {
    IdentityOptions {
        spiffe_id: SPIFFE_ID.into(),
        key_algorithm: KeyAlgorithm::EcdsaP256,
        token_path: dir.join("istio-token"),
        roots,
        store: CertStore::new(dir.join("certs")),
        ttl,
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            jitter: 0.2,
        },
        min_renew_delay: Duration::from_millis(500),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn token_then_mtls_renewal_after_the_token_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let (addr, server) = start(ca.clone()).await;
    let roots = roots(&ca);
    let c = client(addr, roots.clone());
    let token_path = tmp.path().join("istio-token");

    // No token file: no header, and the CA says why.
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = key.csr_pem(SPIFFE_ID).unwrap();
    match c
        .create_certificate(&csr, REQUESTED_TTL, CaAuth::Token(&token_path))
        .await
    {
        Err(CaClientError::Status { code, message, .. }) => {
            assert_eq!(code, tonic::Code::Unauthenticated);
            assert!(message.contains("no bearer token"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // First certificate: the bootstrap token.
    write_token(&ca, &token_path);
    let chain = c
        .create_certificate(&csr, REQUESTED_TTL, CaAuth::Token(&token_path))
        .await
        .unwrap();
    let cert = verify_issued(&chain, &key, SPIFFE_ID, &roots, SystemTime::now()).unwrap();
    let lifetime = cert.lifetime();
    assert!(
        lifetime >= REQUESTED_TTL && lifetime <= REQUESTED_TTL + Duration::from_secs(300),
        "{lifetime:?}"
    );

    // The token expires (here: disappears); the certificate renews itself.
    std::fs::remove_file(&token_path).unwrap();
    let key2 = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr2 = key2.csr_pem(SPIFFE_ID).unwrap();
    let chain2 = c
        .create_certificate(&csr2, REQUESTED_TTL, CaAuth::ClientCert(&key, &cert))
        .await
        .unwrap();
    let cert2 = verify_issued(&chain2, &key2, SPIFFE_ID, &roots, SystemTime::now()).unwrap();
    assert_ne!(cert2.chain_pem(), cert.chain_pem());

    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_root_is_a_tls_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let other = new_ca(&tmp.path().join("other"));
    let (addr, server) = start(ca.clone()).await;
    let token_path = tmp.path().join("istio-token");
    write_token(&ca, &token_path);
    let c = client(addr, roots(&other));
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = key.csr_pem(SPIFFE_ID).unwrap();
    let error = c
        .create_certificate(&csr, REQUESTED_TTL, CaAuth::Token(&token_path))
        .await
        .unwrap_err();
    assert!(matches!(error, CaClientError::Tls { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("TLS handshake"), "{message}");
    assert!(message.contains("istiod.istio-system.svc"), "{message}");
    assert!(message.contains("certificate"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_ca_down_at_start_is_retried_until_it_comes_up() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    write_token(&ca, &tmp.path().join("istio-token"));
    // A free port, released until the CA comes up.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let manager = IdentityManager::start(
        client(addr, roots(&ca)),
        fast_options(tmp.path(), roots(&ca), REQUESTED_TTL),
    );
    // Several attempts fail meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(manager.current().is_none());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = serve_on(ca.clone(), listener).await;
    let identity = tokio::time::timeout(PATIENCE, manager.ready())
        .await
        .expect("a certificate once the CA is up");
    assert_eq!(identity.cert.spiffe_id(), SPIFFE_ID);
    manager.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn short_certificates_are_renewed_over_mtls_and_published() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let (addr, server) = start(ca.clone()).await;
    write_token(&ca, &tmp.path().join("istio-token"));
    let options = fast_options(tmp.path(), roots(&ca), Duration::from_secs(10));
    let store = options.store.clone();
    let manager = IdentityManager::start(client(addr, roots(&ca)), options);
    let first = tokio::time::timeout(PATIENCE, manager.ready())
        .await
        .unwrap();
    // Renewals must use the certificate: the token is gone.
    std::fs::remove_file(tmp.path().join("istio-token")).unwrap();

    let mut rx = manager.subscribe();
    let mut renewed = None;
    tokio::time::timeout(PATIENCE, async {
        loop {
            rx.changed().await.unwrap();
            if let Some(current) = rx.borrow_and_update().clone()
                && current.cert.chain_pem() != first.cert.chain_pem()
            {
                renewed = Some(current);
                break;
            }
        }
    })
    .await
    .expect("a renewed certificate is published");
    let renewed = renewed.unwrap();
    assert_eq!(renewed.cert.spiffe_id(), SPIFFE_ID);
    assert_eq!(renewed.roots_pem(), ca.root_cert_pem());
    assert!(renewed.private_key_pem().contains("PRIVATE KEY"));
    manager.stop().await;

    // The files: 0600, and openssl accepts the chain.
    for path in [
        store.key_path(),
        store.cert_chain_path(),
        store.root_cert_path(),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    let root = tmp.path().join("ca/root-cert.pem");
    meshvm_testing::pki::assert_openssl_verifies(&root, &store.cert_chain_path());
    server.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_manager_reuses_the_stored_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let (addr, server) = start(ca.clone()).await;
    write_token(&ca, &tmp.path().join("istio-token"));
    let manager = IdentityManager::start(
        client(addr, roots(&ca)),
        fast_options(tmp.path(), roots(&ca), REQUESTED_TTL),
    );
    let first = tokio::time::timeout(PATIENCE, manager.ready())
        .await
        .unwrap();
    manager.stop().await;
    server.stop().await;

    // The CA is down and the token gone: the stored certificate still serves.
    std::fs::remove_file(tmp.path().join("istio-token")).unwrap();
    let manager = IdentityManager::start(
        client(addr, roots(&ca)),
        fast_options(tmp.path(), roots(&ca), REQUESTED_TTL),
    );
    let again = tokio::time::timeout(PATIENCE, manager.ready())
        .await
        .unwrap();
    assert_eq!(again.cert.chain_pem(), first.cert.chain_pem());
    assert_eq!(*again.private_key_pem(), *first.private_key_pem());
    manager.stop().await;
}
