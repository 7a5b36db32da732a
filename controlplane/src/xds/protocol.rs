//! The two ADS flavours from the server's side: state of the world and
//! Delta differ only in message shapes here.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

use super::NamedResource;

/// What a request says about the resource names it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// State of the world: the full list (empty: all of them).
    Replace(Vec<String>),
    /// Delta: names added and removed.
    Change {
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
    },
}

pub trait ServerProtocol: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Response: Send + Sync + 'static;
    const NAME: &'static str;

    fn node(request: &Self::Request) -> Option<&Node>;
    fn type_url(request: &Self::Request) -> &str;
    /// The NACK's (or an unhealthy report's) message.
    fn error_detail(request: &Self::Request) -> Option<&str>;
    /// A reply to an earlier response (an ACK, unless its subscription
    /// changed).
    fn is_ack(request: &Self::Request) -> bool;
    fn subscription(request: Self::Request) -> Subscription;
    fn response(
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: Vec<NamedResource>,
        removed: Vec<String>,
    ) -> Self::Response;
}

pub struct Sotw;

impl ServerProtocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "StreamAggregatedResources";

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    fn error_detail(request: &DiscoveryRequest) -> Option<&str> {
        request.error_detail.as_ref().map(|e| e.message.as_str())
    }

    fn is_ack(request: &DiscoveryRequest) -> bool {
        !request.response_nonce.is_empty()
    }

    fn subscription(request: DiscoveryRequest) -> Subscription {
        Subscription::Replace(request.resource_names)
    }

    fn response(
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: Vec<NamedResource>,
        _removed: Vec<String>,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: type_url.into(),
            version_info: version.into(),
            nonce: nonce.into(),
            resources: resources.into_iter().map(|r| r.resource).collect(),
            ..Default::default()
        }
    }
}

pub struct Delta;

impl ServerProtocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "DeltaAggregatedResources";

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    fn error_detail(request: &DeltaDiscoveryRequest) -> Option<&str> {
        request.error_detail.as_ref().map(|e| e.message.as_str())
    }

    fn is_ack(request: &DeltaDiscoveryRequest) -> bool {
        !request.response_nonce.is_empty()
    }

    fn subscription(request: DeltaDiscoveryRequest) -> Subscription {
        Subscription::Change {
            subscribe: request.resource_names_subscribe,
            unsubscribe: request.resource_names_unsubscribe,
        }
    }

    fn response(
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: Vec<NamedResource>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            system_version_info: version.into(),
            nonce: nonce.into(),
            resources: resources
                .into_iter()
                .map(|r| Resource {
                    name: r.name,
                    version: version.into(),
                    resource: Some(r.resource),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed,
            ..Default::default()
        }
    }
}
