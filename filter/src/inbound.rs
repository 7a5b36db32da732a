//! The inbound decision, without host calls: given the request headers and
//! the caller's authenticated URI SAN, which headers the app gets.
//!
//! Kept pure so the whole policy is unit-tested natively and under
//! `wasm-bindgen-test`; the Envoy side then reads the headers once and, if
//! anything changes, writes them back once (each host call costs more than
//! this whole function).

use crate::config::{FilterConfig, HeaderNames};
use crate::peer_metadata::{self, PeerInfo};
use crate::spiffe::{self, SpiffeId};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// A request header: lower-case name, raw value.
pub type Header = (String, Vec<u8>);

/// What labeling did to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labeling {
    /// The headers the app should see, or `None` when they are unchanged.
    pub headers: Option<Vec<Header>>,
    /// Header values removed because only the filter may set such headers.
    pub forged_removed: usize,
    /// The caller's SPIFFE ID, or why there is none.
    pub identity: Result<String, String>,
    /// Peer metadata from an authenticated caller that could not be used, and why.
    pub metadata_problem: Option<String>,
}

/// The last peer metadata decoded on a connection.
///
/// A calling sidecar sends the same `x-envoy-peer-metadata` on every request
/// of a connection; keeping the last value and its decoding per connection
/// turns the decode (base64 and protobuf, the filter's largest computation)
/// into one comparison.
#[derive(Debug, Clone, Default)]
pub struct MetadataMemo {
    raw: Vec<u8>,
    decoded: Option<Result<PeerInfo, String>>,
}

impl MetadataMemo {
    fn decode(&mut self, raw: &[u8], limit: usize) -> Result<PeerInfo, String> {
        match &self.decoded {
            Some(decoded) if self.raw == raw => decoded.clone(),
            _ => {
                let decoded = peer_metadata::decode_header(raw, limit).map_err(|e| e.to_string());
                self.raw = raw.to_vec();
                self.decoded = Some(decoded.clone());
                decoded
            }
        }
    }
}

/// Labels one inbound request. `uri_san` is the first URI SAN of the
/// client certificate Envoy verified; `None` for a plaintext caller or a
/// certificate without one. `memo` belongs to the request's connection.
pub fn label_request(
    config: &FilterConfig,
    headers: Vec<Header>,
    uri_san: Option<&[u8]>,
    memo: &mut MetadataMemo,
) -> Labeling {
    let names = &config.headers;
    let mut peer_metadata: Option<Vec<u8>> = None;
    let mut forged_removed = 0;
    let mut istio_seen = false;
    let mut kept: Vec<Header> = Vec::with_capacity(headers.len() + 7);
    for (name, value) in headers {
        if names.is_reserved(&name) {
            forged_removed += 1;
            continue;
        }
        let is_metadata = name == names.peer_metadata;
        if is_metadata || name == names.peer_metadata_id {
            istio_seen = true;
            if config.remove_peer_metadata_headers {
                if is_metadata && peer_metadata.is_none() {
                    peer_metadata = Some(value);
                }
                continue;
            }
            if is_metadata && peer_metadata.is_none() {
                peer_metadata = Some(value.clone());
            }
        }
        kept.push((name, value));
    }

    let identity = match uri_san.map(core::str::from_utf8) {
        None => Err("no client certificate URI SAN".to_string()),
        Some(Err(_)) => Err("client certificate URI SAN is not UTF-8".to_string()),
        Some(Ok(uri)) => spiffe::parse(uri).map_err(|e| format!("{e}: {uri:.100}")),
    };
    let mut metadata_problem = None;
    if let Ok(id) = &identity {
        push(&mut kept, &names.identity, id.uri);
        push(&mut kept, &names.namespace, id.namespace);
        push(&mut kept, &names.service_account, id.service_account);
        // Peer metadata describes the caller only when the caller is authenticated.
        if let Some(raw) = &peer_metadata {
            match memo
                .decode(raw, config.max_peer_metadata_bytes)
                .and_then(|info| matching_namespace(info, id))
            {
                Ok(info) => push_peer_info(&mut kept, names, &info),
                Err(why) => metadata_problem = Some(why),
            }
        }
    }

    let changed = forged_removed > 0
        || (istio_seen && config.remove_peer_metadata_headers)
        || identity.is_ok();
    Labeling {
        headers: changed.then_some(kept),
        forged_removed,
        identity: identity.map(|id| id.uri.to_string()),
        metadata_problem,
    }
}

/// The certificate is the authority on the namespace: metadata that claims
/// another one is not about this caller.
fn matching_namespace(info: PeerInfo, id: &SpiffeId<'_>) -> Result<PeerInfo, String> {
    match &info.namespace {
        Some(ns) if ns != id.namespace => Err(format!(
            "peer metadata claims namespace {ns:?}, the certificate says {:?}",
            id.namespace
        )),
        _ => Ok(info),
    }
}

fn push(headers: &mut Vec<Header>, name: &str, value: &str) {
    headers.push((name.to_string(), value.as_bytes().to_vec()));
}

fn push_peer_info(headers: &mut Vec<Header>, names: &HeaderNames, info: &PeerInfo) {
    for (name, value) in [
        (&names.workload, &info.workload),
        (&names.app, &info.app),
        (&names.version, &info.version),
        (&names.cluster, &info.cluster),
    ] {
        if let Some(value) = value {
            push(headers, name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::pbstruct::{Struct, Value};
    use alloc::vec;

    const CALLER: &str = "spiffe://cluster.local/ns/payments/sa/ledger";

    fn config(json: &str) -> FilterConfig {
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    fn inbound() -> FilterConfig {
        config(r#"{"direction":"inbound"}"#)
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<Header> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn metadata(fields: &[(&str, &str)]) -> String {
        let mut s = Struct::default();
        for (k, v) in fields {
            s.insert(*k, Value::String(v.to_string()));
        }
        crate::base64::encode(&s.encode())
    }

    fn get<'a>(headers: &'a [Header], name: &str) -> Vec<&'a [u8]> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    #[test]
    fn labels_an_authenticated_caller_and_keeps_other_headers_in_order() {
        let md = metadata(&[("NAMESPACE", "payments"), ("WORKLOAD_NAME", "ledger-v3")]);
        let input = headers(&[
            (":method", "GET"),
            ("x-mesh-peer-identity", "forged"),
            ("accept", "*/*"),
            ("x-envoy-peer-metadata", &md),
            ("x-envoy-peer-metadata-id", "sidecar~x"),
        ]);
        let out = label_request(
            &inbound(),
            input,
            Some(CALLER.as_bytes()),
            &mut MetadataMemo::default(),
        );
        assert_eq!(out.identity.as_deref(), Ok(CALLER));
        assert_eq!(out.forged_removed, 1);
        assert_eq!(out.metadata_problem, None);
        let h = out.headers.unwrap();
        let names: Vec<&str> = h.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                ":method",
                "accept",
                "x-mesh-peer-identity",
                "x-mesh-peer-namespace",
                "x-mesh-peer-service-account",
                "x-mesh-peer-workload",
            ]
        );
        assert_eq!(get(&h, "x-mesh-peer-identity"), [CALLER.as_bytes()]);
        assert_eq!(get(&h, "x-mesh-peer-workload"), [b"ledger-v3"]);
    }

    #[test]
    fn leaves_untouched_requests_alone() {
        let input = headers(&[(":method", "GET"), ("x-mesh-peers", "not ours")]);
        let out = label_request(&inbound(), input, None, &mut MetadataMemo::default());
        assert_eq!(out.headers, None);
        assert_eq!(out.forged_removed, 0);
        assert!(out.identity.is_err());
    }

    #[test]
    fn plaintext_callers_lose_forgeries_and_metadata() {
        let md = metadata(&[("WORKLOAD_NAME", "x")]);
        let input = headers(&[("x-mesh-peer-app", "a"), ("x-envoy-peer-metadata", &md)]);
        let out = label_request(&inbound(), input, None, &mut MetadataMemo::default());
        assert_eq!(out.headers, Some(vec![]));
        assert_eq!(out.forged_removed, 1);
        assert_eq!(out.metadata_problem, None);
        assert_eq!(
            out.identity,
            Err("no client certificate URI SAN".to_string())
        );
    }

    #[test]
    fn explains_why_there_is_no_identity_or_metadata() {
        let out = label_request(
            &inbound(),
            vec![],
            Some(b"spiffe://cluster.local/ns/a"),
            &mut MetadataMemo::default(),
        );
        assert!(out.identity.unwrap_err().contains("/ns/<namespace>/sa/"));
        let out = label_request(
            &inbound(),
            vec![],
            Some(&[0xff, 0xfe]),
            &mut MetadataMemo::default(),
        );
        assert!(out.identity.unwrap_err().contains("UTF-8"));

        let other_ns = metadata(&[("NAMESPACE", "kube-system")]);
        let input = headers(&[("x-envoy-peer-metadata", &other_ns)]);
        let out = label_request(
            &inbound(),
            input,
            Some(CALLER.as_bytes()),
            &mut MetadataMemo::default(),
        );
        assert!(out.metadata_problem.unwrap().contains("kube-system"));
        let input = headers(&[("x-envoy-peer-metadata", "***")]);
        let out = label_request(
            &inbound(),
            input,
            Some(CALLER.as_bytes()),
            &mut MetadataMemo::default(),
        );
        assert!(out.metadata_problem.unwrap().contains("base64"));
    }

    #[test]
    fn metadata_is_decoded_once_per_value_on_a_connection() {
        let mut memo = MetadataMemo::default();
        let a = metadata(&[("WORKLOAD_NAME", "a")]);
        let b = metadata(&[("WORKLOAD_NAME", "b")]);
        for (md, expected) in [(&a, b"a"), (&a, b"a"), (&b, b"b"), (&a, b"a")] {
            let input = headers(&[("x-envoy-peer-metadata", md)]);
            let out = label_request(&inbound(), input, Some(CALLER.as_bytes()), &mut memo);
            assert_eq!(
                get(&out.headers.unwrap(), "x-mesh-peer-workload"),
                [expected]
            );
        }
        // A remembered failure is still a failure, and still reported.
        for _ in 0..2 {
            let input = headers(&[("x-envoy-peer-metadata", "***")]);
            let out = label_request(&inbound(), input, Some(CALLER.as_bytes()), &mut memo);
            assert!(out.metadata_problem.unwrap().contains("base64"));
        }
        // The namespace check applies to the remembered metadata too.
        let other_ns = metadata(&[("NAMESPACE", "kube-system")]);
        let input = headers(&[("x-envoy-peer-metadata", &other_ns)]);
        label_request(
            &inbound(),
            input.clone(),
            Some(CALLER.as_bytes()),
            &mut memo,
        );
        let out = label_request(&inbound(), input, Some(CALLER.as_bytes()), &mut memo);
        assert!(out.metadata_problem.unwrap().contains("kube-system"));
    }

    #[test]
    fn can_keep_the_istio_headers() {
        let md = metadata(&[("WORKLOAD_NAME", "ledger-v3")]);
        let cfg = config(r#"{"direction":"inbound","remove_peer_metadata_headers":false}"#);
        let input = headers(&[
            ("x-envoy-peer-metadata", &md),
            ("x-envoy-peer-metadata-id", "id"),
        ]);
        let out = label_request(
            &cfg,
            input,
            Some(CALLER.as_bytes()),
            &mut MetadataMemo::default(),
        );
        let h = out.headers.unwrap();
        assert_eq!(get(&h, "x-envoy-peer-metadata"), [md.as_bytes()]);
        assert_eq!(get(&h, "x-envoy-peer-metadata-id"), [b"id"]);
        assert_eq!(get(&h, "x-mesh-peer-workload"), [b"ledger-v3"]);
        // Without an identity and with nothing forged, nothing changes.
        let input = headers(&[("x-envoy-peer-metadata", &md)]);
        assert_eq!(
            label_request(&cfg, input, None, &mut MetadataMemo::default()).headers,
            None
        );
    }
}
