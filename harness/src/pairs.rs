//! The proxy-wasm "pairs" map format, used for header maps, `proxy_http_call`
//! headers and map-valued properties (e.g. `xds.node.metadata.LABELS`).
//!
//! Layout: `u32 LE` count N, then N × (`u32 LE` key length, `u32 LE` value
//! length), then for each pair `key \0 value \0`. The SDK's own decoder is
//! private, so tests that build or check such values use these functions.

/// Encodes string pairs in the "pairs" format.
///
/// Exists so tests can build map-valued properties (like Envoy's
/// `xds.node.metadata.LABELS`) and pre-encoded header maps for hand-written guests.
pub fn encode_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = pairs
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    encode_pairs_bytes(&pairs)
}

/// Encodes byte pairs in the "pairs" format (header values may be binary).
pub(crate) fn encode_pairs_bytes(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len_u32(k.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Decodes a "pairs" map into strings; `None` when the bytes are malformed or
/// not UTF-8. An empty input is an empty map (the SDK treats it the same way).
///
/// Exists so tests can check map-valued properties or encoded headers.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    decode_pairs_bytes(bytes)?
        .into_iter()
        .map(|(k, v)| Some((String::from_utf8(k).ok()?, String::from_utf8(v).ok()?)))
        .collect()
}

/// Decodes a "pairs" map into byte pairs; `None` when malformed. Never panics,
/// whatever the guest wrote.
pub(crate) fn decode_pairs_bytes(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    // Each pair needs at least 8 bytes of lengths and 2 terminators.
    if count > bytes.len() / 10 + 1 {
        return None;
    }
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = read_u32(bytes, 4 + i * 8)? as usize;
        let value_len = read_u32(bytes, 8 + i * 8)? as usize;
        let key = take_terminated(bytes, &mut data, key_len)?;
        let value = take_terminated(bytes, &mut data, value_len)?;
        out.push((key, value));
    }
    Some(out)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

fn take_terminated(bytes: &[u8], at: &mut usize, len: usize) -> Option<Vec<u8>> {
    let end = at.checked_add(len)?;
    let value = bytes.get(*at..end)?.to_vec();
    if *bytes.get(end)? != 0 {
        return None;
    }
    *at = end + 1;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rustfmt::skip]
    const SERIALIZED: &[u8] = &[
        2, 0, 0, 0,
        7, 0, 0, 0, 3, 0, 0, 0,
        5, 0, 0, 0, 0, 0, 0, 0,
        b':', b'm', b'e', b't', b'h', b'o', b'd', 0, b'G', b'E', b'T', 0,
        b':', b'p', b'a', b't', b'h', 0, 0,
    ];

    #[test]
    fn encodes_like_the_sdk() {
        assert_eq!(
            encode_pairs(&[(":method", "GET"), (":path", "")]),
            SERIALIZED
        );
        assert_eq!(encode_pairs(&[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn round_trips() {
        let pairs = [("app", "ledger"), ("version", "v1"), ("empty", "")];
        let decoded = decode_pairs(&encode_pairs(&pairs)).expect("valid");
        let expected: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn empty_input_is_an_empty_map() {
        assert_eq!(decode_pairs(&[]), Some(vec![]));
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        assert_eq!(decode_pairs(&[1, 0]), None);
        assert_eq!(decode_pairs(&[1, 0, 0, 0]), None);
        assert_eq!(decode_pairs(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]), None);
        // Missing NUL terminator.
        let mut bad = encode_pairs(&[("a", "b")]);
        let last = bad.len() - 1;
        bad[last] = b'x';
        assert_eq!(decode_pairs(&bad), None);
        // Length beyond the end.
        let mut long = encode_pairs(&[("a", "b")]);
        long[4] = 200;
        assert_eq!(decode_pairs(&long), None);
        // Truncated at every position.
        let full = encode_pairs(&[("key", "value"), ("k2", "v2")]);
        for cut in 1..full.len() {
            assert_eq!(decode_pairs(&full[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn binary_values_survive_the_bytes_variant() {
        let encoded = encode_pairs_bytes(&[(b"k", &[0xff, 0x00, 0x01])]);
        assert_eq!(
            decode_pairs_bytes(&encoded),
            Some(vec![(b"k".to_vec(), vec![0xff, 0x00, 0x01])])
        );
        assert_eq!(decode_pairs(&encoded), None, "not UTF-8");
    }
}
