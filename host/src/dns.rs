//! The DNS proxy (Istio's agent DNS proxy, protocol §5): answers the mesh's
//! service names from the NameTable the control plane sends, so that a VM
//! resolves `ratings.vm-ns` or `ratings.vm-ns.svc.cluster.local` like a pod
//! does, and forwards every other question to the VM's own nameservers.
//!
//! - [`table`]: the NameTable expanded into every name a workload may ask
//!   for (§5.4), built once per NameTable and swapped whole.
//! - [`server`]: UDP and TCP on one address (`127.0.0.1:15053`), query
//!   handling (§5.5), truncation.
//! - [`forward`]: the upstream nameservers.
//! - [`resolv_conf`]: nameservers and search domains of resolv.conf.
//! - [`metrics`]: counters and the upstream latency histogram, for the
//!   agent's `/metrics`.
//!
//! The last table is saved in the agent's state directory and loaded at
//! start, so mesh names keep resolving after a restart while the control
//! plane is unreachable.

pub mod forward;
pub mod metrics;
pub mod resolv_conf;
pub mod server;
pub mod table;

use std::future::Future;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshvm_proto::istio::networking::nds::v1::NameTable;
use prost::Message as _;
use tokio::net::{TcpListener, UdpSocket};

pub use forward::{Forwarder, Protocol};
pub use metrics::{DnsMetrics, DnsMetricsSnapshot};
pub use resolv_conf::ResolvConf;
pub use server::{ListenOptions, TTL};
pub use table::{LookupTable, TableContext};

use crate::xds::NameTableReceiver;

/// Istio's DNS proxy address (`DNS_PROXY_ADDR`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15053";
/// Istio's `DNS_FORWARD_TIMEOUT`.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// The saved table's file name in the agent's state directory.
pub const SAVED_TABLE_FILE: &str = "dns-name-table.pb";

/// How the DNS proxy is set up.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// UDP and TCP on this address (port 0: a free port, for tests).
    pub listen: SocketAddr,
    /// The VM's namespace (bare service names answer only in the VM's own
    /// namespace).
    pub namespace: String,
    /// The cluster domain (`cluster.local`): Kubernetes services under
    /// `svc.<domain>` get their short names.
    pub domain: String,
    /// Nameservers and search domains; `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
    /// Upstreams to use instead of resolv.conf's nameservers (empty: those
    /// of resolv.conf; search domains still come from resolv.conf).
    pub upstreams: Vec<SocketAddr>,
    pub forward_timeout: Duration,
    pub forward_parallel: bool,
    /// Forward everything before the first table instead of SERVFAIL
    /// (Istio does so only when it owns port 53).
    pub forward_before_table: bool,
    pub listen_options: ListenOptions,
    /// Where the last table is saved and loaded from (`None`: nowhere).
    pub saved_table: Option<PathBuf>,
}

impl DnsOptions {
    /// Istio's defaults for a VM in `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("default address"),
            namespace: namespace.into(),
            domain: crate::config::DEFAULT_CLUSTER_DOMAIN.into(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            upstreams: Vec::new(),
            forward_timeout: DEFAULT_FORWARD_TIMEOUT,
            forward_parallel: false,
            forward_before_table: false,
            listen_options: ListenOptions::default(),
            saved_table: None,
        }
    }
}

/// Why the DNS proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen on {addr} (UDP and TCP): {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A bound DNS proxy; [`DnsServer::serve`] runs it.
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    resolver: Arc<server::Resolver>,
    context: TableContext,
    tables: NameTableReceiver,
    saved_table: Option<PathBuf>,
    listen_options: ListenOptions,
}

impl DnsServer {
    /// Binds UDP and TCP, reads resolv.conf and loads the saved table (if
    /// any) so that answers start before the control plane is reached.
    pub async fn bind(options: DnsOptions, tables: NameTableReceiver) -> Result<Self, DnsError> {
        let (udp, tcp) = server::bind(options.listen)
            .await
            .map_err(|error| DnsError::Bind {
                addr: options.listen,
                error,
            })?;
        let resolv = ResolvConf::load(&options.resolv_conf);
        let servers = if options.upstreams.is_empty() {
            resolv.nameservers.clone()
        } else {
            options.upstreams.clone()
        };
        let context = TableContext {
            namespace: options.namespace.clone(),
            domain: options.domain.clone(),
            search: resolv.search.clone(),
        };
        let metrics = Arc::new(DnsMetrics::default());
        let resolver = Arc::new(server::Resolver {
            table: ArcSwapOption::empty(),
            forwarder: Forwarder {
                servers,
                timeout: options.forward_timeout,
                parallel: options.forward_parallel,
            },
            forward_before_table: options.forward_before_table,
            metrics,
        });
        if let Some(path) = &options.saved_table
            && let Some(saved) = load_table(path)
        {
            tracing::info!(path = %path.display(), hosts = saved.table.len(), "DNS: answering from the saved NameTable until the control plane sends one");
            install(&resolver, &context, &saved);
        }
        tracing::info!(
            addr = %udp.local_addr().map_err(|error| DnsError::Bind { addr: options.listen, error })?,
            upstreams = ?resolver.forwarder.servers,
            forward_timeout = ?resolver.forwarder.timeout,
            forward_parallel = resolver.forwarder.parallel,
            search = ?context.search,
            "DNS proxy listening (UDP and TCP)"
        );
        Ok(Self {
            udp,
            tcp,
            resolver,
            context,
            tables,
            saved_table: options.saved_table,
            listen_options: options.listen_options,
        })
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.udp
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// The counters, to be read while the server runs.
    pub fn metrics(&self) -> Arc<DnsMetrics> {
        self.resolver.metrics.clone()
    }

    /// Answers until `shutdown` completes; each new NameTable is built,
    /// swapped in and saved.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            udp,
            tcp,
            resolver,
            context,
            mut tables,
            saved_table,
            listen_options,
        } = self;
        let udp_task = tokio::spawn(server::serve_udp(
            Arc::new(udp),
            resolver.clone(),
            listen_options.max_udp_in_flight,
        ));
        let tcp_task = tokio::spawn(server::serve_tcp(tcp, resolver.clone(), listen_options));
        let updates = {
            let resolver = resolver.clone();
            async move {
                loop {
                    let table = tables.borrow_and_update().clone();
                    if let Some(table) = table {
                        install(&resolver, &context, &table);
                        if let Some(path) = &saved_table {
                            save_table(path, &table);
                        }
                    }
                    if tables.changed().await.is_err() {
                        // The xDS proxy is gone: keep the last table.
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = updates => {}
        }
        udp_task.abort();
        tcp_task.abort();
        let _ = udp_task.await;
        let _ = tcp_task.await;
    }
}

/// Answers one DNS message from `table` alone, as the UDP and TCP servers
/// do, except that a question they would forward gets the SERVFAIL of
/// unreachable upstreams: no network, no shared state. For fuzzing and for
/// replaying hostile inputs. `None`: nothing would be sent.
pub fn answer_packet(table: &LookupTable, request: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
    let metrics = DnsMetrics::default();
    match server::local_step(Some(table), false, request, protocol, &metrics) {
        server::Step::Done(reply) => reply,
        server::Step::Forward(message) => server::upstreams_failed(&message, &metrics),
    }
}

/// Builds and swaps in the table of `name_table`.
fn install(resolver: &server::Resolver, context: &TableContext, name_table: &NameTable) {
    let table = LookupTable::build(name_table, context);
    let metrics = &resolver.metrics;
    metrics
        .table_hosts
        .store(table.hosts() as u64, Ordering::Relaxed);
    metrics
        .table_names
        .store(table.names() as u64, Ordering::Relaxed);
    tracing::info!(
        hosts = table.hosts(),
        names = table.names(),
        "DNS: table updated"
    );
    resolver.table.store(Some(Arc::new(table)));
}

/// Saves `table` (protobuf, 0600, atomically); failures are logged, the
/// proxy keeps answering.
pub fn save_table(path: &Path, table: &NameTable) {
    if let Err(error) = crate::identity::write_atomic(path, &table.encode_to_vec()) {
        tracing::warn!(%error, "DNS: cannot save the NameTable");
    }
}

/// The saved table, if there is a readable one.
pub fn load_table(path: &Path) -> Option<NameTable> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "DNS: cannot read the saved NameTable");
            return None;
        }
    };
    match NameTable::decode(bytes.as_slice()) {
        Ok(table) => Some(table),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "DNS: the saved NameTable is corrupt; ignored");
            None
        }
    }
}

/// A random number for query IDs and shuffles: SipHash with the process's
/// random keys over a counter (no extra dependency; not for cryptography,
/// but not guessable from outside either).
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STATE: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
    }
    STATE.with(|state| {
        let mut hasher = state.build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.finish()
    })
}

/// Fisher–Yates: round-robin-like spreading of answers over addresses.
pub(crate) fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = (random_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

    #[test]
    fn answer_packet_answers_the_table_and_servfails_the_rest() {
        let mut name_table = NameTable::default();
        name_table.table.insert(
            "db.example.com".into(),
            NameInfo {
                ips: vec!["192.0.2.1".into()],
                ..Default::default()
            },
        );
        let table = LookupTable::build(&name_table, &TableContext::new("ns"));
        let ask = |name: &str| {
            let mut query = Message::query();
            query.metadata.id = 77;
            query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            let bytes = query.to_vec().unwrap();
            let reply = answer_packet(&table, &bytes, Protocol::Udp).unwrap();
            Message::from_vec(&reply).unwrap()
        };
        let reply = ask("db.example.com.");
        assert_eq!(reply.metadata.id, 77);
        assert_eq!(reply.answers.len(), 1);
        let reply = ask("elsewhere.example.");
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(answer_packet(&table, &[0; 11], Protocol::Tcp).is_none());
    }
}
