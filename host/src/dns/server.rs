//! The DNS server: UDP and TCP on one address, answering mesh names from the
//! current [`LookupTable`] and forwarding the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::forward::{Forwarder, Protocol};
use super::table::LookupTable;
use super::{DnsMetrics, shuffle};

/// TTL of every record the proxy answers itself (Istio: 30 s).
pub const TTL: u32 = 30;
/// The smallest UDP answer a client must accept (RFC 1035).
const MIN_UDP: usize = 512;
/// The EDNS0 buffer size the proxy advertises in its own answers.
const OUR_EDNS_SIZE: u16 = 1232;
/// RCODE 3, in the low bits of a header's fourth byte.
const NXDOMAIN: u8 = 3;

/// Everything a query is answered from; shared by the UDP and TCP loops.
pub(crate) struct Resolver {
    pub(crate) table: ArcSwapOption<LookupTable>,
    pub(crate) forwarder: Forwarder,
    /// Forward even before the first table (instead of SERVFAIL).
    pub(crate) forward_before_table: bool,
    pub(crate) metrics: Arc<DnsMetrics>,
}

impl Resolver {
    /// Answers one DNS message. `None`: nothing to send (not a query, or
    /// too short to carry an ID).
    pub(crate) async fn handle(&self, request: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
        let table = self.table.load_full();
        let step = local_step(
            table.as_deref(),
            self.forward_before_table,
            request,
            protocol,
            &self.metrics,
        );
        match step {
            Step::Done(reply) => reply,
            Step::Forward(message) => self.forward(request, &message, protocol).await,
        }
    }

    async fn forward(
        &self,
        request: &[u8],
        message: &Message,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let reply = self.forwarder.forward(request, protocol).await;
        if !self.forwarder.servers.is_empty() {
            self.metrics.upstream_latency.observe(started.elapsed());
        }
        match reply {
            Some(reply) => {
                // The header's RCODE (the forwarder returns whole headers).
                let counter = if reply[3] & 0x0f == NXDOMAIN {
                    &self.metrics.nxdomain
                } else {
                    &self.metrics.forwarded
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Some(reply)
            }
            None => {
                self.metrics.forward_failed.fetch_add(1, Ordering::Relaxed);
                upstreams_failed(message, &self.metrics)
            }
        }
    }
}

/// What becomes of one message before any upstream is asked.
pub(crate) enum Step {
    /// Answered (or dropped: `None`) by the proxy itself.
    Done(Option<Vec<u8>>),
    /// For the upstreams; the parsed query, for the SERVFAIL if none
    /// answers.
    Forward(Message),
}

/// The part of query handling that needs no network (§5.5 steps 1–5):
/// drops, errors and table answers are complete here; the rest is to be
/// forwarded. Counts in `metrics`, except the outcome of a forward.
pub(crate) fn local_step(
    table: Option<&LookupTable>,
    forward_before_table: bool,
    request: &[u8],
    protocol: Protocol,
    metrics: &DnsMetrics,
) -> Step {
    use Step::{Done, Forward};
    metrics.queries.fetch_add(1, Ordering::Relaxed);
    if request.len() < 12 || request[2] & 0x80 != 0 {
        // Too short for a header, or a response: never answer (no
        // reflection loops).
        metrics.dropped.fetch_add(1, Ordering::Relaxed);
        return Done(None);
    }
    let limit = |message: &Message| match protocol {
        Protocol::Tcp => u16::MAX as usize,
        Protocol::Udp => message
            .edns
            .as_ref()
            .map(|e| (e.max_payload() as usize).max(MIN_UDP))
            .unwrap_or(MIN_UDP),
    };
    let message = match Message::from_vec(request) {
        Ok(message) => message,
        Err(_) => {
            metrics.formerr.fetch_add(1, Ordering::Relaxed);
            let id = u16::from_be_bytes([request[0], request[1]]);
            let op_code = OpCode::from_u8((request[2] >> 3) & 0x0f);
            let mut reply = Message::error_msg(id, op_code, ResponseCode::FormErr);
            reply.metadata.recursion_desired = request[2] & 0x01 != 0;
            return Done(reply.to_vec().ok());
        }
    };
    if message.metadata.message_type != MessageType::Query {
        metrics.dropped.fetch_add(1, Ordering::Relaxed);
        return Done(None);
    }
    if message.metadata.op_code != OpCode::Query {
        metrics.other_errors.fetch_add(1, Ordering::Relaxed);
        return Done(encode(
            error(&message, ResponseCode::NotImp),
            limit(&message),
        ));
    }
    let Some(query) = message.queries.first() else {
        metrics.servfail.fetch_add(1, Ordering::Relaxed);
        return Done(encode(
            error(&message, ResponseCode::ServFail),
            limit(&message),
        ));
    };
    let Some(table) = table else {
        if forward_before_table {
            return Forward(message);
        }
        metrics.servfail.fetch_add(1, Ordering::Relaxed);
        return Done(encode(
            error(&message, ResponseCode::ServFail),
            limit(&message),
        ));
    };
    let qtype = query.query_type();
    if matches!(qtype, RecordType::A | RecordType::AAAA) {
        let qname = query.name().to_ascii();
        if let Some(hit) = table.lookup(&qname) {
            metrics.answered.fetch_add(1, Ordering::Relaxed);
            let mut reply = response(&message);
            reply.metadata.authoritative = true;
            let owner = match &hit.cname {
                Some(target) => {
                    let mut target = target.clone();
                    if hit.wildcard {
                        // `*.x.` reached through a wildcard: the
                        // target takes the question's first label.
                        if let Some(rest) = target.strip_prefix('*') {
                            let first = qname.split('.').next().unwrap_or("");
                            target = format!("{first}{rest}");
                        }
                    }
                    match Name::from_ascii(&target) {
                        Ok(target) => {
                            reply.answers.push(Record::from_rdata(
                                query.name().clone(),
                                TTL,
                                RData::CNAME(CNAME(target.clone())),
                            ));
                            target
                        }
                        Err(_) => query.name().clone(),
                    }
                }
                None => query.name().clone(),
            };
            if qtype == RecordType::A {
                let mut ips = hit.v4.to_vec();
                shuffle(&mut ips);
                reply.answers.extend(
                    ips.into_iter()
                        .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::A(A(ip)))),
                );
            } else {
                let mut ips = hit.v6.to_vec();
                shuffle(&mut ips);
                reply.answers.extend(
                    ips.into_iter()
                        .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::AAAA(AAAA(ip)))),
                );
            }
            return Done(encode(reply, limit(&message)).inspect(|bytes| {
                if bytes[2] & 0x02 != 0 {
                    metrics.truncated.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    Forward(message)
}

/// The SERVFAIL for a query no upstream answered.
pub(crate) fn upstreams_failed(message: &Message, metrics: &DnsMetrics) -> Option<Vec<u8>> {
    metrics.servfail.fetch_add(1, Ordering::Relaxed);
    encode(error(message, ResponseCode::ServFail), u16::MAX as usize)
}

/// A response header for `request`: same ID, opcode, RD and first question
/// (only that one is answered, as by Istio's `SetReply`; echoing dozens of
/// others pushed the answer out of a 512-byte UDP reply).
fn response(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.queries = request.queries.iter().take(1).cloned().collect();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_EDNS_SIZE);
        reply.edns = Some(edns);
    }
    reply
}

fn error(request: &Message, code: ResponseCode) -> Message {
    let mut reply = response(request);
    reply.metadata.response_code = code;
    reply
}

/// Encodes `reply` within `limit` bytes: answers that do not fit are
/// dropped from the end and TC is set, so the client retries over TCP.
fn encode(mut reply: Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    reply.metadata.truncation = true;
    reply.authorities.clear();
    reply.additionals.clear();
    // The most answers that fit: a binary search over how many are kept.
    let answers = std::mem::take(&mut reply.answers);
    let (mut fits, mut too_many) = (0, answers.len());
    let mut best = None;
    while fits < too_many {
        let keep = (fits + too_many).div_ceil(2);
        reply.answers = answers[..keep].to_vec();
        match reply.to_vec() {
            Ok(bytes) if bytes.len() <= limit => {
                fits = keep;
                best = Some(bytes);
            }
            _ => too_many = keep - 1,
        }
    }
    if let Some(bytes) = best {
        return Some(bytes);
    }
    reply.answers.clear();
    if let Ok(bytes) = reply.to_vec()
        && bytes.len() <= limit
    {
        return Some(bytes);
    }
    reply.edns = None;
    reply.queries.clear();
    let bytes = reply.to_vec().ok()?;
    (bytes.len() <= limit).then_some(bytes)
}

/// How the server listens.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Concurrent TCP connections; more wait to be accepted.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP queries being answered at once (forwarding ones wait up to the
    /// forward timeout); beyond this, datagrams are dropped and clients
    /// retry, instead of memory growing under a flood.
    pub max_udp_in_flight: usize,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            max_udp_in_flight: 1024,
        }
    }
}

/// Binds UDP and TCP on the same address (port 0: one free port for both).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..if addr.port() == 0 { 20 } else { 1 } {
        let udp = UdpSocket::bind(addr).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.expect("at least one attempt"))
}

pub(crate) async fn serve_udp(
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    max_in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier replies surface here on some
                // systems; they concern one client, not the socket.
                tracing::debug!(%error, "DNS: UDP receive error");
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            resolver.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let request = buf[..n].to_vec();
        let socket = socket.clone();
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = resolver.handle(&request, Protocol::Udp).await
                && let Err(error) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(%peer, %error, "DNS: cannot send the UDP answer");
            }
        });
    }
}

pub(crate) async fn serve_tcp(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    options: ListenOptions,
) {
    let slots = Arc::new(Semaphore::new(options.max_tcp_connections.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "DNS: TCP accept error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let resolver = resolver.clone();
        let idle = options.tcp_idle_timeout;
        tokio::spawn(async move {
            if let Err(error) = connection(stream, &resolver, idle).await {
                tracing::debug!(%peer, %error, "DNS: TCP connection closed");
            }
            drop(permit);
        });
    }
}

/// Serves queries on one TCP connection, one after the other, until the
/// client closes it or stays idle (or slow) for `idle`.
async fn connection(
    mut stream: TcpStream,
    resolver: &Resolver,
    idle: Duration,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "idle");
    loop {
        let request = tokio::time::timeout(idle, async {
            let len = match stream.read_u16().await {
                Ok(len) => len as usize,
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(None);
                }
                Err(error) => return Err(error),
            };
            let mut request = vec![0u8; len];
            stream.read_exact(&mut request).await?;
            Ok(Some(request))
        })
        .await
        .map_err(|_| timed_out())??;
        let Some(request) = request else {
            return Ok(());
        };
        let Some(reply) = resolver.handle(&request, Protocol::Tcp).await else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        tokio::time::timeout(idle, stream.write_all(&framed))
            .await
            .map_err(|_| timed_out())??;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::table::TableContext;
    use hickory_proto::op::Query;
    use meshvm_proto::istio::networking::nds::v1::NameTable;
    use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

    fn name_table(hosts: &[(&str, Vec<String>)]) -> NameTable {
        let mut table = NameTable::default();
        for (host, ips) in hosts {
            table.table.insert(
                host.to_string(),
                NameInfo {
                    ips: ips.clone(),
                    ..Default::default()
                },
            );
        }
        table
    }

    fn resolver(table: Option<NameTable>) -> Resolver {
        let context = TableContext {
            search: vec!["corp.example".into()],
            ..TableContext::new("vm-ns")
        };
        let resolver = Resolver {
            table: ArcSwapOption::empty(),
            forwarder: Forwarder {
                servers: Vec::new(),
                timeout: Duration::from_secs(1),
                parallel: false,
            },
            forward_before_table: false,
            metrics: Arc::default(),
        };
        if let Some(table) = table {
            resolver
                .table
                .store(Some(Arc::new(LookupTable::build(&table, &context))));
        }
        resolver
    }

    fn standard() -> Resolver {
        let many: Vec<String> = (0..200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
            .collect();
        resolver(Some(name_table(&[
            (
                "db.example.com",
                vec!["192.0.2.1".into(), "192.0.2.2".into()],
            ),
            ("v6.example.com", vec!["2001:db8::1".into()]),
            ("*.wild.example.com", vec!["192.0.2.9".into()]),
            ("many.example.com", many),
        ])))
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x1234;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            message.edns = Some(e);
        }
        message.to_vec().unwrap()
    }

    async fn ask(resolver: &Resolver, request: &[u8], protocol: Protocol) -> Message {
        let reply = resolver.handle(request, protocol).await.expect("an answer");
        Message::from_vec(&reply).expect("a valid answer")
    }

    fn addresses(reply: &Message) -> Vec<String> {
        let mut out: Vec<String> = reply
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::CNAME(c) => format!("CNAME {}", c.0),
                other => format!("{other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn mesh_hit_is_authoritative_with_ttl_30() {
        let r = standard();
        let reply = ask(
            &r,
            &query("DB.example.com.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.metadata.authoritative && reply.metadata.recursion_desired);
        assert_eq!(addresses(&reply), ["192.0.2.1", "192.0.2.2"]);
        assert!(reply.answers.iter().all(|r| r.ttl == TTL));
        assert_eq!(reply.answers[0].name.to_ascii(), "DB.example.com.");
    }

    #[tokio::test]
    async fn answers_are_shuffled() {
        let r = standard();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..50 {
            let reply = ask(
                &r,
                &query("many.example.com.", RecordType::A, None),
                Protocol::Tcp,
            )
            .await;
            assert_eq!(reply.answers.len(), 200);
            firsts.insert(format!("{:?}", reply.answers[0].data));
        }
        assert!(firsts.len() > 1, "the first address never changed");
    }

    #[tokio::test]
    async fn empty_noerror_for_the_missing_family() {
        let r = standard();
        let reply = ask(
            &r,
            &query("db.example.com.", RecordType::AAAA, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty() && reply.metadata.authoritative);
        let reply = ask(
            &r,
            &query("v6.example.com.", RecordType::AAAA, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(addresses(&reply), ["2001:db8::1"]);
    }

    #[tokio::test]
    async fn cname_for_the_search_domain_and_wildcards() {
        let r = standard();
        let reply = ask(
            &r,
            &query("db.example.com.corp.example.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(
            addresses(&reply),
            ["192.0.2.1", "192.0.2.2", "CNAME db.example.com."]
        );
        assert_eq!(reply.answers[0].record_type(), RecordType::CNAME);
        let reply = ask(
            &r,
            &query("x.y.wild.example.com.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(addresses(&reply), ["192.0.2.9"]);
        assert_eq!(reply.answers[0].name.to_ascii(), "x.y.wild.example.com.");
        let reply = ask(
            &r,
            &query("x.wild.example.com.corp.example.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(
            addresses(&reply),
            ["192.0.2.9", "CNAME x.wild.example.com."]
        );
    }

    #[tokio::test]
    async fn unknown_names_and_other_types_without_upstream_servfail() {
        let r = standard();
        for (name, qtype) in [
            ("unknown.example.org.", RecordType::A),
            ("db.example.com.", RecordType::TXT),
            ("db.example.com.", RecordType::PTR),
        ] {
            let reply = ask(&r, &query(name, qtype, None), Protocol::Udp).await;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::ServFail,
                "{name} {qtype}"
            );
        }
        assert_eq!(r.metrics.snapshot().forward_failed, 3);
    }

    /// A UDP upstream answering NXDOMAIN for names under `nowhere.`,
    /// NOERROR (no records) for the rest.
    async fn fake_upstream() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..n]).unwrap();
                let nowhere = query.queries[0].name().to_ascii().ends_with("nowhere.");
                let code = if nowhere {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let reply = error(&query, code).to_vec().unwrap();
                socket.send_to(&reply, peer).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn each_query_has_one_outcome() {
        let mut r = standard();
        r.forwarder.servers = vec![fake_upstream().await];
        let code = |reply: Message| reply.metadata.response_code;
        let a = |name| query(name, RecordType::A, None);
        assert_eq!(
            code(ask(&r, &a("db.example.com."), Protocol::Udp).await),
            ResponseCode::NoError
        );
        assert_eq!(
            code(ask(&r, &a("www.example.org."), Protocol::Udp).await),
            ResponseCode::NoError
        );
        for _ in 0..2 {
            assert_eq!(
                code(ask(&r, &a("x.nowhere."), Protocol::Udp).await),
                ResponseCode::NXDomain
            );
        }
        let mut truncated = a("db.example.com.");
        truncated.truncate(14);
        assert_eq!(
            code(ask(&r, &truncated, Protocol::Udp).await),
            ResponseCode::FormErr
        );
        let mut notify = a("db.example.com.");
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        assert_eq!(
            code(ask(&r, &notify, Protocol::Udp).await),
            ResponseCode::NotImp
        );
        assert!(r.handle(&[0; 5], Protocol::Udp).await.is_none());
        let mut empty = Message::query();
        empty.metadata.id = 9;
        assert_eq!(
            code(ask(&r, &empty.to_vec().unwrap(), Protocol::Udp).await),
            ResponseCode::ServFail
        );

        let m = r.metrics.snapshot();
        assert_eq!(
            (
                m.answered,
                m.forwarded,
                m.nxdomain,
                m.formerr,
                m.other_errors,
                m.dropped,
                m.servfail
            ),
            (1, 1, 2, 1, 1, 1, 1)
        );
        let outcomes = m.answered
            + m.forwarded
            + m.nxdomain
            + m.servfail
            + m.formerr
            + m.other_errors
            + m.dropped;
        assert_eq!(outcomes, m.queries);
        // Only the three forwarded queries were timed.
        assert_eq!(m.upstream_latency.count, 3);
        assert!(m.upstream_latency.sum_seconds > 0.0);
        assert_eq!(m.forward_failed, 0);

        // Without upstreams: SERVFAIL, and nothing timed.
        let r = standard();
        assert_eq!(
            code(ask(&r, &a("www.example.org."), Protocol::Udp).await),
            ResponseCode::ServFail
        );
        let m = r.metrics.snapshot();
        assert_eq!(
            (m.servfail, m.forward_failed, m.upstream_latency.count),
            (1, 1, 0)
        );
    }

    #[tokio::test]
    async fn servfail_before_the_first_table() {
        let r = resolver(None);
        let reply = ask(
            &r,
            &query("db.example.com.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(reply.metadata.id, 0x1234);
    }

    #[tokio::test]
    async fn udp_truncation_honours_edns() {
        let r = standard();
        // No EDNS: 512 bytes.
        let bytes = r
            .handle(
                &query("many.example.com.", RecordType::A, None),
                Protocol::Udp,
            )
            .await
            .unwrap();
        assert!(bytes.len() <= 512);
        let reply = Message::from_vec(&bytes).unwrap();
        assert!(reply.metadata.truncation && !reply.answers.is_empty());
        // EDNS 1232, and an EDNS size below 512 still gets 512.
        for (size, max) in [(1232u16, 1232usize), (100, 512)] {
            let bytes = r
                .handle(
                    &query("many.example.com.", RecordType::A, Some(size)),
                    Protocol::Udp,
                )
                .await
                .unwrap();
            assert!(
                bytes.len() <= max && bytes.len() > max - 40,
                "{size}: {}",
                bytes.len()
            );
            assert!(Message::from_vec(&bytes).unwrap().metadata.truncation);
        }
        // A small answer is not truncated; TCP gets everything.
        let reply = ask(
            &r,
            &query("db.example.com.", RecordType::A, None),
            Protocol::Udp,
        )
        .await;
        assert!(!reply.metadata.truncation);
        let reply = ask(
            &r,
            &query("many.example.com.", RecordType::A, None),
            Protocol::Tcp,
        )
        .await;
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 200);
        assert!(r.metrics.snapshot().truncated >= 3);
    }

    #[tokio::test]
    async fn no_question_is_servfail_and_many_questions_use_the_first() {
        let r = standard();
        let mut message = Message::query();
        message.metadata.id = 7;
        let reply = ask(&r, &message.to_vec().unwrap(), Protocol::Udp).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        for i in 0..50 {
            let name = match i {
                0 => "db.example.com.".to_string(),
                // Names that do not compress into each other: 500 bytes.
                _ => format!("x{i}.example{i}."),
            };
            message.add_query(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
        }
        let request = message.to_vec().unwrap();
        assert!(request.len() > 512);
        let reply = ask(&r, &request, Protocol::Udp).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 2);
        assert_eq!(reply.queries.len(), 1);
        assert_eq!(reply.queries[0].name().to_ascii(), "db.example.com.");
    }

    #[tokio::test]
    async fn malformed_input_never_crashes() {
        let r = standard();
        // Shorter than a header: silently dropped.
        for len in 0..12 {
            assert!(r.handle(&vec![0xab; len], Protocol::Udp).await.is_none());
        }
        // A response (QR set) is never answered.
        let mut response = query("db.example.com.", RecordType::A, None);
        response[2] |= 0x80;
        assert!(r.handle(&response, Protocol::Udp).await.is_none());
        // A header that promises a question which is not there: FORMERR.
        let mut truncated = query("db.example.com.", RecordType::A, None);
        truncated.truncate(15);
        let reply = ask(&r, &truncated, Protocol::Udp).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(reply.metadata.id, 0x1234);
        // A compression pointer to itself, and two pointing at each other.
        let mut header = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let mut looped = header.clone();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(
            ask(&r, &looped, Protocol::Udp).await.metadata.response_code,
            ResponseCode::FormErr
        );
        header.extend_from_slice(&[1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(
            ask(&r, &header, Protocol::Udp).await.metadata.response_code,
            ResponseCode::FormErr
        );
        // Another opcode: NOTIMP.
        let mut notify = query("db.example.com.", RecordType::A, None);
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        assert_eq!(
            ask(&r, &notify, Protocol::Udp).await.metadata.response_code,
            ResponseCode::NotImp
        );
        // Random bytes: any answer is a valid message with the same ID.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..5000 {
            let len = (round % 300) + 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            // Half of them with a plausible header (QR clear, one question).
            let mut bytes = bytes;
            if round % 2 == 0 && bytes.len() >= 12 {
                bytes[2] &= 0x07;
                bytes[4..6].copy_from_slice(&[0, 1]);
            }
            if let Some(reply) = r.handle(&bytes, Protocol::Udp).await {
                assert!(reply.len() <= 512, "a small query gets a small answer");
                let parsed = Message::from_vec(&reply).expect("our answers parse");
                assert_eq!(parsed.metadata.id.to_be_bytes(), [bytes[0], bytes[1]]);
            }
        }
    }

    /// A TCP server on a free port with `options`, answering from `standard()`.
    async fn tcp_server(options: ListenOptions) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_tcp(listener, Arc::new(standard()), options));
        addr
    }

    async fn tcp_ask(stream: &mut TcpStream, request: &[u8]) -> Message {
        let mut framed = (request.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(request);
        stream.write_all(&framed).await.unwrap();
        let len = stream.read_u16().await.unwrap() as usize;
        let mut reply = vec![0; len];
        stream.read_exact(&mut reply).await.unwrap();
        Message::from_vec(&reply).unwrap()
    }

    /// Waits (generously) for the server to close `stream`.
    async fn closed_by_server(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .expect("the server closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn tcp_serves_several_queries_and_drops_slow_or_lying_clients() {
        let addr = tcp_server(ListenOptions {
            max_tcp_connections: 8,
            tcp_idle_timeout: Duration::from_millis(300),
            ..ListenOptions::default()
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            let reply = tcp_ask(
                &mut stream,
                &query("many.example.com.", RecordType::A, None),
            )
            .await;
            assert_eq!(reply.answers.len(), 200);
            assert!(!reply.metadata.truncation);
        }
        // Garbage on the connection: FORMERR, and the connection goes on.
        let mut garbage = query("db.example.com.", RecordType::A, None);
        garbage.truncate(14);
        let reply = tcp_ask(&mut stream, &garbage).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        let reply = tcp_ask(&mut stream, &query("db.example.com.", RecordType::A, None)).await;
        assert_eq!(reply.answers.len(), 2);

        // A length prefix of 65535 followed by 10 bytes, then silence.
        let mut lying = TcpStream::connect(addr).await.unwrap();
        lying.write_all(&[0xff, 0xff]).await.unwrap();
        lying.write_all(&[0; 10]).await.unwrap();
        // A client that connects and says nothing; one that sends half a
        // length prefix.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(&[0]).await.unwrap();
        // Meanwhile others are served.
        let mut other = TcpStream::connect(addr).await.unwrap();
        let reply = tcp_ask(&mut other, &query("db.example.com.", RecordType::A, None)).await;
        assert_eq!(reply.answers.len(), 2);
        for stream in [&mut lying, &mut silent, &mut half, &mut stream] {
            closed_by_server(stream).await;
        }
    }

    #[tokio::test]
    async fn tcp_connection_limit_queues_the_next_client() {
        let addr = tcp_server(ListenOptions {
            max_tcp_connections: 1,
            tcp_idle_timeout: Duration::from_millis(300),
            ..ListenOptions::default()
        })
        .await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let reply = tcp_ask(&mut first, &query("db.example.com.", RecordType::A, None)).await;
        assert_eq!(reply.answers.len(), 2);
        // The second waits for the first to be closed (idle), then is
        // served: no error, no stall.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let reply = tcp_ask(&mut second, &query("db.example.com.", RecordType::A, None)).await;
        assert_eq!(reply.answers.len(), 2);
        closed_by_server(&mut first).await;
    }

    #[tokio::test]
    async fn udp_queries_in_flight_are_bounded() {
        // Unknown names go to an upstream that never answers (1 h timeout):
        // the first query holds the only slot, the second is dropped.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut r = standard();
        r.forwarder = Forwarder {
            servers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_secs(3600),
            parallel: false,
        };
        let r = Arc::new(r);
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        tokio::spawn(serve_udp(socket, r.clone(), 1));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..2 {
            let request = query("unknown.example.org.", RecordType::A, None);
            client.send_to(&request, addr).await.unwrap();
        }
        let mut upstream = [0u8; 512];
        silent.recv_from(&mut upstream).await.unwrap();
        while r.metrics.snapshot().dropped < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m = r.metrics.snapshot();
        assert_eq!((m.queries, m.dropped), (1, 1));
    }
}
