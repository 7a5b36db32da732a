//! The workload's active health probe, run from a singleton Wasm service
//! in Envoy (root id [`HEALTH_ROOT_ID`]): the WorkloadGroup's `httpGet`
//! probe with the defaults Istio's agent applies (reference: Istio's
//! pkg/istio-agent/health), verdicts after the success/failure thresholds,
//! and only transitions (always the first verdict) posted to the agent's
//! `POST /v1/health`.
//!
//! Configuration (plugin configuration of the singleton, JSON): the probe as
//! mesh.yaml's `readinessProbe` writes it, and the clusters Envoy has for
//! the app and the agent:
//!
//! ```json
//! {"probe": {"httpGet": {"path": "/health", "port": 9080}, "periodSeconds": 5},
//!  "app_cluster": "inbound-probe", "agent_cluster": "agent"}
//! ```

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde::Deserialize;

use crate::config::ConfigError;

/// The root id that makes a root context the health service.
pub const HEALTH_ROOT_ID: &str = "meshvm-health";
/// `User-Agent` of probe requests unless the probe sets one (Istio's).
pub const PROBE_USER_AGENT: &str = "istio-probe/1.0";
/// Where verdicts go on the agent's status server.
pub const HEALTH_PATH: &str = "/v1/health";

/// The singleton's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// The active probe (`httpGet`), if the WorkloadGroup has one.
    #[serde(default)]
    pub probe: Option<ReadinessProbe>,
    /// Health from real traffic; absent: off.
    #[serde(default)]
    pub traffic: Option<TrafficConfig>,
    /// The cluster that reaches the app (the probe's port on the app's
    /// address).
    #[serde(default = "default_app_cluster")]
    pub app_cluster: String,
    /// The cluster that reaches the agent's status server.
    #[serde(default = "default_agent_cluster")]
    pub agent_cluster: String,
    /// The `source` of the reports.
    #[serde(default = "default_source")]
    pub source: String,
}

fn default_app_cluster() -> String {
    "inbound-probe".into()
}

fn default_agent_cluster() -> String {
    "agent".into()
}

fn default_source() -> String {
    "filter".into()
}

/// Health from the outcomes of real inbound requests: unhealthy when, over
/// the last `window_seconds`, at least `min_requests` were answered and the
/// share of failures (5xx, resets, no upstream) reached `failure_percent`;
/// healthy again when it falls below (or the traffic is too thin to judge,
/// which is what happens once the VM is out of the endpoints: it is put
/// back after a window to try again, like an outlier ejection).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficConfig {
    #[serde(default = "default_window_seconds")]
    pub window_seconds: u32,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_failure_percent")]
    pub failure_percent: u32,
    /// The `source` of its reports.
    #[serde(default = "default_traffic_source")]
    pub source: String,
}

fn default_window_seconds() -> u32 {
    30
}

fn default_min_requests() -> u32 {
    20
}

fn default_failure_percent() -> u32 {
    50
}

fn default_traffic_source() -> String {
    "traffic".into()
}

/// The shared queue inbound filters send their outcome counts on (owned by
/// the health service, in the VM [`TRAFFIC_VM_ID`]).
pub const TRAFFIC_QUEUE: &str = "meshvm-traffic";
/// The `vm_id` of the filter and the health service.
pub const TRAFFIC_VM_ID: &str = "meshvm";

/// One queue message: successes and failures since the last one.
pub fn encode_counts(ok: u32, failed: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&ok.to_le_bytes());
    out[4..].copy_from_slice(&failed.to_le_bytes());
    out
}

pub fn decode_counts(bytes: &[u8]) -> Option<(u32, u32)> {
    let bytes: &[u8; 8] = bytes.try_into().ok()?;
    Some((
        u32::from_le_bytes(bytes[..4].try_into().ok()?),
        u32::from_le_bytes(bytes[4..].try_into().ok()?),
    ))
}

/// Outcomes per second over the window, and the verdict last reported.
#[derive(Debug, Clone)]
pub struct TrafficWindow {
    config: TrafficConfig,
    /// (second, successes, failures), oldest first.
    buckets: Vec<(u64, u32, u32)>,
    reported: Option<bool>,
}

impl TrafficWindow {
    pub fn new(config: TrafficConfig) -> Self {
        TrafficWindow {
            config,
            buckets: Vec::new(),
            reported: None,
        }
    }

    pub fn source(&self) -> &str {
        &self.config.source
    }

    /// Adds counts received at `now_ms`.
    pub fn record(&mut self, now_ms: u64, ok: u32, failed: u32) {
        let second = now_ms / 1000;
        match self.buckets.last_mut() {
            Some((s, o, f)) if *s == second => {
                *o = o.saturating_add(ok);
                *f = f.saturating_add(failed);
            }
            _ => self.buckets.push((second, ok, failed)),
        }
    }

    /// The verdict at `now_ms` if it is due (a change, or the first one once
    /// there is enough traffic to judge), with a message when unhealthy.
    pub fn evaluate(&mut self, now_ms: u64) -> Option<(bool, Option<String>)> {
        let now = now_ms / 1000;
        let window = u64::from(self.config.window_seconds);
        self.buckets.retain(|(s, _, _)| s + window > now);
        let (ok, failed) = self
            .buckets
            .iter()
            .fold((0u64, 0u64), |(o, f), (_, bo, bf)| {
                (o + u64::from(*bo), f + u64::from(*bf))
            });
        let total = ok + failed;
        let enough = total >= u64::from(self.config.min_requests.max(1));
        let failing = failed * 100 >= u64::from(self.config.failure_percent) * total;
        let healthy = !(enough && failing);
        if self.reported == Some(healthy) || (self.reported.is_none() && healthy && !enough) {
            return None;
        }
        self.reported = Some(healthy);
        let message = (!healthy).then(|| {
            format!(
                "{failed} of the last {total} requests failed (5xx or no response) in {} s",
                self.config.window_seconds
            )
        });
        Some((healthy, message))
    }

    /// A verdict that did not reach the agent is due again.
    pub fn forget(&mut self) {
        self.reported = None;
    }
}

/// `readinessProbe` (istio.networking.v1alpha3.ReadinessProbe in JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadinessProbe {
    #[serde(default)]
    pub initial_delay_seconds: i32,
    #[serde(default)]
    pub timeout_seconds: i32,
    #[serde(default)]
    pub period_seconds: i32,
    #[serde(default)]
    pub success_threshold: i32,
    #[serde(default)]
    pub failure_threshold: i32,
    #[serde(default)]
    pub http_get: Option<HttpGet>,
}

/// `httpGet`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: u32,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub scheme: String,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// The probe with Istio's defaults applied: what one round sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Request headers (`:method`, `:path`, `:authority`, `:scheme`,
    /// `user-agent`, then the probe's own).
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub period_ms: u64,
    pub initial_delay_ms: u64,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn seconds(field: &str, value: i32, default: u64) -> Result<u64, ConfigError> {
    match value {
        0 => Ok(default),
        v if v > 0 => Ok(v as u64 * 1000),
        v => Err(invalid(field, &format!("{v} is negative"))),
    }
}

fn count(field: &str, value: i32) -> Result<u32, ConfigError> {
    match value {
        0 => Ok(1),
        v if v > 0 => Ok(v as u32),
        v => Err(invalid(field, &format!("{v} is negative"))),
    }
}

fn invalid(field: &str, problem: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        problem: problem.to_string(),
    }
}

impl HealthConfig {
    /// Parses and checks the singleton's configuration.
    pub fn parse(bytes: &[u8]) -> Result<HealthConfig, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        let config: HealthConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        if config.probe.is_none() && config.traffic.is_none() {
            return Err(invalid(
                "probe",
                "missing, and no traffic health: nothing to do",
            ));
        }
        if config.probe.is_some() {
            config.probe()?;
        }
        if let Some(traffic) = &config.traffic {
            if traffic.window_seconds == 0 {
                return Err(invalid("traffic.window_seconds", "must be at least 1"));
            }
            if !(1..=100).contains(&traffic.failure_percent) {
                return Err(invalid(
                    "traffic.failure_percent",
                    &format!("{} is not in 1-100", traffic.failure_percent),
                ));
            }
        }
        Ok(config)
    }

    /// The probe to run, Istio's defaults applied (0 = default): timeout
    /// 1 s, period 10 s, no initial delay, thresholds 1, path `/`, scheme
    /// `http`, host `127.0.0.1`.
    pub fn probe(&self) -> Result<Probe, ConfigError> {
        let p = self
            .probe
            .as_ref()
            .ok_or_else(|| invalid("probe", "missing"))?;
        let get = p.http_get.as_ref().ok_or_else(|| {
            invalid(
                "probe.httpGet",
                "missing: the filter runs httpGet probes (the agent runs the others)",
            )
        })?;
        if !(1..=65535).contains(&get.port) {
            return Err(invalid(
                "probe.httpGet.port",
                &format!("{} is not a port (1-65535)", get.port),
            ));
        }
        let scheme = match get.scheme.to_ascii_lowercase().as_str() {
            "" | "http" => "http",
            "https" => "https",
            other => {
                return Err(invalid(
                    "probe.httpGet.scheme",
                    &format!("`{other}` is not http or https"),
                ));
            }
        };
        let path = if get.path.is_empty() {
            "/".to_string()
        } else if get.path.starts_with('/') {
            get.path.clone()
        } else {
            format!("/{}", get.path)
        };
        let host = if get.host.is_empty() {
            "127.0.0.1"
        } else {
            get.host.as_str()
        };
        let mut headers = Vec::new();
        headers.push((":method".to_string(), "GET".to_string()));
        headers.push((":path".to_string(), path));
        headers.push((":authority".to_string(), format!("{host}:{}", get.port)));
        headers.push((":scheme".to_string(), scheme.to_string()));
        let own_user_agent = get
            .http_headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("user-agent"));
        if !own_user_agent {
            headers.push(("user-agent".to_string(), PROBE_USER_AGENT.to_string()));
        }
        for h in &get.http_headers {
            let name = h.name.to_ascii_lowercase();
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
            if !valid {
                return Err(invalid(
                    "probe.httpGet.httpHeaders",
                    &format!("`{}` is not a header name", h.name),
                ));
            }
            if name == "host" {
                headers[2].1 = h.value.clone();
            } else {
                headers.push((name, h.value.clone()));
            }
        }
        Ok(Probe {
            headers,
            timeout_ms: seconds("probe.timeoutSeconds", p.timeout_seconds, 1000)?,
            period_ms: seconds("probe.periodSeconds", p.period_seconds, 10_000)?,
            initial_delay_ms: seconds("probe.initialDelaySeconds", p.initial_delay_seconds, 0)?,
            success_threshold: count("probe.successThreshold", p.success_threshold)?,
            failure_threshold: count("probe.failureThreshold", p.failure_threshold)?,
        })
    }
}

/// One probe round's outcome from the response's `:status` (`None`: no
/// response: timeout, refused, reset). Healthy iff 200–399.
pub fn outcome(status: Option<&str>) -> Result<(), String> {
    match status.and_then(|s| s.parse::<u16>().ok()) {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("HTTP probe failed with status {code}")),
        None => Err("HTTP probe failed: no response (timeout or connection failure)".into()),
    }
}

/// Consecutive results against the thresholds; says when to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    reported: Option<bool>,
}

impl Tracker {
    pub fn new(probe: &Probe) -> Self {
        Tracker {
            success_threshold: probe.success_threshold,
            failure_threshold: probe.failure_threshold,
            successes: 0,
            failures: 0,
            reported: None,
        }
    }

    /// Records one round; `Some(healthy)` when a verdict is due: a
    /// threshold reached whose verdict differs from the last one reported
    /// (the first verdict is always due).
    pub fn observe(&mut self, healthy: bool) -> Option<bool> {
        if healthy {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.success_threshold && self.reported != Some(true) {
                self.reported = Some(true);
                return Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= self.failure_threshold && self.reported != Some(false) {
                self.reported = Some(false);
                return Some(false);
            }
        }
        None
    }

    /// A reported verdict did not reach the agent: the next round that
    /// agrees reports it again.
    pub fn forget(&mut self, verdict: bool) {
        if self.reported == Some(verdict) {
            self.reported = None;
        }
    }
}

/// The body of `POST /v1/health` (JSON written by hand: a serializer
/// would cost the module more than the rest of this file).
pub fn report_body(healthy: bool, message: Option<&str>, source: &str) -> Vec<u8> {
    let mut out = String::from("{\"healthy\":");
    out.push_str(if healthy { "true" } else { "false" });
    if let Some(message) = message {
        out.push_str(",\"message\":");
        push_json_string(&mut out, message);
    }
    out.push_str(",\"source\":");
    push_json_string(&mut out, source);
    out.push('}');
    out.into_bytes()
}

fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn parse(json: &str) -> Result<HealthConfig, ConfigError> {
        HealthConfig::parse(json.as_bytes())
    }

    #[test]
    fn istio_defaults_apply_to_zeros() {
        let config = parse(r#"{"probe": {"httpGet": {"port": 9080}}}"#).unwrap();
        assert_eq!(config.app_cluster, "inbound-probe");
        assert_eq!(config.agent_cluster, "agent");
        let probe = config.probe().unwrap();
        assert_eq!(
            (probe.timeout_ms, probe.period_ms, probe.initial_delay_ms),
            (1000, 10_000, 0)
        );
        assert_eq!((probe.success_threshold, probe.failure_threshold), (1, 1));
        let headers: Vec<(&str, &str)> = probe
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            vec![
                (":method", "GET"),
                (":path", "/"),
                (":authority", "127.0.0.1:9080"),
                (":scheme", "http"),
                ("user-agent", "istio-probe/1.0"),
            ]
        );
    }

    #[test]
    fn the_probe_s_own_settings_and_headers_are_kept() {
        let config = parse(
            r#"{"probe": {"httpGet": {"path": "health", "port": 8080, "host": "app.local",
                "scheme": "HTTPS", "httpHeaders": [{"name": "X-Probe", "value": "1"},
                {"name": "Host", "value": "virtual"}, {"name": "User-Agent", "value": "mine"}]},
                "timeoutSeconds": 2, "periodSeconds": 3, "initialDelaySeconds": 4,
                "successThreshold": 2, "failureThreshold": 3}}"#,
        )
        .unwrap();
        let probe = config.probe().unwrap();
        assert_eq!(
            (probe.timeout_ms, probe.period_ms, probe.initial_delay_ms),
            (2000, 3000, 4000)
        );
        assert_eq!((probe.success_threshold, probe.failure_threshold), (2, 3));
        assert_eq!(probe.headers[1].1, "/health");
        assert_eq!(probe.headers[2].1, "virtual");
        assert_eq!(probe.headers[3].1, "https");
        assert!(probe.headers.contains(&("x-probe".into(), "1".into())));
        assert!(
            probe
                .headers
                .contains(&("user-agent".into(), "mine".into()))
        );
        assert!(!probe.headers.iter().any(|(_, v)| v == PROBE_USER_AGENT));
    }

    #[test]
    fn bad_configurations_name_the_field() {
        for (json, field) in [
            (r#"{"probe": {"tcpSocket": {"port": 1}}}"#, ""),
            (r#"{"probe": {}}"#, "probe.httpGet"),
            (r#"{"app_cluster": "x"}"#, "probe"),
            (
                r#"{"probe": {"httpGet": {"port": 0}}}"#,
                "probe.httpGet.port",
            ),
            (
                r#"{"probe": {"httpGet": {"port": 80, "scheme": "ftp"}}}"#,
                "probe.httpGet.scheme",
            ),
            (
                r#"{"probe": {"httpGet": {"port": 80}, "periodSeconds": -1}}"#,
                "probe.periodSeconds",
            ),
            (
                r#"{"probe": {"httpGet": {"port": 80, "httpHeaders": [{"name": "a b", "value": ""}]}}}"#,
                "probe.httpGet.httpHeaders",
            ),
        ] {
            let error = parse(json).unwrap_err();
            match (&error, field) {
                (ConfigError::Json(_), "") => {}
                (ConfigError::Invalid { field: f, .. }, expected) => assert_eq!(f, expected),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert_eq!(parse("  ").unwrap_err(), ConfigError::Empty);
    }

    #[test]
    fn statuses_200_to_399_are_healthy() {
        assert!(outcome(Some("200")).is_ok());
        assert!(outcome(Some("302")).is_ok());
        assert_eq!(
            outcome(Some("500")).unwrap_err(),
            "HTTP probe failed with status 500"
        );
        assert!(outcome(Some("404")).is_err());
        assert!(outcome(None).unwrap_err().contains("no response"));
    }

    #[test]
    fn only_transitions_are_reported_after_the_thresholds() {
        let probe = Probe {
            headers: vec![],
            timeout_ms: 1000,
            period_ms: 1000,
            initial_delay_ms: 0,
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut t = Tracker::new(&probe);
        // The first verdict waits for its threshold, then is always sent.
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(true), None);
        // Failures below the threshold, interrupted: nothing.
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
    }

    #[test]
    fn traffic_health_judges_the_window_and_reports_changes() {
        let config = parse(r#"{"traffic": {"window_seconds": 10, "min_requests": 10}}"#).unwrap();
        assert!(config.probe.is_none());
        let mut w = TrafficWindow::new(config.traffic.unwrap());
        // Too little traffic to judge: nothing reported.
        w.record(0, 3, 3);
        assert_eq!(w.evaluate(500), None);
        // Enough, half failing: unhealthy.
        w.record(1_000, 2, 2);
        let (healthy, message) = w.evaluate(1_500).unwrap();
        assert!(!healthy);
        assert_eq!(
            message.unwrap(),
            "5 of the last 10 requests failed (5xx or no response) in 10 s"
        );
        assert_eq!(w.evaluate(2_000), None, "only changes");
        // The failures age out of the window: healthy again.
        w.record(5_000, 30, 1);
        assert_eq!(w.evaluate(12_000), Some((true, None)));
        assert_eq!(encode_counts(7, 9).as_slice().len(), 8);
        assert_eq!(decode_counts(&encode_counts(7, 9)), Some((7, 9)));
        assert_eq!(decode_counts(b"short"), None);
        for bad in [
            r#"{}"#,
            r#"{"traffic": {"window_seconds": 0}}"#,
            r#"{"traffic": {"failure_percent": 150}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reports_are_the_agent_s_json() {
        assert_eq!(
            report_body(false, Some("HTTP probe failed with status 500"), "filter"),
            br#"{"healthy":false,"message":"HTTP probe failed with status 500","source":"filter"}"#
        );
        assert_eq!(
            report_body(true, None, "filter"),
            br#"{"healthy":true,"source":"filter"}"#
        );
        assert_eq!(
            report_body(false, Some("a \"quoted\" \\ line\n"), "filter"),
            br#"{"healthy":false,"message":"a \"quoted\" \\ line\u000a","source":"filter"}"#
        );
    }
}
