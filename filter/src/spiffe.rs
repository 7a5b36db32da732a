//! Parsing of Istio workload identities: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! Only this exact shape is an identity. The trust domain follows the SPIFFE
//! specification (lower-case letters, digits, `.`, `-`, `_`); namespace and
//! service account are non-empty path segments of SPIFFE's character set. No
//! query, fragment, port, user info, percent-encoding, extra segments or
//! trailing slash are accepted.

use core::fmt;

/// Longest SPIFFE ID accepted, as in the SPIFFE specification.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A parsed Istio workload identity, borrowing from the SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeId<'a> {
    /// The whole ID, as presented.
    pub uri: &'a str,
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// Why a URI is not an Istio workload identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeError {
    TooLong,
    NotSpiffeScheme,
    InvalidTrustDomain,
    /// The path is not `/ns/<ns>/sa/<sa>`.
    NotWorkloadPath,
    InvalidSegment,
}

impl fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpiffeError::TooLong => "SPIFFE ID longer than 2048 bytes",
            SpiffeError::NotSpiffeScheme => "URI does not start with spiffe://",
            SpiffeError::InvalidTrustDomain => "invalid trust domain",
            SpiffeError::NotWorkloadPath => "path is not /ns/<namespace>/sa/<service-account>",
            SpiffeError::InvalidSegment => "invalid character or empty segment in path",
        })
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Parses an Istio workload SPIFFE ID.
pub fn parse(uri: &str) -> Result<SpiffeId<'_>, SpiffeError> {
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeError::TooLong);
    }
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or(SpiffeError::NotSpiffeScheme)?;
    let (trust_domain, path) = rest.split_once('/').ok_or(SpiffeError::NotWorkloadPath)?;
    if !valid_trust_domain(trust_domain) {
        return Err(SpiffeError::InvalidTrustDomain);
    }
    let mut segments = path.split('/');
    let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(SpiffeError::NotWorkloadPath);
    };
    if !valid_segment(namespace) || !valid_segment(service_account) {
        return Err(SpiffeError::InvalidSegment);
    }
    Ok(SpiffeId {
        uri,
        trust_domain,
        namespace,
        service_account,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn parses_istio_identities() {
        let id = parse("spiffe://cluster.local/ns/default/sa/product").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "product");
        assert_eq!(id.uri, "spiffe://cluster.local/ns/default/sa/product");

        let id = parse("spiffe://td-1_x.example/ns/pay.ments/sa/Ledger_v2").unwrap();
        assert_eq!(id.namespace, "pay.ments");
        assert_eq!(id.service_account, "Ledger_v2");
    }

    #[test]
    fn rejects_everything_else() {
        let cases = [
            ("", SpiffeError::NotSpiffeScheme),
            (
                "https://cluster.local/ns/a/sa/b",
                SpiffeError::NotSpiffeScheme,
            ),
            (
                "SPIFFE://cluster.local/ns/a/sa/b",
                SpiffeError::NotSpiffeScheme,
            ),
            ("spiffe://cluster.local", SpiffeError::NotWorkloadPath),
            ("spiffe:///ns/a/sa/b", SpiffeError::InvalidTrustDomain),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                SpiffeError::InvalidTrustDomain,
            ),
            (
                "spiffe://cluster.local:443/ns/a/sa/b",
                SpiffeError::InvalidTrustDomain,
            ),
            (
                "spiffe://user@cluster.local/ns/a/sa/b",
                SpiffeError::InvalidTrustDomain,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/",
                SpiffeError::NotWorkloadPath,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/c",
                SpiffeError::NotWorkloadPath,
            ),
            (
                "spiffe://cluster.local/ns/a/sa",
                SpiffeError::NotWorkloadPath,
            ),
            (
                "spiffe://cluster.local/sa/b/ns/a",
                SpiffeError::NotWorkloadPath,
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/../sa/b",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/a%2f/sa/b",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b#f",
                SpiffeError::InvalidSegment,
            ),
            (
                "spiffe://cluster.local/ns/a\r\n/sa/b",
                SpiffeError::InvalidSegment,
            ),
        ];
        for (uri, expected) in cases {
            assert_eq!(parse(uri), Err(expected), "{uri:?}");
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(2048));
        assert_eq!(parse(&long), Err(SpiffeError::TooLong));
    }
}
