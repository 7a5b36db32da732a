//! `hosts`: `/etc/hosts` lines istioctl writes so the VM can reach istiod by
//! the name in its certificate, e.g. `34.120.10.7 istiod.istio-system.svc`
//! (empty when istioctl found no gateway IP).

use std::net::IpAddr;

use serde::Serialize;

/// One `/etc/hosts` line: an address and its names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostsEntry {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

impl std::fmt::Display for HostsEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.ip, self.names.join(" "))
    }
}

/// Where and why a hosts file does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    pub problem: String,
}

/// Parses `/etc/hosts` syntax: `IP name [alias...]`, `#` comments, blank lines.
pub fn parse(text: &str) -> Result<Vec<HostsEntry>, HostsError> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or_default();
        let mut fields = fields_with_columns(content);
        let Some((ip_col, ip_text)) = fields.next() else {
            continue;
        };
        let ip: IpAddr = ip_text.parse().map_err(|_| HostsError {
            line,
            column: ip_col,
            problem: format!("`{ip_text}` is not an IP address (a line is `IP name [alias...]`)"),
        })?;
        let mut names = Vec::new();
        for (column, name) in fields {
            if let Some(bad) = name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(HostsError {
                    line,
                    column,
                    problem: format!("`{name}` is not a host name (`{bad}`)"),
                });
            }
            names.push(name.to_string());
        }
        if names.is_empty() {
            return Err(HostsError {
                line,
                column: ip_col + ip_text.chars().count(),
                problem: format!("no host name after `{ip_text}`"),
            });
        }
        entries.push(HostsEntry { ip, names });
    }
    Ok(entries)
}

/// Whitespace-separated fields with their 1-based character columns.
fn fields_with_columns(line: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut column = 1;
    let mut rest = line;
    std::iter::from_fn(move || {
        let skipped = rest.len() - rest.trim_start().len();
        column += rest[..skipped].chars().count();
        rest = &rest[skipped..];
        if rest.is_empty() {
            return None;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (field, after) = rest.split_at(end);
        let at = column;
        column += field.chars().count();
        rest = after;
        Some((at, field))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istioctl_hosts() {
        let entries = parse("34.120.10.7 istiod.istio-system.svc\n").unwrap();
        assert_eq!(
            entries,
            [HostsEntry {
                ip: "34.120.10.7".parse().unwrap(),
                names: vec!["istiod.istio-system.svc".into()],
            }]
        );
        assert_eq!(
            entries[0].to_string(),
            "34.120.10.7 istiod.istio-system.svc"
        );
        // istioctl writes an empty file when it found no gateway IP.
        assert!(parse("").unwrap().is_empty());
        // An older istioctl wrote no trailing newline.
        assert_eq!(
            parse("10.10.10.11 istiod-rev-1.istio-system.svc")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn system_hosts_syntax() {
        let text = "# static table\n127.0.0.1\tlocalhost\n\n::1  localhost ip6-localhost  # v6\n\
                    fd00:10:96::1 istiod.istio-system.svc\n";
        let entries = parse(text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].names, ["localhost", "ip6-localhost"]);
        assert!(entries[2].ip.is_ipv6());
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("# x\nistiod.istio-system.svc 34.120.10.7\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 1));
        assert!(
            e.problem
                .contains("`istiod.istio-system.svc` is not an IP address")
        );
        let e = parse("  34.120.10.7   \n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 14));
        assert_eq!(e.problem, "no host name after `34.120.10.7`");
        let e = parse("34.120.10.7 istiod,svc\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 13));
        assert!(e.problem.contains("not a host name (`,`)"));
    }
}
