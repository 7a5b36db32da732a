//! A YAML writer that reproduces what Go's `sigs.k8s.io/yaml` (go-yaml v2)
//! writes, used for istioctl's mesh.yaml and for objects as `kubectl get -o
//! yaml` shows them: block style, map keys in go-yaml's
//! "natural" order (non-letters before letters, digit runs compared as
//! numbers: `ISTIO_META_X` before `ISTIO_METAJSON_LABELS`), sequences not
//! indented under their key, and go-yaml's choice of scalar style:
//!
//! - plain when the text would read back as the same string;
//! - double-quoted when plain text would read as another type (`"true"`,
//!   `"2"`, `""`, `"null"`, dates) or holds characters that need escapes;
//! - single-quoted when plain text would be misread as YAML syntax (a leading
//!   `{` or `[`, `: `, ` #`, leading or trailing spaces).
//!
//! Not reproduced: go-yaml folds long single-quoted scalars at spaces past 80
//! columns and writes multi-line strings as literal blocks; this writer keeps
//! every scalar on one line (double-quoted with `\n` when multi-line), which
//! reads back the same.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(BTreeMap<String, Node>),
}

impl Node {
    pub fn str(s: impl Into<String>) -> Self {
        Node::Str(s.into())
    }

    /// Converts a parsed YAML value (tags dropped, keys made strings).
    pub fn from_yaml(value: &serde_norway::Value) -> Self {
        use serde_norway::Value;
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Node::Int(i),
                None => Node::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Node::Str(s.clone()),
            Value::Sequence(items) => Node::Seq(items.iter().map(Node::from_yaml).collect()),
            Value::Mapping(map) => Node::Map(
                map.iter()
                    .map(|(k, v)| (key_string(k), Node::from_yaml(v)))
                    .collect(),
            ),
            Value::Tagged(tagged) => Node::from_yaml(&tagged.value),
        }
    }
}

impl Node {
    /// Converts a JSON value (how kubectl turns an object into YAML).
    pub fn from_json(value: &serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Node::Int(i),
                None => Node::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(map) => Node::Map(
                map.iter()
                    .map(|(k, v)| (k.clone(), Node::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// Writes a JSON object as a YAML document (`{}` for anything else).
pub fn json_to_string(value: &serde_json::Value) -> String {
    match Node::from_json(value) {
        Node::Map(map) => to_string(&map),
        _ => "{}\n".into(),
    }
}

fn key_string(key: &serde_norway::Value) -> String {
    use serde_norway::Value;
    match key {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "null".into(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Writes `map` as a YAML document.
pub fn to_string(map: &BTreeMap<String, Node>) -> String {
    let mut out = String::new();
    write_map(&mut out, map, 0, false);
    out
}

fn sorted(map: &BTreeMap<String, Node>) -> Vec<(&String, &Node)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| go_key_order(a.0, b.0));
    entries
}

/// `first_inline`: the map is a sequence item, its first key goes on the
/// `- ` line.
fn write_map(out: &mut String, map: &BTreeMap<String, Node>, indent: usize, first_inline: bool) {
    for (i, (key, value)) in sorted(map).into_iter().enumerate() {
        if i > 0 || !first_inline {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&scalar(key, true));
        out.push(':');
        write_value(out, value, indent, false);
    }
}

fn write_value(out: &mut String, value: &Node, indent: usize, in_seq: bool) {
    match value {
        Node::Map(m) if !m.is_empty() => {
            if !in_seq {
                out.push('\n');
            }
            write_map(out, m, indent + 2, in_seq);
        }
        Node::Seq(items) if !items.is_empty() => {
            if in_seq {
                // A sequence directly in a sequence: start it on a new line.
                out.push('\n');
                write_seq(out, items, indent + 2);
            } else {
                out.push('\n');
                write_seq(out, items, indent);
            }
        }
        scalar_node => {
            if !in_seq {
                out.push(' ');
            }
            out.push_str(&scalar_text(scalar_node));
            out.push('\n');
        }
    }
}

fn write_seq(out: &mut String, items: &[Node], indent: usize) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        out.push_str("- ");
        write_value(out, item, indent, true);
    }
}

fn scalar_text(node: &Node) -> String {
    match node {
        Node::Null => "null".into(),
        Node::Bool(b) => b.to_string(),
        Node::Int(i) => i.to_string(),
        Node::Float(f) if f.is_nan() => ".nan".into(),
        Node::Float(f) if f.is_infinite() => if *f > 0.0 { ".inf" } else { "-.inf" }.into(),
        Node::Float(f) => format!("{f:?}"),
        Node::Str(s) => scalar(s, false),
        Node::Map(_) => "{}".into(),
        Node::Seq(_) => "[]".into(),
    }
}

/// A string scalar in go-yaml v2's style (block context).
pub fn scalar(s: &str, simple_key: bool) -> String {
    if resolves_to_non_string(s) || s.contains('\n') {
        return double_quoted(s);
    }
    let a = analyze(s);
    if a.special_characters || a.space_break {
        return double_quoted(s);
    }
    let plain_ok = a.block_plain_allowed && !(s.is_empty() && simple_key);
    if plain_ok {
        return s.to_string();
    }
    if a.single_quoted_allowed {
        return format!("'{}'", s.replace('\'', "''"));
    }
    double_quoted(s)
}

fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            '\u{feff}' => out.push_str("\\uFEFF"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Default)]
struct Analysis {
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    special_characters: bool,
    space_break: bool,
}

/// go-yaml's `yaml_emitter_analyze_scalar`, for one-line block scalars.
fn analyze(s: &str) -> Analysis {
    let mut a = Analysis {
        block_plain_allowed: true,
        single_quoted_allowed: true,
        ..Analysis::default()
    };
    if s.is_empty() {
        a.block_plain_allowed = false;
        return a;
    }
    let chars: Vec<char> = s.chars().collect();
    let mut block_indicators = s.starts_with("---") || s.starts_with("...");
    let mut preceded_by_whitespace = true;
    let (mut leading_space, mut trailing_space) = (false, false);
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_whitespace = chars.get(i + 1).is_none_or(|n| *n == ' ' || *n == '\t');
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' if followed_by_whitespace => block_indicators = true,
                '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        let printable = matches!(c, '\t' | '\n' | '\r' | '\u{85}')
            || ('\u{20}'..='\u{7e}').contains(&c)
            || ('\u{a0}'..='\u{d7ff}').contains(&c)
            || (('\u{e000}'..='\u{fffd}').contains(&c) && c != '\u{feff}')
            || c >= '\u{10000}';
        if !printable {
            a.special_characters = true;
        }
        if c == ' ' {
            if i == 0 {
                leading_space = true;
            }
            if i + 1 == chars.len() {
                trailing_space = true;
            }
        }
        preceded_by_whitespace = c == ' ' || c == '\t';
    }
    if leading_space || trailing_space || block_indicators {
        a.block_plain_allowed = false;
    }
    a
}

/// go-yaml v2 `resolve`: would this text, written plain, read back as
/// something other than a string?
fn resolves_to_non_string(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "", "~", "null", "Null", "NULL", "y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true",
        "True", "TRUE", "n", "N", "no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE",
        ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF", "<<",
    ];
    if SPECIAL.contains(&s) {
        return true;
    }
    let Some(first) = s.chars().next() else {
        return true;
    };
    if first == '.' {
        return is_yaml_float(s);
    }
    if !(first.is_ascii_digit() || first == '+' || first == '-') {
        return false;
    }
    if is_timestamp(s) || is_base60_float(s) {
        return true;
    }
    let plain: String = s.chars().filter(|&c| c != '_').collect();
    is_go_int(&plain) || is_yaml_float(&plain)
}

/// What Go's `strconv.ParseInt(s, 0, 64)` / `ParseUint` accept (ignoring range).
fn is_go_int(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let all = |d: &str, radix: u32| !d.is_empty() && d.chars().all(|c| c.is_digit(radix));
    if let Some(d) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        return all(d, 16);
    }
    if let Some(d) = digits
        .strip_prefix("0b")
        .or_else(|| digits.strip_prefix("0B"))
    {
        return all(d, 2);
    }
    if let Some(d) = digits
        .strip_prefix("0o")
        .or_else(|| digits.strip_prefix("0O"))
    {
        return all(d, 8);
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return all(&digits[1..], 8);
    }
    all(digits, 10)
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn is_yaml_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$`
fn is_base60_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    if frac.is_some_and(|f| !f.bytes().all(|b| b.is_ascii_digit() || b == b'_')) {
        return false;
    }
    let mut parts = main.split(':');
    let head = parts.next().unwrap_or("");
    let head_ok = head.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && head.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    let rest: Vec<&str> = parts.collect();
    head_ok
        && !rest.is_empty()
        && rest.iter().all(|p| match p.as_bytes() {
            [d] => d.is_ascii_digit(),
            [a, b] => (b'0'..=b'5').contains(a) && b.is_ascii_digit(),
            _ => false,
        })
}

/// A YAML timestamp go-yaml would parse: `YYYY-M-D`, optionally followed by
/// `T`, `t` or a space and a time.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 8 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let rest = &s[5..];
    let (date, time) = match rest.find(['T', 't', ' ']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let Some((m, d)) = date.split_once('-') else {
        return false;
    };
    let num12 = |x: &str| (1..=2).contains(&x.len()) && x.bytes().all(|c| c.is_ascii_digit());
    num12(m)
        && num12(d)
        && time.is_none_or(|t| {
            let mut it = t.splitn(3, ':');
            let (h, mi) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            num12(h) && it.next().is_some() && num12(mi)
        })
}

/// go-yaml v2's key order (`keyList.Less`).
pub fn go_key_order(a: &str, b: &str) -> Ordering {
    let ar: Vec<char> = a.chars().collect();
    let br: Vec<char> = b.chars().collect();
    let mut i = 0;
    while i < ar.len() && i < br.len() {
        if ar[i] == br[i] {
            i += 1;
            continue;
        }
        let al = ar[i].is_alphabetic();
        let bl = br[i].is_alphabetic();
        if al && bl {
            return ar[i].cmp(&br[i]);
        }
        if al || bl {
            return if bl {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        let (mut an, mut bn) = (0i64, 0i64);
        if ar[i] == '0' || br[i] == '0' {
            let mut j = i;
            while j > 0 && ar[j - 1].is_ascii_digit() {
                j -= 1;
                if ar[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let mut ai = i;
        while ai < ar.len() && ar[ai].is_ascii_digit() {
            an = an.wrapping_mul(10).wrapping_add(ar[ai] as i64 - '0' as i64);
            ai += 1;
        }
        let mut bi = i;
        while bi < br.len() && br[bi].is_ascii_digit() {
            bn = bn.wrapping_mul(10).wrapping_add(br[bi] as i64 - '0' as i64);
            bi += 1;
        }
        if an != bn {
            return an.cmp(&bn);
        }
        if ai != bi {
            return ai.cmp(&bi);
        }
        return ar[i].cmp(&br[i]);
    }
    ar.len().cmp(&br.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_styles_match_go_yaml() {
        for (input, want) in [
            ("v2", "v2"),
            ("ratings-vm", "ratings-vm"),
            (
                "istiod.istio-system.svc:15012",
                "istiod.istio-system.svc:15012",
            ),
            ("true", "\"true\""),
            ("", "\"\""),
            ("2", "\"2\""),
            ("1.5", "\"1.5\""),
            ("0x1F", "\"0x1F\""),
            ("1_000", "\"1_000\""),
            ("2024-01-02", "\"2024-01-02\""),
            ("1:20", "\"1:20\""),
            ("null", "\"null\""),
            ("no", "\"no\""),
            ("nothing", "nothing"),
            ("1.2.3", "1.2.3"),
            (r#"{"app":"ratings"}"#, r#"'{"app":"ratings"}'"#),
            (
                r#"[{"name":"http","containerPort":9080,"protocol":""}]"#,
                r#"'[{"name":"http","containerPort":9080,"protocol":""}]'"#,
            ),
            (
                "payments team's batch VMs (ticket #4711)",
                "'payments team''s batch VMs (ticket #4711)'",
            ),
            ("a: b", "'a: b'"),
            ("a:b", "a:b"),
            ("- x", "'- x'"),
            (" lead", "' lead'"),
            ("*", "'*'"),
            ("two\nlines", "\"two\\nlines\""),
            ("bell\u{7}", "\"bell\\x07\""),
        ] {
            assert_eq!(scalar(input, false), want, "{input:?}");
        }
    }

    #[test]
    fn keys_in_go_yaml_order() {
        let mut keys = vec![
            "ISTIO_METAJSON_LABELS",
            "ISTIO_META_WORKLOAD_NAME",
            "POD_NAMESPACE",
            "CANONICAL_SERVICE",
            "ISTIO_META_AUTO_REGISTER_GROUP",
            "a10",
            "a9",
            "CANONICAL_REVISION",
        ];
        keys.sort_by(|a, b| go_key_order(a, b));
        assert_eq!(
            keys,
            [
                "CANONICAL_REVISION",
                "CANONICAL_SERVICE",
                "ISTIO_META_AUTO_REGISTER_GROUP",
                "ISTIO_META_WORKLOAD_NAME",
                "ISTIO_METAJSON_LABELS",
                "POD_NAMESPACE",
                "a9",
                "a10",
            ]
        );
    }

    #[test]
    fn block_layout() {
        let mut probe = BTreeMap::new();
        probe.insert(
            "exec".to_string(),
            Node::Map(BTreeMap::from([(
                "command".to_string(),
                Node::Seq(vec![Node::str("/bin/check"), Node::str("--ready")]),
            )])),
        );
        probe.insert(
            "headers".to_string(),
            Node::Seq(vec![Node::Map(BTreeMap::from([
                ("name".to_string(), Node::str("x")),
                ("value".to_string(), Node::str("1")),
            ]))]),
        );
        probe.insert("periodSeconds".to_string(), Node::Int(5));
        probe.insert("empty".to_string(), Node::Map(BTreeMap::new()));
        let doc = BTreeMap::from([("defaultConfig".to_string(), Node::Map(probe))]);
        assert_eq!(
            to_string(&doc),
            "defaultConfig:\n  empty: {}\n  exec:\n    command:\n    - /bin/check\n    - --ready\n  headers:\n  - name: x\n    value: \"1\"\n  periodSeconds: 5\n"
        );
        // And it reads back.
        let back: serde_norway::Value = serde_norway::from_str(&to_string(&doc)).unwrap();
        assert_eq!(back["defaultConfig"]["headers"][0]["value"], "1");
    }
}
