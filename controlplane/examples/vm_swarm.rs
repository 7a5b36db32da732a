//! `vm_swarm`: N simulated VMs registering with `meshvm-controlplane serve`,
//! each over its own TLS connection and ADS stream, as N real VMs' agents
//! would; for `make bench-join` (bench/join/run.sh) and for trying the
//! control plane under load by hand.
//!
//! ```sh
//! cargo build --release -p meshvm-controlplane --example vm_swarm
//! ulimit -n 4096     # one descriptor per VM, here and in the control plane
//! vm_swarm --addr 127.0.0.1:15012 --ca-dir CA --vms 1000 --hold 10s --state-dir STATE
//! ```
//!
//! 1. Loads the mesh CA from `--ca-dir` and issues one workload certificate
//!    per VM (`spiffe://<trust domain>/ns/vm-ns/sa/ratings-sa`, a fresh
//!    ECDSA P-256 key each), before any connection: that cost is the VMs',
//!    not the control plane's.
//! 2. Registers the VMs, `--concurrency` at a time: for each, a new TCP +
//!    TLS connection (client certificate) and a SotW ADS stream whose first
//!    request carries the node (id `sidecar~<ip>~vm-<i>.vm-ns~vm-ns.svc.cluster.local`,
//!    `INSTANCE_IPS` 10.1.x.y, `AUTO_REGISTER_GROUP`, `NAMESPACE`,
//!    `SERVICE_ACCOUNT`, `NETWORK`, `ISTIO_VERSION`, `LABELS`) and asks for
//!    listeners, followed by a NameTable request. A VM is registered when the
//!    first response arrives (the control plane answers only after the
//!    WorkloadEntry is stored). Every response is ACKed, as Envoy does.
//! 3. Holds every stream open for `--hold` (or, with `--pause`, until a line
//!    arrives on stdin), then closes them all and, with `--state-dir`, waits
//!    for the control plane to delete the VMs' entries after its grace period.
//!
//! Progress goes to stderr; stdout gets one JSON object per phase
//! (`{"phase":"ready",…}`, `"registered"`, `"closed"`, `"deleted"`), for
//! scripts. With `--pause` the tool also waits for a line on stdin after
//! `ready` (before connecting) and after `registered` (before closing), so a
//! script can sample the control plane at those points.
//!
//! The soft RLIMIT_NOFILE is raised to the hard limit; more VMs than that
//! allows are refused up front (raise it with `ulimit -n`).

use std::io::BufRead as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use meshvm_controlplane::ca::{MeshCa, SpiffeId};
use meshvm_proto::NAME_TABLE_TYPE_URL;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The name the control plane's serving certificate is checked for.
const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Simulated VMs registering with the control plane over real TLS + ADS.
#[derive(Parser)]
#[command(name = "vm_swarm")]
struct Args {
    /// The control plane (`meshvm-controlplane serve --listen`).
    #[arg(long, default_value = "127.0.0.1:15012")]
    addr: SocketAddr,
    /// The control plane's CA directory (workload certificates are issued
    /// with its root key, in this process).
    #[arg(long)]
    ca_dir: PathBuf,
    /// How many VMs.
    #[arg(long, default_value_t = 1000)]
    vms: usize,
    /// How many registrations are in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// How long to hold the streams once all are registered (e.g. 10s,
    /// 500ms); ignored with --pause.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: Duration,
    /// Wait for a line on stdin before connecting and before closing,
    /// instead of holding for --hold.
    #[arg(long)]
    pause: bool,
    /// The control plane's state directory: after closing, wait until the
    /// VMs' WorkloadEntries are deleted (the grace period, then cleanup).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Give up waiting for the deletions after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    delete_timeout: Duration,
    /// The VMs' WorkloadGroup (AUTO_REGISTER_GROUP).
    #[arg(long, default_value = "ratings-vm")]
    group: String,
    #[arg(long, default_value = "vm-ns")]
    namespace: String,
    #[arg(long, default_value = "ratings-sa")]
    service_account: String,
    #[arg(long, default_value = "vm-network")]
    network: String,
    /// The first two octets of the VMs' addresses (10.1.x.y).
    #[arg(long, default_value = "10.1")]
    ip_prefix: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s, 500ms or 2m"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("`{text}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

/// One simulated VM, ready to connect.
struct Vm {
    index: usize,
    ip: Ipv4Addr,
    tls: ClientTlsConfig,
}

/// A registered VM's open stream.
struct Held {
    /// Dropping it ends the request stream: the VM disconnects.
    requests: mpsc::Sender<DiscoveryRequest>,
    /// Reads (and ACKs) responses until the control plane ends the stream;
    /// yields how many responses arrived.
    reader: JoinHandle<u64>,
}

/// What one registration measured.
struct Registered {
    held: Held,
    /// Start to TLS connection established (TCP, TLS handshake, HTTP/2).
    connect: Duration,
    /// Start to first response.
    total: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(args.vms > 0, "--vms must be at least 1");
    anyhow::ensure!(
        args.vms <= 250 * 256,
        "--vms: at most {} (addresses 10.1.x.y)",
        250 * 256
    );
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let nofile = raise_nofile_limit()?;
    // One descriptor per connection, plus the runtime's and stdio.
    anyhow::ensure!(
        (args.vms as u64) + 64 <= nofile,
        "{} VMs need about {} open files, the limit is {nofile}: raise it (ulimit -n)",
        args.vms,
        args.vms + 64
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

/// Raises the soft open-file limit to the hard one; returns the limit.
fn raise_nofile_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Ok(limit.rlim_cur)
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

/// Blocks until a line (or end of input) on stdin.
async fn wait_for_stdin() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    })
    .await;
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca = MeshCa::load_or_create(&args.ca_dir, None)
        .with_context(|| format!("loading the mesh CA from {}", args.ca_dir.display()))?;
    let identity = SpiffeId::parse(&format!(
        "spiffe://{}/ns/{}/sa/{}",
        ca.trust_domain(),
        args.namespace,
        args.service_account
    ))?;
    let prefix: Vec<u8> = args
        .ip_prefix
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|p: &Vec<u8>| p.len() == 2)
        .context("--ip-prefix: two octets, like 10.1")?;

    // 1. Certificates, before anything is timed.
    let started = Instant::now();
    let root = Certificate::from_pem(ca.root_cert_pem());
    let mut vms = Vec::with_capacity(args.vms);
    for index in 0..args.vms {
        let key = rcgen::KeyPair::generate().context("generating a key")?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let chain = ca.issue(&csr, &identity, None)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(root.clone())
            .domain_name(SERVER_NAME)
            .identity(Identity::from_pem(chain.concat(), key.serialize_pem()));
        let ip = Ipv4Addr::new(
            prefix[0],
            prefix[1],
            (index / 250) as u8,
            (index % 250) as u8 + 1,
        );
        vms.push(Vm { index, ip, tls });
    }
    let issue_time = started.elapsed();
    eprintln!(
        "vm_swarm: {} workload certificates for {identity} in {:.2} s",
        args.vms,
        issue_time.as_secs_f64()
    );
    emit(json!({
        "phase": "ready",
        "vms": args.vms,
        "identity": identity.to_string(),
        "certificates_s": issue_time.as_secs_f64(),
    }));
    if args.pause {
        wait_for_stdin().await;
    }

    // 2. Registration, `concurrency` at a time.
    eprintln!(
        "vm_swarm: registering {} VMs with {} ({} at a time)",
        args.vms, args.addr, args.concurrency
    );
    let args = Arc::new(args);
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<Registered, String>>> = vms
        .into_iter()
        .map(|vm| {
            let args = args.clone();
            let permits = permits.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
                register(&args, vm).await
            })
        })
        .collect();
    let mut held = Vec::with_capacity(tasks.len());
    let mut connect = Vec::with_capacity(tasks.len());
    let mut total = Vec::with_capacity(tasks.len());
    let mut errors: Vec<String> = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(r)) => {
                connect.push(r.connect);
                total.push(r.total);
                held.push(r.held);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let register_time = started.elapsed();
    let failures = errors.len();
    errors.sort();
    errors.dedup();
    eprintln!(
        "vm_swarm: {} registered, {failures} failed, in {:.2} s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        held.len(),
        register_time.as_secs_f64(),
        ms(percentile(&mut total, 50.0)),
        ms(percentile(&mut total, 99.0)),
        ms(percentile(&mut total, 100.0)),
    );
    for e in errors.iter().take(5) {
        eprintln!("vm_swarm: failure: {e}");
    }
    emit(json!({
        "phase": "registered",
        "vms": args.vms,
        "registered": held.len(),
        "failures": failures,
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
        "concurrency": args.concurrency,
        "register_all_s": register_time.as_secs_f64(),
        "per_second": held.len() as f64 / register_time.as_secs_f64(),
        "latency_ms": summary(&mut total),
        "connect_ms": summary(&mut connect),
    }));

    // 3. Hold, close, wait for the deletions.
    if args.pause {
        wait_for_stdin().await;
    } else {
        eprintln!(
            "vm_swarm: holding {} streams for {:?}",
            held.len(),
            args.hold
        );
        tokio::time::sleep(args.hold).await;
    }
    let alive = held.iter().filter(|h| !h.reader.is_finished()).count();
    let started = Instant::now();
    let readers: Vec<JoinHandle<u64>> = held
        .into_iter()
        .map(|h| {
            drop(h.requests);
            h.reader
        })
        .collect();
    let mut responses = 0;
    for reader in readers {
        responses += reader.await.unwrap_or(0);
    }
    let close_time = started.elapsed();
    eprintln!(
        "vm_swarm: {alive} streams were open at the end of the hold; all closed by the control plane in {:.2} s",
        close_time.as_secs_f64()
    );
    emit(json!({
        "phase": "closed",
        "open_at_end_of_hold": alive,
        "responses": responses,
        "close_s": close_time.as_secs_f64(),
    }));
    if let Some(state_dir) = &args.state_dir {
        let dir = state_dir.join("workloadentries").join(&args.namespace);
        let prefix = format!("{}-{}.{}.", args.group, prefix[0], prefix[1]);
        let deadline = started + args.delete_timeout;
        let mut left = count_entries(&dir, &prefix);
        while left > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = count_entries(&dir, &prefix);
        }
        let delete_time = started.elapsed();
        eprintln!(
            "vm_swarm: {left} entries left {:.2} s after closing",
            delete_time.as_secs_f64()
        );
        emit(json!({
            "phase": "deleted",
            "entries_left": left,
            "deleted_after_s": delete_time.as_secs_f64(),
        }));
        if left > 0 {
            bail!("{left} WorkloadEntries were not deleted");
        }
    }
    if failures > 0 {
        bail!("{failures} VMs failed to register");
    }
    Ok(())
}

/// Files in `dir` named `<prefix>…yaml` (the swarm's entries).
fn count_entries(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(prefix) && name.ends_with(".yaml")
                })
                .count()
        })
        .unwrap_or(0)
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// The node a VM's Envoy sends (through its agent) on its first request.
fn node(args: &Args, vm: &Vm) -> Node {
    let labels = Struct {
        fields: [("app", "ratings"), ("version", "v2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    let ip = vm.ip.to_string();
    let fields = [
        ("NAMESPACE", string(&args.namespace)),
        ("SERVICE_ACCOUNT", string(&args.service_account)),
        ("AUTO_REGISTER_GROUP", string(&args.group)),
        ("INSTANCE_IPS", string(&ip)),
        ("NETWORK", string(&args.network)),
        ("ISTIO_VERSION", string("1.28.0")),
        (
            "LABELS",
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Node {
        id: format!(
            "sidecar~{ip}~vm-{}.{ns}~{ns}.svc.cluster.local",
            vm.index,
            ns = args.namespace
        ),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// Connects one VM and waits for its first response.
async fn register(args: &Args, vm: Vm) -> Result<Registered, String> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("vm-{} ({}): {what}: {e}", vm.index, vm.ip);
    let node = node(args, &vm);
    let started = Instant::now();
    let channel = Endpoint::from_shared(format!("https://{}", args.addr))
        .map_err(|e| fail("endpoint", &e))?
        .tls_config(vm.tls.clone())
        .map_err(|e| fail("TLS", &e))?
        .connect()
        .await
        .map_err(|e| fail("connect", &error_chain(&e)))?;
    let connect = started.elapsed();
    let (requests, rx) = mpsc::channel(4);
    for request in [
        DiscoveryRequest {
            node: Some(node),
            type_url: LDS.into(),
            ..Default::default()
        },
        DiscoveryRequest {
            type_url: NAME_TABLE_TYPE_URL.into(),
            ..Default::default()
        },
    ] {
        requests
            .send(request)
            .await
            .map_err(|e| fail("request", &e))?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail("ADS", &e))?
        .into_inner();
    let first = responses
        .message()
        .await
        .map_err(|e| fail("ADS", &e))?
        .ok_or_else(|| fail("ADS", &"stream ended before the first response"))?;
    let total = started.elapsed();
    // Weak: dropping `Held::requests` must end the request stream.
    let acks = requests.downgrade();
    let reader = tokio::spawn(async move {
        let mut count = 0;
        let mut next = Some(first);
        while let Some(response) = next {
            count += 1;
            // ACK, as Envoy does, unless the VM is closing.
            if let Some(acks) = acks.upgrade() {
                let _ = acks
                    .send(DiscoveryRequest {
                        version_info: response.version_info,
                        response_nonce: response.nonce,
                        type_url: response.type_url,
                        ..Default::default()
                    })
                    .await;
            }
            next = responses.message().await.ok().flatten();
        }
        count
    });
    Ok(Registered {
        held: Held { requests, reader },
        connect,
        total,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile (`p` in 0..=100) of `values` (sorted in place).
fn percentile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn summary(values: &mut [Duration]) -> serde_json::Value {
    let mean = if values.is_empty() {
        0.0
    } else {
        values.iter().map(|d| ms(*d)).sum::<f64>() / values.len() as f64
    };
    json!({
        "p50": ms(percentile(values, 50.0)),
        "p90": ms(percentile(values, 90.0)),
        "p99": ms(percentile(values, 99.0)),
        "max": ms(percentile(values, 100.0)),
        "min": ms(percentile(values, 0.0)),
        "mean": mean,
    })
}
