//! The agent's own readiness probe (reference §3.2, §3.3; Istio's
//! pkg/istio-agent/health/health_check.go): after the initial delay, probe
//! at once and then every period, each probe bounded by the timeout, and
//! turn consecutive results into verdicts with the success and failure
//! thresholds. Only transitions are reported; the first verdict always is.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ProbeMethod, ReadinessProbe};

use super::{Health, exec, grpc, tcp};

/// The source name under which the agent's own probe reports.
pub const AGENT_SOURCE: &str = "agent-probe";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    /// With what went wrong.
    Failure(String),
    /// No answer within the timeout.
    Timeout(Duration),
}

impl ProbeOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Success)
    }

    /// Why the probe failed (empty on success).
    pub fn message(&self) -> String {
        match self {
            Self::Success => String::new(),
            Self::Failure(message) => message.clone(),
            Self::Timeout(timeout) => format!("no answer within {timeout:?}"),
        }
    }
}

/// When to probe and how many results make a verdict, with Istio's
/// defaults already applied (see [`ReadinessProbe`]'s accessors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Schedule {
    pub fn from_probe(probe: &ReadinessProbe) -> Self {
        Self {
            initial_delay: probe.initial_delay(),
            period: probe.period(),
            timeout: probe.timeout(),
            success_threshold: probe.success_threshold(),
            failure_threshold: probe.failure_threshold(),
        }
    }
}

/// Consecutive counters and the last verdict, as Istio's agent keeps them.
#[derive(Debug, Clone)]
pub struct Transitions {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    /// `None` until the first verdict: it is always reported.
    last: Option<bool>,
}

impl Transitions {
    pub fn new(success_threshold: u32, failure_threshold: u32) -> Self {
        Self {
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
            successes: 0,
            failures: 0,
            last: None,
        }
    }

    /// Counts one result; `Some(healthy)` when it makes a new verdict.
    pub fn observe(&mut self, success: bool) -> Option<bool> {
        let (count, threshold) = if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes, self.success_threshold)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures, self.failure_threshold)
        };
        if count >= threshold && self.last != Some(success) {
            self.last = Some(success);
            Some(success)
        } else {
            None
        }
    }
}

/// A probe the agent can run itself.
#[derive(Debug, Clone)]
pub enum Checker {
    Tcp(tcp::TcpCheck),
    Exec(exec::ExecCheck),
    Grpc(grpc::GrpcCheck),
}

impl Checker {
    /// The agent's check for `method`; `None` for `httpGet`, which the
    /// filter runs inside Envoy and posts to `/v1/health`.
    pub fn for_method(method: &ProbeMethod) -> Option<Self> {
        match method {
            ProbeMethod::HttpGet(_) => None,
            ProbeMethod::TcpSocket(t) => Some(Self::Tcp(tcp::TcpCheck::new(t))),
            ProbeMethod::Exec(e) => Some(Self::Exec(exec::ExecCheck::new(e))),
            ProbeMethod::Grpc(g) => Some(Self::Grpc(grpc::GrpcCheck::new(g))),
        }
    }

    /// One probe, bounded by `timeout` (an exec probe's process is killed).
    pub async fn check(&self, timeout: Duration) -> ProbeOutcome {
        let outcome = match self {
            Self::Tcp(c) => tokio::time::timeout(timeout, c.check()).await,
            Self::Exec(c) => tokio::time::timeout(timeout, c.check()).await,
            Self::Grpc(c) => tokio::time::timeout(timeout, c.check()).await,
        };
        match outcome {
            Ok(Ok(())) => ProbeOutcome::Success,
            Ok(Err(message)) => ProbeOutcome::Failure(message),
            Err(_) => ProbeOutcome::Timeout(timeout),
        }
    }
}

/// Runs `checker` on `schedule` forever, recording verdicts in `health`
/// under [`AGENT_SOURCE`]. Abort the task to stop.
pub async fn run(checker: Checker, schedule: Schedule, health: Arc<Health>) {
    run_with(schedule, health, move || {
        let checker = checker.clone();
        async move { checker.check(schedule.timeout).await }
    })
    .await
}

/// [`run`] with any check (tests script outcomes with it).
pub async fn run_with<F, Fut>(schedule: Schedule, health: Arc<Health>, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ProbeOutcome>,
{
    tokio::time::sleep(schedule.initial_delay).await;
    let mut ticks = tokio::time::interval(schedule.period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut transitions = Transitions::new(schedule.success_threshold, schedule.failure_threshold);
    loop {
        ticks.tick().await;
        let outcome = check().await;
        health.count_probe(&outcome);
        if !outcome.is_success() {
            tracing::debug!(error = %outcome.message(), "readiness probe failed");
        }
        if let Some(healthy) = transitions.observe(outcome.is_success()) {
            if healthy {
                tracing::info!("readiness probe: healthy");
            } else {
                tracing::warn!(error = %outcome.message(), "readiness probe: unhealthy");
            }
            // The agent's own source name is valid and reserved: it cannot fail.
            let _ = health.record(AGENT_SOURCE, healthy, &outcome.message());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::xds::HealthReport;

    #[test]
    fn transitions_follow_the_thresholds_and_report_the_first_verdict() {
        let mut t = Transitions::new(2, 3);
        assert_eq!(t.observe(true), None, "one success of two");
        assert_eq!(t.observe(true), Some(true), "the first verdict");
        assert_eq!(t.observe(true), None, "no change");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a success resets the failures");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false), "three in a row");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));

        let mut t = Transitions::new(1, 1);
        assert_eq!(t.observe(false), Some(false), "a failing first verdict too");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), Some(true));
    }

    /// Reports with when they were made.
    type Seen = Arc<Mutex<Vec<(Duration, HealthReport)>>>;

    /// A health that records what it would report, and when.
    fn recorder() -> (Arc<Health>, Seen) {
        let start = tokio::time::Instant::now();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let health = Health::new(move |report| {
            sink.lock().unwrap().push((start.elapsed(), report));
        });
        (Arc::new(health), seen)
    }

    fn scripted(outcomes: &[bool]) -> impl FnMut() -> std::future::Ready<ProbeOutcome> {
        let mut script: VecDeque<bool> = outcomes.iter().copied().collect();
        move || {
            let ok = script.pop_front().unwrap_or(true);
            std::future::ready(if ok {
                ProbeOutcome::Success
            } else {
                ProbeOutcome::Failure("connection refused".into())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_waits_probes_every_period_and_reports_transitions() {
        let (health, seen) = recorder();
        let schedule = Schedule {
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        // Probes at 5, 15, 25, ... s.
        let script = scripted(&[true, true, false, false, false, false, true]);
        let task = tokio::spawn(run_with(schedule, health.clone(), script));
        tokio::time::sleep(Duration::from_secs(100)).await;
        task.abort();
        let seen = seen.lock().unwrap().clone();
        let unhealthy = HealthReport::Unhealthy("agent-probe: connection refused".into());
        assert_eq!(
            seen,
            vec![
                (Duration::from_secs(5), HealthReport::Healthy),
                (Duration::from_secs(45), unhealthy),
                (Duration::from_secs(65), HealthReport::Healthy),
            ]
        );
        let counts = health.probe_counts();
        assert_eq!((counts.success, counts.failure), (6, 4), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_reported_before_a_threshold_is_met() {
        let (health, seen) = recorder();
        let schedule = Schedule {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 3,
            failure_threshold: 3,
        };
        // Alternating results never reach either threshold.
        let script = scripted(&[true, false, true, false, true, false, true, false]);
        let task = tokio::spawn(run_with(schedule, health.clone(), script));
        tokio::time::sleep(Duration::from_secs(75)).await;
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(health.current(), None);
        // Then three successes (at 80, 90, 100 s).
        tokio::time::sleep(Duration::from_secs(30)).await;
        task.abort();
        assert_eq!(
            seen.lock().unwrap().clone(),
            vec![(Duration::from_secs(100), HealthReport::Healthy)]
        );
    }
}
