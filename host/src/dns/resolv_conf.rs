//! The parts of resolv.conf the DNS proxy needs: the upstream nameservers
//! (to forward what the mesh does not know) and the search domains (the
//! first one gets CNAMEs, so `ratings.vm-ns` resolves through the search
//! list the way Kubernetes names do in a pod).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// Nameservers and search domains, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Reads `path`; a missing or unreadable file is an empty configuration
    /// (the proxy then answers mesh names only), logged.
    pub fn load(path: &Path) -> Self {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "DNS: cannot read resolv.conf; no upstream, no search domain");
                Self::default()
            }
        }
    }

    /// Parses resolv.conf text: `nameserver ADDR` lines (port 53; an IPv6
    /// zone is dropped), the last `search`/`domain` line wins as in libc.
    pub fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let Some(addr) = words.next() else { continue };
                    let addr = addr.split('%').next().unwrap_or(addr);
                    if let Ok(ip) = addr.parse::<IpAddr>() {
                        conf.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("search") | Some("domain") => {
                    conf.search = words
                        .map(|w| w.trim_matches('.').to_string())
                        .filter(|w| !w.is_empty())
                        .collect();
                }
                _ => {}
            }
        }
        conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_and_search() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n\
             domain first.example\nsearch ec2.internal. corp ; trailing\noptions ndots:5\n",
        );
        assert_eq!(
            conf.nameservers,
            [
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(conf.search, ["ec2.internal", "corp"]);
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }
}
