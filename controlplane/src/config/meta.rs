//! Kubernetes object metadata shared by every kind, the (namespace, name)
//! key objects are stored under, name rules, and timestamps as the API
//! server and istiod write them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The namespace of an object whose manifest names none (kubectl's default
/// context namespace).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where an object lives: its namespace and name. Orders by namespace, then
/// name, as `kubectl get -A` lists objects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `metadata`: the fields this control plane reads or writes; other
/// Kubernetes fields (managedFields, finalizers, ...) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Empty when the manifest has none (reported as a missing name).
    #[serde(default)]
    pub name: String,
    /// `None` in a manifest without one; objects loaded from a config
    /// directory always have one ([`DEFAULT_NAMESPACE`] if omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// RFC 3339, seconds precision (`2024-05-01T10:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

impl ObjectMeta {
    /// The namespace, [`DEFAULT_NAMESPACE`] if unset.
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            None | Some("") => DEFAULT_NAMESPACE,
            Some(ns) => ns,
        }
    }

    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace(), &self.name)
    }

    /// The owner that controls this object (Kubernetes garbage collection
    /// and istiod use the reference marked `controller: true`).
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references
            .iter()
            .find(|r| r.controller == Some(true))
    }
}

/// `metadata.ownerReferences[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

/// A Kubernetes DNS-1123 label: namespaces, Service names (which also
/// must start with a letter, see [`is_dns1035_label`]).
pub fn is_dns_label(s: &str) -> bool {
    crate::ca::spiffe::is_dns_label(s)
}

/// A Kubernetes DNS-1123 subdomain: most object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    crate::ca::spiffe::is_dns_subdomain(s)
}

/// A DNS-1035 label: Service names (a DNS label starting with a letter).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// An IANA service name, the form of a named port: at most 15 lower-case
/// letters, digits and `-`, with at least one letter, no leading, trailing
/// or doubled `-`.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// `t` as Go's `time.RFC3339Nano` writes it in UTC, the format of istiod's
/// `istio.io/connectedAt` and `istio.io/disconnectedAt` annotations: the
/// fraction has no trailing zeros and is left out when zero.
pub fn format_rfc3339_nano(t: SystemTime) -> String {
    let (date_time, nanos) = utc_parts(t);
    if nanos == 0 {
        return format!("{date_time}Z");
    }
    let fraction = format!("{nanos:09}");
    format!("{date_time}.{}Z", fraction.trim_end_matches('0'))
}

/// `t` in RFC 3339 with whole seconds, as the API server writes
/// `creationTimestamp`.
pub fn format_rfc3339(t: SystemTime) -> String {
    format!("{}Z", utc_parts(t).0)
}

/// Parses an RFC 3339 timestamp (any precision, `Z` or an offset).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let nanos = t.unix_timestamp_nanos();
    if nanos >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_nanos(u64::try_from(-nanos).ok()?))
    }
}

/// A fresh random uid (an RFC 9562 version 4 UUID), as the API server gives
/// every new object.
pub fn random_uid() -> String {
    let mut bytes = [0u8; 16];
    // Without randomness the uid is still unique enough for a local
    // stand-in: fall back to the clock.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid_string(&bytes)
}

/// `8-4-4-4-12` lower-case hex.
pub(crate) fn uuid_string(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC and the nanoseconds.
fn utc_parts(t: SystemTime) -> (String, u32) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let dt = time::OffsetDateTime::from_unix_timestamp(since.as_secs() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        since.subsec_nanos(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_as_go_writes_them() {
        let t = UNIX_EPOCH + Duration::new(1_714_557_600, 120_000_000);
        assert_eq!(format_rfc3339_nano(t), "2024-05-01T10:00:00.12Z");
        assert_eq!(format_rfc3339(t), "2024-05-01T10:00:00Z");
        let whole = UNIX_EPOCH + Duration::from_secs(1_714_557_600);
        assert_eq!(format_rfc3339_nano(whole), "2024-05-01T10:00:00Z");
        let nanos = UNIX_EPOCH + Duration::new(1_714_557_600, 1);
        assert_eq!(format_rfc3339_nano(nanos), "2024-05-01T10:00:00.000000001Z");
        assert_eq!(parse_rfc3339(&format_rfc3339_nano(nanos)), Some(nanos));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00.12+02:00"),
            Some(t),
            "offsets are honoured"
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn names() {
        assert!(is_dns1035_label("ratings"));
        assert!(!is_dns1035_label("9ratings"));
        assert!(is_port_name("http-web"));
        assert!(!is_port_name("9080"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("much-too-long-port-name"));
        let meta = ObjectMeta {
            name: "x".into(),
            ..ObjectMeta::default()
        };
        assert_eq!(meta.key(), ObjectKey::new("default", "x"));
    }
}
