//! Istio's peer metadata: `x-envoy-peer-metadata` (base64 of a serialized
//! `google.protobuf.Struct`) and `x-envoy-peer-metadata-id` (the node id).
//!
//! Decoding accepts both the Istio ≤ 1.23 and ≥ 1.24 key sets; encoding
//! writes the ≥ 1.24 set (NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, OWNER
//! and LABELS limited to the app/version/canonical labels), so an Istio
//! sidecar on the other side decodes it.

use crate::base64;
use crate::pbstruct::{DecodeError, Struct, StructEntries, Value};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// Node metadata keys that go into outbound peer metadata (Istio ≥ 1.24).
pub const EXCHANGED_KEYS: [&str; 5] = ["NAME", "NAMESPACE", "WORKLOAD_NAME", "CLUSTER_ID", "OWNER"];

/// Labels that go into outbound peer metadata; all others stay private.
pub const EXCHANGED_LABELS: [&str; 6] = [
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
];

/// What the app is told about an authenticated caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub workload: Option<String>,
    pub app: Option<String>,
    pub version: Option<String>,
    pub cluster: Option<String>,
    pub namespace: Option<String>,
}

/// Why a peer metadata header was not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMetadataError {
    TooLarge {
        len: usize,
        limit: usize,
    },
    Base64(base64::Base64Error),
    Protobuf(DecodeError),
    /// A value that cannot be put in an HTTP header (control characters).
    UnsafeValue(&'static str),
}

impl fmt::Display for PeerMetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMetadataError::TooLarge { len, limit } => {
                write!(f, "peer metadata is {len} bytes, limit is {limit}")
            }
            PeerMetadataError::Base64(e) => write!(f, "peer metadata is not base64: {e}"),
            PeerMetadataError::Protobuf(e) => {
                write!(f, "peer metadata is not a protobuf Struct: {e}")
            }
            PeerMetadataError::UnsafeValue(key) => {
                write!(
                    f,
                    "peer metadata {key} contains characters not allowed in a header"
                )
            }
        }
    }
}

/// True when `value` can be sent as an HTTP header value unchanged:
/// visible ASCII, space, tab and obs-text; no CR, LF, NUL or other controls.
pub fn is_header_safe(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Label keys that name the app and its version, most specific first
/// (Istio's canonical-service rules).
const APP_LABELS: [&str; 3] = [
    "app",
    "app.kubernetes.io/name",
    "service.istio.io/canonical-name",
];
const VERSION_LABELS: [&str; 3] = [
    "version",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-revision",
];

/// Decodes an `x-envoy-peer-metadata` value of at most `limit` bytes.
pub fn decode_header(value: &[u8], limit: usize) -> Result<PeerInfo, PeerMetadataError> {
    if value.len() > limit {
        return Err(PeerMetadataError::TooLarge {
            len: value.len(),
            limit,
        });
    }
    let raw = base64::decode(value).map_err(PeerMetadataError::Base64)?;
    peer_info(&raw).map_err(|e| match e {
        Found::Protobuf(e) => PeerMetadataError::Protobuf(e),
        Found::Unsafe(key) => PeerMetadataError::UnsafeValue(key),
    })
}

enum Found {
    Protobuf(DecodeError),
    Unsafe(&'static str),
}

impl From<DecodeError> for Found {
    fn from(e: DecodeError) -> Found {
        Found::Protobuf(e)
    }
}

/// Extracts what the app is told from serialized peer metadata, reading only
/// the keys it needs (every other entry is skipped unparsed).
fn best(ranked: [Option<&str>; 3]) -> Option<&str> {
    ranked.into_iter().flatten().find(|v| !v.is_empty())
}

fn peer_info(raw: &[u8]) -> Result<PeerInfo, Found> {
    let (mut workload, mut cluster, mut namespace, mut labels) = (None, None, None, None);
    for entry in StructEntries::new(raw) {
        let (key, value) = entry?;
        match key {
            "WORKLOAD_NAME" => workload = value.as_str()?,
            "CLUSTER_ID" => cluster = value.as_str()?,
            "NAMESPACE" => namespace = value.as_str()?,
            "LABELS" => labels = Some(value),
            _ => {}
        }
    }
    // Best label per rank; a later duplicate key overrides an earlier one.
    let mut app: [Option<&str>; 3] = [None; 3];
    let mut version: [Option<&str>; 3] = [None; 3];
    if let Some(entries) = labels.map(|l| l.as_struct()).transpose()?.flatten() {
        for entry in entries {
            let (key, value) = entry?;
            let slot = if let Some(rank) = APP_LABELS.iter().position(|k| *k == key) {
                &mut app[rank]
            } else if let Some(rank) = VERSION_LABELS.iter().position(|k| *k == key) {
                &mut version[rank]
            } else {
                continue;
            };
            *slot = value.as_str()?;
        }
    }
    let owned = |key: &'static str, value: Option<&str>| -> Result<Option<String>, Found> {
        match value.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) if is_header_safe(v) => Ok(Some(v.to_string())),
            Some(_) => Err(Found::Unsafe(key)),
        }
    };
    Ok(PeerInfo {
        workload: owned("WORKLOAD_NAME", workload)?,
        app: owned("app label", best(app))?,
        version: owned("version label", best(version))?,
        cluster: owned("CLUSTER_ID", cluster)?,
        namespace: owned("NAMESPACE", namespace)?,
    })
}

/// The VM's own metadata, as read from Envoy's node metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMetadata {
    /// `(key, value)` for the keys of [`EXCHANGED_KEYS`] that are set.
    pub fields: Vec<(String, String)>,
    /// All node labels; only [`EXCHANGED_LABELS`] are sent.
    pub labels: Vec<(String, String)>,
}

impl NodeMetadata {
    /// The Struct Istio ≥ 1.24 exchanges for this node.
    pub fn to_struct(&self) -> Struct {
        let mut s = Struct::default();
        for (key, value) in &self.fields {
            if EXCHANGED_KEYS.contains(&key.as_str()) {
                s.insert(key.clone(), Value::String(value.clone()));
            }
        }
        let mut labels = Struct::default();
        for (key, value) in &self.labels {
            if EXCHANGED_LABELS.contains(&key.as_str()) {
                labels.insert(key.clone(), Value::String(value.clone()));
            }
        }
        if !labels.fields.is_empty() {
            s.insert("LABELS", Value::Struct(labels));
        }
        s
    }

    /// The `x-envoy-peer-metadata` header value for this node.
    pub fn encode_header(&self) -> String {
        base64::encode(&self.to_struct().encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    use alloc::vec;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn s(v: &str) -> Value {
        Value::String(v.to_string())
    }

    fn node() -> NodeMetadata {
        NodeMetadata {
            fields: vec![
                ("NAME".into(), "vm-1".into()),
                ("NAMESPACE".into(), "default".into()),
                ("WORKLOAD_NAME".into(), "product-vm".into()),
                ("CLUSTER_ID".into(), "Kubernetes".into()),
                ("ISTIO_VERSION".into(), "1.24.0".into()),
            ],
            labels: vec![
                ("app".into(), "product".into()),
                ("version".into(), "v1".into()),
                ("secret-label".into(), "do-not-share".into()),
            ],
        }
    }

    #[test]
    fn encodes_only_exchanged_keys_and_labels() {
        let st = node().to_struct();
        let decoded = Struct::decode(&st.encode()).unwrap();
        let keys: Vec<&str> = decoded.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["CLUSTER_ID", "LABELS", "NAME", "NAMESPACE", "WORKLOAD_NAME"]
        );
        let labels = st.child("LABELS").unwrap();
        assert_eq!(labels.fields.len(), 2);
        assert_eq!(labels.string("app"), Some("product"));
    }

    #[test]
    fn decodes_what_it_encodes() {
        let info = decode_header(node().encode_header().as_bytes(), 8192).unwrap();
        assert_eq!(
            info,
            PeerInfo {
                workload: Some("product-vm".into()),
                app: Some("product".into()),
                version: Some("v1".into()),
                cluster: Some("Kubernetes".into()),
                namespace: Some("default".into()),
            }
        );
    }

    #[test]
    fn reads_istio_1_23_shape_and_fallback_labels() {
        let mut labels = Struct::default();
        labels.insert("app.kubernetes.io/name", s("ratings"));
        labels.insert("service.istio.io/canonical-revision", s("v2"));
        let mut md = Struct::default();
        md.insert("WORKLOAD_NAME", s("ratings-v2"));
        md.insert("ISTIO_VERSION", s("1.23.2"));
        md.insert("MESH_ID", s("cluster.local"));
        md.insert("INSTANCE_IPS", Value::List(vec![s("10.0.0.7")]));
        md.insert("PLATFORM_METADATA", Value::Struct(Struct::default()));
        md.insert("LABELS", Value::Struct(labels));
        let header = base64::encode(&md.encode());
        // Readers tolerate missing padding.
        let unpadded = header.trim_end_matches('=');
        let info = decode_header(unpadded.as_bytes(), 8192).unwrap();
        assert_eq!(info.workload.as_deref(), Some("ratings-v2"));
        assert_eq!(info.app.as_deref(), Some("ratings"));
        assert_eq!(info.version.as_deref(), Some("v2"));
        assert_eq!(info.cluster, None);
    }

    #[test]
    fn rejects_bad_headers() {
        let header = node().encode_header();
        assert!(matches!(
            decode_header(header.as_bytes(), 10),
            Err(PeerMetadataError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_header(b"not base64!", 8192),
            Err(PeerMetadataError::Base64(_))
        ));
        assert!(matches!(
            decode_header(base64::encode(&[0x0a, 0x7f]).as_bytes(), 8192),
            Err(PeerMetadataError::Protobuf(_))
        ));
        let mut md = Struct::default();
        md.insert("WORKLOAD_NAME", s("evil\r\nx-mesh-peer-identity: x"));
        assert_eq!(
            decode_header(base64::encode(&md.encode()).as_bytes(), 8192),
            Err(PeerMetadataError::UnsafeValue("WORKLOAD_NAME"))
        );
    }

    #[test]
    fn ignores_values_of_other_types() {
        let mut md = Struct::default();
        md.insert("WORKLOAD_NAME", Value::Number(3.0));
        md.insert("LABELS", s("app=x"));
        assert_eq!(
            decode_header(base64::encode(&md.encode()).as_bytes(), 8192).unwrap(),
            PeerInfo::default()
        );
    }
}
