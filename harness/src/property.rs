//! Property values encoded the way Envoy encodes them, and the property tree the
//! host serves to `proxy_get_property`.
//!
//! Envoy returns strings and bytes raw, integers as 8 bytes little-endian, booleans
//! as one byte and maps in the "pairs" format (see [`crate::encode_pairs`]). Tests
//! use these helpers so a property looks to the filter exactly as it would in Envoy.

use std::collections::BTreeMap;

use crate::pairs::decode_pairs_bytes;

/// A boolean property (`connection.mtls`): one byte, 1 or 0.
pub fn bool(v: bool) -> Vec<u8> {
    vec![u8::from(v)]
}

/// A signed integer property (`destination.port`, durations in ns): 8 bytes LE.
pub fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// An unsigned integer property (`connection.id`): 8 bytes LE.
pub fn uint(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A string property: the raw bytes, no terminator.
pub fn string(v: &str) -> Vec<u8> {
    v.as_bytes().to_vec()
}

/// A map property (`xds.node.metadata.LABELS`) in the "pairs" format.
pub fn map(pairs: &[(&str, &str)]) -> Vec<u8> {
    crate::pairs::encode_pairs(pairs)
}

/// Splits a wire path (segments joined with NUL) into segments.
pub(crate) fn split_path(raw: &[u8]) -> Vec<String> {
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Converts a test-provided path to owned segments.
pub(crate) fn owned_path(path: &[&str]) -> Vec<String> {
    path.iter().map(|s| s.to_string()).collect()
}

/// A set of properties keyed by path.
#[derive(Debug, Clone, Default)]
pub(crate) struct PropertyMap {
    values: BTreeMap<Vec<String>, Vec<u8>>,
}

impl PropertyMap {
    /// Sets (or overwrites) a value.
    pub(crate) fn set(&mut self, path: Vec<String>, value: Vec<u8>) {
        self.values.insert(path, value);
    }

    /// Whether a value is stored at exactly `path`.
    #[cfg(test)]
    pub(crate) fn contains(&self, path: &[String]) -> bool {
        self.values.contains_key(path)
    }

    /// Looks a path up: an exact match first, then (like Envoy's CEL map
    /// selection) a key of a map-valued property one level up, e.g.
    /// `xds.node.metadata.LABELS.app` inside the pairs-encoded `LABELS`.
    pub(crate) fn get(&self, path: &[String]) -> Option<Vec<u8>> {
        if let Some(v) = self.values.get(path) {
            return Some(v.clone());
        }
        let (last, parent) = path.split_last()?;
        let map = self.values.get(parent)?;
        decode_pairs_bytes(map)?
            .into_iter()
            .find(|(k, _)| k == last.as_bytes())
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &[&str]) -> Vec<String> {
        owned_path(path)
    }

    #[test]
    fn encodings_match_envoy() {
        assert_eq!(bool(true), vec![1]);
        assert_eq!(bool(false), vec![0]);
        assert_eq!(
            int(-2),
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(uint(258), vec![2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(string("a"), b"a".to_vec());
    }

    #[test]
    fn splits_wire_paths() {
        assert_eq!(
            split_path(b"xds\0node\0metadata"),
            p(&["xds", "node", "metadata"])
        );
        assert_eq!(split_path(b"plugin_root_id"), p(&["plugin_root_id"]));
        assert!(split_path(b"").is_empty());
    }

    #[test]
    fn exact_and_map_lookups() {
        let mut props = PropertyMap::default();
        props.set(p(&["a", "b"]), b"v".to_vec());
        props.set(p(&["labels"]), map(&[("app", "ledger"), ("version", "v1")]));
        assert_eq!(props.get(&p(&["a", "b"])), Some(b"v".to_vec()));
        assert_eq!(props.get(&p(&["a"])), None);
        assert_eq!(props.get(&p(&["labels", "app"])), Some(b"ledger".to_vec()));
        assert_eq!(props.get(&p(&["labels", "nope"])), None);
        assert_eq!(props.get(&p(&["a", "b", "c"])), None);
        assert!(props.contains(&p(&["labels"])));
        assert_eq!(props.get(&[]), None);
    }
}
