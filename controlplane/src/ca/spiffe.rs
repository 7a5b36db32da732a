//! SPIFFE identities as Istio uses them: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use std::fmt;

/// An Istio workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a SPIFFE ID or one of its parts is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error(
        "`{0}` is not a SPIFFE ID of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
    )]
    Form(String),
    #[error("trust domain `{0}`: expected lower-case letters, digits, `.`, `-` or `_`")]
    TrustDomain(String),
    #[error("namespace `{0}`: expected a DNS label (lower-case letters, digits, `-`; at most 63)")]
    Namespace(String),
    #[error(
        "service account `{0}`: expected a DNS subdomain (lower-case letters, digits, `-`, `.`; at most 253)"
    )]
    ServiceAccount(String),
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// An identity from its parts, each checked (Kubernetes name rules for
    /// the namespace and the service account).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if !is_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_string()));
        }
        if !is_dns_label(namespace) {
            return Err(SpiffeIdError::Namespace(namespace.to_string()));
        }
        if !is_dns_subdomain(service_account) {
            return Err(SpiffeIdError::ServiceAccount(service_account.to_string()));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let form = || SpiffeIdError::Form(uri.to_string());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(form)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(form()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI, as put in a certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// SPIFFE trust domain characters (lower-case; `.`, `-`, `_`).
pub(crate) fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A Kubernetes DNS-1123 label (namespaces).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes DNS-1123 subdomain (service accounts, most object names).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/vm-ns/sa/ratings-sa").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "vm-ns");
        assert_eq!(id.service_account(), "ratings-sa");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/UPPER/sa/b",
            "spiffe://cluster.local/ns/a/sa/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
