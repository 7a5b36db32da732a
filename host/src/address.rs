//! The VM's own addresses: the one the mesh knows it by (the first entry of
//! node metadata `INSTANCE_IPS`, the address of its WorkloadEntry and part of
//! Envoy's node id), and every other private address of the host.
//!
//! Istio's start script takes the first word of `hostname --all-ip-addresses`
//! when `ISTIO_SVC_IP` is unset, which picks a Docker bridge or a link-local
//! IPv6 address often enough to be a top complaint. Here the choice is, in
//! order:
//!
//! 1. `INSTANCE_IP` / `ISTIO_SVC_IP` from the configuration (istioctl's
//!    `--internalIP`/`--externalIP`), taken as given: it may be a NAT address
//!    that no local interface carries;
//! 2. an interface named by the operator (`--interface`, or the
//!    [`INTERFACE_ENV`] variable): its IPv4 address, else its first global
//!    IPv6 address;
//! 3. the first usable address of the host, IPv4 preferred.
//!
//! A missing interface, or an interface without a usable address, is an
//! error that lists every candidate; an automatic choice among several
//! candidates is logged with all of them, so a wrong pick is easy to spot
//! and to override.
//!
//! `INSTANCE_IPS` is then the chosen address followed by every private
//! address of the host, as Istio's agent computes it (istio/istio:
//! pilot/cmd/pilot-agent/app/cmd.go `initProxy`, pilot/pkg/util/network/ip.go
//! `GetPrivateIPsIfAvailable`): addresses of interfaces that are up and not
//! loopback, without loopback, link-local or unspecified addresses, IPv4
//! mapped IPv6 addresses unwrapped, duplicates removed, and `127.0.0.1`,
//! `::1` when there are none.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Config;

/// The environment variable that names the interface whose address is the
/// VM's mesh address (the same as the agent's `--interface` option).
pub const INTERFACE_ENV: &str = "MESHVM_INTERFACE";

/// One address of one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The interface's name, e.g. `eth0`.
    pub interface: String,
    pub ip: IpAddr,
    /// The interface is administratively up.
    pub up: bool,
    /// The interface is a loopback interface.
    pub loopback: bool,
}

impl fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.ip, self.interface)?;
        if !self.up {
            f.write_str(" (down)")?;
        }
        Ok(())
    }
}

/// How the VM's mesh address was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSource {
    /// `INSTANCE_IP` or `ISTIO_SVC_IP`.
    Configured,
    /// The address of the named interface.
    Interface(String),
    /// The first usable address of the host (this interface).
    FirstUsable(String),
}

impl fmt::Display for AddressSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Configured => f.write_str("INSTANCE_IP/ISTIO_SVC_IP"),
            Self::Interface(name) => write!(f, "interface {name}"),
            Self::FirstUsable(name) => write!(f, "first usable address, on {name}"),
        }
    }
}

/// The VM's addresses as the mesh sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAddresses {
    /// The address in the node id and the WorkloadEntry.
    pub primary: IpAddr,
    /// How `primary` was chosen.
    pub source: AddressSource,
    /// Node metadata `INSTANCE_IPS`: `primary` first, then the host's
    /// private addresses, without duplicates.
    pub instance_ips: Vec<IpAddr>,
}

impl ProxyAddresses {
    /// Chooses the addresses from the configuration, the operator's
    /// interface (if any) and the host's interfaces.
    pub fn detect(config: &Config, interface: Option<&str>) -> Result<Self, AddressError> {
        let candidates = host_addresses()?;
        let chosen = select(config.instance_ip, interface, &candidates)?;
        if chosen.source == AddressSource::Configured
            && !candidates.iter().any(|c| c.ip == chosen.primary)
        {
            tracing::info!(
                address = %chosen.primary,
                "the configured INSTANCE_IP/ISTIO_SVC_IP is on no local interface \
                 (fine behind NAT; otherwise check istioctl's --internalIP/--externalIP)"
            );
        }
        tracing::info!(
            address = %chosen.primary,
            source = %chosen.source,
            instance_ips = %join(&chosen.instance_ips),
            "the VM's mesh address"
        );
        Ok(chosen)
    }

    /// `true` when every address is IPv6 (Envoy then binds and connects
    /// over IPv6, as Istio's agent decides).
    pub fn all_ipv6(&self) -> bool {
        self.instance_ips.iter().all(IpAddr::is_ipv6)
    }
}

/// Why the VM's address could not be chosen. Each message lists what the
/// host has, so the operator can pick with `--interface` or `ISTIO_SVC_IP`.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The interfaces could not be listed.
    #[error("listing the network interfaces: {0}")]
    List(#[source] std::io::Error),
    /// The named interface does not exist.
    #[error("no network interface named `{name}`; the host has: {}", list(.candidates))]
    NoSuchInterface {
        name: String,
        candidates: Vec<InterfaceAddress>,
    },
    /// The named interface has no address that can identify the VM.
    #[error(
        "interface `{name}` has no usable address (up, not loopback or link-local); \
         the host has: {}", list(.candidates)
    )]
    NoUsableAddressOn {
        name: String,
        candidates: Vec<InterfaceAddress>,
    },
    /// No interface has an address that can identify the VM.
    #[error(
        "no usable address (an interface that is up, an address that is not loopback or \
         link-local); set ISTIO_SVC_IP or name an interface; the host has: {}",
        list(.candidates)
    )]
    NoUsableAddress { candidates: Vec<InterfaceAddress> },
}

fn list(candidates: &[InterfaceAddress]) -> String {
    if candidates.is_empty() {
        return "no addresses".into();
    }
    candidates
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every address of every interface of this host (`getifaddrs`), in the
/// kernel's order.
pub fn host_addresses() -> Result<Vec<InterfaceAddress>, AddressError> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| AddressError::List(e.into()))?;
    Ok(addrs
        .filter_map(|a| {
            let storage = a.address?;
            let ip = if let Some(v4) = storage.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(storage.as_sockaddr_in6()?.ip())
            };
            Some(InterfaceAddress {
                interface: a.interface_name,
                ip,
                up: a.flags.contains(InterfaceFlags::IFF_UP),
                loopback: a.flags.contains(InterfaceFlags::IFF_LOOPBACK),
            })
        })
        .collect())
}

/// Whether Istio counts `ip` as a private address of the host: not
/// loopback, link-local, multicast or unspecified. (Istio treats an
/// unspecified address as "not ready yet"; here it is simply skipped.)
fn usable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6.is_unspecified()
                || v6.is_multicast())
        }
    }
}

/// The host's private addresses as Istio lists them: usable addresses of
/// interfaces that are up and not loopback, in order, without duplicates.
pub fn private_ips(candidates: &[InterfaceAddress]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for c in candidates {
        let ip = c.ip.to_canonical();
        if c.up && !c.loopback && usable(ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The first IPv4 address, else the first address.
fn prefer_ipv4<'a>(
    mut usable: impl Iterator<Item = &'a InterfaceAddress> + Clone,
) -> Option<&'a InterfaceAddress> {
    usable
        .clone()
        .find(|c| c.ip.to_canonical().is_ipv4())
        .or_else(|| usable.next())
}

/// Chooses the VM's addresses from the configured address, the operator's
/// interface and the host's `candidates` (see the module documentation).
/// Pure: [`ProxyAddresses::detect`] supplies the host's addresses.
pub fn select(
    configured: Option<IpAddr>,
    interface: Option<&str>,
    candidates: &[InterfaceAddress],
) -> Result<ProxyAddresses, AddressError> {
    let is_usable = |c: &&InterfaceAddress| c.up && !c.loopback && usable(c.ip);
    let (primary, source) = match (configured, interface) {
        (Some(ip), _) => (ip.to_canonical(), AddressSource::Configured),
        (None, Some(name)) => {
            if !candidates.iter().any(|c| c.interface == name) {
                return Err(AddressError::NoSuchInterface {
                    name: name.into(),
                    candidates: candidates.to_vec(),
                });
            }
            let on_interface = candidates
                .iter()
                .filter(|c| c.interface == name)
                .filter(is_usable);
            let chosen = prefer_ipv4(on_interface.clone()).ok_or_else(|| {
                AddressError::NoUsableAddressOn {
                    name: name.into(),
                    candidates: candidates.to_vec(),
                }
            })?;
            if on_interface.clone().count() > 1 {
                tracing::info!(
                    interface = name,
                    chosen = %chosen.ip,
                    all = %list(&on_interface.cloned().collect::<Vec<_>>()),
                    "the interface has several addresses; using its first IPv4 address \
                     (set ISTIO_SVC_IP to choose another)"
                );
            }
            (
                chosen.ip.to_canonical(),
                AddressSource::Interface(name.into()),
            )
        }
        (None, None) => {
            let all = candidates.iter().filter(is_usable);
            let chosen = prefer_ipv4(all.clone()).ok_or_else(|| AddressError::NoUsableAddress {
                candidates: candidates.to_vec(),
            })?;
            if all.clone().count() > 1 {
                tracing::warn!(
                    chosen = %chosen,
                    all = %list(&all.cloned().collect::<Vec<_>>()),
                    "several addresses could identify this VM; using the first IPv4 one \
                     (set ISTIO_SVC_IP or name an interface to choose)"
                );
            }
            (
                chosen.ip.to_canonical(),
                AddressSource::FirstUsable(chosen.interface.clone()),
            )
        }
    };
    let mut instance_ips = vec![primary];
    let mut others = private_ips(candidates);
    if others.is_empty() {
        others = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
    }
    for ip in others {
        if !instance_ips.contains(&ip) {
            instance_ips.push(ip);
        }
    }
    Ok(ProxyAddresses {
        primary,
        source,
        instance_ips,
    })
}

/// The short host name (up to the first `.`), the default `POD_NAME` on a
/// VM as Istio's start script sets it (`hostname -s`).
pub fn short_hostname() -> std::io::Result<String> {
    let name = nix::unistd::gethostname().map_err(std::io::Error::from)?;
    let name = name.to_string_lossy();
    Ok(name.split('.').next().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, ip: &str) -> InterfaceAddress {
        InterfaceAddress {
            interface: interface.into(),
            ip: ip.parse().unwrap(),
            up: true,
            loopback: interface == "lo",
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn host() -> Vec<InterfaceAddress> {
        vec![
            addr("lo", "127.0.0.1"),
            addr("lo", "::1"),
            addr("eth0", "fe80::1"),
            addr("eth0", "2001:db8::10"),
            addr("eth0", "10.0.0.12"),
            addr("docker0", "172.17.0.1"),
            addr("eth1", "169.254.3.4"),
            InterfaceAddress {
                up: false,
                ..addr("eth2", "192.168.9.9")
            },
        ]
    }

    #[test]
    fn configured_address_wins_and_leads_instance_ips() {
        let a = select(Some("10.9.9.9".parse().unwrap()), Some("eth0"), &host()).unwrap();
        assert_eq!(a.primary, "10.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(a.source, AddressSource::Configured);
        assert_eq!(
            a.instance_ips,
            ips(&["10.9.9.9", "2001:db8::10", "10.0.0.12", "172.17.0.1"])
        );
        // A configured address that is also local is not repeated.
        let a = select(Some("172.17.0.1".parse().unwrap()), None, &host()).unwrap();
        assert_eq!(
            a.instance_ips,
            ips(&["172.17.0.1", "2001:db8::10", "10.0.0.12"])
        );
        // IPv4-mapped IPv6 is unwrapped, as Istio does.
        let a = select(Some("::ffff:10.1.2.3".parse().unwrap()), None, &[]).unwrap();
        assert_eq!(a.primary, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn interface_prefers_ipv4_then_global_ipv6() {
        let a = select(None, Some("eth0"), &host()).unwrap();
        assert_eq!(a.primary, "10.0.0.12".parse::<IpAddr>().unwrap());
        assert_eq!(a.source, AddressSource::Interface("eth0".into()));
        assert_eq!(
            a.instance_ips,
            ips(&["10.0.0.12", "2001:db8::10", "172.17.0.1"])
        );
        let v6only = vec![addr("eth0", "fe80::1"), addr("eth0", "2001:db8::10")];
        let a = select(None, Some("eth0"), &v6only).unwrap();
        assert_eq!(a.primary, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert!(a.all_ipv6());
    }

    #[test]
    fn missing_interface_lists_every_candidate() {
        let e = select(None, Some("ens5"), &host()).unwrap_err();
        assert!(matches!(e, AddressError::NoSuchInterface { .. }));
        assert_eq!(
            e.to_string(),
            "no network interface named `ens5`; the host has: 127.0.0.1 on lo, ::1 on lo, \
             fe80::1 on eth0, 2001:db8::10 on eth0, 10.0.0.12 on eth0, 172.17.0.1 on docker0, \
             169.254.3.4 on eth1, 192.168.9.9 on eth2 (down)"
        );
        for name in ["eth1", "eth2", "lo"] {
            let e = select(None, Some(name), &host()).unwrap_err();
            assert!(
                matches!(&e, AddressError::NoUsableAddressOn { name: n, .. } if n == name),
                "{e}"
            );
            assert!(e.to_string().contains("10.0.0.12 on eth0"), "{e}");
        }
    }

    #[test]
    fn automatic_choice_is_the_first_usable_ipv4() {
        let a = select(None, None, &host()).unwrap();
        assert_eq!(a.primary, "10.0.0.12".parse::<IpAddr>().unwrap());
        assert_eq!(a.source, AddressSource::FirstUsable("eth0".into()));
        let v6only = vec![addr("lo", "::1"), addr("eth0", "2001:db8::10")];
        let a = select(None, None, &v6only).unwrap();
        assert_eq!(a.primary, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(a.instance_ips, ips(&["2001:db8::10"]));
    }

    #[test]
    fn no_usable_address_is_an_error_unless_configured() {
        let only_loopback = vec![addr("lo", "127.0.0.1"), addr("eth0", "fe80::1")];
        let e = select(None, None, &only_loopback).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no usable address (an interface that is up, an address that is not loopback or \
             link-local); set ISTIO_SVC_IP or name an interface; the host has: 127.0.0.1 on lo, \
             fe80::1 on eth0"
        );
        // With a configured address, Istio's loopback fallback fills INSTANCE_IPS.
        let a = select(Some("10.0.0.12".parse().unwrap()), None, &only_loopback).unwrap();
        assert_eq!(a.instance_ips, ips(&["10.0.0.12", "127.0.0.1", "::1"]));
        assert!(!a.all_ipv6());
    }

    #[test]
    fn private_ips_follow_istio() {
        assert_eq!(
            private_ips(&host()),
            ips(&["2001:db8::10", "10.0.0.12", "172.17.0.1"])
        );
        let dup = vec![addr("eth0", "10.0.0.1"), addr("eth0:1", "10.0.0.1")];
        assert_eq!(private_ips(&dup), ips(&["10.0.0.1"]));
    }

    #[test]
    fn this_host_has_addresses() {
        let all = host_addresses().unwrap();
        assert!(all.iter().any(|a| a.loopback), "{all:?}");
        assert!(!short_hostname().unwrap().contains('.'));
    }
}
