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

/// Sentinel in [`DECODE`] for bytes outside the alphabet.
const INVALID: u8 = 0xff;

/// Byte → 6-bit value, built at compile time so decoding is one lookup a byte.
const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

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
    let invalid_at = |offset: usize| {
        let at = data[offset..]
            .iter()
            .position(|&b| DECODE[b as usize] == INVALID)
            .map_or(offset, |p| offset + p);
        Base64Error::InvalidByte(at)
    };
    let mut quads = data.chunks_exact(4);
    for (index, quad) in quads.by_ref().enumerate() {
        let [a, b, c, d] = [quad[0], quad[1], quad[2], quad[3]].map(|x| DECODE[x as usize]);
        // Valid symbols are below 64; INVALID has the top bits set.
        if (a | b | c | d) & 0xc0 != 0 {
            return Err(invalid_at(index * 4));
        }
        let n = (u32::from(a) << 18) | (u32::from(b) << 12) | (u32::from(c) << 6) | u32::from(d);
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
    }
    let tail = quads.remainder();
    if !tail.is_empty() {
        let offset = data.len() - tail.len();
        let mut n: u32 = 0;
        for (i, &byte) in tail.iter().enumerate() {
            let v = DECODE[byte as usize];
            if v == INVALID {
                return Err(invalid_at(offset));
            }
            n |= u32::from(v) << (18 - 6 * i);
        }
        // Bits beyond what the last symbol carries must be zero (canonical form).
        let (produced, unused_mask) = if tail.len() == 2 {
            (1, 0xffff)
        } else {
            (2, 0xff)
        };
        if n & unused_mask != 0 {
            return Err(Base64Error::InvalidPadding);
        }
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8][..produced]);
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
