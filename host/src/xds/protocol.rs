//! What differs between the two ADS flavours the proxy carries: state of the
//! world (`StreamAggregatedResources`) and incremental
//! (`DeltaAggregatedResources`, Istio's default). The proxy's loop is written
//! once against [`Protocol`].

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// gRPC code INTERNAL: what Istio's agent puts in NACKs and health errors.
pub const CODE_INTERNAL: i32 = 13;

/// One ADS flavour.
pub trait Protocol: Send + Sync + 'static {
    type Request: Clone + Send + Sync + std::fmt::Debug + 'static;
    type Response: Clone + Send + Sync + std::fmt::Debug + 'static;
    /// Remembers what Envoy subscribed to, to replay on a new upstream stream.
    type Subscriptions: Default + Send + 'static;

    /// `StreamAggregatedResources` or `DeltaAggregatedResources`.
    const NAME: &'static str;

    fn request_type_url(request: &Self::Request) -> &str;
    fn response_type_url(response: &Self::Response) -> &str;
    fn node_mut(request: &mut Self::Request) -> &mut Option<Node>;
    /// The resources of a response, for the agent's own types.
    fn resources(response: &Self::Response) -> Vec<&Any>;
    /// The same, to rewrite before Envoy sees them.
    fn resources_mut(response: &mut Self::Response) -> Vec<&mut Any>;
    /// The first request for an agent-consumed type (no names: everything).
    fn subscribe(type_url: &str) -> Self::Request;
    /// The ACK (`error == None`) or NACK of `response`.
    fn ack(response: &Self::Response, error: Option<String>) -> Self::Request;
    /// A NACK, on Envoy's behalf, of a response the agent did not forward:
    /// it names the version Envoy last accepted, so the control plane knows
    /// what Envoy still runs.
    fn reject(
        subscriptions: &Self::Subscriptions,
        response: &Self::Response,
        error: String,
    ) -> Self::Request;
    /// A `HealthInformation` report: healthy, or unhealthy with `error`.
    fn health(type_url: &str, error: Option<String>) -> Self::Request;

    fn track_request(subscriptions: &mut Self::Subscriptions, request: &Self::Request);
    fn track_response(subscriptions: &mut Self::Subscriptions, response: &Self::Response);
    /// What to send on a new upstream stream so the control plane knows what
    /// Envoy has and wants, oldest type first.
    fn replay(subscriptions: &Self::Subscriptions) -> Vec<Self::Request>;

    /// Opens the upstream stream.
    fn open(
        client: AggregatedDiscoveryServiceClient<Channel>,
        requests: tonic::Request<ReceiverStream<Self::Request>>,
    ) -> impl std::future::Future<Output = Result<tonic::Streaming<Self::Response>, tonic::Status>> + Send;
}

fn rpc_error(message: String) -> RpcStatus {
    RpcStatus {
        code: CODE_INTERNAL,
        message,
        details: Vec::new(),
    }
}

/// State of the world.
pub struct Sotw;

/// Per type, in the order Envoy first asked: its latest request.
#[derive(Default)]
pub struct SotwSubscriptions {
    order: Vec<String>,
    latest: BTreeMap<String, DiscoveryRequest>,
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Subscriptions = SotwSubscriptions;
    const NAME: &'static str = "StreamAggregatedResources";

    fn request_type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    fn response_type_url(response: &DiscoveryResponse) -> &str {
        &response.type_url
    }

    fn node_mut(request: &mut DiscoveryRequest) -> &mut Option<Node> {
        &mut request.node
    }

    fn resources(response: &DiscoveryResponse) -> Vec<&Any> {
        response.resources.iter().collect()
    }

    fn resources_mut(response: &mut DiscoveryResponse) -> Vec<&mut Any> {
        response.resources.iter_mut().collect()
    }

    fn reject(
        s: &SotwSubscriptions,
        response: &DiscoveryResponse,
        error: String,
    ) -> DiscoveryRequest {
        let last = s.latest.get(&response.type_url);
        DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            resource_names: last.map(|r| r.resource_names.clone()).unwrap_or_default(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(rpc_error(error)),
            ..Default::default()
        }
    }

    fn subscribe(type_url: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_string(),
            ..Default::default()
        }
    }

    fn ack(response: &DiscoveryResponse, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(rpc_error),
            ..Default::default()
        }
    }

    fn health(type_url: &str, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_string(),
            error_detail: error.map(rpc_error),
            ..Default::default()
        }
    }

    fn track_request(s: &mut SotwSubscriptions, request: &DiscoveryRequest) {
        if !s.latest.contains_key(&request.type_url) {
            s.order.push(request.type_url.clone());
        }
        let mut kept = request.clone();
        kept.node = None;
        s.latest.insert(request.type_url.clone(), kept);
    }

    fn track_response(_: &mut SotwSubscriptions, _: &DiscoveryResponse) {}

    fn replay(s: &SotwSubscriptions) -> Vec<DiscoveryRequest> {
        s.order
            .iter()
            .filter_map(|t| s.latest.get(t))
            .map(|r| DiscoveryRequest {
                // A new stream: no nonce of the old one; the version tells
                // the server what Envoy already has.
                response_nonce: String::new(),
                error_detail: None,
                ..r.clone()
            })
            .collect()
    }

    async fn open(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: tonic::Request<ReceiverStream<DiscoveryRequest>>,
    ) -> Result<tonic::Streaming<DiscoveryResponse>, tonic::Status> {
        Ok(client
            .stream_aggregated_resources(requests)
            .await?
            .into_inner())
    }
}

/// Incremental.
pub struct Delta;

/// Per type, in the order Envoy first asked: the names it subscribed to (a
/// wildcard subscription is remembered as such) and the versions of the
/// resources it was sent.
#[derive(Default)]
pub struct DeltaSubscriptions {
    order: Vec<String>,
    types: BTreeMap<String, DeltaType>,
}

#[derive(Default)]
struct DeltaType {
    names: BTreeSet<String>,
    versions: BTreeMap<String, String>,
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type Subscriptions = DeltaSubscriptions;
    const NAME: &'static str = "DeltaAggregatedResources";

    fn request_type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    fn response_type_url(response: &DeltaDiscoveryResponse) -> &str {
        &response.type_url
    }

    fn node_mut(request: &mut DeltaDiscoveryRequest) -> &mut Option<Node> {
        &mut request.node
    }

    fn resources(response: &DeltaDiscoveryResponse) -> Vec<&Any> {
        response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .collect()
    }

    fn resources_mut(response: &mut DeltaDiscoveryResponse) -> Vec<&mut Any> {
        response
            .resources
            .iter_mut()
            .filter_map(|r| r.resource.as_mut())
            .collect()
    }

    fn reject(
        _: &DeltaSubscriptions,
        response: &DeltaDiscoveryResponse,
        error: String,
    ) -> DeltaDiscoveryRequest {
        Self::ack(response, Some(error))
    }

    fn subscribe(type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            ..Default::default()
        }
    }

    fn ack(response: &DeltaDiscoveryResponse, error: Option<String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(rpc_error),
            ..Default::default()
        }
    }

    fn health(type_url: &str, error: Option<String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            error_detail: error.map(rpc_error),
            ..Default::default()
        }
    }

    fn track_request(s: &mut DeltaSubscriptions, request: &DeltaDiscoveryRequest) {
        let t = request.type_url.clone();
        if !s.types.contains_key(&t) {
            s.order.push(t.clone());
        }
        let entry = s.types.entry(t).or_default();
        entry
            .names
            .extend(request.resource_names_subscribe.iter().cloned());
        for name in &request.resource_names_unsubscribe {
            entry.names.remove(name);
            entry.versions.remove(name);
        }
        // Envoy's own initial versions (it reconnected to us) are what it has.
        for (name, version) in &request.initial_resource_versions {
            entry.versions.insert(name.clone(), version.clone());
        }
    }

    fn track_response(s: &mut DeltaSubscriptions, response: &DeltaDiscoveryResponse) {
        let Some(entry) = s.types.get_mut(&response.type_url) else {
            return;
        };
        for resource in &response.resources {
            entry
                .versions
                .insert(resource.name.clone(), resource.version.clone());
        }
        for name in &response.removed_resources {
            entry.versions.remove(name);
        }
    }

    fn replay(s: &DeltaSubscriptions) -> Vec<DeltaDiscoveryRequest> {
        s.order
            .iter()
            .filter_map(|t| Some((t, s.types.get(t)?)))
            .map(|(t, entry)| DeltaDiscoveryRequest {
                type_url: t.clone(),
                resource_names_subscribe: entry.names.iter().cloned().collect(),
                initial_resource_versions: entry
                    .versions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    async fn open(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: tonic::Request<ReceiverStream<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        Ok(client
            .delta_aggregated_resources(requests)
            .await?
            .into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

    #[test]
    fn sotw_replays_the_latest_request_per_type_without_nonce_or_node() {
        let mut s = SotwSubscriptions::default();
        let first = DiscoveryRequest {
            node: Some(Node {
                id: "sidecar~1.2.3.4~a.b~b.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: CDS.into(),
            ..Default::default()
        };
        Sotw::track_request(&mut s, &first);
        Sotw::track_request(
            &mut s,
            &DiscoveryRequest {
                type_url: LDS.into(),
                ..Default::default()
            },
        );
        Sotw::track_request(
            &mut s,
            &DiscoveryRequest {
                type_url: CDS.into(),
                version_info: "v7".into(),
                response_nonce: "n3".into(),
                ..Default::default()
            },
        );
        let replay = Sotw::replay(&s);
        assert_eq!(replay.len(), 2);
        assert_eq!(replay[0].type_url, CDS);
        assert_eq!(replay[0].version_info, "v7");
        assert_eq!(replay[0].response_nonce, "");
        assert!(replay[0].node.is_none());
        assert_eq!(replay[1].type_url, LDS);
    }

    #[test]
    fn delta_replays_subscriptions_and_known_versions() {
        let mut s = DeltaSubscriptions::default();
        Delta::track_request(
            &mut s,
            &DeltaDiscoveryRequest {
                type_url: CDS.into(),
                resource_names_subscribe: vec!["a".into(), "b".into()],
                ..Default::default()
            },
        );
        Delta::track_response(
            &mut s,
            &DeltaDiscoveryResponse {
                type_url: CDS.into(),
                resources: vec![
                    Resource {
                        name: "a".into(),
                        version: "1".into(),
                        ..Default::default()
                    },
                    Resource {
                        name: "b".into(),
                        version: "2".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        Delta::track_response(
            &mut s,
            &DeltaDiscoveryResponse {
                type_url: CDS.into(),
                removed_resources: vec!["b".into()],
                ..Default::default()
            },
        );
        Delta::track_request(
            &mut s,
            &DeltaDiscoveryRequest {
                type_url: CDS.into(),
                resource_names_unsubscribe: vec!["b".into()],
                ..Default::default()
            },
        );
        let replay = Delta::replay(&s);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].resource_names_subscribe, vec!["a".to_string()]);
        assert_eq!(
            replay[0]
                .initial_resource_versions
                .get("a")
                .map(String::as_str),
            Some("1")
        );
        assert!(!replay[0].initial_resource_versions.contains_key("b"));
    }

    #[test]
    fn nacks_and_health_errors_carry_code_13() {
        let response = DiscoveryResponse {
            type_url: "t".into(),
            version_info: "v".into(),
            nonce: "n".into(),
            ..Default::default()
        };
        let nack = Sotw::ack(&response, Some("bad".into()));
        assert_eq!(nack.response_nonce, "n");
        assert_eq!(nack.version_info, "v");
        assert_eq!(nack.error_detail.unwrap().code, 13);
        let healthy = Delta::health("h", None);
        assert!(healthy.error_detail.is_none());
        assert!(healthy.node.is_none());
        let unhealthy = Sotw::health("h", Some("probe failed".into()));
        assert_eq!(unhealthy.error_detail.unwrap().message, "probe failed");
    }
}
