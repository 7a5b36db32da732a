//! The agent's status server on 127.0.0.1:15020 (Istio's status port):
//! `/healthz/ready`, which Envoy's 15021 listener forwards to (so a load
//! balancer or kubelet-style prober asking Envoy learns whether the whole VM
//! side is ready), `/metrics` in Prometheus' text format, and `POST
//! /v1/health`, where the Wasm filter inside Envoy (through its `agent`
//! cluster) posts its probe results and traffic-health transitions. Only
//! `/healthz/ready` is forwarded by Envoy's listener; the rest is reachable
//! on loopback only.
//!
//! Ready means: a valid workload certificate is held, Envoy answers on its
//! admin API (when the agent runs Envoy), the xDS proxy has an upstream
//! stream to the control plane, and — when the DNS proxy is on — a
//! NameTable has arrived. Not ready answers 503 with the reasons, one a line.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dns::DnsMetrics;
use crate::envoy::EnvoyStatus;
use crate::health::{Health, HealthUpdate, MAX_BODY};
use crate::identity_manager::CurrentIdentity;
use crate::xds::{NameTableReceiver, XdsStatus};

/// Istio's agent status port.
pub const DEFAULT_STATUS_ADDRESS: SocketAddr = crate::envoy::bootstrap::AGENT_ADDRESS;

/// What the status server reads.
#[derive(Clone)]
pub struct StatusSources {
    pub identity: watch::Receiver<CurrentIdentity>,
    pub xds: watch::Receiver<XdsStatus>,
    pub name_table: NameTableReceiver,
    /// `None` when Envoy is run by someone else.
    pub envoy: Option<watch::Receiver<EnvoyStatus>>,
    /// The DNS proxy is on: readiness waits for a NameTable.
    pub dns: bool,
    /// The running DNS proxy's counters, rendered with the rest.
    pub dns_metrics: Option<Arc<DnsMetrics>>,
    /// The workload's health: `/v1/health` records into it.
    pub health: Arc<Health>,
}

/// Why the agent is not ready (empty: ready).
pub async fn not_ready_reasons(sources: &StatusSources) -> Vec<String> {
    let mut reasons = Vec::new();
    let identity = sources.identity.borrow().clone();
    match identity {
        None => reasons.push("no workload certificate yet".to_string()),
        Some(id) if id.cert.not_after() <= SystemTime::now() => {
            reasons.push("the workload certificate has expired".to_string());
        }
        Some(_) => {}
    }
    if let Some(envoy) = &sources.envoy {
        let admin = envoy.borrow().admin;
        match admin {
            None => reasons.push("Envoy is not running".to_string()),
            Some(addr) => {
                if !crate::envoy::admin::is_live(addr, Duration::from_secs(1)).await {
                    reasons.push("Envoy is not live yet (waiting for its configuration)".into());
                }
            }
        }
    }
    if sources.xds.borrow().upstreams == 0 {
        reasons.push("no xDS stream to the control plane".to_string());
    }
    if sources.dns && sources.name_table.borrow().is_none() {
        reasons.push("no NameTable from the control plane yet".to_string());
    }
    reasons
}

async fn ready(State(sources): State<Arc<StatusSources>>) -> impl IntoResponse {
    let reasons = not_ready_reasons(&sources).await;
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
    }
}

/// The metrics, in Prometheus' text exposition format.
pub fn render_metrics(sources: &StatusSources) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    let expiry = sources
        .identity
        .borrow()
        .as_ref()
        .and_then(|id| id.cert.not_after().duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs() as f64);
    metric(
        "meshvm_agent_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the workload certificate expires (Unix time; 0 without one).",
        expiry,
    );
    let xds = *sources.xds.borrow();
    metric(
        "meshvm_agent_xds_upstream_streams",
        "gauge",
        "xDS streams open to the control plane.",
        xds.upstreams as f64,
    );
    metric(
        "meshvm_agent_xds_upstream_streams_opened_total",
        "counter",
        "xDS streams opened to the control plane.",
        xds.upstreams_opened as f64,
    );
    metric(
        "meshvm_agent_name_tables_accepted_total",
        "counter",
        "NameTables received and accepted.",
        xds.name_tables_accepted as f64,
    );
    metric(
        "meshvm_agent_name_tables_rejected_total",
        "counter",
        "NameTables refused (NACKed).",
        xds.name_tables_rejected as f64,
    );
    metric(
        "meshvm_agent_health_reports_sent_total",
        "counter",
        "HealthInformation reports sent to the control plane.",
        xds.health_reports_sent as f64,
    );
    let hosts = sources
        .name_table
        .borrow()
        .as_ref()
        .map_or(0, |t| t.table.len());
    metric(
        "meshvm_agent_name_table_hosts",
        "gauge",
        "Hosts in the current NameTable.",
        hosts as f64,
    );
    if let Some(envoy) = &sources.envoy {
        let restarts = envoy.borrow().restarts;
        metric(
            "meshvm_agent_envoy_restarts_total",
            "counter",
            "Envoy restarts by the agent.",
            restarts as f64,
        );
    }
    sources.health.render(&mut out);
    if let Some(dns) = &sources.dns_metrics {
        dns.render(&mut out);
    }
    out
}

async fn metrics(State(sources): State<Arc<StatusSources>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&sources),
    )
}

/// `POST /v1/health`: one source's health, as [`HealthUpdate`] JSON. 204
/// when recorded; 400 saying why when not (nothing changes then).
async fn post_health(
    State(sources): State<Arc<StatusSources>>,
    body: Result<Bytes, BytesRejection>,
) -> impl IntoResponse {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return bad_request(format!("health update over {MAX_BODY} bytes"));
        }
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    match HealthUpdate::parse(&body).and_then(|update| sources.health.apply(&update)) {
        Ok(()) => (StatusCode::NO_CONTENT, String::new()),
        Err(error) => {
            tracing::debug!(%error, "refused a health update");
            bad_request(error.to_string())
        }
    }
}

fn bad_request(message: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message + "\n")
}

/// The routes.
pub fn router(sources: StatusSources) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/v1/health",
            post(post_health).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .with_state(Arc::new(sources))
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    sources: StatusSources,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(sources))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dns: bool) -> StatusSources {
        StatusSources {
            identity: watch::channel(None).1,
            xds: watch::channel(XdsStatus::default()).1,
            name_table: watch::channel(None).1,
            envoy: None,
            dns,
            dns_metrics: None,
            health: Arc::new(Health::new(|_| {})),
        }
    }

    #[tokio::test]
    async fn not_ready_says_why() {
        let reasons = not_ready_reasons(&sources(true)).await;
        assert_eq!(
            reasons,
            vec![
                "no workload certificate yet",
                "no xDS stream to the control plane",
                "no NameTable from the control plane yet",
            ]
        );
        let reasons = not_ready_reasons(&sources(false)).await;
        assert_eq!(reasons.len(), 2);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let text = render_metrics(&sources(false));
        assert!(text.contains("# TYPE meshvm_agent_xds_upstream_streams gauge\n"));
        assert!(text.contains("\nmeshvm_agent_name_table_hosts 0\n"));
        assert!(!text.contains("meshvm_agent_dns_"), "{text}");
        let dns = Arc::new(DnsMetrics::default());
        dns.answered.store(2, std::sync::atomic::Ordering::Relaxed);
        let text = render_metrics(&StatusSources {
            dns_metrics: Some(dns),
            ..sources(true)
        });
        assert!(
            text.contains("\nmeshvm_agent_dns_queries_total{outcome=\"table\"} 2\n"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("meshvm_agent_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }

    async fn post(router: &Router, body: impl Into<axum::body::Body>) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let request = axum::http::Request::post("/v1/health")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_posts_are_checked_then_recorded() {
        let sources = sources(false);
        let health = sources.health.clone();
        let router = router(sources.clone());

        for (body, why) in [
            (
                "garbage".to_string(),
                "invalid health update: expected value",
            ),
            (r#"{"healthy":1}"#.into(), "expected a boolean"),
            (r#"{"healthy":true,"x":1}"#.into(), "unknown field `x`"),
            (
                r#"{"healthy":true,"source":"a/b"}"#.into(),
                "invalid source",
            ),
            (
                format!(
                    r#"{{"healthy":false,"message":"{}"}}"#,
                    "x".repeat(MAX_BODY)
                ),
                "health update over 8192 bytes",
            ),
        ] {
            let (status, text) = post(&router, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
            assert!(text.contains(why), "{text}");
        }
        assert_eq!(health.current(), None, "nothing recorded");
        assert!(health.sources().is_empty());

        let (status, text) = post(&router, r#"{"healthy":false,"message":"db down"}"#).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
        assert_eq!(
            health.current(),
            Some(crate::xds::HealthReport::Unhealthy(
                "filter: db down".into()
            ))
        );
        let metrics = render_metrics(&sources);
        assert!(
            metrics
                .lines()
                .any(|l| l == "meshvm_agent_workload_healthy 0"),
            "{metrics}"
        );
    }
}
