//! Helpers shared by the filter's tests: where the `.wasm` is, and Istio
//! peer metadata encoded and decoded independently of the filter. Envoy and
//! PKI helpers live in the `meshvm-testing` crate.
#![allow(dead_code)]

pub use meshvm_testing::envoy::filter_wasm;

/// A harness on the built filter: compiled once per test binary, each
/// caller gets fresh shared data and queues.
pub fn harness() -> meshvm_harness::Harness {
    static HARNESS: std::sync::OnceLock<meshvm_harness::Harness> = std::sync::OnceLock::new();
    HARNESS
        .get_or_init(|| {
            meshvm_harness::Harness::load(filter_wasm()).expect("load meshvm_filter.wasm")
        })
        .isolated()
}

/// Istio's peer metadata header value for `fields`, encoded independently of
/// the filter (prost-types + base64), as an Istio sidecar would send it.
pub fn istio_peer_metadata(fields: &[(&str, &str)], labels: &[(&str, &str)]) -> String {
    use base64::Engine;
    use prost::Message;
    use prost_types::{Struct, Value, value::Kind};
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let mut st = Struct::default();
    for (k, v) in fields {
        st.fields.insert(k.to_string(), string(v));
    }
    if !labels.is_empty() {
        let mut l = Struct::default();
        for (k, v) in labels {
            l.fields.insert(k.to_string(), string(v));
        }
        st.fields.insert(
            "LABELS".to_string(),
            Value {
                kind: Some(Kind::StructValue(l)),
            },
        );
    }
    base64::engine::general_purpose::STANDARD.encode(st.encode_to_vec())
}

/// Decodes `x-envoy-peer-metadata` independently of the filter.
pub fn decode_istio_peer_metadata(header: &str) -> prost_types::Struct {
    use base64::Engine;
    use prost::Message;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(header)
        .expect("peer metadata is standard base64");
    prost_types::Struct::decode(bytes.as_slice()).expect("peer metadata is a protobuf Struct")
}

/// Decoded peer metadata as plain maps: top-level string fields, and the
/// `LABELS` struct. Panics on a value of any other type (Istio sends strings).
pub fn peer_metadata_maps(
    metadata: &prost_types::Struct,
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
) {
    use prost_types::value::Kind;
    let strings = |s: &prost_types::Struct| {
        s.fields
            .iter()
            .filter(|(k, _)| *k != "LABELS")
            .map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => (k.clone(), s.clone()),
                other => panic!("{k} is not a string: {other:?}"),
            })
            .collect()
    };
    let labels = match metadata.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(l)) => strings(l),
        None => Default::default(),
        other => panic!("LABELS is not a struct: {other:?}"),
    };
    (strings(metadata), labels)
}

/// `[(k, v)]` as an owned map, for comparisons.
pub fn map(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
