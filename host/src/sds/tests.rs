use super::*;
use std::os::unix::fs::PermissionsExt as _;

fn secret(tag: &str) -> WorkloadSecret {
    WorkloadSecret {
        cert_chain_pem: format!("chain {tag}\n"),
        private_key_pem: Zeroizing::new(format!("KEY-SECRET {tag}\n")),
        root_pem: format!("root {tag}\n"),
    }
}

#[test]
fn default_is_a_tls_certificate_with_inline_bytes() {
    let s = secret("a").to_envoy(WORKLOAD_RESOURCE).expect("default");
    assert_eq!(s.name, "default");
    let Some(secret::Type::TlsCertificate(tls)) = s.r#type else {
        panic!("not a tls_certificate")
    };
    assert_eq!(
        tls.certificate_chain.and_then(|d| d.specifier),
        Some(Specifier::InlineBytes(b"chain a\n".to_vec()))
    );
    assert_eq!(
        tls.private_key.and_then(|d| d.specifier),
        Some(Specifier::InlineBytes(b"KEY-SECRET a\n".to_vec()))
    );
}

#[test]
fn rootca_is_a_validation_context_with_inline_bytes() {
    let s = secret("a").to_envoy(ROOT_RESOURCE).expect("ROOTCA");
    assert_eq!(s.name, "ROOTCA");
    let Some(secret::Type::ValidationContext(vc)) = s.r#type else {
        panic!("not a validation_context")
    };
    assert_eq!(
        vc.trusted_ca.and_then(|d| d.specifier),
        Some(Specifier::InlineBytes(b"root a\n".to_vec()))
    );
}

#[test]
fn unknown_names_are_not_served() {
    assert!(secret("a").to_envoy("file-root:system").is_none());
    assert!(build_response(&secret("a"), "v", &["nope".into()], "0".into()).is_none());
    let r = build_response(
        &secret("a"),
        "v",
        &["nope".into(), "ROOTCA".into()],
        "0".into(),
    )
    .expect("one known");
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    assert_eq!(r.resources[0].type_url, SECRET_TYPE_URL);
}

#[test]
fn version_follows_content_and_debug_hides_the_key() {
    assert_eq!(secret("a").version(), secret("a").version());
    assert_ne!(secret("a").version(), secret("b").version());
    let mut k = secret("a");
    k.private_key_pem = Zeroizing::new("other".into());
    assert_ne!(secret("a").version(), k.version());
    let debug = format!("{:?}", secret("a"));
    assert!(!debug.contains("KEY-SECRET"), "{debug}");
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_refuses_a_live_one_or_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/socket");
    let (_tx, rx) = watch::channel(None);
    {
        let server = SdsServer::bind(&path, rx.clone()).expect("bind");
        let mode = std::fs::metadata(server.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Live: the listener is still open.
        let err = SdsServer::bind(&path, rx.clone()).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
    // The listener is dropped but the socket file stays: stale.
    assert!(path.exists());
    let _server = SdsServer::bind(&path, rx.clone()).expect("rebind over a stale socket");

    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let err = SdsServer::bind(&file, rx).expect_err("not a socket");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
}

mod stream {
    use super::*;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use std::time::Duration;
    use tonic::transport::{Channel, Endpoint};

    /// A liveness bound for each expected message, not a timing expectation.
    const LIMIT: Duration = Duration::from_secs(30);

    async fn client(path: PathBuf) -> SecretDiscoveryServiceClient<Channel> {
        let channel = Endpoint::from_static("http://sds")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .expect("connect");
        SecretDiscoveryServiceClient::new(channel)
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn chain_of(r: &DiscoveryResponse) -> Vec<u8> {
        let s = Secret::decode(r.resources[0].value.as_slice()).expect("Secret");
        let Some(secret::Type::TlsCertificate(tls)) = s.r#type else {
            panic!("not a tls_certificate")
        };
        match tls.certificate_chain.and_then(|d| d.specifier) {
            Some(Specifier::InlineBytes(b)) => b,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_until_the_first_secret_then_pushes_changes_and_survives_a_nack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("socket");
        let (tx, rx) = watch::channel(None);
        let server = SdsServer::bind(&path, rx).expect("bind");
        tokio::spawn(server.serve());

        let mut client = client(path).await;
        let (req_tx, req_rx) = mpsc::channel(8);
        req_tx
            .send(request(&["default", "unknown-name"], "", ""))
            .await
            .expect("send");
        let mut responses = client
            .stream_secrets(ReceiverStream::new(req_rx))
            .await
            .expect("stream")
            .into_inner();
        let mut next = async || {
            tokio::time::timeout(LIMIT, responses.message())
                .await
                .expect("a response in time")
                .expect("no error")
                .expect("stream open")
        };

        // Published after the request: the first response is this secret.
        tx.send(Some(Arc::new(secret("a")))).expect("publish");
        let first = next().await;
        assert_eq!(first.resources.len(), 1, "unknown name ignored");
        assert_eq!(chain_of(&first), b"chain a\n");
        assert_eq!(first.version_info, secret("a").version());
        req_tx
            .send(request(
                &["default", "unknown-name"],
                &first.version_info,
                &first.nonce,
            ))
            .await
            .expect("ack");

        // A change is pushed.
        tx.send(Some(Arc::new(secret("b")))).expect("publish");
        let second = next().await;
        assert_eq!(chain_of(&second), b"chain b\n");
        assert_ne!(second.nonce, first.nonce);

        // NACK it; the stream stays up and the next change still arrives.
        let mut nack = request(&["default"], &first.version_info, &second.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 13,
            message: "bad key".into(),
            details: vec![],
        });
        req_tx.send(nack).await.expect("nack");
        // Re-publishing the rejected content is not resent; the next one is.
        tx.send(Some(Arc::new(secret("b")))).expect("publish");
        tx.send(Some(Arc::new(secret("c")))).expect("publish");
        let third = next().await;
        assert_eq!(chain_of(&third), b"chain c\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_answers_once_a_secret_exists_and_delta_is_unimplemented() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("socket");
        let (tx, rx) = watch::channel(None);
        tokio::spawn(SdsServer::bind(&path, rx).expect("bind").serve());
        let mut client = client(path).await;
        let err = client
            .fetch_secrets(request(&["ROOTCA"], "", ""))
            .await
            .expect_err("nothing yet");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        tx.send(Some(Arc::new(secret("a")))).expect("publish");
        let r = client
            .fetch_secrets(request(&["ROOTCA"], "", ""))
            .await
            .expect("fetch")
            .into_inner();
        let s = Secret::decode(r.resources[0].value.as_slice()).expect("Secret");
        assert_eq!(s.name, "ROOTCA");
        let err = client
            .delta_secrets(tokio_stream::empty())
            .await
            .expect_err("delta");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }
}
