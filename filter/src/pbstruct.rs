//! A small codec for `google.protobuf.Struct`, the message Istio serializes
//! into `x-envoy-peer-metadata`.
//!
//! Encoding is deterministic (map keys in byte order, key and value always
//! written), matching Go's deterministic marshaling that istiod and Istio's
//! agent use. Decoding is defensive: it bounds nesting depth, rejects
//! truncated or malformed wire data, skips unknown fields and never panics.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Deepest nesting of Struct/ListValue accepted when decoding.
pub const MAX_DEPTH: usize = 16;

/// A `google.protobuf.Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Number(f64),
    String(String),
    Bool(bool),
    Struct(Struct),
    List(Vec<Value>),
}

/// A `google.protobuf.Struct`.
///
/// Fields are kept in a plain vector (a map type would cost the filter
/// kilobytes of code). Decoding appends in wire order and lookups take the
/// last occurrence of a key, which is protobuf's map semantics at linear
/// cost; [`Struct::insert`] keeps keys unique; encoding sorts them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Struct {
    pub fields: Vec<(String, Value)>,
}

impl Struct {
    /// Sets `key` to `value`, replacing an earlier value (protobuf map semantics).
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key, value)),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The string value of `key`, if it holds a string.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The nested struct under `key`, if it holds one.
    pub fn child(&self, key: &str) -> Option<&Struct> {
        match self.get(key) {
            Some(Value::Struct(s)) => Some(s),
            _ => None,
        }
    }

    /// The keys in encoding order.
    fn sorted(&self) -> Vec<&(String, Value)> {
        let mut fields: Vec<&(String, Value)> = self.fields.iter().collect();
        fields.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        fields
    }

    /// Serializes this struct in protobuf wire format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_struct_fields(self, &mut out);
        out
    }

    /// Parses protobuf wire format into an owned tree.
    pub fn decode(bytes: &[u8]) -> Result<Struct, DecodeError> {
        to_struct(StructEntries::new(bytes))
    }
}

/// Why bytes are not a `google.protobuf.Struct`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    VarintTooLong,
    /// A wire type this message cannot contain (groups, or 6/7).
    BadWireType(u8),
    /// A known field arrived with the wrong wire type.
    UnexpectedWireType {
        field: u64,
    },
    InvalidUtf8,
    TooDeep,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated protobuf"),
            DecodeError::VarintTooLong => f.write_str("varint longer than 10 bytes"),
            DecodeError::BadWireType(t) => write!(f, "unsupported wire type {t}"),
            DecodeError::UnexpectedWireType { field } => {
                write!(f, "field {field} has an unexpected wire type")
            }
            DecodeError::InvalidUtf8 => f.write_str("string is not UTF-8"),
            DecodeError::TooDeep => write!(f, "nesting deeper than {MAX_DEPTH}"),
        }
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(field: u64, wire: u8, out: &mut Vec<u8>) {
    put_varint((field << 3) | u64::from(wire), out);
}

fn put_len(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    put_tag(field, LEN, out);
    put_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn encode_struct_fields(s: &Struct, out: &mut Vec<u8>) {
    for (key, value) in s.sorted() {
        let mut entry = Vec::new();
        put_len(1, key.as_bytes(), &mut entry);
        put_len(2, &encode_value(value), &mut entry);
        put_len(1, &entry, out);
    }
}

fn encode_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match value {
        Value::Null => {
            put_tag(1, VARINT, &mut out);
            put_varint(0, &mut out);
        }
        Value::Number(n) => {
            put_tag(2, FIXED64, &mut out);
            out.extend_from_slice(&n.to_bits().to_le_bytes());
        }
        Value::String(s) => put_len(3, s.as_bytes(), &mut out),
        Value::Bool(b) => {
            put_tag(4, VARINT, &mut out);
            put_varint(u64::from(*b), &mut out);
        }
        Value::Struct(s) => {
            let mut inner = Vec::new();
            encode_struct_fields(s, &mut inner);
            put_len(5, &inner, &mut out);
        }
        Value::List(items) => {
            let mut inner = Vec::new();
            for item in items {
                put_len(1, &encode_value(item), &mut inner);
            }
            put_len(6, &inner, &mut out);
        }
    }
    out
}

/// One field read off the wire.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let (&byte, rest) = self.buf.split_first().ok_or(DecodeError::Truncated)?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field number and value, or `None` at the end of the buffer.
    fn field(&mut self) -> Result<Option<(u64, Field<'a>)>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let number = tag >> 3;
        let field = match (tag & 7) as u8 {
            VARINT => Field::Varint(self.varint()?),
            FIXED64 => {
                let bytes = self.take(8)?;
                let mut le = [0u8; 8];
                le.copy_from_slice(bytes);
                Field::Fixed64(u64::from_le_bytes(le))
            }
            LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
                Field::Len(self.take(len)?)
            }
            FIXED32 => {
                self.take(4)?;
                Field::Fixed32
            }
            other => return Err(DecodeError::BadWireType(other)),
        };
        Ok(Some((number, field)))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
}

/// The entries of a serialized `Struct`, read in wire order without copying.
///
/// This is what the filter uses on the request path: it looks at the few
/// keys it needs and skips the rest unparsed. A later entry with the same key
/// overrides an earlier one (protobuf map semantics), so readers keep the
/// last value they see.
pub struct StructEntries<'a> {
    reader: Reader<'a>,
    depth: usize,
}

impl<'a> StructEntries<'a> {
    /// Reads the entries of a top-level `Struct`.
    pub fn new(bytes: &'a [u8]) -> StructEntries<'a> {
        StructEntries::at_depth(bytes, 0)
    }

    fn at_depth(bytes: &'a [u8], depth: usize) -> StructEntries<'a> {
        StructEntries {
            reader: Reader { buf: bytes },
            depth,
        }
    }

    fn entry(&mut self, bytes: &'a [u8]) -> Result<(&'a str, ValueRef<'a>), DecodeError> {
        let mut key = "";
        let mut value = ValueRef {
            bytes: &[],
            depth: self.depth + 1,
        };
        let mut reader = Reader { buf: bytes };
        while let Some((number, field)) = reader.field()? {
            match (number, field) {
                (1, Field::Len(k)) => key = utf8(k)?,
                (2, Field::Len(v)) => value.bytes = v,
                (1 | 2, _) => return Err(DecodeError::UnexpectedWireType { field: number }),
                _ => {}
            }
        }
        Ok((key, value))
    }
}

impl<'a> Iterator for StructEntries<'a> {
    type Item = Result<(&'a str, ValueRef<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.depth > MAX_DEPTH {
            self.reader.buf = &[];
            return Some(Err(DecodeError::TooDeep));
        }
        loop {
            let item = match self.reader.field() {
                Ok(None) => return None,
                Ok(Some((1, Field::Len(entry)))) => self.entry(entry),
                Ok(Some((1, _))) => Err(DecodeError::UnexpectedWireType { field: 1 }),
                Ok(Some(_)) => continue,
                Err(e) => Err(e),
            };
            if item.is_err() {
                // Stop after the first error: the rest cannot be trusted.
                self.reader.buf = &[];
            }
            return Some(item);
        }
    }
}

/// A serialized `google.protobuf.Value`, decoded only when asked.
#[derive(Debug, Clone, Copy)]
pub struct ValueRef<'a> {
    bytes: &'a [u8],
    depth: usize,
}

/// The kind of a [`ValueRef`], borrowing strings and nested messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueKind<'a> {
    Null,
    Number(f64),
    String(&'a str),
    Bool(bool),
    /// A serialized nested `Struct`.
    Struct(&'a [u8]),
    /// A serialized `ListValue`.
    List(&'a [u8]),
}

impl<'a> ValueRef<'a> {
    /// Decodes the value's kind (the last one on the wire wins, as for a oneof).
    pub fn kind(&self) -> Result<ValueKind<'a>, DecodeError> {
        if self.depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let mut kind = ValueKind::Null;
        let mut reader = Reader { buf: self.bytes };
        while let Some((number, field)) = reader.field()? {
            kind = match (number, field) {
                (1, Field::Varint(_)) => ValueKind::Null,
                (2, Field::Fixed64(bits)) => ValueKind::Number(f64::from_bits(bits)),
                (3, Field::Len(s)) => ValueKind::String(utf8(s)?),
                (4, Field::Varint(b)) => ValueKind::Bool(b != 0),
                (5, Field::Len(s)) => ValueKind::Struct(s),
                (6, Field::Len(l)) => ValueKind::List(l),
                (1..=6, _) => return Err(DecodeError::UnexpectedWireType { field: number }),
                _ => continue,
            };
        }
        Ok(kind)
    }

    /// The entries of a nested struct value; `None` for any other kind.
    pub fn as_struct(&self) -> Result<Option<StructEntries<'a>>, DecodeError> {
        Ok(match self.kind()? {
            ValueKind::Struct(bytes) => Some(StructEntries::at_depth(bytes, self.depth + 1)),
            _ => None,
        })
    }

    /// The string, if this value is one.
    pub fn as_str(&self) -> Result<Option<&'a str>, DecodeError> {
        Ok(match self.kind()? {
            ValueKind::String(s) => Some(s),
            _ => None,
        })
    }

    /// Decodes the whole value into an owned tree.
    pub fn to_value(&self) -> Result<Value, DecodeError> {
        Ok(match self.kind()? {
            ValueKind::Null => Value::Null,
            ValueKind::Number(n) => Value::Number(n),
            ValueKind::String(s) => Value::String(String::from(s)),
            ValueKind::Bool(b) => Value::Bool(b),
            ValueKind::Struct(bytes) => {
                Value::Struct(to_struct(StructEntries::at_depth(bytes, self.depth + 1))?)
            }
            ValueKind::List(bytes) => {
                let mut items = Vec::new();
                let mut reader = Reader { buf: bytes };
                while let Some((number, field)) = reader.field()? {
                    match (number, field) {
                        (1, Field::Len(v)) => items.push(
                            ValueRef {
                                bytes: v,
                                depth: self.depth + 1,
                            }
                            .to_value()?,
                        ),
                        (1, _) => return Err(DecodeError::UnexpectedWireType { field: 1 }),
                        _ => {}
                    }
                }
                Value::List(items)
            }
        })
    }
}

fn to_struct(entries: StructEntries<'_>) -> Result<Struct, DecodeError> {
    let mut s = Struct::default();
    for entry in entries {
        let (key, value) = entry?;
        s.fields.push((String::from(key), value.to_value()?));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The same tests run natively and, under Node, as wasm32-unknown-unknown.
    use alloc::string::ToString;
    use alloc::vec;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn sample() -> Struct {
        let mut labels = Struct::default();
        labels.insert("app".to_string(), Value::String("product".to_string()));
        let mut s = Struct::default();
        s.insert("NAME".to_string(), Value::String("vm-1".to_string()));
        s.insert("LABELS".to_string(), Value::Struct(labels));
        s.insert("N".to_string(), Value::Number(1.5));
        s.insert("B".to_string(), Value::Bool(true));
        s.insert("Z".to_string(), Value::Null);
        s.insert(
            "L".to_string(),
            Value::List(vec![Value::String(String::new()), Value::Bool(false)]),
        );
        s
    }

    fn sorted(mut s: Struct) -> Struct {
        s.fields.sort_by(|a, b| a.0.cmp(&b.0));
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(Struct::decode(&s.encode()).unwrap(), sorted(s));
    }

    #[test]
    fn later_duplicate_keys_win() {
        let mut a = Struct::default();
        a.insert("k", Value::Bool(false));
        let mut b = Struct::default();
        b.insert("k", Value::Bool(true));
        let mut bytes = a.encode();
        bytes.extend_from_slice(&b.encode());
        assert_eq!(
            Struct::decode(&bytes).unwrap().get("k"),
            Some(&Value::Bool(true))
        );
    }

    #[test]
    fn encodes_known_bytes() {
        let mut s = Struct::default();
        s.insert("a".to_string(), Value::String("b".to_string()));
        // fields { key: "a" value { string_value: "b" } }
        assert_eq!(
            s.encode(),
            [0x0a, 0x08, 0x0a, 0x01, b'a', 0x12, 0x03, 0x1a, 0x01, b'b']
        );
    }

    #[test]
    fn skips_unknown_fields() {
        let mut bytes = sample().encode();
        // field 9 varint, field 10 fixed32, field 11 bytes.
        bytes.extend_from_slice(&[0x48, 0x01, 0x55, 1, 2, 3, 4, 0x5a, 0x01, 0x00]);
        assert_eq!(Struct::decode(&bytes).unwrap(), sorted(sample()));
    }

    #[test]
    fn rejects_malformed_wire_data() {
        let good = sample().encode();
        for cut in 1..good.len() {
            // Any strict prefix either fails or decodes to fewer fields; never panics.
            if let Ok(s) = Struct::decode(&good[..cut]) {
                assert!(s.fields.len() < sample().fields.len());
            }
        }
        assert_eq!(
            Struct::decode(&[0x0a, 0x05, 0x00]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(Struct::decode(&[0x0b]), Err(DecodeError::BadWireType(3)));
        assert_eq!(
            Struct::decode(&[0x08, 0x01]),
            Err(DecodeError::UnexpectedWireType { field: 1 })
        );
        assert_eq!(Struct::decode(&[0x80; 11]), Err(DecodeError::VarintTooLong));
        let bad_utf8 = [0x0a, 0x03, 0x0a, 0x01, 0xff];
        assert_eq!(Struct::decode(&bad_utf8), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn bounds_nesting() {
        let mut s = Struct::default();
        for _ in 0..40 {
            let mut outer = Struct::default();
            outer.insert("x".to_string(), Value::Struct(s));
            s = outer;
        }
        assert_eq!(Struct::decode(&s.encode()), Err(DecodeError::TooDeep));
    }
}
