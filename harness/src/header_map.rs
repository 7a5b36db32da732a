//! An ordered header multimap with Envoy's semantics.
//!
//! Envoy lower-cases names, keeps insertion order, returns the first value on a
//! lookup, replaces all values of a name on `replace`, removes all of them on
//! `remove` and appends on `add`. Values are bytes because the ABI allows
//! binary header values; the public API shows them as (lossy) strings.

use crate::pairs::{decode_pairs_bytes, encode_pairs_bytes};

/// Ordered multimap of lower-case header names to byte values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HeaderMap {
    entries: Vec<(String, Vec<u8>)>,
}

fn lower(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_ascii_lowercase()
}

impl HeaderMap {
    /// Builds a map from test-provided pairs, lower-casing the names.
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let mut map = Self::default();
        for (k, v) in pairs {
            map.add(k.as_bytes(), v.as_bytes());
        }
        map
    }

    /// Builds a map from "pairs"-encoded guest bytes; `None` when malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut map = Self::default();
        for (k, v) in decode_pairs_bytes(bytes)? {
            map.add(&k, &v);
        }
        Some(map)
    }

    /// The map in the "pairs" format, for `proxy_get_header_map_pairs`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let pairs: Vec<(&[u8], &[u8])> = self
            .entries
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_slice()))
            .collect();
        encode_pairs_bytes(&pairs)
    }

    /// Number of entries (what Envoy passes as `num_headers`).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of name and value lengths (Envoy's `byteSize`, for `proxy_get_header_map_size`).
    pub(crate) fn byte_size(&self) -> usize {
        self.entries.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// First value of `name`.
    pub(crate) fn get(&self, name: &[u8]) -> Option<&[u8]> {
        let name = lower(name);
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of `name`, in order.
    #[cfg(test)]
    pub(crate) fn get_all(&self, name: &[u8]) -> Vec<&[u8]> {
        let name = lower(name);
        self.entries
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// Appends a value.
    pub(crate) fn add(&mut self, name: &[u8], value: &[u8]) {
        self.entries.push((lower(name), value.to_vec()));
    }

    /// Replaces every value of `name` by one value, kept at the position of the
    /// first occurrence; appends when the name is absent.
    pub(crate) fn replace(&mut self, name: &[u8], value: &[u8]) {
        let name = lower(name);
        match self.entries.iter().position(|(k, _)| *k == name) {
            Some(first) => {
                self.entries[first].1 = value.to_vec();
                let mut index = 0;
                self.entries.retain(|(k, _)| {
                    let keep = index <= first || *k != name;
                    index += 1;
                    keep
                });
            }
            None => self.entries.push((name, value.to_vec())),
        }
    }

    /// Removes every value of `name`.
    pub(crate) fn remove(&mut self, name: &[u8]) {
        let name = lower(name);
        self.entries.retain(|(k, _)| *k != name);
    }

    /// The entries as strings, for the public API.
    pub(crate) fn to_strings(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(map: &HeaderMap) -> Vec<(String, String)> {
        map.to_strings()
    }

    #[test]
    fn names_are_lower_cased_and_order_kept() {
        let map = HeaderMap::from_pairs(&[("X-B", "1"), ("x-a", "2"), ("X-b", "3")]);
        assert_eq!(
            strings(&map),
            vec![
                ("x-b".into(), "1".into()),
                ("x-a".into(), "2".into()),
                ("x-b".into(), "3".into())
            ]
        );
        assert_eq!(map.get(b"X-B"), Some(&b"1"[..]));
        assert_eq!(map.get_all(b"x-b"), vec![&b"1"[..], &b"3"[..]]);
        assert_eq!(map.get(b"missing"), None);
        assert_eq!(map.len(), 3);
        assert_eq!(map.byte_size(), 3 + 1 + 3 + 1 + 3 + 1);
    }

    #[test]
    fn replace_keeps_one_value_at_the_first_position() {
        let mut map = HeaderMap::from_pairs(&[("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")]);
        map.replace(b"A", b"new");
        assert_eq!(
            strings(&map),
            vec![
                ("a".into(), "new".into()),
                ("b".into(), "2".into()),
                ("c".into(), "4".into())
            ]
        );
        map.replace(b"d", b"5");
        assert_eq!(map.get(b"d"), Some(&b"5"[..]));
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn remove_removes_all_and_add_appends() {
        let mut map = HeaderMap::from_pairs(&[("a", "1"), ("b", "2"), ("a", "3")]);
        map.remove(b"A");
        assert_eq!(strings(&map), vec![("b".into(), "2".into())]);
        map.add(b"B", b"x");
        assert_eq!(map.get_all(b"b"), vec![&b"2"[..], &b"x"[..]]);
        map.remove(b"nothing");
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn encodes_and_decodes_pairs() {
        let map = HeaderMap::from_pairs(&[(":status", "200"), ("x", "")]);
        let decoded = HeaderMap::decode(&map.encode()).expect("valid");
        assert_eq!(decoded, map);
        assert_eq!(HeaderMap::decode(&[9, 9]), None);
    }
}
