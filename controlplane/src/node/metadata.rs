//! Node metadata: the `google.protobuf.Struct` Envoy sends in `node.metadata`
//! (the agent's `ISTIO_META_*` settings), decoded by JSON type as istiod's
//! `NodeMetadata` is. The Struct is first turned into JSON (numbers that are
//! whole become integers, as protojson writes them), then each known key is
//! checked for its JSON type.

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

use super::NodeError;

/// The node metadata istiod reads. String keys that are absent, `null` or
/// empty are `None` (istiod treats an empty string as unset).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMetadata {
    /// `NAMESPACE`: the proxy's namespace (`POD_NAMESPACE`).
    pub namespace: Option<String>,
    /// `SERVICE_ACCOUNT`: the identity the proxy claims.
    pub service_account: Option<String>,
    /// `NAME`: the pod (or VM) name.
    pub name: Option<String>,
    /// `INSTANCE_IPS`: the comma-joined string, split (entries unchecked).
    pub instance_ips: Vec<String>,
    /// `LABELS`: the workload's labels (`ISTIO_METAJSON_LABELS`).
    pub labels: BTreeMap<String, String>,
    /// `STATIC_LABELS`.
    pub static_labels: BTreeMap<String, String>,
    /// `AUTO_REGISTER_GROUP`: the WorkloadGroup to auto-register into.
    pub auto_register_group: Option<String>,
    /// `WORKLOAD_ENTRY`: a pre-created WorkloadEntry this proxy is.
    pub workload_entry: Option<String>,
    /// `NETWORK`.
    pub network: Option<String>,
    /// `CLUSTER_ID`.
    pub cluster_id: Option<String>,
    /// `MESH_ID`.
    pub mesh_id: Option<String>,
    /// `WORKLOAD_NAME`.
    pub workload_name: Option<String>,
    /// `POD_PORTS`: a JSON array in a string, kept as sent.
    pub pod_ports: Option<String>,
    /// `DNS_CAPTURE`: a boolean in a string (`"true"`).
    pub dns_capture: Option<bool>,
    /// `ENABLE_HBONE`: a boolean in a string; the proxy accepts HBONE.
    pub enable_hbone: Option<bool>,
    /// `INTERCEPTION_MODE` (`REDIRECT` when unset).
    pub interception_mode: Option<String>,
    /// `ISTIO_VERSION`.
    pub istio_version: Option<String>,
    /// `PROXY_CONFIG`: the proxy's ProxyConfig, as JSON.
    pub proxy_config: Option<Map<String, Json>>,
    /// `ENVOY_STATUS_PORT` (15021 when unset).
    pub envoy_status_port: Option<u16>,
    /// `ENVOY_PROMETHEUS_PORT` (15090 when unset).
    pub envoy_prometheus_port: Option<u16>,
    /// Every key, including the ones without a field here.
    pub raw: Map<String, Json>,
}

impl NodeMetadata {
    /// Decodes `node.metadata` (`None` is empty metadata).
    pub fn decode(metadata: Option<&Struct>) -> Result<Self, NodeError> {
        let raw = match metadata {
            Some(s) => struct_to_json(s, "")?,
            None => Map::new(),
        };
        let proxy_config = object(&raw, "PROXY_CONFIG")?;
        if let Some(config) = &proxy_config
            && let Some(probe) = config.get("readinessProbe")
            && !matches!(probe, Json::Object(_) | Json::Null)
        {
            return Err(type_error(
                "PROXY_CONFIG.readinessProbe",
                "an object",
                probe,
            ));
        }
        Ok(Self {
            namespace: string(&raw, "NAMESPACE")?,
            service_account: string(&raw, "SERVICE_ACCOUNT")?,
            name: string(&raw, "NAME")?,
            instance_ips: string(&raw, "INSTANCE_IPS")?
                .map(|ips| ips.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            labels: string_map(&raw, "LABELS")?,
            static_labels: string_map(&raw, "STATIC_LABELS")?,
            auto_register_group: string(&raw, "AUTO_REGISTER_GROUP")?,
            workload_entry: string(&raw, "WORKLOAD_ENTRY")?,
            network: string(&raw, "NETWORK")?,
            cluster_id: string(&raw, "CLUSTER_ID")?,
            mesh_id: string(&raw, "MESH_ID")?,
            workload_name: string(&raw, "WORKLOAD_NAME")?,
            pod_ports: string(&raw, "POD_PORTS")?,
            dns_capture: string_bool(&raw, "DNS_CAPTURE")?,
            enable_hbone: string_bool(&raw, "ENABLE_HBONE")?,
            interception_mode: string(&raw, "INTERCEPTION_MODE")?,
            istio_version: string(&raw, "ISTIO_VERSION")?,
            proxy_config,
            envoy_status_port: port(&raw, "ENVOY_STATUS_PORT")?,
            envoy_prometheus_port: port(&raw, "ENVOY_PROMETHEUS_PORT")?,
            raw,
        })
    }

    /// Whether the proxy's ProxyConfig has a readiness probe: the proxy will
    /// report health, so its WorkloadEntry is health-checked.
    pub fn has_readiness_probe(&self) -> bool {
        self.proxy_config
            .as_ref()
            .and_then(|c| c.get("readinessProbe"))
            .is_some_and(|p| !p.is_null())
    }
}

/// The JSON form of a Struct; `path` names nested keys in errors.
fn struct_to_json(s: &Struct, path: &str) -> Result<Map<String, Json>, NodeError> {
    s.fields
        .iter()
        .map(|(key, value)| {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            Ok((key.clone(), value_to_json(value, &path)?))
        })
        .collect()
}

fn value_to_json(value: &Value, path: &str) -> Result<Json, NodeError> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // 2^53: beyond it a double no longer holds every integer.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if n.fract() == 0.0 && n.abs() <= EXACT {
                Json::Number(Number::from(*n as i64))
            } else {
                Json::Number(
                    Number::from_f64(*n).ok_or_else(|| NodeError::MetadataValue {
                        key: path.to_string(),
                        problem: format!("{n} has no JSON form"),
                    })?,
                )
            }
        }
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(s, path)?),
        Some(Kind::ListValue(list)) => Json::Array(
            list.values
                .iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn type_error(key: &str, expected: &'static str, got: &Json) -> NodeError {
    NodeError::MetadataType {
        key: key.to_string(),
        expected,
        got: json_type(got),
    }
}

fn string(raw: &Map<String, Json>, key: &str) -> Result<Option<String>, NodeError> {
    match raw.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok((!s.is_empty()).then(|| s.clone())),
        Some(other) => Err(type_error(key, "a string", other)),
    }
}

fn object(raw: &Map<String, Json>, key: &str) -> Result<Option<Map<String, Json>>, NodeError> {
    match raw.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(map)) => Ok(Some(map.clone())),
        Some(other) => Err(type_error(key, "an object", other)),
    }
}

fn string_map(raw: &Map<String, Json>, key: &str) -> Result<BTreeMap<String, String>, NodeError> {
    let Some(map) = object(raw, key)? else {
        return Ok(BTreeMap::new());
    };
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Json::String(s) => Ok((k, s)),
            other => Err(type_error(&format!("{key}.{k}"), "a string", &other)),
        })
        .collect()
}

/// Go's `strconv.ParseBool` of a string value.
fn string_bool(raw: &Map<String, Json>, key: &str) -> Result<Option<bool>, NodeError> {
    match raw.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => match s.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Some(false)),
            _ => Err(NodeError::MetadataValue {
                key: key.to_string(),
                problem: format!("{s:?} is not \"true\" or \"false\""),
            }),
        },
        Some(other) => Err(type_error(key, "a string (\"true\" or \"false\")", other)),
    }
}

fn port(raw: &Map<String, Json>, key: &str) -> Result<Option<u16>, NodeError> {
    match raw.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| NodeError::MetadataValue {
                key: key.to_string(),
                problem: format!("{n} is not a port number (0-65535)"),
            }),
        Some(other) => Err(type_error(key, "a number", other)),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::ListValue;

    use super::*;

    fn v(kind: Kind) -> Value {
        Value { kind: Some(kind) }
    }
    fn s(text: &str) -> Value {
        v(Kind::StringValue(text.into()))
    }
    fn num(n: f64) -> Value {
        v(Kind::NumberValue(n))
    }
    fn obj(fields: &[(&str, Value)]) -> Struct {
        Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// What the stock agent sends for the reference VM (istio-vm-protocol §1).
    fn ratings_vm() -> Struct {
        obj(&[
            ("NAMESPACE", s("vm-ns")),
            ("SERVICE_ACCOUNT", s("ratings-sa")),
            ("NAME", s("ratings-vm-1")),
            ("INSTANCE_IPS", s("10.0.0.12,fd00::12")),
            (
                "LABELS",
                v(Kind::StructValue(obj(&[
                    ("app", s("ratings")),
                    ("version", s("v2")),
                ]))),
            ),
            ("AUTO_REGISTER_GROUP", s("ratings-vm")),
            ("NETWORK", s("vm-network")),
            ("CLUSTER_ID", s("cluster1")),
            ("MESH_ID", s("mesh1")),
            ("WORKLOAD_NAME", s("ratings-vm")),
            (
                "POD_PORTS",
                s(r#"[{"name":"http","containerPort":9080,"protocol":""}]"#),
            ),
            ("DNS_CAPTURE", s("true")),
            ("ISTIO_VERSION", s("1.28.0")),
            (
                "PROXY_CONFIG",
                v(Kind::StructValue(obj(&[
                    ("serviceCluster", s("ratings-vm.vm-ns")),
                    (
                        "readinessProbe",
                        v(Kind::StructValue(obj(&[(
                            "httpGet",
                            v(Kind::StructValue(obj(&[("port", num(9080.0))]))),
                        )]))),
                    ),
                ]))),
            ),
            ("ENVOY_STATUS_PORT", num(15021.0)),
            ("ENVOY_PROMETHEUS_PORT", num(15090.0)),
            ("SOMETHING_NEW", v(Kind::BoolValue(true))),
        ])
    }

    #[test]
    fn decodes_the_agent_metadata() {
        let m = NodeMetadata::decode(Some(&ratings_vm())).unwrap();
        assert_eq!(m.namespace.as_deref(), Some("vm-ns"));
        assert_eq!(m.service_account.as_deref(), Some("ratings-sa"));
        assert_eq!(m.instance_ips, ["10.0.0.12", "fd00::12"]);
        assert_eq!(m.labels["app"], "ratings");
        assert_eq!(m.auto_register_group.as_deref(), Some("ratings-vm"));
        assert_eq!(m.network.as_deref(), Some("vm-network"));
        assert_eq!(m.dns_capture, Some(true));
        assert!(m.has_readiness_probe());
        assert_eq!(m.envoy_status_port, Some(15021));
        assert_eq!(m.envoy_prometheus_port, Some(15090));
        assert_eq!(
            m.raw["SOMETHING_NEW"],
            Json::Bool(true),
            "unknown keys kept"
        );
        assert_eq!(
            m.raw["PROXY_CONFIG"]["readinessProbe"]["httpGet"]["port"],
            serde_json::json!(9080),
            "whole numbers become JSON integers"
        );
        assert_eq!(NodeMetadata::decode(None).unwrap(), NodeMetadata::default());
    }

    #[test]
    fn empty_and_null_strings_are_unset() {
        let m = NodeMetadata::decode(Some(&obj(&[
            ("NAMESPACE", s("")),
            ("NETWORK", v(Kind::NullValue(0))),
            ("INSTANCE_IPS", s("")),
            ("PROXY_CONFIG", v(Kind::StructValue(obj(&[])))),
        ])))
        .unwrap();
        assert_eq!(m.namespace, None);
        assert_eq!(m.network, None);
        assert!(m.instance_ips.is_empty());
        assert!(!m.has_readiness_probe());
    }

    #[test]
    fn wrong_types_name_the_key_and_the_type() {
        let list = v(Kind::ListValue(ListValue {
            values: vec![s("a")],
        }));
        for (key, value, want) in [
            (
                "DNS_CAPTURE",
                v(Kind::BoolValue(true)),
                "node metadata DNS_CAPTURE: expected a string (\"true\" or \"false\"), got a boolean",
            ),
            (
                "DNS_CAPTURE",
                s("yes"),
                "node metadata DNS_CAPTURE: \"yes\" is not \"true\" or \"false\"",
            ),
            (
                "NAMESPACE",
                num(3.0),
                "node metadata NAMESPACE: expected a string, got a number",
            ),
            (
                "INSTANCE_IPS",
                list.clone(),
                "node metadata INSTANCE_IPS: expected a string, got an array",
            ),
            (
                "LABELS",
                s("app=ratings"),
                "node metadata LABELS: expected an object, got a string",
            ),
            (
                "LABELS",
                v(Kind::StructValue(obj(&[("replicas", num(2.0))]))),
                "node metadata LABELS.replicas: expected a string, got a number",
            ),
            (
                "PROXY_CONFIG",
                s("{}"),
                "node metadata PROXY_CONFIG: expected an object, got a string",
            ),
            (
                "PROXY_CONFIG",
                v(Kind::StructValue(obj(&[("readinessProbe", s("http"))]))),
                "node metadata PROXY_CONFIG.readinessProbe: expected an object, got a string",
            ),
            (
                "ENVOY_STATUS_PORT",
                s("15021"),
                "node metadata ENVOY_STATUS_PORT: expected a number, got a string",
            ),
            (
                "ENVOY_STATUS_PORT",
                num(15021.5),
                "node metadata ENVOY_STATUS_PORT: 15021.5 is not a port number (0-65535)",
            ),
            (
                "ENVOY_PROMETHEUS_PORT",
                num(70000.0),
                "node metadata ENVOY_PROMETHEUS_PORT: 70000 is not a port number (0-65535)",
            ),
            (
                "WHATEVER",
                v(Kind::StructValue(obj(&[("x", num(f64::NAN))]))),
                "node metadata WHATEVER.x: NaN has no JSON form",
            ),
        ] {
            let err = NodeMetadata::decode(Some(&obj(&[(key, value)]))).unwrap_err();
            assert_eq!(err.to_string(), want);
        }
    }
}
