//! The generated CA client and server, wired together in-process (the server
//! is itself a tower `Service`, so the client can call it without a network):
//! proves both compile with tonic's `codegen` feature alone, agree on the
//! method path, and carry request metadata the way istiod reads it.

use meshvm_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use meshvm_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer, SERVICE_NAME,
};
use meshvm_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use meshvm_proto::{CA_CREATE_CERTIFICATE_PATH, CA_SERVICE_NAME};
use tonic::{Code, Request, Response, Status};

/// A CA that echoes what it saw: the CSR, the TTL, the signer and the headers
/// istiod authenticates with.
struct EchoCa;

#[tonic::async_trait]
impl IstioCertificateService for EchoCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        if header("authorization") != "Bearer token" {
            return Err(Status::unauthenticated("request authenticate failure"));
        }
        let cluster = header("clusterid");
        let req = request.into_inner();
        let signer = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("CertSigner"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![
                format!("leaf for {} ttl {}", req.csr, req.validity_duration),
                format!("root of {cluster} signer {signer:?}"),
            ],
        }))
    }
}

fn request(token: &str) -> Request<IstioCertificateRequest> {
    let mut req = Request::new(IstioCertificateRequest {
        csr: "csr".to_owned(),
        validity_duration: 3600,
        metadata: Some(prost_types::Struct {
            fields: [(
                "CertSigner".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(String::new())),
                },
            )]
            .into(),
        }),
    });
    // pilot-agent sends `ClusterID`; HTTP/2 header names are lower case.
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "current_thread")]
async fn client_calls_server_in_process() {
    let mut client = IstioCertificateServiceClient::new(IstioCertificateServiceServer::new(EchoCa));
    let resp = client
        .create_certificate(request("token"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.cert_chain,
        ["leaf for csr ttl 3600", "root of Kubernetes signer \"\""]
    );

    let err = client
        .create_certificate(request("wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "request authenticate failure");
}

#[tokio::test(flavor = "current_thread")]
async fn server_routes_the_reference_method_path_only() {
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    use tonic::codegen::{Bytes, Service, http};

    // A raw gRPC call, as pilot-agent puts it on the wire: POST to the method
    // path, one length-prefixed message (flag 0 = uncompressed, u32 BE len).
    let call = |path: &str| {
        let msg = request("token").into_inner().encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&msg);
        http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", "Bearer token")
            .header("clusterid", "Kubernetes")
            .body(tonic::body::Body::new(Full::new(Bytes::from(framed))))
            .unwrap()
    };
    let mut server = IstioCertificateServiceServer::new(EchoCa);

    // An unknown method is answered with grpc-status 12 (Unimplemented).
    let resp = server
        .call(call("/istio.v1.auth.IstioCertificateService/Other"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["grpc-status"], "12");

    // The reference path reaches our handler: one framed response message,
    // then trailers with grpc-status 0.
    let resp = server.call(call(CA_CREATE_CERTIFICATE_PATH)).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    let data = collected.to_bytes();
    assert_eq!(data[0], 0, "uncompressed");
    let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
    let resp = IstioCertificateResponse::decode(&data[5..5 + len]).unwrap();
    assert_eq!(
        resp.cert_chain,
        ["leaf for csr ttl 3600", "root of Kubernetes signer \"\""]
    );
}

#[test]
fn service_name_and_path_match_the_reference() {
    assert_eq!(SERVICE_NAME, CA_SERVICE_NAME);
    assert_eq!(
        CA_CREATE_CERTIFICATE_PATH,
        format!("/{CA_SERVICE_NAME}/CreateCertificate")
    );
    assert_eq!(
        CA_CREATE_CERTIFICATE_PATH,
        "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    );
}
