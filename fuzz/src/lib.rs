//! What the fuzz targets share with the test that replays their corpora
//! (`host/tests/dns_fuzz_corpus.rs` includes this file): the table the DNS
//! proxy answers from, and what makes an answer acceptable.

use hickory_proto::op::{Message, MessageType};
use meshvm_agent::dns::{LookupTable, Protocol, TableContext};
use meshvm_proto::istio::networking::nds::v1::NameTable;
use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

/// A table with every kind of entry: a Kubernetes service in the VM's
/// namespace (short names, IPv4 and IPv6) and one in another, a wildcard,
/// a plain host, one with too many addresses for a UDP answer, and the
/// CNAMEs of the search domain `ec2.internal`.
pub fn table() -> LookupTable {
    let host = |ips: &[&str], registry: &str, short: &str, ns: &str| NameInfo {
        ips: ips.iter().map(|s| s.to_string()).collect(),
        registry: registry.into(),
        shortname: short.into(),
        namespace: ns.into(),
        alt_hosts: Vec::new(),
    };
    let mut table = NameTable::default();
    let t = &mut table.table;
    t.insert(
        "ratings.vm-ns.svc.cluster.local".into(),
        host(
            &["10.96.0.10", "fd00::10"],
            "Kubernetes",
            "ratings",
            "vm-ns",
        ),
    );
    t.insert(
        "reviews.other.svc.cluster.local".into(),
        host(&["10.96.0.11"], "Kubernetes", "reviews", "other"),
    );
    t.insert(
        "*.wild.example.com".into(),
        host(&["192.0.2.9"], "External", "", ""),
    );
    t.insert(
        "db.example.com".into(),
        host(&["192.0.2.1", "2001:db8::1"], "External", "", ""),
    );
    let many: Vec<String> = (0..300)
        .map(|i| format!("10.20.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    t.insert("many.example.com".into(), host(&many, "External", "", ""));
    let context = TableContext {
        search: vec!["ec2.internal".into()],
        ..TableContext::new("vm-ns")
    };
    LookupTable::build(&table, &context)
}

/// Panics unless `reply` is an acceptable answer to `request` over
/// `protocol`: absent, or a DNS response that parses, carries the
/// request's ID, and fits the transport (UDP: 512 bytes, or the request's
/// EDNS0 size when larger; TCP: 65535).
pub fn check_answer(request: &[u8], reply: Option<&[u8]>, protocol: Protocol) {
    let Some(reply) = reply else {
        return;
    };
    assert!(
        request.len() >= 12,
        "an answer to a request without a header"
    );
    let parsed = Message::from_vec(reply)
        .unwrap_or_else(|e| panic!("the answer does not parse ({e}): {reply:02x?}"));
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert_eq!(
        parsed.metadata.id.to_be_bytes(),
        [request[0], request[1]],
        "the answer's ID is not the request's"
    );
    let limit = match protocol {
        Protocol::Tcp => usize::from(u16::MAX),
        Protocol::Udp => Message::from_vec(request)
            .ok()
            .and_then(|m| m.edns.map(|e| usize::from(e.max_payload())))
            .unwrap_or(0)
            .max(512),
    };
    assert!(
        reply.len() <= limit,
        "a {} byte answer over {protocol:?} (limit {limit})",
        reply.len()
    );
}
