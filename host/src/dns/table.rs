//! The lookup table built from a NameTable (Istio: `pkg/dns/client/dns.go`,
//! `buildAlternateHosts`): every name a workload may ask for, lower-cased,
//! mapped to its addresses or to the name it is a CNAME of.
//!
//! A table is immutable once built; the server swaps whole tables so that a
//! query never sees half of one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshvm_proto::istio::networking::nds::v1::NameTable;

/// Istio's registry name for Kubernetes services: only those get the short
/// names (`name.ns.`, `name.`).
const KUBERNETES: &str = "Kubernetes";

/// What the table says about one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A host with its addresses (either list may be empty: the name exists,
    /// the family has no record).
    Host {
        v4: Vec<Ipv4Addr>,
        v6: Vec<Ipv6Addr>,
    },
    /// The search-domain alias of another key (`name.ns.<search>.` →
    /// `name.ns.`).
    Cname(String),
}

/// A lookup hit: the CNAME followed (if any) and the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit<'a> {
    /// `Some(target)` when the name is a search-domain alias; the addresses
    /// then belong to `target`.
    pub cname: Option<String>,
    pub v4: &'a [Ipv4Addr],
    pub v6: &'a [Ipv6Addr],
    /// The name matched a wildcard key (`*.example.com.`): records are
    /// renamed to the question.
    pub wildcard: bool,
}

/// Where the names of a NameTable are expanded to: the VM's namespace and
/// cluster domain, and the search domains of resolv.conf.
#[derive(Debug, Clone)]
pub struct TableContext {
    /// The VM's namespace: only its services answer to the bare `name.`.
    pub namespace: String,
    /// The cluster domain (`cluster.local`); Kubernetes hosts under
    /// `svc.<domain>` get the short names.
    pub domain: String,
    /// resolv.conf's search domains; only the first one gets CNAMEs, as in
    /// Istio.
    pub search: Vec<String>,
}

impl TableContext {
    /// The defaults for a VM in `namespace` of a `cluster.local` mesh.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            domain: crate::config::DEFAULT_CLUSTER_DOMAIN.into(),
            search: Vec::new(),
        }
    }
}

/// The immutable name → entry map answered from.
#[derive(Debug, Default, Clone)]
pub struct LookupTable {
    names: HashMap<String, Entry>,
    hosts: usize,
}

impl LookupTable {
    /// Builds the table the way Istio's agent does (§5.4): alternate names
    /// per host, merged addresses per name, a CNAME in the first search
    /// domain for each name not already in it.
    pub fn build(table: &NameTable, context: &TableContext) -> Self {
        let proxy_domain = format!("svc.{}", context.domain.trim_matches('.'));
        let proxy_domain_first = "svc";
        let mut names: HashMap<String, Entry> = HashMap::new();
        let mut hosts = 0;
        for (host, info) in &table.table {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for ip in &info.ips {
                match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => v4.push(ip),
                    Ok(IpAddr::V6(ip)) => v6.push(ip),
                    Err(_) => tracing::debug!(%host, %ip, "DNS: invalid address in the NameTable"),
                }
            }
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            hosts += 1;
            let host = host.trim_end_matches('.');
            let mut alternates = vec![format!("{host}.")];
            if info.registry == KUBERNETES && host.ends_with(&proxy_domain) {
                let (short, ns) = (&info.shortname, &info.namespace);
                if !short.is_empty() && !ns.is_empty() {
                    alternates.push(format!("{short}.{ns}."));
                    alternates.push(format!("{short}.{ns}.{proxy_domain_first}."));
                    if *ns == context.namespace {
                        alternates.push(format!("{short}."));
                    }
                }
            }
            for alt in &info.alt_hosts {
                alternates.push(format!("{}.", alt.trim_end_matches('.')));
            }
            alternates.sort();
            alternates.dedup();
            for name in alternates {
                let name = name.to_ascii_lowercase();
                match names.entry(name).or_insert_with(|| Entry::Host {
                    v4: Vec::new(),
                    v6: Vec::new(),
                }) {
                    Entry::Host { v4: a, v6: b } => {
                        a.extend(&v4);
                        b.extend(&v6);
                    }
                    Entry::Cname(_) => unreachable!("no CNAMEs yet"),
                }
            }
        }
        if let Some(search) = context.search.first() {
            let search = search.trim_matches('.').to_ascii_lowercase();
            if !search.is_empty() {
                let suffix = format!("{search}.");
                let aliases: Vec<(String, String)> = names
                    .keys()
                    .filter(|name| !name.ends_with(&suffix))
                    .map(|name| (format!("{name}{suffix}"), name.clone()))
                    .filter(|(alias, _)| !names.contains_key(alias))
                    .collect();
                for (alias, target) in aliases {
                    names.insert(alias, Entry::Cname(target));
                }
            }
        }
        Self { names, hosts }
    }

    /// Hosts with at least one valid address.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// Names answered (alternates and CNAMEs included).
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// The entry of exactly this (lower-case, dot-terminated) key.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.names.get(key)
    }

    /// Looks `qname` up (case-insensitively; with or without the final
    /// dot): the name itself, else its wildcard parents, most specific first.
    pub fn lookup(&self, qname: &str) -> Option<Hit<'_>> {
        let mut name = qname.to_ascii_lowercase();
        if !name.ends_with('.') {
            name.push('.');
        }
        let (key, wildcard) = if self.names.contains_key(&name) {
            (name, false)
        } else {
            let mut rest = name.as_str();
            let mut found = None;
            while let Some((_, parent)) = rest.split_once('.') {
                if parent.is_empty() {
                    break;
                }
                let candidate = format!("*.{parent}");
                if self.names.contains_key(&candidate) {
                    found = Some(candidate);
                    break;
                }
                rest = parent;
            }
            (found?, true)
        };
        match self.names.get(&key)? {
            Entry::Host { v4, v6 } => Some(Hit {
                cname: None,
                v4,
                v6,
                wildcard,
            }),
            Entry::Cname(target) => match self.names.get(target)? {
                Entry::Host { v4, v6 } => Some(Hit {
                    cname: Some(target.clone()),
                    v4,
                    v6,
                    wildcard,
                }),
                Entry::Cname(_) => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

    fn info(ips: &[&str], registry: &str, short: &str, ns: &str) -> NameInfo {
        NameInfo::new(ips, registry, short, ns)
    }

    fn reference() -> NameTable {
        let mut table = NameTable::default();
        table.table.insert(
            "ratings.vm-ns.svc.cluster.local".into(),
            info(&["10.0.0.1", "fd00::1"], KUBERNETES, "ratings", "vm-ns"),
        );
        table.table.insert(
            "reviews.other.svc.cluster.local".into(),
            info(&["10.0.0.2"], KUBERNETES, "reviews", "other"),
        );
        table.table.insert(
            "db.example.com".into(),
            info(&["192.0.2.7"], "External", "", ""),
        );
        table.table.insert(
            "*.wild.example.com".into(),
            info(&["192.0.2.9"], "External", "", ""),
        );
        table.table.insert(
            "noaddr.example.com".into(),
            info(&["not-an-ip"], "External", "", ""),
        );
        table
    }

    fn context() -> TableContext {
        TableContext {
            search: vec!["ec2.internal".into(), "other.search".into()],
            ..TableContext::new("vm-ns")
        }
    }

    fn keys(table: &LookupTable) -> Vec<String> {
        let mut keys: Vec<String> = table.names.keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn alternate_names_as_istio() {
        let t = LookupTable::build(&reference(), &context());
        assert_eq!(t.hosts(), 4);
        let host_keys: Vec<String> = keys(&t)
            .into_iter()
            .filter(|k| !k.ends_with("ec2.internal."))
            .collect();
        assert_eq!(
            host_keys,
            [
                "*.wild.example.com.",
                "db.example.com.",
                "ratings.",
                "ratings.vm-ns.",
                "ratings.vm-ns.svc.",
                "ratings.vm-ns.svc.cluster.local.",
                "reviews.other.",
                "reviews.other.svc.",
                "reviews.other.svc.cluster.local.",
            ]
        );
        // `reviews.` is in another namespace: no bare name.
        assert!(t.lookup("reviews.").is_none());
        // Only the first search domain gets CNAMEs.
        assert_eq!(
            t.entry("ratings.vm-ns.ec2.internal."),
            Some(&Entry::Cname("ratings.vm-ns.".into()))
        );
        assert!(t.entry("ratings.vm-ns.other.search.").is_none());
        assert_eq!(t.names(), 18);
    }

    #[test]
    fn lookups() {
        let t = LookupTable::build(&reference(), &context());
        let hit = t.lookup("RATINGS.vm-ns").unwrap();
        assert_eq!(hit.v4, ["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(hit.v6, ["fd00::1".parse::<Ipv6Addr>().unwrap()]);
        assert!(hit.cname.is_none() && !hit.wildcard);
        let hit = t.lookup("ratings.vm-ns.ec2.internal.").unwrap();
        assert_eq!(hit.cname.as_deref(), Some("ratings.vm-ns."));
        let hit = t.lookup("a.b.wild.example.com.").unwrap();
        assert!(hit.wildcard);
        assert_eq!(hit.v4, ["192.0.2.9".parse::<Ipv4Addr>().unwrap()]);
        assert!(t.lookup("wild.example.com.").is_none());
        assert!(t.lookup("noaddr.example.com.").is_none());
        assert!(t.lookup("example.com.").is_none());
        assert!(t.lookup(".").is_none());
        assert!(t.lookup("").is_none());
    }

    #[test]
    fn short_names_follow_the_cluster_domain() {
        let mut table = reference();
        table.table.insert(
            "details.vm-ns.svc.corp.example".into(),
            info(&["10.0.0.3"], KUBERNETES, "details", "vm-ns"),
        );
        let context = TableContext {
            domain: "corp.example".into(),
            ..TableContext::new("vm-ns")
        };
        let t = LookupTable::build(&table, &context);
        for name in [
            "details.",
            "details.vm-ns.",
            "details.vm-ns.svc.",
            "details.vm-ns.svc.corp.example.",
        ] {
            assert!(t.entry(name).is_some(), "{name}");
        }
        // Under another domain, a Kubernetes host is only its full name.
        assert!(t.entry("ratings.vm-ns.svc.cluster.local.").is_some());
        for name in ["ratings.", "ratings.vm-ns.", "ratings.vm-ns.svc."] {
            assert!(t.entry(name).is_none(), "{name}");
        }
        // A domain given with its dots still matches.
        let dotted = TableContext {
            domain: ".corp.example.".into(),
            ..TableContext::new("vm-ns")
        };
        assert!(
            LookupTable::build(&table, &dotted)
                .entry("details.vm-ns.")
                .is_some()
        );
    }

    #[test]
    fn same_name_merges_and_cname_never_shadows_a_key() {
        let mut table = NameTable::default();
        table
            .table
            .insert("a.com".into(), info(&["192.0.2.1"], "External", "", ""));
        let mut alt = info(&["192.0.2.2"], "External", "", "");
        alt.alt_hosts = vec!["a.com".into()];
        table.table.insert("b.com".into(), alt);
        table.table.insert(
            "a.com.corp".into(),
            info(&["192.0.2.3"], "External", "", ""),
        );
        let context = TableContext {
            search: vec!["corp".into()],
            ..TableContext::new("ns")
        };
        let t = LookupTable::build(&table, &context);
        assert_eq!(t.lookup("a.com.").unwrap().v4.len(), 2);
        assert_eq!(t.lookup("a.com.corp.").unwrap().v4.len(), 1);
        assert!(t.lookup("a.com.corp.").unwrap().cname.is_none());
        assert_eq!(
            t.lookup("b.com.corp.").unwrap().cname.as_deref(),
            Some("b.com.")
        );
    }
}
