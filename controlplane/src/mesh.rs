//! The mesh as the proxies' configuration sees it: every Service with its
//! ports and endpoints, and every workload (Pod or WorkloadEntry) with its
//! address, labels, identity and named ports. Built once per change of the
//! config directory or of the registered WorkloadEntries, then shared by
//! every stream that generates Envoy resources from it ([`crate::xds::envoy`]).
//!
//! Endpoints follow Kubernetes and Istio: a Service selects the Pods and
//! WorkloadEntries of its namespace whose labels match its selector; a named
//! `targetPort` resolves to the workload's port of that name (a container
//! port, or the entry's `ports` map); a Pod not `Running` and a
//! health-checked WorkloadEntry that is not `Healthy=True` are no endpoints
//! (istiod leaves them out of EDS).

pub mod vip;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::selector::selector_matches;
use crate::config::service::{IntOrString, ServicePort};
use crate::config::workload_entry::HEALTHY_CONDITION;
use crate::config::{ConfigSnapshot, Service, WorkloadEntry};

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The annotation that makes a WorkloadEntry's health count (istiod's
/// `proxy.istio.io/health-checks-enabled`).
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

/// The application protocol of a port, which decides how Envoy proxies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// HTTP/1.1 (or HTTP/2 when the client speaks it): routed, filtered.
    Http,
    /// HTTP/2 to the app (gRPC, `http2`).
    Http2,
    /// Opaque TCP: proxied as bytes, still over mTLS between proxies.
    Tcp,
}

impl Protocol {
    /// Istio's protocol selection: `appProtocol`, else the port name's
    /// prefix before `-` (`http-web`, `grpc`, `tcp-db`). Unnamed ports are
    /// treated as HTTP (where istiod would sniff the protocol).
    pub fn select(name: &str, app_protocol: Option<&str>) -> Protocol {
        let token = app_protocol
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| name.split('-').next().unwrap_or(""))
            .to_ascii_lowercase();
        match token.as_str() {
            "http2" | "grpc" | "grpc-web" | "h2c" => Protocol::Http2,
            "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" | "kafka" => Protocol::Tcp,
            _ => Protocol::Http,
        }
    }

    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }
}

/// Where a workload comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Pod,
    WorkloadEntry,
}

/// A Pod or a WorkloadEntry with an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
    pub namespace: String,
    pub address: IpAddr,
    pub labels: BTreeMap<String, String>,
    /// Port name → port on the workload.
    pub named_ports: BTreeMap<String, u16>,
    pub service_account: String,
    /// Whether it may receive traffic (running, healthy).
    pub ready: bool,
    /// Relative share of traffic (WorkloadEntry `weight`; 0 = unset).
    pub weight: u32,
}

impl Workload {
    /// The SPIFFE identity it serves with.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// `targetPort` resolved on this workload: a number as is, a name through
    /// the workload's named ports (`None` when it has no port of that name).
    pub fn resolve(&self, target: &IntOrString) -> Option<u16> {
        match target {
            IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
            IntOrString::String(name) => self.named_ports.get(name).copied(),
        }
    }
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Index into [`MeshModel::workloads`].
    pub workload: usize,
}

/// One port of a Service with its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPort {
    pub name: String,
    pub port: u16,
    pub target: IntOrString,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
}

/// A Service with its endpoints per port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshService {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub hostname: String,
    /// `None` for a headless Service.
    pub cluster_ip: Option<IpAddr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<MeshPort>,
    /// SPIFFE identities of every selected workload (ready or not): what a
    /// client accepts from the Service's servers, as istiod's
    /// `subjectAltNames` of the outbound cluster.
    pub identities: BTreeSet<String>,
}

impl MeshService {
    /// Istio's outbound cluster name, `outbound|<port>||<hostname>`.
    pub fn cluster_name(&self, port: u16) -> String {
        format!("outbound|{port}||{}", self.hostname)
    }

    pub fn selects(&self, workload: &Workload) -> bool {
        workload.namespace == self.namespace && selector_matches(&self.selector, &workload.labels)
    }
}

/// The workloads of registered entries from the last
/// [`MeshModel::build_shared`], by entry allocation. The entries are kept
/// so that their addresses cannot be reused by other entries meanwhile.
#[derive(Debug, Default)]
pub struct WorkloadCache {
    entries: Vec<Arc<WorkloadEntry>>,
    by_entry: HashMap<usize, Option<Arc<Workload>>>,
}

/// A WorkloadEntry's workload; none without a valid address.
fn workload_of_entry(entry: &WorkloadEntry) -> Option<Workload> {
    let address = entry.spec.address.parse::<IpAddr>().ok()?;
    Some(Workload {
        kind: WorkloadKind::WorkloadEntry,
        name: entry.metadata.name.clone(),
        namespace: entry.metadata.namespace().to_string(),
        address,
        labels: entry.spec.labels.clone(),
        named_ports: entry
            .spec
            .ports
            .iter()
            .map(|(name, port)| (name.clone(), *port as u16))
            .collect(),
        service_account: if entry.spec.service_account.is_empty() {
            "default".into()
        } else {
            entry.spec.service_account.clone()
        },
        ready: entry_is_healthy(entry),
        weight: entry.spec.weight,
    })
}

/// The mesh at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshModel {
    pub trust_domain: String,
    /// Sorted by namespace, then name.
    pub services: Vec<MeshService>,
    /// Pods first, then WorkloadEntries (config, then registered). Shared:
    /// a registered entry that did not change keeps its workload from one
    /// model to the next ([`WorkloadCache`]).
    pub workloads: Vec<Arc<Workload>>,
    /// (namespace, address) → the first workload there: every stream looks
    /// its own workload up on every change.
    by_address: HashMap<(String, IpAddr), usize>,
}

impl MeshModel {
    /// The model of `snapshot` plus the `registered` (auto-registered)
    /// WorkloadEntries.
    pub fn build(
        snapshot: &ConfigSnapshot,
        registered: &[WorkloadEntry],
        trust_domain: &str,
    ) -> MeshModel {
        let registered = registered
            .iter()
            .filter_map(workload_of_entry)
            .map(Arc::new)
            .collect();
        Self::assemble(snapshot, registered, trust_domain)
    }

    /// The same from the entries the registry publishes, reusing the
    /// workloads of entries that did not change since the last build with
    /// `cache`: with many VMs, one registering costs one new workload, not
    /// one per VM.
    pub fn build_shared(
        snapshot: &ConfigSnapshot,
        registered: &[Arc<WorkloadEntry>],
        trust_domain: &str,
        cache: &mut WorkloadCache,
    ) -> MeshModel {
        let mut by_entry = HashMap::with_capacity(registered.len());
        let workloads = registered
            .iter()
            .filter_map(|entry| {
                let key = Arc::as_ptr(entry) as usize;
                let workload = match cache.by_entry.get(&key) {
                    Some(known) => known.clone(),
                    None => workload_of_entry(entry).map(Arc::new),
                };
                by_entry.insert(key, workload.clone());
                workload
            })
            .collect();
        cache.by_entry = by_entry;
        cache.entries = registered.to_vec();
        Self::assemble(snapshot, workloads, trust_domain)
    }

    /// The config directory's Pods and WorkloadEntries, then `registered`.
    fn assemble(
        snapshot: &ConfigSnapshot,
        registered: Vec<Arc<Workload>>,
        trust_domain: &str,
    ) -> MeshModel {
        let mut workloads = Vec::with_capacity(registered.len() + snapshot.pods.len());
        for pod in snapshot.pods.values() {
            let Some(address) = pod.ip() else { continue };
            workloads.push(Arc::new(Workload {
                kind: WorkloadKind::Pod,
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace().to_string(),
                address,
                labels: pod.metadata.labels.clone(),
                named_ports: pod.named_ports(),
                service_account: pod.service_account().to_string(),
                ready: pod.is_running(),
                weight: 0,
            }));
        }
        workloads.extend(
            snapshot
                .workload_entries
                .values()
                .filter_map(workload_of_entry)
                .map(Arc::new),
        );
        workloads.extend(registered);
        let services = snapshot
            .services
            .values()
            .map(|service| mesh_service(service, &workloads, trust_domain))
            .collect();
        let mut by_address = HashMap::new();
        for (index, w) in workloads.iter().enumerate() {
            by_address
                .entry((w.namespace.clone(), w.address))
                .or_insert(index);
        }
        MeshModel {
            trust_domain: trust_domain.to_string(),
            services,
            workloads,
            by_address,
        }
    }

    /// The workload a proxy runs for: the one at `address` in `namespace`
    /// (a Pod before a WorkloadEntry).
    pub fn workload_at(&self, namespace: &str, address: IpAddr) -> Option<&Workload> {
        let index = self.by_address.get(&(namespace.to_string(), address))?;
        self.workloads.get(*index).map(|w| &**w)
    }

    /// The Services that select `workload`.
    pub fn services_of<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a MeshService> + 'a {
        self.services.iter().filter(move |s| s.selects(workload))
    }
}

/// istiod's rule: an entry without health checks is healthy; one with
/// health checks is healthy only with a `Healthy` condition that is `True`.
pub fn entry_is_healthy(entry: &WorkloadEntry) -> bool {
    if entry
        .metadata
        .annotations
        .get(HEALTH_CHECKS_ANNOTATION)
        .map(String::as_str)
        != Some("true")
    {
        return true;
    }
    entry.status.as_ref().is_some_and(|status| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == HEALTHY_CONDITION)
            .is_some_and(|c| c.status == "True")
    })
}

fn mesh_service(service: &Service, workloads: &[Arc<Workload>], trust_domain: &str) -> MeshService {
    let namespace = service.metadata.namespace().to_string();
    let name = service.metadata.name.clone();
    let mut mesh = MeshService {
        hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        name,
        namespace,
        cluster_ip: service.cluster_ip(),
        selector: service.spec.selector.clone(),
        ports: Vec::new(),
        identities: BTreeSet::new(),
    };
    let selected: Vec<(usize, &Workload)> = workloads
        .iter()
        .enumerate()
        .map(|(index, w)| (index, &**w))
        .filter(|(_, w)| mesh.selects(w))
        .collect();
    // One identity per service account, formatted once.
    let accounts: BTreeSet<(&str, &str)> = selected
        .iter()
        .map(|(_, w)| (w.namespace.as_str(), w.service_account.as_str()))
        .collect();
    mesh.identities = accounts
        .into_iter()
        .map(|(namespace, account)| format!("spiffe://{trust_domain}/ns/{namespace}/sa/{account}"))
        .collect();
    mesh.ports = service
        .spec
        .ports
        .iter()
        // Envoy's listeners here proxy TCP; UDP and SCTP ports are left out.
        .filter(|port| port.protocol == "TCP")
        .map(|port| mesh_port(port, &selected))
        .collect();
    mesh
}

fn mesh_port(port: &ServicePort, selected: &[(usize, &Workload)]) -> MeshPort {
    let target = port.target_port();
    let mut endpoints: Vec<Endpoint> = selected
        .iter()
        .filter(|(_, w)| w.ready)
        .filter_map(|(index, w)| {
            Some(Endpoint {
                address: w.address,
                port: w.resolve(&target)?,
                weight: w.weight,
                workload: *index,
            })
        })
        .collect();
    endpoints.sort();
    endpoints.dedup_by(|a, b| a.address == b.address && a.port == b.port);
    MeshPort {
        name: port.name.clone(),
        port: port.port,
        protocol: Protocol::select(&port.name, port.app_protocol.as_deref()),
        target,
        endpoints,
    }
}

#[cfg(test)]
mod tests;
