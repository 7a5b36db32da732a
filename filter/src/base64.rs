//! Standard base64 (RFC 4648 §4), as Istio uses for `x-envoy-peer-metadata`.
//!
//! Hand-written to keep the filter small. Encoding always pads; decoding
//! accepts input with or without padding, as Istio's readers do, and rejects
//! anything else (URL-safe alphabet, whitespace, bad padding, non-zero
//! trailing bits).

use core::fmt;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a base64 string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base64Error {
    /// A byte outside the standard alphabet, at this offset.
    InvalidByte(usize),
    /// The length (ignoring padding) cannot come from any encoding.
    InvalidLength,
    /// Padding in the wrong place or the wrong amount.
    InvalidPadding,
}

impl fmt::Display for Base64Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base64Error::InvalidByte(at) => write!(f, "invalid base64 byte at offset {at}"),
            Base64Error::InvalidLength => f.write_str("invalid base64 length"),
            Base64Error::InvalidPadding => f.write_str("invalid base64 padding"),
        }
    }
}

/// Encodes `input` with the standard alphabet and `=` padding.
pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..4 {
            if i < symbols {
                let index = (n >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn value_of(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes standard base64, padded or not.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, Base64Error> {
    let unpadded_len = input.iter().rposition(|&b| b != b'=').map_or(0, |p| p + 1);
    let padding = input.len() - unpadded_len;
    if padding > 2 || (padding > 0 && !input.len().is_multiple_of(4)) {
        return Err(Base64Error::InvalidPadding);
    }
    let data = &input[..unpadded_len];
    if data.len() % 4 == 1 {
        return Err(Base64Error::InvalidLength);
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    for (chunk_index, chunk) in data.chunks(4).enumerate() {
        let mut n: u32 = 0;
        for (i, &byte) in chunk.iter().enumerate() {
            let v = value_of(byte).ok_or(Base64Error::InvalidByte(chunk_index * 4 + i))?;
            n |= u32::from(v) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let produced = chunk.len() - 1;
        // Bits beyond what the last symbol carries must be zero (canonical form).
        let unused_mask = match produced {
            1 => 0xffff,
            2 => 0xff,
            _ => 0,
        };
        if n & unused_mask != 0 {
            return Err(Base64Error::InvalidPadding);
        }
        out.extend_from_slice(&bytes[..produced]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn round_trips_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded.as_bytes()).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn accepts_missing_padding() {
        assert_eq!(decode(b"Zg").unwrap(), b"f");
        assert_eq!(decode(b"Zm8").unwrap(), b"fo");
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(decode(b"Zm9v!A"), Err(Base64Error::InvalidByte(4)));
        assert_eq!(decode(b"Z"), Err(Base64Error::InvalidLength));
        assert_eq!(decode(b"Zg==="), Err(Base64Error::InvalidPadding));
        assert_eq!(decode(b"Zg="), Err(Base64Error::InvalidPadding));
        assert_eq!(decode(b"Zh=="), Err(Base64Error::InvalidPadding));
        assert_eq!(decode(b"Zm9v Zm9"), Err(Base64Error::InvalidByte(4)));
        assert_eq!(decode(b"-_8="), Err(Base64Error::InvalidByte(0)));
    }

    #[test]
    fn round_trips_all_byte_values() {
        let all: Vec<u8> = (0..=255).collect();
        for len in 0..all.len() {
            assert_eq!(decode(encode(&all[..len]).as_bytes()).unwrap(), &all[..len]);
        }
    }
}
