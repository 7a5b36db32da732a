//! Outbound addresses: each Service gets a loopback address of its own on
//! the proxy's host, where that proxy's Envoy listens for the Service's
//! ports. The DNS proxy answers the Service's name with that address, so an
//! app that resolves `product.default.svc.cluster.local` and connects lands
//! on Envoy without any traffic capture (no iptables).
//!
//! A Service keeps its address as long as it exists: the address is taken
//! from the low bits of its cluster IP (`10.96.88.12` → `127.240.88.12` in
//! the default `127.240.0.0/16`), and only a collision moves it (to the next
//! free address, in Service order). Headless Services get none: their names
//! resolve to their endpoints' own addresses. The block is per proxy (node metadata
//! [`OUTBOUND_ADDRESSES_METADATA`]), so several proxies sharing one host —
//! tests, the demo — do not listen on each other's addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::MeshService;

/// The node metadata key (`ISTIO_META_MESHVM_OUTBOUND_ADDRESSES` on the
/// agent) that sets a proxy's block.
pub const OUTBOUND_ADDRESSES_METADATA: &str = "MESHVM_OUTBOUND_ADDRESSES";
/// The block when the proxy does not name one.
pub const DEFAULT_OUTBOUND_ADDRESSES: &str = "127.240.0.0/16";

/// A block of loopback IPv4 addresses, `127.x.y.z/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressBlock {
    base: u32,
    prefix_len: u8,
}

/// Why a block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressBlockError {
    #[error("`{0}` is not an IPv4 block (expected e.g. 127.240.0.0/16)")]
    Syntax(String),
    #[error("`{0}` is not inside the loopback range 127.0.0.0/8")]
    NotLoopback(String),
    #[error("`{0}` is too small: use a prefix between /8 and /24")]
    Size(String),
}

impl FromStr for AddressBlock {
    type Err = AddressBlockError;

    fn from_str(text: &str) -> Result<Self, AddressBlockError> {
        let syntax = || AddressBlockError::Syntax(text.to_string());
        let (addr, len) = text.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = len.parse().map_err(|_| syntax())?;
        if !(8..=24).contains(&prefix_len) {
            return Err(AddressBlockError::Size(text.to_string()));
        }
        if !addr.is_loopback() {
            return Err(AddressBlockError::NotLoopback(text.to_string()));
        }
        let mask = u32::MAX << (32 - prefix_len);
        Ok(AddressBlock {
            base: u32::from(addr) & mask,
            prefix_len,
        })
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix_len)
    }
}

impl Default for AddressBlock {
    fn default() -> Self {
        DEFAULT_OUTBOUND_ADDRESSES.parse().expect("valid default")
    }
}

impl AddressBlock {
    fn size(&self) -> u32 {
        1 << (32 - self.prefix_len)
    }

    /// Offsets whose last octet is 0 or 255 are skipped: they read like
    /// network and broadcast addresses.
    fn usable(&self, offset: u32) -> bool {
        let last = (self.base + offset) & 0xff;
        offset != 0 && last != 0 && last != 255
    }

    /// The address of every non-headless Service of `services`, by hostname.
    pub fn assign(&self, services: &[MeshService]) -> BTreeMap<String, Ipv4Addr> {
        let mut taken = BTreeSet::new();
        let mut assigned = BTreeMap::new();
        for service in services {
            let Some(cluster_ip) = service.cluster_ip else {
                continue;
            };
            let preferred = match cluster_ip {
                std::net::IpAddr::V4(v4) => u32::from(v4),
                std::net::IpAddr::V6(v6) => {
                    let bits = u128::from(v6);
                    (bits & 0xffff_ffff) as u32
                }
            } % self.size();
            let mut offset = preferred;
            // Linear probing; the block holds far more addresses than a
            // mesh has Services, so this ends.
            for _ in 0..self.size() {
                if self.usable(offset) && !taken.contains(&offset) {
                    break;
                }
                offset = (offset + 1) % self.size();
            }
            taken.insert(offset);
            assigned.insert(service.hostname.clone(), Ipv4Addr::from(self.base + offset));
        }
        assigned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(host: &str, ip: &str) -> MeshService {
        MeshService {
            name: host.into(),
            namespace: "default".into(),
            hostname: host.into(),
            cluster_ip: Some(ip.parse().unwrap()),
            selector: Default::default(),
            ports: Vec::new(),
            identities: Default::default(),
        }
    }

    #[test]
    fn blocks_parse_and_refuse_what_is_not_a_loopback_block() {
        let block: AddressBlock = "127.240.7.9/16".parse().unwrap();
        assert_eq!(block.to_string(), "127.240.0.0/16");
        assert_eq!(
            AddressBlock::default().to_string(),
            DEFAULT_OUTBOUND_ADDRESSES
        );
        assert!(matches!(
            "10.0.0.0/16".parse::<AddressBlock>(),
            Err(AddressBlockError::NotLoopback(_))
        ));
        assert!(matches!(
            "127.0.0.0/30".parse::<AddressBlock>(),
            Err(AddressBlockError::Size(_))
        ));
        for bad in ["127.0.0.1", "127.0.0.0/x", "nope/16"] {
            assert!(
                matches!(
                    bad.parse::<AddressBlock>(),
                    Err(AddressBlockError::Syntax(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn addresses_follow_cluster_ips_and_collisions_move_to_the_next_free_one() {
        let block = AddressBlock::default();
        let services = [
            service("a", "10.96.88.12"),
            service("b", "10.97.88.12"), // same low 16 bits as a
            service("c", "10.96.0.0"),   // would be .0
            service("d", "10.96.14.255"),
        ];
        let assigned = block.assign(&services);
        assert_eq!(assigned["a"], Ipv4Addr::new(127, 240, 88, 12));
        assert_eq!(assigned["b"], Ipv4Addr::new(127, 240, 88, 13));
        assert_eq!(assigned["c"], Ipv4Addr::new(127, 240, 0, 1));
        assert_eq!(assigned["d"], Ipv4Addr::new(127, 240, 15, 1));
        // Another block, the same low bits.
        let other: AddressBlock = "127.11.0.0/16".parse().unwrap();
        assert_eq!(
            other.assign(&services[..1])["a"],
            Ipv4Addr::new(127, 11, 88, 12)
        );
    }
}
