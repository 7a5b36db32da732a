//! Envoy's "pairs" encoding of string maps, used for map-valued properties
//! such as `xds.node.metadata.LABELS`: a u32 count N, N pairs of u32 key and
//! value lengths, then each key and value followed by a NUL byte (all LE).

use alloc::string::String;
use alloc::vec::Vec;

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Decodes a pairs map; `None` if the bytes are not one. Entries that are not
/// UTF-8 are skipped.
pub fn decode(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let count = read_u32(bytes, 0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if data > bytes.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = read_u32(bytes, 4 + i * 8)?;
        let value_len = read_u32(bytes, 8 + i * 8)?;
        let key = bytes.get(data..data.checked_add(key_len)?)?;
        data = data.checked_add(key_len + 1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len + 1)?;
        if data > bytes.len() {
            return None;
        }
        if let (Ok(k), Ok(v)) = (core::str::from_utf8(key), core::str::from_utf8(value)) {
            out.push((String::from(k), String::from(v)));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    use alloc::vec;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn decodes_pairs() {
        let pairs = [("app", "product"), ("version", "v1"), ("", "")];
        let expected: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (String::from(*k), String::from(*v)))
            .collect();
        assert_eq!(decode(&encode(&pairs)), Some(expected));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    fn rejects_truncated_or_lying_input() {
        let good = encode(&[("app", "product")]);
        for cut in 0..good.len() {
            assert_eq!(decode(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), None);
        let mut lying = good.clone();
        lying[4] = 200;
        assert_eq!(decode(&lying), None);
    }
}
