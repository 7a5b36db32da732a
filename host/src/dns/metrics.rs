//! The DNS proxy's counters and their Prometheus text, served on the agent's
//! `/metrics`: plain atomics bumped on the query path (no lock, no
//! allocation), read when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the upstream latency buckets: from a resolver
/// on the same host (well under a millisecond) to Istio's 5 s forward
/// timeout and beyond.
pub const UPSTREAM_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram over [`UPSTREAM_BUCKETS`]: a count per bucket
/// (not cumulative; summed when read, so that `+Inf` and `_count` always
/// agree with the buckets) and the sum in nanoseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// One per bound, then `+Inf`.
    buckets: [AtomicU64; UPSTREAM_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A copy of a [`Histogram`]: cumulative counts per bound (`+Inf` is
/// `count`), sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = UPSTREAM_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(UPSTREAM_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = UPSTREAM_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: total + self.buckets[UPSTREAM_BUCKETS.len()].load(Ordering::Relaxed),
        }
    }
}

/// Counters for `/metrics`: plain atomics, read with [`DnsMetrics::snapshot`].
///
/// Each message handled ends in exactly one outcome: `answered`,
/// `forwarded`, `nxdomain`, `servfail`, `formerr`, `other_errors` or
/// `dropped`.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    /// Every message handled (UDP datagrams dropped for lack of a slot are
    /// in `dropped` only).
    pub queries: AtomicU64,
    /// Answered from the table (including empty NOERROR).
    pub answered: AtomicU64,
    /// An upstream's answer relayed, other than NXDOMAIN.
    pub forwarded: AtomicU64,
    /// An upstream's NXDOMAIN relayed (the table never answers NXDOMAIN).
    pub nxdomain: AtomicU64,
    /// Every upstream failed (counted in `servfail` too).
    pub forward_failed: AtomicU64,
    /// SERVFAIL sent by the proxy (no question, no table yet, upstreams
    /// failed); an upstream's SERVFAIL relayed is `forwarded`.
    pub servfail: AtomicU64,
    /// Unparseable queries (FORMERR sent).
    pub formerr: AtomicU64,
    /// Other error answers (NOTIMP for opcodes other than QUERY).
    pub other_errors: AtomicU64,
    /// Not answered: too short for a header, not a query, or too many UDP
    /// queries in flight.
    pub dropped: AtomicU64,
    /// Table answers truncated (TC set).
    pub truncated: AtomicU64,
    /// Hosts and names of the current table.
    pub table_hosts: AtomicU64,
    pub table_names: AtomicU64,
    /// Time from sending a query upstream to the answer relayed, or to
    /// giving up on every server.
    pub upstream_latency: Histogram,
}

/// A copy of [`DnsMetrics`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsMetricsSnapshot {
    pub queries: u64,
    pub answered: u64,
    pub forwarded: u64,
    pub nxdomain: u64,
    pub forward_failed: u64,
    pub servfail: u64,
    pub formerr: u64,
    pub other_errors: u64,
    pub dropped: u64,
    pub truncated: u64,
    pub table_hosts: u64,
    pub table_names: u64,
    pub upstream_latency: HistogramSnapshot,
}

impl DnsMetrics {
    /// Every counter, read once (each is exact; together they are not one
    /// atomic instant).
    pub fn snapshot(&self) -> DnsMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsMetricsSnapshot {
            queries: get(&self.queries),
            answered: get(&self.answered),
            forwarded: get(&self.forwarded),
            nxdomain: get(&self.nxdomain),
            forward_failed: get(&self.forward_failed),
            servfail: get(&self.servfail),
            formerr: get(&self.formerr),
            other_errors: get(&self.other_errors),
            dropped: get(&self.dropped),
            truncated: get(&self.truncated),
            table_hosts: get(&self.table_hosts),
            table_names: get(&self.table_names),
            upstream_latency: self.upstream_latency.snapshot(),
        }
    }

    /// Appends the metrics in Prometheus' text exposition format.
    pub fn render(&self, out: &mut String) {
        self.snapshot().render(out);
    }
}

impl DnsMetricsSnapshot {
    /// Appends the metrics in Prometheus' text exposition format.
    pub fn render(&self, out: &mut String) {
        fn head(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        }
        let name = "meshvm_agent_dns_queries_total";
        head(
            out,
            name,
            "counter",
            "DNS messages handled, by outcome: table (answered from the mesh's names), \
             forwarded (an upstream's answer relayed), nxdomain (an upstream's NXDOMAIN relayed), \
             servfail (sent by the proxy), malformed (FORMERR), notimp (not a QUERY), \
             dropped (not answered).",
        );
        for (outcome, value) in [
            ("table", self.answered),
            ("forwarded", self.forwarded),
            ("nxdomain", self.nxdomain),
            ("servfail", self.servfail),
            ("malformed", self.formerr),
            ("notimp", self.other_errors),
            ("dropped", self.dropped),
        ] {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {value}");
        }
        let scalars = [
            (
                "meshvm_agent_dns_forward_failures_total",
                "counter",
                "Queries no upstream nameserver answered (SERVFAIL sent).",
                self.forward_failed,
            ),
            (
                "meshvm_agent_dns_truncated_total",
                "counter",
                "Table answers truncated to fit the client's UDP size (TC set).",
                self.truncated,
            ),
            (
                "meshvm_agent_dns_table_names",
                "gauge",
                "Names the DNS proxy answers (alternate names and search-domain CNAMEs included).",
                self.table_names,
            ),
            (
                "meshvm_agent_dns_table_hosts",
                "gauge",
                "Hosts with an address in the DNS proxy's table.",
                self.table_hosts,
            ),
        ];
        for (name, kind, help, value) in scalars {
            head(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "meshvm_agent_dns_upstream_duration_seconds";
        head(
            out,
            name,
            "histogram",
            "Time to forward a query: until an upstream's answer, or until every upstream failed.",
        );
        let latency = &self.upstream_latency;
        for (bound, count) in &latency.cumulative {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", latency.count);
        let _ = writeln!(out, "{name}_sum {}", latency.sum_seconds);
        let _ = writeln!(out, "{name}_count {}", latency.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for millis in [0, 1, 3, 3, 700, 20_000] {
            h.observe(Duration::from_millis(millis));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert!((s.sum_seconds - 20.707).abs() < 1e-9, "{}", s.sum_seconds);
        let at = |bound: f64| s.cumulative.iter().find(|b| b.0 == bound).unwrap().1;
        // 0 ms and exactly 1 ms are ≤ 0.001; 3 ms twice ≤ 0.005; 700 ms
        // ≤ 1; 20 s only in +Inf.
        assert_eq!(at(0.0005), 1);
        assert_eq!(at(0.001), 2);
        assert_eq!(at(0.0025), 2);
        assert_eq!(at(0.005), 4);
        assert_eq!(at(0.5), 4);
        assert_eq!(at(1.0), 5);
        assert_eq!(at(10.0), 5);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = DnsMetrics::default();
        for (counter, n) in [
            (&m.answered, 3),
            (&m.forwarded, 2),
            (&m.nxdomain, 1),
            (&m.servfail, 4),
            (&m.formerr, 5),
            (&m.other_errors, 6),
            (&m.dropped, 7),
            (&m.forward_failed, 8),
            (&m.truncated, 9),
            (&m.table_names, 18),
            (&m.table_hosts, 4),
        ] {
            counter.store(n, Ordering::Relaxed);
        }
        m.upstream_latency.observe(Duration::from_micros(1500));
        m.upstream_latency.observe(Duration::from_secs(2));
        let mut text = String::new();
        m.render(&mut text);
        for line in [
            "# TYPE meshvm_agent_dns_queries_total counter",
            "meshvm_agent_dns_queries_total{outcome=\"table\"} 3",
            "meshvm_agent_dns_queries_total{outcome=\"forwarded\"} 2",
            "meshvm_agent_dns_queries_total{outcome=\"nxdomain\"} 1",
            "meshvm_agent_dns_queries_total{outcome=\"servfail\"} 4",
            "meshvm_agent_dns_queries_total{outcome=\"malformed\"} 5",
            "meshvm_agent_dns_queries_total{outcome=\"notimp\"} 6",
            "meshvm_agent_dns_queries_total{outcome=\"dropped\"} 7",
            "meshvm_agent_dns_forward_failures_total 8",
            "meshvm_agent_dns_truncated_total 9",
            "# TYPE meshvm_agent_dns_table_names gauge",
            "meshvm_agent_dns_table_names 18",
            "meshvm_agent_dns_table_hosts 4",
            "# TYPE meshvm_agent_dns_upstream_duration_seconds histogram",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"0.0005\"} 0",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"0.001\"} 0",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"0.0025\"} 1",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"1\"} 1",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"2.5\"} 2",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"10\"} 2",
            "meshvm_agent_dns_upstream_duration_seconds_bucket{le=\"+Inf\"} 2",
            "meshvm_agent_dns_upstream_duration_seconds_sum 2.0015",
            "meshvm_agent_dns_upstream_duration_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // Every sample line is `name{labels} value`, with a HELP and a TYPE
        // before its family, and bucket bounds increasing.
        let mut families = Vec::new();
        let mut last_bound = f64::NEG_INFINITY;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.split_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            let family = families.last().expect("a TYPE line first");
            assert!(series.starts_with(family.as_str()), "{line}");
            if let Some(bound) = series.strip_prefix(&format!("{family}_bucket{{le=\"")) {
                let bound = bound.trim_end_matches("\"}");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().unwrap()
                };
                assert!(bound > last_bound, "{line}");
                last_bound = bound;
            }
        }
        assert_eq!(families.len(), 6);
    }
}
