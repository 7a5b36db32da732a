//! cluster.env as istioctl writes it: `KEY=value` lines sorted as whole
//! lines, values quoted by istio's `shellescape.Quote`.

use std::collections::BTreeMap;

/// Characters istio's quoter leaves unquoted. Its pattern
/// `[^\\w@%+=:,./-]` is a raw regular expression in which `\\w` is a literal
/// backslash and a `w`, not the word class: so `v2` is quoted but `www` is
/// not.
const SAFE: &[char] = &['\\', 'w', '@', '%', '+', '=', ':', ',', '.', '/', '-'];

/// Quotes `s` for a POSIX shell as istio's `shellescape.Quote` does.
pub fn quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    if s.chars().all(|c| SAFE.contains(&c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// The env file for `vars`: one `KEY=quoted` line each, sorted, newline-terminated.
pub fn env_file(vars: &BTreeMap<String, String>) -> String {
    let mut lines: Vec<String> = vars
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect();
    lines.sort();
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_istioctl() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("v2"), "'v2'");
        assert_eq!(quote("www"), "www");
        assert_eq!(quote("-.-"), "-.-");
        assert_eq!(quote("*"), "'*'");
        assert_eq!(
            quote("payments team's batch VMs (ticket #4711)"),
            r#"'payments team'"'"'s batch VMs (ticket #4711)'"#
        );
    }

    #[test]
    fn lines_sorted_as_lines() {
        let vars = BTreeMap::from([
            ("A".to_string(), "x".to_string()),
            ("A1".to_string(), "y".to_string()),
            ("ISTIO_META_X".to_string(), "z".to_string()),
            ("ISTIO_METAJSON_LABELS".to_string(), "{}".to_string()),
        ]);
        assert_eq!(
            env_file(&vars),
            "A1='y'\nA='x'\nISTIO_METAJSON_LABELS='{}'\nISTIO_META_X='z'\n"
        );
    }
}
