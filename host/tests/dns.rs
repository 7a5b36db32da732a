//! The DNS proxy against real clients and a real upstream: `dig` asks the
//! in-process server (or `meshvm-agent run`); dnsmasq on loopback plays the
//! VM's nameserver.

#[path = "common/agent.rs"]
mod agent;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvm_agent::dns::{DnsOptions, DnsServer};
use meshvm_agent::status::{self, StatusSources};
use meshvm_agent::xds::{NameTableReceiver, XdsStatus};
use meshvm_proto::istio::networking::nds::v1::NameTable;
use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;
use meshvm_testing::process::{Process, free_port, wait_until};
use tokio::sync::{oneshot, watch};

/// What `dig` printed, picked apart.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    /// `(name, type, data)` of the answer section.
    answers: Vec<(String, String, String)>,
    /// The TTL of each answer.
    ttls: Vec<u32>,
    output: String,
}

impl Dig {
    fn data(&self, rtype: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .answers
            .iter()
            .filter(|a| a.1 == rtype)
            .map(|a| a.2.clone())
            .collect();
        out.sort();
        out
    }
}

/// Runs `dig @addr name type extra...` (blocking; call from
/// `spawn_blocking`).
fn dig(addr: SocketAddr, name: &str, rtype: &str, extra: &[&str]) -> Dig {
    let output = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .args(["+tries=1", "+time=30", "+nocookie"])
        .args(extra)
        .args([name, rtype])
        .output()
        .expect("dig runs (apt-get install bind9-dnsutils)");
    let output = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NONE")
        .to_string();
    let flags = output
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let answers = output
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f[0].to_string(), f[3].to_string(), f[4..].join(" "))
                })
                .collect()
        })
        .unwrap_or_default();
    let ttls = output
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    Dig {
        status,
        flags,
        answers,
        ttls,
        output,
    }
}

async fn dig_async(addr: SocketAddr, name: &str, rtype: &str, extra: &[&str]) -> Dig {
    let (name, rtype) = (name.to_string(), rtype.to_string());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        dig(addr, &name, &rtype, &extra)
    })
    .await
    .unwrap()
}

fn host(ips: &[&str], registry: &str, short: &str, ns: &str) -> NameInfo {
    NameInfo::new(ips, registry, short, ns)
}

fn mesh_table() -> NameTable {
    let mut table = NameTable::default();
    let t = &mut table.table;
    t.insert(
        "ratings.vm-ns.svc.cluster.local".into(),
        host(&["10.96.0.10"], "Kubernetes", "ratings", "vm-ns"),
    );
    t.insert(
        "reviews.other.svc.cluster.local".into(),
        host(
            &["10.96.0.11", "fd00::11"],
            "Kubernetes",
            "reviews",
            "other",
        ),
    );
    t.insert(
        "*.wild.example.com".into(),
        host(&["192.0.2.9"], "External", "", ""),
    );
    let many: Vec<String> = (0..300)
        .map(|i| format!("10.20.{}.{}", i / 200, i % 200 + 1))
        .collect();
    t.insert(
        "many.example.com".into(),
        NameInfo {
            ips: many,
            ..Default::default()
        },
    );
    table
}

/// A running proxy: its address, the NameTable sender, and a stop switch.
struct Proxy {
    addr: SocketAddr,
    /// The agent's status server with this proxy's counters on `/metrics`.
    status: SocketAddr,
    tables: watch::Sender<Option<Arc<NameTable>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(mut options: DnsOptions, dir: &Path, table: Option<NameTable>) -> Self {
        let resolv = dir.join("resolv.conf");
        if !resolv.exists() {
            std::fs::write(&resolv, "nameserver 127.0.0.1\nsearch ec2.internal corp\n").unwrap();
        }
        options.resolv_conf = resolv;
        let (tables, rx): (_, NameTableReceiver) = watch::channel(table.map(Arc::new));
        let server = DnsServer::bind(options, rx.clone())
            .await
            .expect("the proxy binds");
        let addr = server.local_addr();
        let sources = StatusSources {
            identity: watch::channel(None).1,
            xds: watch::channel(XdsStatus::default()).1,
            name_table: rx,
            envoy: None,
            dns: true,
            dns_metrics: Some(server.metrics()),
            health: Arc::new(meshvm_agent::health::Health::new(|_| {})),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let status = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let (stop_status, status_stopped) = oneshot::channel::<()>();
        let status_task = tokio::spawn(status::serve(listener, sources, async {
            let _ = status_stopped.await;
        }));
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = stopped.await;
                })
                .await;
            let _ = stop_status.send(());
            status_task.await.unwrap().unwrap();
        });
        Self {
            addr,
            status,
            tables,
            stop: Some(stop),
            task,
        }
    }

    /// Sends the mesh's NameTable and waits until the proxy answers from it.
    async fn publish_mesh_table(&self) {
        self.tables.send_replace(Some(Arc::new(mesh_table())));
        let addr = self.addr;
        tokio::task::spawn_blocking(move || {
            wait_until("the first table is used", String::new, || {
                dig(addr, "ratings.vm-ns", "A", &[]).status == "NOERROR"
            })
        })
        .await
        .unwrap();
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

/// `/metrics` of the proxy's status server: each sample line as
/// `series → value`.
async fn scrape(proxy: &Proxy) -> std::collections::BTreeMap<String, f64> {
    let addr = proxy.status;
    let (code, body) =
        tokio::task::spawn_blocking(move || meshvm_testing::envoy::http_get(addr, "/metrics"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(code, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.split_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn options() -> DnsOptions {
    let mut options = DnsOptions::new("vm-ns");
    options.listen = "127.0.0.1:0".parse().unwrap();
    options
}

/// dnsmasq serving `hosts` on 127.0.0.1:`port` (UDP and TCP), no recursion.
fn dnsmasq(dir: &Path, hosts: &str) -> (Process, SocketAddr) {
    dnsmasq_on(dir, hosts, "127.0.0.1".parse().unwrap())
}

/// dnsmasq serving `hosts` on `ip`:`port` (UDP and TCP), no recursion.
fn dnsmasq_on(dir: &Path, hosts: &str, ip: IpAddr) -> (Process, SocketAddr) {
    let file = dir.join("upstream-hosts");
    std::fs::write(&file, hosts).unwrap();
    // dnsmasq started as root drops to `nobody`, who must read the file.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port();
    let mut command = Command::new("dnsmasq");
    command.args([
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        // Authoritative for the test zone: NXDOMAIN, not REFUSED.
        "--local=/example.org/",
        &format!("--addn-hosts={}", file.display()),
        &format!("--port={port}"),
        &format!("--listen-address={ip}"),
        "--bind-interfaces",
        "--keep-in-foreground",
        "--log-facility=-",
        &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
    ]);
    let process = Process::spawn("dnsmasq", command);
    let addr = SocketAddr::new(ip, port);
    wait_until(
        "dnsmasq answers",
        || process.log(),
        || dig(addr, "upstream.test", "A", &["+time=1"]).status != "NONE",
    );
    (process, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_cname_empty_noerror_and_wildcard() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(options(), dir.path(), Some(mesh_table())).await;
    let addr = proxy.addr;

    // Every alternate name of a Kubernetes service in the VM's namespace.
    for name in [
        "ratings.vm-ns.svc.cluster.local",
        "RATINGS.vm-ns.svc",
        "ratings.vm-ns",
        "ratings",
    ] {
        let d = dig_async(addr, name, "A", &[]).await;
        assert_eq!(d.status, "NOERROR", "{name}: {}", d.output);
        assert!(d.flags.contains(&"aa".into()), "{}", d.output);
        assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
        assert_eq!(d.answers[0].1, "A");
        assert!(d.answers.iter().all(|a| a.0.ends_with('.')));
        assert_eq!(d.ttls, [30], "{}", d.output);
    }
    // Another namespace: no bare name (forwarded to an upstream that is
    // not there: SERVFAIL, never a made-up answer).
    let d = dig_async(addr, "reviews.other", "A", &[]).await;
    assert_eq!(d.data("A"), ["10.96.0.11"]);

    // The first search domain: a CNAME to the mesh name.
    let d = dig_async(addr, "ratings.vm-ns.ec2.internal", "A", &[]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.data("CNAME"), ["ratings.vm-ns."], "{}", d.output);
    assert_eq!(d.data("A"), ["10.96.0.10"]);

    // A known name without IPv6: empty NOERROR, not NXDOMAIN.
    let d = dig_async(addr, "ratings.vm-ns", "AAAA", &[]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert!(
        d.answers.is_empty() && d.flags.contains(&"aa".into()),
        "{}",
        d.output
    );
    let d = dig_async(addr, "reviews.other", "AAAA", &[]).await;
    assert_eq!(d.data("AAAA"), ["fd00::11"]);

    // Wildcards answer with the question's name.
    let d = dig_async(addr, "api.v1.wild.example.com", "A", &[]).await;
    assert_eq!(d.data("A"), ["192.0.2.9"], "{}", d.output);
    assert_eq!(d.answers[0].0, "api.v1.wild.example.com.");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answer_is_truncated_over_udp_and_complete_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(options(), dir.path(), Some(mesh_table())).await;
    // Over UDP only (+ignore: no retry): TC with what fits in 1232 bytes.
    let d = dig_async(
        proxy.addr,
        "many.example.com",
        "A",
        &["+ignore", "+bufsize=1232"],
    )
    .await;
    assert!(d.flags.contains(&"tc".into()), "{}", d.output);
    assert!(d.answers.len() < 300, "{}", d.output);
    // dig retries over TCP by itself and gets all 300.
    let d = dig_async(proxy.addr, "many.example.com", "A", &[]).await;
    assert!(
        d.output.contains("Truncated, retrying in TCP mode"),
        "{}",
        d.output
    );
    assert_eq!(d.data("A").len(), 300, "{}", d.output);
    // Several queries on one TCP connection (+keepopen).
    let d = dig_async(
        proxy.addr,
        "many.example.com",
        "A",
        &["+tcp", "+keepopen", "ratings", "A", "ratings.vm-ns", "A"],
    )
    .await;
    assert_eq!(
        d.output.matches("status: NOERROR").count(),
        3,
        "{}",
        d.output
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_a_real_upstream_over_udp_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let (_dnsmasq, upstream) = dnsmasq(
        dir.path(),
        "198.51.100.1 upstream.test\n198.51.100.2 www.example.org\n2001:db8::2 www.example.org\n",
    );
    let mut options = options();
    options.upstreams = vec![upstream];
    let proxy = Proxy::start(options, dir.path(), Some(mesh_table())).await;
    for transport in ["+notcp", "+tcp"] {
        let d = dig_async(proxy.addr, "www.example.org", "A", &[transport]).await;
        assert_eq!(d.status, "NOERROR", "{}", d.output);
        assert_eq!(d.data("A"), ["198.51.100.2"], "{}", d.output);
        // Relayed as is: dnsmasq's TTL, not ours.
        // (dnsmasq's TTL for hosts-file names is 0.)
        assert_eq!(d.ttls, [0], "{}", d.output);
        let d = dig_async(proxy.addr, "www.example.org", "AAAA", &[transport]).await;
        assert_eq!(d.data("AAAA"), ["2001:db8::2"], "{}", d.output);
        // An unknown name: the upstream's NXDOMAIN, relayed.
        let d = dig_async(proxy.addr, "nowhere.example.org", "A", &[transport]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    }
    // Mesh names still come from the table, other types of them upstream.
    let d = dig_async(proxy.addr, "ratings.vm-ns", "A", &[]).await;
    assert_eq!(d.data("A"), ["10.96.0.10"]);
    let d = dig_async(proxy.addr, "ratings.vm-ns", "TXT", &[]).await;
    assert!(d.status != "NONE" && d.answers.is_empty(), "{}", d.output);
    assert!(!d.flags.contains(&"aa".into()), "{}", d.output);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_servfail_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A UDP socket that never answers, and a closed port.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let timeout = Duration::from_secs(1);
    let mut options = options();
    options.upstreams = vec![silent.local_addr().unwrap(), closed];
    options.forward_timeout = timeout;
    let proxy = Proxy::start(options.clone(), dir.path(), Some(mesh_table())).await;
    let started = Instant::now();
    let d = dig_async(proxy.addr, "www.example.org", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    // The silent server was waited for (the timeout is honoured, not
    // skipped) and dig (30 s) got an answer before giving up.
    assert!(started.elapsed() >= timeout);
    let d = dig_async(proxy.addr, "www.example.org", "A", &["+tcp"]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    proxy.stop().await;

    // In parallel: the same, each server once.
    options.forward_parallel = true;
    let proxy = Proxy::start(options, dir.path(), Some(mesh_table())).await;
    let d = dig_async(proxy.addr, "www.example.org", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_table_servfail_or_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (_dnsmasq, upstream) = dnsmasq(dir.path(), "198.51.100.2 www.example.org\n");
    let mut options = options();
    options.upstreams = vec![upstream];
    let proxy = Proxy::start(options.clone(), dir.path(), None).await;
    let d = dig_async(proxy.addr, "www.example.org", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    // The first table arrives: answers start.
    proxy.publish_mesh_table().await;
    proxy.stop().await;

    options.forward_before_table = true;
    let proxy = Proxy::start(options, dir.path(), None).await;
    let d = dig_async(proxy.addr, "www.example.org", "A", &[]).await;
    assert_eq!(d.data("A"), ["198.51.100.2"], "{}", d.output);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saved_table_answers_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir
        .path()
        .join("state")
        .join(meshvm_agent::dns::SAVED_TABLE_FILE);
    std::fs::create_dir_all(saved.parent().unwrap()).unwrap();
    let mut options = options();
    options.saved_table = Some(saved.clone());
    let proxy = Proxy::start(options.clone(), dir.path(), Some(mesh_table())).await;
    let file = saved.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the table is saved", String::new, || file.exists())
    })
    .await
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    proxy.stop().await;

    // Restarted with no control plane: the saved table answers at once.
    let proxy = Proxy::start(options.clone(), dir.path(), None).await;
    let d = dig_async(proxy.addr, "ratings.vm-ns", "A", &[]).await;
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    // A new table replaces it, and is saved in turn.
    let mut next = NameTable::default();
    next.table.insert(
        "new.example.com".into(),
        host(&["192.0.2.50"], "External", "", ""),
    );
    proxy.tables.send_replace(Some(Arc::new(next)));
    let addr = proxy.addr;
    tokio::task::spawn_blocking(move || {
        wait_until("the new table is used", String::new, || {
            dig(addr, "new.example.com", "A", &[]).data("A") == ["192.0.2.50"]
        })
    })
    .await
    .unwrap();
    proxy.stop().await;
    // A corrupt file is ignored (SERVFAIL until a table arrives).
    std::fs::write(&saved, b"\xff\xff\xff not protobuf").unwrap();
    let proxy = Proxy::start(options, dir.path(), None).await;
    let d = dig_async(proxy.addr, "new.example.com", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_is_skipped_sequentially_and_outrun_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let (_dnsmasq, upstream) = dnsmasq(dir.path(), "198.51.100.2 www.example.org\n");
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for parallel in [false, true] {
        let mut options = options();
        options.upstreams = vec![closed, silent.local_addr().unwrap(), upstream];
        // Sequentially, the silent server costs one timeout (whatever the
        // shuffled order); in parallel, dnsmasq answers first.
        options.forward_timeout = Duration::from_secs(1);
        options.forward_parallel = parallel;
        let proxy = Proxy::start(options, dir.path(), Some(mesh_table())).await;
        for transport in ["+notcp", "+tcp"] {
            let d = dig_async(proxy.addr, "www.example.org", "A", &[transport]).await;
            assert_eq!(
                d.data("A"),
                ["198.51.100.2"],
                "parallel {parallel}: {}",
                d.output
            );
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_outcome_and_time_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (_dnsmasq, upstream) = dnsmasq(dir.path(), "198.51.100.2 www.example.org\n");
    let mut options = options();
    options.upstreams = vec![upstream];
    let proxy = Proxy::start(options, dir.path(), None).await;
    let outcome = |o: &str| format!("meshvm_agent_dns_queries_total{{outcome=\"{o}\"}}");
    let upstream_count = "meshvm_agent_dns_upstream_duration_seconds_count";
    // What changed between two scrapes, for the series that did.
    let moved = |before: &std::collections::BTreeMap<String, f64>,
                 after: &std::collections::BTreeMap<String, f64>| {
        let mut changes: Vec<(String, f64)> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(k, _)| !k.contains("_bucket") && !k.ends_with("_sum"))
            .collect();
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        changes
    };
    let count = |k: &str, d: f64| vec![(k.to_string(), d)];

    // No table yet: SERVFAIL, nothing forwarded.
    let m0 = scrape(&proxy).await;
    assert_eq!(m0[&outcome("servfail")], 0.0);
    assert_eq!(m0["meshvm_agent_dns_table_names"], 0.0);
    let d = dig_async(proxy.addr, "ratings.vm-ns", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    let m1 = scrape(&proxy).await;
    assert_eq!(moved(&m0, &m1), count(&outcome("servfail"), 1.0));

    // The table arrives: its size, then a table answer.
    proxy.publish_mesh_table().await;
    let m2 = scrape(&proxy).await;
    // 4 hosts; 9 names (4 + 3 for the Kubernetes services, 1 each for the
    // others) and their 9 CNAMEs in the first search domain.
    assert_eq!(m2["meshvm_agent_dns_table_hosts"], 4.0);
    assert_eq!(m2["meshvm_agent_dns_table_names"], 18.0);
    let d = dig_async(proxy.addr, "ratings.vm-ns.ec2.internal", "A", &[]).await;
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    let m3 = scrape(&proxy).await;
    assert_eq!(moved(&m2, &m3), count(&outcome("table"), 1.0));

    // Forwarded: an upstream answer, and an upstream NXDOMAIN; both timed.
    let d = dig_async(proxy.addr, "www.example.org", "A", &[]).await;
    assert_eq!(d.data("A"), ["198.51.100.2"], "{}", d.output);
    let m4 = scrape(&proxy).await;
    assert_eq!(
        moved(&m3, &m4),
        [
            (outcome("forwarded"), 1.0),
            (upstream_count.to_string(), 1.0)
        ]
    );
    let d = dig_async(proxy.addr, "nowhere.example.org", "A", &["+tcp"]).await;
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    let m5 = scrape(&proxy).await;
    assert_eq!(
        moved(&m4, &m5),
        [
            (outcome("nxdomain"), 1.0),
            (upstream_count.to_string(), 1.0)
        ]
    );
    let histogram = "meshvm_agent_dns_upstream_duration_seconds";
    assert_eq!(m5[&format!("{histogram}_bucket{{le=\"+Inf\"}}")], 2.0);
    assert_eq!(m5[&format!("{histogram}_bucket{{le=\"10\"}}")], 2.0);
    assert!(m5[&format!("{histogram}_sum")] > 0.0);

    // Malformed: a header promising a question that is cut short.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(
            &[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w'],
            proxy.addr,
        )
        .await
        .unwrap();
    let mut reply = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), socket.recv(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((n >= 12, reply[3] & 0x0f), (true, 1), "FORMERR");
    let m6 = scrape(&proxy).await;
    assert_eq!(moved(&m5, &m6), count(&outcome("malformed"), 1.0));
    proxy.stop().await;
}

/// Whether `::1` is usable; if not, says why (the IPv6 test is then
/// skipped: some containers have no IPv6 loopback).
fn ipv6_loopback() -> bool {
    match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => true,
        Err(error) => {
            eprintln!("skipped: no IPv6 loopback (cannot bind [::1]: {error})");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listens_and_forwards_over_ipv6() {
    if !ipv6_loopback() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_dnsmasq, upstream) = dnsmasq_on(
        dir.path(),
        "198.51.100.2 www.example.org\n2001:db8::2 www.example.org\n",
        "::1".parse().unwrap(),
    );
    let mut options = options();
    options.listen = "[::1]:0".parse().unwrap();
    options.upstreams = vec![upstream];
    let proxy = Proxy::start(options, dir.path(), Some(mesh_table())).await;
    assert_eq!(proxy.addr.ip().to_string(), "::1");
    for transport in ["+notcp", "+tcp"] {
        // From the table: A and AAAA.
        let d = dig_async(proxy.addr, "ratings.vm-ns", "A", &[transport]).await;
        assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
        assert!(d.output.contains("SERVER: ::1#"), "{}", d.output);
        let d = dig_async(proxy.addr, "reviews.other.svc", "AAAA", &[transport]).await;
        assert_eq!(d.data("AAAA"), ["fd00::11"], "{}", d.output);
        assert!(d.flags.contains(&"aa".into()), "{}", d.output);
        assert_eq!(d.ttls, [30], "{}", d.output);
        // Forwarded to an IPv6 upstream, relayed as is (dnsmasq's TTL 0).
        let d = dig_async(proxy.addr, "www.example.org", "AAAA", &[transport]).await;
        assert_eq!(d.data("AAAA"), ["2001:db8::2"], "{}", d.output);
        assert_eq!(d.ttls, [0], "{}", d.output);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_names_in_another_cluster_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = mesh_table();
    table.table.insert(
        "details.vm-ns.svc.corp.example".into(),
        host(&["10.96.0.12"], "Kubernetes", "details", "vm-ns"),
    );
    let mut options = options();
    options.domain = "corp.example".into();
    options.upstreams = vec![format!("127.0.0.1:{}", free_port()).parse().unwrap()];
    options.forward_timeout = Duration::from_secs(1);
    let proxy = Proxy::start(options, dir.path(), Some(table)).await;
    for name in [
        "details.vm-ns.svc.corp.example",
        "details.vm-ns.svc",
        "details.vm-ns",
        "details",
        "details.vm-ns.ec2.internal",
    ] {
        let d = dig_async(proxy.addr, name, "A", &[]).await;
        assert_eq!(d.data("A"), ["10.96.0.12"], "{name}: {}", d.output);
    }
    // `cluster.local` services keep their full name only (the short one is
    // forwarded, to a closed port: SERVFAIL).
    let d = dig_async(proxy.addr, "ratings.vm-ns.svc.cluster.local", "A", &[]).await;
    assert_eq!(d.data("A"), ["10.96.0.10"], "{}", d.output);
    let d = dig_async(proxy.addr, "ratings.vm-ns", "A", &[]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    proxy.stop().await;
}

/// `meshvm-agent run` with its DNS flags: upstreams by `--dns-upstream`,
/// parallel forwarding from DNS_FORWARD_PARALLEL, `--dns-forward-timeout`
/// over DNS_FORWARD_TIMEOUT, `--cluster-domain`; its `/metrics` counts what
/// was answered.
#[test]
fn agent_run_dns_flags() {
    use agent::{Agent, CaServer, onboarding_dir};

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let (_dnsmasq, upstream) = dnsmasq(dir.path(), "198.51.100.2 www.example.org\n");
    // An upstream that never answers: with sequential forwarding and a 60 s
    // timeout, half of the queries would wait for it.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let state = dir.path().join("certs");
    std::fs::create_dir_all(&state).unwrap();
    let mut table = NameTable::default();
    table.table.insert(
        "details.vm-ns.svc.corp.example".into(),
        host(&["10.96.0.12"], "Kubernetes", "details", "vm-ns"),
    );
    meshvm_agent::dns::save_table(&state.join(meshvm_agent::dns::SAVED_TABLE_FILE), &table);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (upstream, silent) = (
        upstream.to_string(),
        silent.local_addr().unwrap().to_string(),
    );
    let agent = Agent::spawn_with_args(
        &onboarding,
        dir.path(),
        &ca.address(),
        &[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("DNS_FORWARD_PARALLEL", "true"),
            ("DNS_FORWARD_TIMEOUT", "60s"),
        ],
        &[
            "--no-envoy",
            "--dns-listen",
            &listen.to_string(),
            "--dns-upstream",
            &silent,
            "--dns-upstream",
            &upstream,
            "--dns-forward-timeout",
            "20s",
            "--cluster-domain",
            "corp.example",
        ],
    );
    agent.wait_for_log("DNS proxy listening", 1);
    agent.wait_for_log("status server", 1);
    let log = agent.log();
    for shown in [
        format!("upstreams=[{silent}, {upstream}]"),
        "forward_timeout=20s".into(),
        "forward_parallel=true".into(),
    ] {
        assert!(log.contains(&shown), "no {shown} in:\n{log}");
    }

    // The short name in the configured cluster domain, from the saved table.
    let d = dig(listen, "details", "A", &[]);
    assert_eq!(d.data("A"), ["10.96.0.12"], "{}\n{}", d.output, agent.log());
    // Forwarded names: dnsmasq answers first every time (sequentially, the
    // silent server would come first in about half of them).
    for _ in 0..8 {
        let d = dig(listen, "www.example.org", "A", &["+time=10"]);
        assert_eq!(
            d.data("A"),
            ["198.51.100.2"],
            "{}\n{}",
            d.output,
            agent.log()
        );
    }

    let status: SocketAddr = log
        .split("status_address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no status address in:\n{log}"));
    let (code, metrics) = meshvm_testing::envoy::http_get(status, "/metrics").unwrap();
    assert_eq!(code, 200, "{metrics}");
    for line in [
        "meshvm_agent_dns_queries_total{outcome=\"table\"} 1",
        "meshvm_agent_dns_queries_total{outcome=\"forwarded\"} 8",
        "meshvm_agent_dns_upstream_duration_seconds_count 8",
        "meshvm_agent_dns_table_hosts 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    let mut agent = agent;
    assert!(agent.terminate(), "agent failed:\n{}", agent.log());
}
