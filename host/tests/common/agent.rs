//! Helpers for tests that run `meshvm-agent` as a process: onboarding files
//! for the local control plane's CA, that CA served in-process over TLS
//! (stoppable, restartable on the same port, and able to misbehave on
//! purpose), and the agent with its log captured.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshvm_testing::process::{Process, wait_until};

use meshvm_controlplane::ca::server::{ServeOptions, tls_config};
use meshvm_controlplane::ca::{CaService, MeshCa, SpiffeId};
use meshvm_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshvm_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The identity of testdata/onboarding/ratings-vm.
pub const SPIFFE_ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";
pub const CLUSTER: &str = "cluster1";
/// Polls `done` until it holds (see [`wait_until`]).
pub fn wait_for(what: &str, done: impl FnMut() -> bool) {
    wait_until(what, String::new, done);
}

/// How the CA answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Correctly.
    None,
    /// With no certificates at all.
    EmptyChain,
    /// With a certificate for a key other than the CSR's.
    OtherKey,
    /// With a certificate for another service account.
    OtherIdentity,
    /// With a certificate that has expired by the time it arrives.
    Expired,
}

/// The real CA service, with answers altered per [`Fault`].
#[derive(Clone)]
struct FaultyCa {
    ca: Arc<MeshCa>,
    inner: CaService,
    fault: Arc<Mutex<Fault>>,
}

#[tonic::async_trait]
impl IstioCertificateService for FaultyCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let csr = request.get_ref().csr.clone();
        // Authentication stays real: the altered answers go to callers the
        // CA accepted.
        let good = self.inner.create_certificate(request).await?;
        let fault = *self.fault.lock().unwrap();
        let me = SpiffeId::parse(SPIFFE_ID).unwrap();
        let issue = |csr: &str, id: &SpiffeId, ttl: Duration| {
            self.ca
                .issue(csr, id, Some(ttl))
                .map_err(|e| Status::internal(e.to_string()))
        };
        let cert_chain = match fault {
            Fault::None => return Ok(good),
            Fault::EmptyChain => Vec::new(),
            Fault::OtherKey => {
                let other = rcgen::KeyPair::generate().unwrap();
                let other_csr = rcgen::CertificateParams::default()
                    .serialize_request(&other)
                    .unwrap()
                    .pem()
                    .unwrap();
                issue(&other_csr, &me, Duration::from_secs(3600))?
            }
            Fault::OtherIdentity => {
                let other = SpiffeId::parse("spiffe://cluster.local/ns/vm-ns/sa/intruder").unwrap();
                issue(&csr, &other, Duration::from_secs(3600))?
            }
            Fault::Expired => {
                let chain = issue(&csr, &me, Duration::from_secs(1))?;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                chain
            }
        };
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// The local control plane's CA on 127.0.0.1, served by the test's runtime.
pub struct CaServer {
    pub ca: Arc<MeshCa>,
    pub fault: Arc<Mutex<Fault>>,
    port: u16,
    runtime: tokio::runtime::Handle,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl CaServer {
    /// A new CA in `dir`, serving on a free port.
    pub fn start(runtime: &tokio::runtime::Runtime, dir: &Path) -> Self {
        let ca = Arc::new(MeshCa::load_or_create(dir, None).unwrap());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let mut server = Self {
            ca,
            fault: Arc::new(Mutex::new(Fault::None)),
            port: listener.local_addr().unwrap().port(),
            runtime: runtime.handle().clone(),
            running: None,
        };
        server.serve(listener);
        server
    }

    /// `localhost:<port>`, as `CA_ADDR` (Istio's server-name rule then
    /// expects `istiod.istio-system.svc`).
    pub fn address(&self) -> String {
        format!("localhost:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let options = ServeOptions {
            cluster_id: CLUSTER.into(),
            extra_dns_names: Vec::new(),
        };
        let tls = tls_config(&self.ca, &options).unwrap();
        let service = FaultyCa {
            ca: self.ca.clone(),
            inner: CaService::new(self.ca.clone(), CLUSTER),
            fault: self.fault.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = self.runtime.spawn(async move {
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(IstioCertificateServiceServer::new(service))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        self.running = Some((stop, task));
    }

    /// Stops serving (connections are refused) until [`CaServer::resume`].
    pub fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            self.runtime.block_on(task).unwrap();
        }
    }

    /// Serves again on the same port.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "already serving");
        let addr = self.addr();
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap();
        self.serve(listener);
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            let _ = stop.send(());
        }
    }
}

/// Writes onboarding files as istioctl does for testdata's ratings-vm, with
/// `ca`'s root and a one-hour token from it, into `dir`.
pub fn onboarding_dir(ca: &MeshCa, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/onboarding/ratings-vm");
    for file in ["cluster.env", "mesh.yaml", "hosts"] {
        std::fs::copy(testdata.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("root-cert.pem"), ca.root_cert_pem()).unwrap();
    let token = ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    std::fs::write(dir.join("istio-token"), token).unwrap();
    dir.to_path_buf()
}

/// `meshvm-agent run` as a child process, its log collected.
pub struct Agent {
    process: Process,
    pub state_dir: PathBuf,
    pub sds_socket: PathBuf,
}

impl Agent {
    /// Without Envoy (`--no-envoy`): the identity and SDS part.
    pub fn spawn(onboarding: &Path, work: &Path, ca_address: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_with_args(onboarding, work, ca_address, env, &["--no-envoy"])
    }

    pub fn spawn_with_args(
        onboarding: &Path,
        work: &Path,
        ca_address: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let state_dir = work.join("certs");
        let sds_socket = work.join("sds.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"));
        command
            .arg("--onboarding-dir")
            .arg(onboarding)
            .arg("run")
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--sds-socket")
            .arg(&sds_socket)
            .arg("--run-dir")
            .arg(work.join("run"))
            .args(["--status-listen", "127.0.0.1:0"])
            .args(args)
            .env("CA_ADDR", ca_address)
            .env("RUST_LOG", "info");
        // The onboarding files turn the DNS proxy on: a free port, so that
        // agents of parallel tests do not compete for 15053.
        if !args.contains(&"--dns-listen") {
            command.args(["--dns-listen", "127.0.0.1:0"]);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        Self {
            process: Process::spawn("meshvm-agent", command),
            state_dir,
            sds_socket,
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// How many log lines contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.process.count(text)
    }

    /// Waits until `text` has been logged `n` times.
    pub fn wait_for_log(&self, text: &str, n: usize) {
        self.process.wait_for_log(text, n);
    }

    /// `cert-chain.pem` in the state directory, if written.
    pub fn chain(&self) -> Option<String> {
        std::fs::read_to_string(self.state_dir.join("cert-chain.pem")).ok()
    }

    /// Waits until a chain is on disk and returns it.
    pub fn wait_for_chain(&self) -> String {
        wait_for("the certificate chain on disk", || self.chain().is_some());
        self.chain().unwrap()
    }

    /// The leaf's serial, as `meshvm-agent secrets` reads it over SDS.
    pub fn served_serial(&self) -> Option<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
            .arg("secrets")
            .arg("--sds-socket")
            .arg(&self.sds_socket)
            .args(["--format", "json"])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["secrets"].as_array()?.iter().find_map(|s| {
            (s["kind"] == "certificate")
                .then(|| s["chain"][0]["serial"].as_str().map(String::from))?
        })
    }

    /// The process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGTERM, then waits; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.process.terminate()
    }
}

/// The serial of the first certificate in `pem`, written as
/// `meshvm-agent secrets` shows serials.
pub fn leaf_serial(pem: &str) -> String {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let cert = block.parse_x509().unwrap();
    cert.raw_serial_as_string()
}
