//! The filter's plugin configuration (JSON), validated before use.
//!
//! ```json
//! {"direction": "inbound"}
//! {"direction": "outbound", "headers": {"peer_metadata": "x-envoy-peer-metadata"}}
//! ```
//!
//! Unknown fields are errors, so a misspelt option is caught at load time
//! rather than silently ignored.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use serde::Deserialize;

/// Default limit on the size of an incoming `x-envoy-peer-metadata` value.
pub const DEFAULT_MAX_PEER_METADATA_BYTES: usize = 8192;
/// Hard upper bound for `max_peer_metadata_bytes`.
pub const MAX_PEER_METADATA_BYTES_LIMIT: usize = 65536;

/// Which side of the workload this filter instance sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Requests arriving for the local app: label them with the caller's identity.
    Inbound,
    /// Requests the local app sends into the mesh: attach our own peer metadata.
    Outbound,
}

/// Names of every header the filter reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    /// Every incoming header starting with this prefix is removed (inbound).
    pub identity_prefix: String,
    pub identity: String,
    pub namespace: String,
    pub service_account: String,
    pub workload: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
    /// Istio's peer metadata header (base64 `google.protobuf.Struct`).
    pub peer_metadata: String,
    /// Istio's peer node id header.
    pub peer_metadata_id: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            identity_prefix: "x-mesh-peer-".into(),
            identity: "x-mesh-peer-identity".into(),
            namespace: "x-mesh-peer-namespace".into(),
            service_account: "x-mesh-peer-service-account".into(),
            workload: "x-mesh-peer-workload".into(),
            app: "x-mesh-peer-app".into(),
            version: "x-mesh-peer-version".into(),
            cluster: "x-mesh-peer-cluster".into(),
            peer_metadata: "x-envoy-peer-metadata".into(),
            peer_metadata_id: "x-envoy-peer-metadata-id".into(),
        }
    }
}

impl HeaderNames {
    /// The headers the filter sets for the app, with their field names.
    pub fn identity_headers(&self) -> [(&'static str, &str); 7] {
        [
            ("headers.identity", &self.identity),
            ("headers.namespace", &self.namespace),
            ("headers.service_account", &self.service_account),
            ("headers.workload", &self.workload),
            ("headers.app", &self.app),
            ("headers.version", &self.version),
            ("headers.cluster", &self.cluster),
        ]
    }

    /// True for a header that only this filter may set: anything that arrives
    /// with such a name is a forgery and is removed.
    pub fn is_reserved(&self, name: &str) -> bool {
        name.starts_with(self.identity_prefix.as_str())
            || self.identity_headers().iter().any(|(_, h)| *h == name)
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub direction: Direction,
    #[serde(default)]
    pub headers: HeaderNames,
    /// Inbound: remove Istio's peer metadata headers before the app sees them.
    #[serde(default = "default_true")]
    pub remove_peer_metadata_headers: bool,
    /// Inbound: larger `x-envoy-peer-metadata` values are ignored as malformed.
    #[serde(default = "default_max_peer_metadata_bytes")]
    pub max_peer_metadata_bytes: usize,
}

fn default_true() -> bool {
    true
}

fn default_max_peer_metadata_bytes() -> usize {
    DEFAULT_MAX_PEER_METADATA_BYTES
}

/// Why a configuration was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Empty,
    /// JSON syntax, a missing or unknown field, or a value of the wrong type.
    Json(String),
    Invalid {
        field: String,
        problem: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Empty => f.write_str(
                "plugin configuration is empty; expected JSON such as {\"direction\": \"inbound\"}",
            ),
            ConfigError::Json(e) => write!(f, "plugin configuration: {e}"),
            ConfigError::Invalid { field, problem } => {
                write!(f, "plugin configuration field `{field}`: {problem}")
            }
        }
    }
}

/// An HTTP/2-compatible header name: lower-case token characters only.
fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        });
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: field.to_string(),
            problem: alloc::format!(
                "{name:?} is not a valid header name (lower-case letters, digits and -._ etc.)"
            ),
        })
    }
}

impl FilterConfig {
    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        let config: FilterConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.headers;
        check_header_name("headers.identity_prefix", &h.identity_prefix)?;
        check_header_name("headers.peer_metadata", &h.peer_metadata)?;
        check_header_name("headers.peer_metadata_id", &h.peer_metadata_id)?;
        let mut seen: Vec<&str> = Vec::new();
        for (field, name) in h.identity_headers() {
            check_header_name(field, name)?;
            if seen.contains(&name) {
                return Err(ConfigError::Invalid {
                    field: field.to_string(),
                    problem: alloc::format!("{name:?} is already used by another header"),
                });
            }
            seen.push(name);
        }
        for (field, name) in [
            ("headers.peer_metadata", &h.peer_metadata),
            ("headers.peer_metadata_id", &h.peer_metadata_id),
        ] {
            if h.is_reserved(name) {
                return Err(ConfigError::Invalid {
                    field: field.to_string(),
                    problem: alloc::format!(
                        "{name:?} collides with the identity headers the filter sets"
                    ),
                });
            }
        }
        if h.peer_metadata == h.peer_metadata_id {
            return Err(ConfigError::Invalid {
                field: "headers.peer_metadata_id".to_string(),
                problem: "must differ from headers.peer_metadata".to_string(),
            });
        }
        if self.max_peer_metadata_bytes == 0
            || self.max_peer_metadata_bytes > MAX_PEER_METADATA_BYTES_LIMIT
        {
            return Err(ConfigError::Invalid {
                field: "max_peer_metadata_bytes".to_string(),
                problem: alloc::format!(
                    "{} is outside 1..={MAX_PEER_METADATA_BYTES_LIMIT}",
                    self.max_peer_metadata_bytes
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn minimal_configs_get_defaults() {
        let c = FilterConfig::parse(br#"{"direction":"inbound"}"#).unwrap();
        assert_eq!(c.direction, Direction::Inbound);
        assert_eq!(c.headers, HeaderNames::default());
        assert!(c.remove_peer_metadata_headers);
        assert_eq!(c.max_peer_metadata_bytes, DEFAULT_MAX_PEER_METADATA_BYTES);
        let c = FilterConfig::parse(br#" {"direction":"outbound"} "#).unwrap();
        assert_eq!(c.direction, Direction::Outbound);
    }

    #[test]
    fn header_names_are_configurable() {
        let c = FilterConfig::parse(
            br#"{"direction":"inbound","headers":{"identity_prefix":"x-caller-","identity":"x-caller-id"}}"#,
        )
        .unwrap();
        assert_eq!(c.headers.identity, "x-caller-id");
        assert_eq!(c.headers.namespace, "x-mesh-peer-namespace");
        assert!(c.headers.is_reserved("x-caller-anything"));
        assert!(c.headers.is_reserved("x-mesh-peer-namespace"));
        assert!(!c.headers.is_reserved("x-mesh-peer-other"));
    }

    fn error_of(json: &str) -> String {
        FilterConfig::parse(json.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert!(error_of("").contains("empty"));
        assert!(error_of("{").contains("EOF"));
        assert!(error_of("{}").contains("missing field `direction`"));
        assert!(error_of(r#"{"direction":"sideways"}"#).contains("unknown variant `sideways`"));
        assert!(
            error_of(r#"{"direction":"inbound","diretcion":1}"#)
                .contains("unknown field `diretcion`")
        );
        assert!(
            error_of(r#"{"direction":"inbound","headers":{"idenity":"x"}}"#)
                .contains("unknown field `idenity`")
        );
        assert!(
            error_of(r#"{"direction":"inbound","headers":{"identity":"X-Upper"}}"#)
                .contains("`headers.identity`")
        );
        assert!(
            error_of(r#"{"direction":"inbound","headers":{"app":""}}"#).contains("`headers.app`")
        );
        assert!(
            error_of(r#"{"direction":"inbound","headers":{"app":"x-mesh-peer-identity"}}"#)
                .contains("already used")
        );
        assert!(
            error_of(r#"{"direction":"inbound","headers":{"peer_metadata":"x-mesh-peer-md"}}"#)
                .contains("collides")
        );
        assert!(
            error_of(r#"{"direction":"inbound","max_peer_metadata_bytes":0}"#)
                .contains("`max_peer_metadata_bytes`")
        );
        assert!(
            error_of(r#"{"direction":"inbound","max_peer_metadata_bytes":-1}"#)
                .contains("invalid value")
        );
        assert!(
            error_of(r#"{"direction":"inbound","remove_peer_metadata_headers":"yes"}"#)
                .contains("invalid type")
        );
    }
}
