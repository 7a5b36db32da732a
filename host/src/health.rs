//! The workload's health (reference §3): what each source says, and the
//! aggregate the xDS proxy reports to the control plane as
//! `HealthInformation`.
//!
//! Sources are the agent's own readiness probe ([`probe`]: `tcpSocket`,
//! `exec`, `grpc`) and whoever posts to the status server's `/v1/health`:
//! the Wasm filter inside Envoy posts its `httpGet` probe results and
//! traffic-health transitions there (source `filter` unless it says
//! otherwise). The workload is healthy only when every source that has
//! spoken says so. Until one has, nothing is reported, as Istio's agent
//! reports nothing without a probe.

pub mod exec;
pub mod grpc;
pub mod probe;
pub mod tcp;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::xds::HealthReport;
use probe::{AGENT_SOURCE, ProbeOutcome};

/// The source of a `/v1/health` post that names none.
pub const DEFAULT_SOURCE: &str = "filter";
/// The largest `/v1/health` body accepted.
pub const MAX_BODY: usize = 8 * 1024;
/// Distinct sources kept; a post naming one more is refused.
pub const MAX_SOURCES: usize = 16;
const MAX_SOURCE_LEN: usize = 64;

/// What one source says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceHealth {
    pub healthy: bool,
    pub message: String,
}

/// A `/v1/health` body: `{"healthy": bool, "message"?: string, "source"?: string}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthUpdate {
    pub healthy: bool,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
}

/// Why a health update was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    #[error("invalid health update: {0}")]
    Json(String),
    #[error("invalid source {0:?}: use 1-64 of A-Z a-z 0-9 . _ -")]
    BadSource(String),
    #[error("source {0:?} is the agent's own probe")]
    Reserved(String),
    #[error("too many health sources (at most {MAX_SOURCES}); not recording {0:?}")]
    TooManySources(String),
}

impl HealthUpdate {
    /// Parses and checks a posted body.
    pub fn parse(body: &[u8]) -> Result<Self, UpdateError> {
        let update: Self =
            serde_json::from_slice(body).map_err(|e| UpdateError::Json(e.to_string()))?;
        let source = update.source();
        let valid = !source.is_empty()
            && source.len() <= MAX_SOURCE_LEN
            && source
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(UpdateError::BadSource(source.to_string()));
        }
        if source == AGENT_SOURCE {
            return Err(UpdateError::Reserved(source.to_string()));
        }
        Ok(update)
    }

    /// The source, `filter` by default.
    pub fn source(&self) -> &str {
        self.source.as_deref().unwrap_or(DEFAULT_SOURCE)
    }
}

/// Probes run by the agent, by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCounts {
    pub success: u64,
    pub failure: u64,
    pub timeout: u64,
}

#[derive(Default)]
struct State {
    sources: BTreeMap<String, SourceHealth>,
    aggregate: Option<HealthReport>,
}

type Reporter = Box<dyn Fn(HealthReport) + Send + Sync>;

/// The sources and their aggregate. Each change of the aggregate goes to
/// the reporter (the xDS proxy's `report_health`).
pub struct Health {
    state: Mutex<State>,
    report: Reporter,
    success: AtomicU64,
    failure: AtomicU64,
    timeout: AtomicU64,
}

impl Health {
    pub fn new(report: impl Fn(HealthReport) + Send + Sync + 'static) -> Self {
        Self {
            state: Mutex::new(State::default()),
            report: Box::new(report),
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
        }
    }

    /// Records what `source` says; reports the aggregate if it changed.
    pub fn record(&self, source: &str, healthy: bool, message: &str) -> Result<(), UpdateError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.sources.contains_key(source) && state.sources.len() >= MAX_SOURCES {
            return Err(UpdateError::TooManySources(source.to_string()));
        }
        state.sources.insert(
            source.to_string(),
            SourceHealth {
                healthy,
                message: message.to_string(),
            },
        );
        let aggregate = aggregate(&state.sources);
        if state.aggregate.as_ref() != Some(&aggregate) {
            match &aggregate {
                HealthReport::Healthy => tracing::info!(source, "workload healthy"),
                HealthReport::Unhealthy(why) => {
                    tracing::warn!(source, reason = %why, "workload unhealthy");
                }
            }
            (self.report)(aggregate.clone());
            state.aggregate = Some(aggregate);
        }
        Ok(())
    }

    /// Records a posted update.
    pub fn apply(&self, update: &HealthUpdate) -> Result<(), UpdateError> {
        self.record(
            update.source(),
            update.healthy,
            update.message.as_deref().unwrap_or(""),
        )
    }

    /// The aggregate (`None` until a source has spoken).
    pub fn current(&self) -> Option<HealthReport> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .aggregate
            .clone()
    }

    /// Every source's latest word.
    pub fn sources(&self) -> BTreeMap<String, SourceHealth> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .clone()
    }

    /// Counts one probe of the agent's own.
    pub fn count_probe(&self, outcome: &ProbeOutcome) {
        let counter = match outcome {
            ProbeOutcome::Success => &self.success,
            ProbeOutcome::Failure(_) => &self.failure,
            ProbeOutcome::Timeout(_) => &self.timeout,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn probe_counts(&self) -> ProbeCounts {
        ProbeCounts {
            success: self.success.load(Ordering::Relaxed),
            failure: self.failure.load(Ordering::Relaxed),
            timeout: self.timeout.load(Ordering::Relaxed),
        }
    }

    /// The health metrics, in Prometheus' text format. The workload gauge
    /// is absent until a source has spoken (unknown is neither 1 nor 0).
    pub fn render(&self, out: &mut String) {
        if let Some(current) = self.current() {
            let value = u8::from(current == HealthReport::Healthy);
            let _ = writeln!(
                out,
                "# HELP meshvm_agent_workload_healthy Whether the workload is healthy (every source says so).\n\
                 # TYPE meshvm_agent_workload_healthy gauge\n\
                 meshvm_agent_workload_healthy {value}"
            );
        }
        let sources = self.sources();
        if !sources.is_empty() {
            let _ = writeln!(
                out,
                "# HELP meshvm_agent_health_source_healthy What each health source last said (1 healthy).\n\
                 # TYPE meshvm_agent_health_source_healthy gauge"
            );
            // Source names are checked to be label-safe.
            for (name, health) in &sources {
                let value = u8::from(health.healthy);
                let _ = writeln!(
                    out,
                    "meshvm_agent_health_source_healthy{{source=\"{name}\"}} {value}"
                );
            }
        }
        let counts = self.probe_counts();
        let _ = writeln!(
            out,
            "# HELP meshvm_agent_health_probes_total Readiness probes run by the agent, by result.\n\
             # TYPE meshvm_agent_health_probes_total counter"
        );
        for (result, n) in [
            ("success", counts.success),
            ("failure", counts.failure),
            ("timeout", counts.timeout),
        ] {
            let _ = writeln!(
                out,
                "meshvm_agent_health_probes_total{{result=\"{result}\"}} {n}"
            );
        }
    }
}

/// Healthy when every source is; otherwise each failing source and its
/// message, for the control plane's `Healthy` condition.
fn aggregate(sources: &BTreeMap<String, SourceHealth>) -> HealthReport {
    let failing: Vec<String> = sources
        .iter()
        .filter(|(_, h)| !h.healthy)
        .map(|(name, h)| {
            if h.message.is_empty() {
                format!("{name}: unhealthy")
            } else {
                format!("{name}: {}", h.message)
            }
        })
        .collect();
    if failing.is_empty() {
        HealthReport::Healthy
    } else {
        HealthReport::Unhealthy(failing.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn recording() -> (Health, Arc<Mutex<Vec<HealthReport>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (Health::new(move |r| sink.lock().unwrap().push(r)), seen)
    }

    #[test]
    fn healthy_only_when_every_source_is_and_only_changes_are_reported() {
        let (health, seen) = recording();
        assert_eq!(health.current(), None);
        health.record("agent-probe", true, "").unwrap();
        health.record("agent-probe", true, "").unwrap();
        health.record("filter", false, "db down").unwrap();
        health.record("traffic", false, "").unwrap();
        health.record("filter", true, "").unwrap();
        health.record("traffic", true, "").unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                HealthReport::Healthy,
                HealthReport::Unhealthy("filter: db down".into()),
                HealthReport::Unhealthy("filter: db down; traffic: unhealthy".into()),
                HealthReport::Unhealthy("traffic: unhealthy".into()),
                HealthReport::Healthy,
            ]
        );
        assert_eq!(health.current(), Some(HealthReport::Healthy));
    }

    #[test]
    fn updates_are_checked() {
        let ok = HealthUpdate::parse(br#"{"healthy":false,"message":"db down"}"#).unwrap();
        assert_eq!(ok.source(), "filter");
        assert_eq!(ok.message.as_deref(), Some("db down"));
        let named = HealthUpdate::parse(br#"{"healthy":true,"source":"traffic"}"#).unwrap();
        assert_eq!(named.source(), "traffic");

        for (body, expected) in [
            (&b"not json"[..], "expected ident"),
            (
                br#"{"healthy":"yes"}"#,
                "invalid type: string \"yes\", expected a boolean",
            ),
            (br#"{"message":"x"}"#, "missing field `healthy`"),
            (br#"{"healthy":true,"extra":1}"#, "unknown field `extra`"),
            (
                br#"{"healthy":true,"message":5}"#,
                "invalid type: integer `5`",
            ),
        ] {
            let error = HealthUpdate::parse(body).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        assert_eq!(
            HealthUpdate::parse(br#"{"healthy":true,"source":"a b"}"#),
            Err(UpdateError::BadSource("a b".into()))
        );
        assert_eq!(
            HealthUpdate::parse(br#"{"healthy":true,"source":""}"#),
            Err(UpdateError::BadSource(String::new()))
        );
        assert_eq!(
            HealthUpdate::parse(br#"{"healthy":true,"source":"agent-probe"}"#),
            Err(UpdateError::Reserved("agent-probe".into()))
        );
    }

    #[test]
    fn sources_are_bounded() {
        let (health, _) = recording();
        for i in 0..MAX_SOURCES {
            health.record(&format!("s{i}"), true, "").unwrap();
        }
        assert_eq!(
            health.record("one-more", false, ""),
            Err(UpdateError::TooManySources("one-more".into()))
        );
        assert_eq!(health.current(), Some(HealthReport::Healthy));
        health.record("s0", false, "").unwrap();
        assert_eq!(
            health.current(),
            Some(HealthReport::Unhealthy("s0: unhealthy".into()))
        );
    }

    #[test]
    fn metrics_show_the_aggregate_each_source_and_probe_counts() {
        let (health, _) = recording();
        let mut text = String::new();
        health.render(&mut text);
        assert!(!text.contains("meshvm_agent_workload_healthy"), "{text}");
        assert!(text.contains("\nmeshvm_agent_health_probes_total{result=\"success\"} 0\n"));

        health.record("agent-probe", true, "").unwrap();
        health.record("filter", false, "db down").unwrap();
        health.count_probe(&ProbeOutcome::Success);
        health.count_probe(&ProbeOutcome::Timeout(std::time::Duration::from_secs(1)));
        let mut text = String::new();
        health.render(&mut text);
        for line in [
            "meshvm_agent_workload_healthy 0",
            "meshvm_agent_health_source_healthy{source=\"agent-probe\"} 1",
            "meshvm_agent_health_source_healthy{source=\"filter\"} 0",
            "meshvm_agent_health_probes_total{result=\"success\"} 1",
            "meshvm_agent_health_probes_total{result=\"timeout\"} 1",
            "meshvm_agent_health_probes_total{result=\"failure\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
    }
}
