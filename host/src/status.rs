//! The agent's status server on 127.0.0.1:15020 (Istio's status port):
//! `/healthz/ready`, which Envoy's 15021 listener forwards to (so a load
//! balancer or kubelet-style prober asking Envoy learns whether the whole VM
//! side is ready), and `/metrics` in Prometheus' text format.
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
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dns::DnsMetrics;
use crate::envoy::EnvoyStatus;
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

/// The routes.
pub fn router(sources: StatusSources) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
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
}
