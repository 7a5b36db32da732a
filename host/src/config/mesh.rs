//! `mesh.yaml` (installed as `/etc/istio/config/mesh`): a MeshConfig whose
//! `defaultConfig` is the VM's ProxyConfig, in Istio's camelCase JSON names.
//!
//! Only the fields the agent uses are typed: `discoveryAddress`, `meshId`,
//! `proxyMetadata` and `readinessProbe` (the WorkloadGroup's `probe`). Every
//! other field, at any level, is accepted and ignored, as a newer istioctl or
//! mesh config may carry more.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Where and why mesh.yaml (or `PROXY_CONFIG`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// 1-based line, when the parser knows it.
    pub line: Option<usize>,
    /// 1-based column, when the parser knows it.
    pub column: Option<usize>,
    pub problem: String,
}

/// The typed subset of Istio's `ProxyConfig` (istio/api mesh/v1alpha1/proxy.proto).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// `host:port` of istiod's xDS server.
    pub discovery_address: Option<String>,
    /// The mesh id (telemetry, multi-mesh).
    pub mesh_id: Option<String>,
    /// Environment variables for the agent; `ISTIO_META_*` ones become node metadata.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub proxy_metadata: BTreeMap<String, String>,
    /// The WorkloadGroup's `probe`.
    pub readiness_probe: Option<ReadinessProbe>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    default_config: Option<ProxyConfig>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or_default())
}

/// Parses a mesh config file (`defaultConfig: ...`). An empty file, or one
/// without `defaultConfig`, yields the empty ProxyConfig.
pub fn parse_mesh_config(text: &str) -> Result<ProxyConfig, YamlError> {
    let mesh: Option<MeshConfig> = serde_norway::from_str(text).map_err(yaml_error)?;
    Ok(mesh.and_then(|m| m.default_config).unwrap_or_default())
}

/// Parses a bare ProxyConfig, as found in the `PROXY_CONFIG` environment
/// variable (YAML or JSON).
pub fn parse_proxy_config(text: &str) -> Result<ProxyConfig, YamlError> {
    let pc: Option<ProxyConfig> = serde_norway::from_str(text).map_err(yaml_error)?;
    Ok(pc.unwrap_or_default())
}

fn yaml_error(e: serde_norway::Error) -> YamlError {
    let mut problem = e.to_string();
    let location = e.location();
    if let Some(loc) = &location {
        // The position is reported separately; drop libyaml's copy of it.
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        problem = problem.replacen(&at, "", 1);
    }
    YamlError {
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        problem,
    }
}

/// The 1-based line of each `proxyMetadata` key in the file, best effort
/// (for messages about a value's origin).
pub fn proxy_metadata_lines(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut section_indent = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        match section_indent {
            None => {
                if trimmed.trim_end() == "proxyMetadata:" {
                    section_indent = Some(indent);
                }
            }
            Some(section) if indent > section => {
                if let Some((key, _)) = trimmed.split_once(':') {
                    let key = key.trim().trim_matches(['"', '\'']);
                    out.entry(key.to_string()).or_insert(i + 1);
                }
            }
            Some(_) => section_indent = None,
        }
    }
    out
}

/// The 1-based line of the first `key:` in the file, best effort.
pub fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let t = line.trim_start();
            t.strip_prefix(key).is_some_and(|r| r.starts_with(':'))
        })
        .map(|i| i + 1)
}

/// `ProxyConfig.readinessProbe` (istio/api networking/v1alpha3/workload_group.proto
/// `ReadinessProbe`), validated: exactly one method, ports in range, no
/// negative timings. Zero timings mean "Istio's default", see the accessors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawProbe")]
pub struct ReadinessProbe {
    #[serde(flatten)]
    pub method: ProbeMethod,
    #[serde(skip_serializing_if = "is_zero")]
    pub initial_delay_seconds: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_seconds: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub period_seconds: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub success_threshold: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub failure_threshold: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn or_default(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

impl ReadinessProbe {
    /// Delay before the first probe (Istio default 0).
    pub fn initial_delay(&self) -> Duration {
        Duration::from_secs(self.initial_delay_seconds.into())
    }

    /// Timeout of one probe (Istio default 1 s).
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(or_default(self.timeout_seconds, 1).into())
    }

    /// Interval between probes (Istio default 10 s).
    pub fn period(&self) -> Duration {
        Duration::from_secs(or_default(self.period_seconds, 10).into())
    }

    /// Consecutive successes before reporting healthy (Istio default 1).
    pub fn success_threshold(&self) -> u32 {
        or_default(self.success_threshold, 1)
    }

    /// Consecutive failures before reporting unhealthy (Istio's agent
    /// defaults to 1, although the proto comment says 3).
    pub fn failure_threshold(&self) -> u32 {
        or_default(self.failure_threshold, 1)
    }
}

/// The probe's `health_check_method` oneof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeMethod {
    HttpGet(HttpGetProbe),
    TcpSocket(TcpSocketProbe),
    Exec(ExecProbe),
    Grpc(GrpcProbe),
}

/// `HTTPHealthCheckConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetProbe {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default)]
    pub port: u32,
    /// Defaults to the workload's IP.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// `""`, `HTTP` or `HTTPS` (any case).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheme: String,
    #[serde(
        default,
        deserialize_with = "null_as_empty_vec",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub http_headers: Vec<HttpHeader>,
}

impl HttpGetProbe {
    /// The request path (default `/`).
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "/"
        } else {
            &self.path
        }
    }

    /// `http` or `https` (Istio lower-cases the scheme; default `http`).
    pub fn scheme(&self) -> String {
        if self.scheme.is_empty() {
            "http".into()
        } else {
            self.scheme.to_ascii_lowercase()
        }
    }
}

/// One request header of an HTTP probe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// `TCPHealthCheckConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocketProbe {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default)]
    pub port: u32,
}

/// `ExecHealthCheckConfig`: argv, run directly (no shell).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProbe {
    #[serde(default, deserialize_with = "null_as_empty_vec")]
    pub command: Vec<String>,
}

/// `GrpcHealthCheckConfig`: `grpc.health.v1.Health/Check` in plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcProbe {
    #[serde(default)]
    pub port: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

fn null_as_empty_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::deserialize(d)?.unwrap_or_default())
}

/// The probe as written, before validation.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProbe {
    #[serde(default)]
    initial_delay_seconds: i32,
    #[serde(default)]
    timeout_seconds: i32,
    #[serde(default)]
    period_seconds: i32,
    #[serde(default)]
    success_threshold: i32,
    #[serde(default)]
    failure_threshold: i32,
    http_get: Option<HttpGetProbe>,
    tcp_socket: Option<TcpSocketProbe>,
    exec: Option<ExecProbe>,
    grpc: Option<GrpcProbe>,
}

fn check_port(method: &str, port: u32) -> Result<(), String> {
    match port {
        0 => Err(format!("{method}.port is required")),
        1..=65535 => Ok(()),
        _ => Err(format!("{method}.port {port} is not in 1-65535")),
    }
}

fn non_negative(name: &str, value: i32) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("{name} must not be negative, got {value}"))
}

impl TryFrom<RawProbe> for ReadinessProbe {
    type Error = String;

    fn try_from(raw: RawProbe) -> Result<Self, String> {
        Self::validate(raw).map_err(|problem| format!("readinessProbe: {problem}"))
    }
}

impl ReadinessProbe {
    fn validate(raw: RawProbe) -> Result<Self, String> {
        let mut methods = Vec::new();
        if let Some(h) = raw.http_get {
            check_port("httpGet", h.port)?;
            if !["", "http", "https"].contains(&h.scheme.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "httpGet.scheme must be HTTP or HTTPS, got `{}`",
                    h.scheme
                ));
            }
            methods.push(("httpGet", ProbeMethod::HttpGet(h)));
        }
        if let Some(t) = raw.tcp_socket {
            check_port("tcpSocket", t.port)?;
            methods.push(("tcpSocket", ProbeMethod::TcpSocket(t)));
        }
        if let Some(e) = raw.exec {
            if e.command.is_empty() {
                return Err("exec.command must not be empty".into());
            }
            methods.push(("exec", ProbeMethod::Exec(e)));
        }
        if let Some(g) = raw.grpc {
            check_port("grpc", g.port)?;
            methods.push(("grpc", ProbeMethod::Grpc(g)));
        }
        let method = match methods.len() {
            0 => return Err("set one of httpGet, tcpSocket, exec or grpc".into()),
            1 => methods.pop().expect("one method").1,
            _ => {
                let names: Vec<_> = methods.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "{} are all set; a probe has exactly one method",
                    names.join(", ")
                ));
            }
        };
        Ok(Self {
            method,
            initial_delay_seconds: non_negative("initialDelaySeconds", raw.initial_delay_seconds)?,
            timeout_seconds: non_negative("timeoutSeconds", raw.timeout_seconds)?,
            period_seconds: non_negative("periodSeconds", raw.period_seconds)?,
            success_threshold: non_negative("successThreshold", raw.success_threshold)?,
            failure_threshold: non_negative("failureThreshold", raw.failure_threshold)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATINGS: &str = include_str!("../../../testdata/onboarding/ratings-vm/mesh.yaml");
    const BILLING: &str = include_str!("../../../testdata/onboarding/billing-vm/mesh.yaml");

    #[test]
    fn istioctl_mesh_yaml() {
        let pc = parse_mesh_config(RATINGS).unwrap();
        assert_eq!(
            pc.discovery_address.as_deref(),
            Some("istiod.istio-system.svc:15012")
        );
        assert_eq!(pc.mesh_id.as_deref(), Some("mesh1"));
        assert_eq!(pc.proxy_metadata["ISTIO_META_DNS_CAPTURE"], "true");
        assert_eq!(pc.proxy_metadata.len(), 13);
        let probe = pc.readiness_probe.unwrap();
        assert_eq!(
            probe.method,
            ProbeMethod::HttpGet(HttpGetProbe {
                path: "/health".into(),
                port: 9080,
                ..Default::default()
            })
        );
        assert_eq!(probe.initial_delay(), Duration::from_secs(1));
        assert_eq!(probe.period(), Duration::from_secs(5));
        assert_eq!(probe.timeout(), Duration::from_secs(1));
        assert_eq!(probe.failure_threshold(), 1);
        assert_eq!(probe.success_threshold(), 1);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let pc = parse_mesh_config(BILLING).unwrap();
        assert_eq!(pc.mesh_id, None);
        assert_eq!(
            pc.proxy_metadata["ISTIO_META_VM_NOTE"],
            "payments team's batch VMs (ticket #4711)"
        );
        let probe = pc.readiness_probe.unwrap();
        assert_eq!(
            probe.method,
            ProbeMethod::TcpSocket(TcpSocketProbe {
                host: String::new(),
                port: 7070
            })
        );
        assert_eq!(probe.failure_threshold(), 3);
        assert_eq!(probe.timeout(), Duration::from_secs(2));
        let pc = parse_mesh_config("trustDomain: td\nenableTracing: true\n").unwrap();
        assert_eq!(pc, ProxyConfig::default());
    }

    #[test]
    fn empty_and_null() {
        assert_eq!(parse_mesh_config("").unwrap(), ProxyConfig::default());
        assert_eq!(
            parse_mesh_config("# nothing\n").unwrap(),
            ProxyConfig::default()
        );
        let pc = parse_mesh_config("defaultConfig:\n  proxyMetadata:\n").unwrap();
        assert!(pc.proxy_metadata.is_empty());
    }

    #[test]
    fn every_probe_method() {
        let pc = parse_proxy_config(
            "readinessProbe:\n  exec:\n    command: [/bin/check, --quick]\n  periodSeconds: 30\n",
        )
        .unwrap();
        let probe = pc.readiness_probe.unwrap();
        assert_eq!(
            probe.method,
            ProbeMethod::Exec(ExecProbe {
                command: vec!["/bin/check".into(), "--quick".into()]
            })
        );
        assert_eq!(probe.period(), Duration::from_secs(30));

        let pc =
            parse_proxy_config(r#"{"readinessProbe":{"grpc":{"port":7070,"service":"billing"}}}"#)
                .unwrap();
        assert_eq!(
            pc.readiness_probe.unwrap().method,
            ProbeMethod::Grpc(GrpcProbe {
                port: 7070,
                service: "billing".into()
            })
        );

        let pc = parse_proxy_config(
            "readinessProbe:\n  httpGet:\n    port: 8443\n    scheme: HTTPS\n    host: 10.0.0.1\n    \
             httpHeaders:\n    - name: x-probe\n      value: \"1\"\n",
        )
        .unwrap();
        let ProbeMethod::HttpGet(h) = pc.readiness_probe.unwrap().method else {
            panic!("not httpGet");
        };
        assert_eq!(h.scheme(), "https");
        assert_eq!(h.path(), "/");
        assert_eq!(h.http_headers[0].name, "x-probe");
    }

    #[test]
    fn probe_round_trips_in_istio_shape() {
        let probe = parse_mesh_config(RATINGS).unwrap().readiness_probe.unwrap();
        let json = serde_json::to_string(&probe).unwrap();
        assert_eq!(
            json,
            r#"{"httpGet":{"path":"/health","port":9080},"initialDelaySeconds":1,"periodSeconds":5}"#
        );
        let back: ReadinessProbe = serde_json::from_str(&json).unwrap();
        assert_eq!(back, probe);
    }

    fn probe_error(probe_yaml: &str) -> YamlError {
        let text = format!("defaultConfig:\n  readinessProbe:\n{probe_yaml}");
        parse_mesh_config(&text).expect_err(&text)
    }

    #[test]
    fn invalid_probes() {
        let e = probe_error("    periodSeconds: 5\n");
        assert!(
            e.problem.starts_with(
                "defaultConfig: readinessProbe: set one of httpGet, tcpSocket, exec or grpc"
            ),
            "{e:?}"
        );
        // The line of `readinessProbe:`.
        assert_eq!(e.line, Some(2));
        let e = probe_error("    httpGet:\n      port: 80\n    tcpSocket:\n      port: 80\n");
        assert!(
            e.problem.contains("httpGet, tcpSocket are all set"),
            "{e:?}"
        );
        let e = probe_error("    httpGet:\n      path: /\n");
        assert!(e.problem.contains("httpGet.port is required"), "{e:?}");
        let e = probe_error("    tcpSocket:\n      port: 70000\n");
        assert!(
            e.problem.contains("tcpSocket.port 70000 is not in 1-65535"),
            "{e:?}"
        );
        let e = probe_error("    exec: {}\n");
        assert!(
            e.problem.contains("exec.command must not be empty"),
            "{e:?}"
        );
        let e = probe_error("    grpc:\n      port: 1\n    periodSeconds: -5\n");
        assert!(
            e.problem.contains("periodSeconds must not be negative"),
            "{e:?}"
        );
        let e = probe_error("    httpGet:\n      port: 1\n      scheme: FTP\n");
        assert!(e.problem.contains("scheme must be HTTP or HTTPS"), "{e:?}");
    }

    #[test]
    fn type_errors_name_line_and_path() {
        let text = RATINGS.replace("      port: 9080", "      port: http");
        let e = parse_mesh_config(&text).unwrap_err();
        assert_eq!(e.line, Some(21));
        assert!(
            e.problem
                .starts_with("defaultConfig.readinessProbe.httpGet.port: invalid type"),
            "{e:?}"
        );
        let e = parse_mesh_config("defaultConfig:\n  proxyMetadata:\n    A: [1]\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.problem.contains("proxyMetadata.A"), "{e:?}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = RATINGS.replace("    ISTIO_META_NETWORK", "   ISTIO_META_NETWORK");
        let e = parse_mesh_config(&text).unwrap_err();
        assert_eq!((e.line, e.column), (Some(11), Some(4)), "{e:?}");
        assert_eq!(
            e.problem,
            "did not find expected key, while parsing a block mapping at line 2 column 3"
        );
        let e = parse_mesh_config("defaultConfig:\n\tmeshId: x\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e:?}");
    }

    #[test]
    fn metadata_lines() {
        let lines = proxy_metadata_lines(RATINGS);
        assert_eq!(lines["CANONICAL_REVISION"], 5);
        assert_eq!(lines["TRUST_DOMAIN"], 17);
        assert!(!lines.contains_key("httpGet"));
        assert_eq!(key_line(RATINGS, "discoveryAddress"), Some(2));
        assert_eq!(key_line(RATINGS, "nothing"), None);
    }
}
