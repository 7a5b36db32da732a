//! Who a proxy says it is: the Envoy `Node` of its first xDS request,
//! parsed as istiod parses it (istio/istio `pilot/pkg/model/context.go`,
//! `ParseServiceNodeWithMetadata`), so a node istiod would refuse is refused
//! here with the same cause.
//!
//! - The id is `<type>~<ip>~<name>.<namespace>~<namespace>.svc.<domain>`:
//!   exactly four `~`-separated parts, the type one of [`NodeType`].
//! - The metadata (a `google.protobuf.Struct`) is decoded into
//!   [`NodeMetadata`] by JSON type, as istiod's `json.Unmarshal` does: a
//!   known key of the wrong type (`DNS_CAPTURE: true` instead of `"true"`)
//!   refuses the node; unknown keys are kept in [`NodeMetadata::raw`].
//! - The proxy's IPs are `INSTANCE_IPS` if every one is valid, else the id's
//!   second part; none is an error.
//! - The config namespace is `NAMESPACE`, else the first label of the id's
//!   DNS domain.

mod metadata;

use std::fmt;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};

pub use metadata::NodeMetadata;

/// What kind of proxy a node is (the id's first part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeType {
    Sidecar,
    Router,
    Waypoint,
    Ztunnel,
    AgentGateway,
}

impl NodeType {
    /// Every type, as written in node ids.
    pub const ALL: [NodeType; 5] = [
        NodeType::Sidecar,
        NodeType::Router,
        NodeType::Waypoint,
        NodeType::Ztunnel,
        NodeType::AgentGateway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Sidecar => "sidecar",
            NodeType::Router => "router",
            NodeType::Waypoint => "waypoint",
            NodeType::Ztunnel => "ztunnel",
            NodeType::AgentGateway => "agentgateway",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

impl fmt::Display for NodeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a node is refused. Every one is an `InvalidArgument` for the stream
/// that sent it ([`NodeError::code`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    #[error("missing node information")]
    Missing,
    #[error(
        "missing parts in the service node {id:?} (expected 4 parts separated by `~`, got {parts})"
    )]
    Parts { id: String, parts: usize },
    #[error(
        "invalid node type {node_type:?} in the service node {id:?} (valid types: sidecar, router, waypoint, ztunnel, agentgateway)"
    )]
    NodeType { id: String, node_type: String },
    #[error("no valid IP address in the service node id {id:?} or metadata INSTANCE_IPS")]
    NoIp { id: String },
    #[error("node metadata {key}: expected {expected}, got {got}")]
    MetadataType {
        key: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("node metadata {key}: {problem}")]
    MetadataValue { key: String, problem: String },
}

impl NodeError {
    /// The gRPC status code of the stream's error.
    pub fn code(&self) -> tonic::Code {
        tonic::Code::InvalidArgument
    }
}

/// A parsed Envoy node.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyNode {
    /// The raw node id.
    pub node_id: String,
    pub node_type: NodeType,
    /// The proxy's IPs as it reported them, each a valid address; at
    /// least one. The first is the WorkloadEntry address.
    pub ip_addresses: Vec<String>,
    /// The id's third part, `<name>.<namespace>`.
    pub id: String,
    /// The id's fourth part, `<namespace>.svc.cluster.local`.
    pub dns_domain: String,
    /// `NAMESPACE`, else the first label of the DNS domain; empty if
    /// neither names one.
    pub config_namespace: String,
    /// Envoy's service cluster (`node.cluster`).
    pub cluster: String,
    /// `region/zone/subzone` from `node.locality`, `None` if unset.
    pub locality: Option<String>,
    pub metadata: NodeMetadata,
}

impl ProxyNode {
    /// Parses `node` as istiod does when a stream starts.
    pub fn parse(node: &Node) -> Result<Self, NodeError> {
        if node.id.is_empty() {
            return Err(NodeError::Missing);
        }
        let metadata = NodeMetadata::decode(node.metadata.as_ref())?;
        Self::from_parts(node, metadata)
    }

    fn from_parts(node: &Node, metadata: NodeMetadata) -> Result<Self, NodeError> {
        let node_id = node.id.clone();
        let parts: Vec<&str> = node_id.split('~').collect();
        let [node_type, ip, id, dns_domain] = parts[..] else {
            return Err(NodeError::Parts {
                id: node_id.clone(),
                parts: parts.len(),
            });
        };
        let node_type = NodeType::parse(node_type).ok_or_else(|| NodeError::NodeType {
            id: node_id.clone(),
            node_type: node_type.to_string(),
        })?;
        let ip_addresses = if !metadata.instance_ips.is_empty()
            && metadata.instance_ips.iter().all(|ip| is_ip(ip))
        {
            metadata.instance_ips.clone()
        } else if is_ip(ip) {
            vec![ip.to_string()]
        } else {
            return Err(NodeError::NoIp {
                id: node_id.clone(),
            });
        };
        let config_namespace = match metadata.namespace.as_deref() {
            Some(ns) => ns.to_string(),
            None => match dns_domain.split_once('.') {
                Some((first, _)) => first.to_string(),
                None => String::new(),
            },
        };
        Ok(Self {
            node_type,
            ip_addresses,
            id: id.to_string(),
            dns_domain: dns_domain.to_string(),
            config_namespace,
            cluster: node.cluster.clone(),
            locality: node.locality.as_ref().and_then(locality_string),
            metadata,
            node_id,
        })
    }

    /// The first IP: the address of the proxy's WorkloadEntry.
    pub fn first_ip(&self) -> &str {
        &self.ip_addresses[0]
    }
}

fn is_ip(text: &str) -> bool {
    text.parse::<std::net::IpAddr>().is_ok()
}

/// istiod's `LocalityToString`: `region[/zone[/subzone]]`, the zone and
/// subzone left out from the first empty one; `None` if that is empty.
fn locality_string(locality: &Locality) -> Option<String> {
    let mut out = locality.region.clone();
    for part in [&locality.zone, &locality.sub_zone] {
        if part.is_empty() {
            break;
        }
        out.push('/');
        out.push_str(part);
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    use super::*;

    fn string(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    fn node(id: &str, fields: &[(&str, Value)]) -> Node {
        Node {
            id: id.into(),
            cluster: "ratings-vm.vm-ns".into(),
            metadata: Some(Struct {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            }),
            ..Node::default()
        }
    }

    const ID: &str = "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local";

    #[test]
    fn parses_a_vm_node() {
        let mut n = node(
            ID,
            &[
                ("NAMESPACE", string("vm-ns")),
                ("INSTANCE_IPS", string("10.0.0.12,fd00::12")),
            ],
        );
        n.locality = Some(Locality {
            region: "us-east1".into(),
            zone: "us-east1-b".into(),
            sub_zone: String::new(),
        });
        let p = ProxyNode::parse(&n).unwrap();
        assert_eq!(p.node_type, NodeType::Sidecar);
        assert_eq!(p.ip_addresses, ["10.0.0.12", "fd00::12"]);
        assert_eq!(p.first_ip(), "10.0.0.12");
        assert_eq!(p.id, "ratings-vm-1.vm-ns");
        assert_eq!(p.dns_domain, "vm-ns.svc.cluster.local");
        assert_eq!(p.config_namespace, "vm-ns");
        assert_eq!(p.cluster, "ratings-vm.vm-ns");
        assert_eq!(p.locality.as_deref(), Some("us-east1/us-east1-b"));
    }

    #[test]
    fn ips_and_namespace_fall_back_to_the_id() {
        // An invalid INSTANCE_IPS entry: the id's IP is used.
        let p = ProxyNode::parse(&node(
            "router~10.0.0.12~gw.istio-system~istio-system.svc.cluster.local",
            &[("INSTANCE_IPS", string("10.0.0.1,not-an-ip"))],
        ))
        .unwrap();
        assert_eq!(p.node_type, NodeType::Router);
        assert_eq!(p.ip_addresses, ["10.0.0.12"]);
        assert_eq!(p.config_namespace, "istio-system");
        // A one-label domain names no namespace.
        let p = ProxyNode::parse(&node("sidecar~10.0.0.12~a~local", &[])).unwrap();
        assert_eq!(p.config_namespace, "");
        assert_eq!(p.locality, None);
    }

    #[test]
    fn refuses_malformed_ids() {
        let err = |id: &str| ProxyNode::parse(&node(id, &[])).unwrap_err();
        assert_eq!(
            ProxyNode::parse(&Node::default()).unwrap_err().to_string(),
            "missing node information"
        );
        assert_eq!(
            err("sidecar~10.0.0.12~a.b"),
            NodeError::Parts {
                id: "sidecar~10.0.0.12~a.b".into(),
                parts: 3
            }
        );
        assert!(matches!(
            err("a~b~c~d~e"),
            NodeError::Parts { parts: 5, .. }
        ));
        let e = err("gateway~10.0.0.12~a.b~b.svc.cluster.local");
        assert_eq!(
            e.to_string(),
            "invalid node type \"gateway\" in the service node \"gateway~10.0.0.12~a.b~b.svc.cluster.local\" (valid types: sidecar, router, waypoint, ztunnel, agentgateway)"
        );
        assert!(matches!(
            err("sidecar~10.0.0.256~a.b~b.svc.cluster.local"),
            NodeError::NoIp { .. }
        ));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        for t in ["sidecar", "router", "waypoint", "ztunnel", "agentgateway"] {
            assert!(
                ProxyNode::parse(&node(&format!("{t}~10.0.0.1~a.b~b.svc.cluster.local"), &[]))
                    .is_ok()
            );
        }
    }
}
