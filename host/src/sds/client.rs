//! An SDS client for operators and tests: asks the agent's SDS socket for
//! `default` and `ROOTCA` exactly as Envoy does and describes what came
//! back (identity, validity, serial, roots) without ever showing the key.
//! `meshvm-agent secrets` prints it; `--wait` turns it into a readiness
//! check ("is a certificate being served yet?").

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message as _;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};

use super::{ROOT_RESOURCE, SECRET_TYPE_URL, WORKLOAD_RESOURCE};

/// Why the secrets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SdsClientError {
    #[error("cannot connect to the SDS socket {path}: {error}")]
    Connect { path: PathBuf, error: String },
    #[error("SDS stream failed: {0}")]
    Stream(#[from] tonic::Status),
    #[error("no secret served within {0:?}")]
    Timeout(Duration),
    #[error("the SDS server closed the stream without answering")]
    Closed,
    #[error("malformed SDS response: {0}")]
    Malformed(String),
}

/// One certificate, as shown to an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CertSummary {
    pub subject: String,
    /// URI SANs (the SPIFFE identity for a workload certificate).
    pub uris: Vec<String>,
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
}

/// What one served secret holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum SecretSummary {
    /// `default`: the chain (leaf first); the key is only said to be present.
    Certificate {
        name: String,
        chain: Vec<CertSummary>,
        has_private_key: bool,
    },
    /// `ROOTCA`: the trusted roots.
    TrustedCa {
        name: String,
        roots: Vec<CertSummary>,
    },
}

/// The secrets served, with the response's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedSecrets {
    pub version: String,
    pub secrets: Vec<SecretSummary>,
}

impl ServedSecrets {
    /// The workload identity the `default` certificate carries.
    pub fn identity(&self) -> Option<&str> {
        self.secrets.iter().find_map(|s| match s {
            SecretSummary::Certificate { chain, .. } => {
                chain.first()?.uris.first().map(String::as_str)
            }
            SecretSummary::TrustedCa { .. } => None,
        })
    }
}

async fn connect(path: &Path) -> Result<SecretDiscoveryServiceClient<Channel>, SdsClientError> {
    let socket = path.to_path_buf();
    let channel = Endpoint::from_static("http://sds")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| SdsClientError::Connect {
            path: path.to_path_buf(),
            error: std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
        })?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

/// Asks `socket` for `default` and `ROOTCA` and waits up to `wait` for the
/// first answer (the agent holds requests until it has a certificate). With
/// `retry_connect`, a socket that does not exist yet is retried until `wait`
/// runs out (for "wait until the agent serves").
pub async fn fetch_secrets(
    socket: &Path,
    wait: Duration,
    retry_connect: bool,
) -> Result<ServedSecrets, SdsClientError> {
    tokio::time::timeout(wait, fetch(socket, retry_connect))
        .await
        .map_err(|_| SdsClientError::Timeout(wait))?
}

async fn fetch(socket: &Path, retry_connect: bool) -> Result<ServedSecrets, SdsClientError> {
    let mut client = loop {
        match connect(socket).await {
            Ok(client) => break client,
            Err(_) if retry_connect => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => return Err(e),
        }
    };
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "meshvm-agent-secrets".into(),
            ..Default::default()
        }),
        resource_names: vec![WORKLOAD_RESOURCE.into(), ROOT_RESOURCE.into()],
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request).await.expect("the receiver is alive");
    let mut responses = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let response = responses.message().await?.ok_or(SdsClientError::Closed)?;
    drop(tx);
    let mut secrets = Vec::new();
    for any in &response.resources {
        if any.type_url != SECRET_TYPE_URL {
            return Err(SdsClientError::Malformed(format!(
                "resource of type {}",
                any.type_url
            )));
        }
        let secret = Secret::decode(any.value.as_slice())
            .map_err(|e| SdsClientError::Malformed(format!("Secret: {e}")))?;
        secrets.push(summarize(&secret)?);
    }
    Ok(ServedSecrets {
        version: response.version_info,
        secrets,
    })
}

fn inline_bytes(source: Option<&DataSource>) -> &[u8] {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(bytes)) => bytes,
        Some(Specifier::InlineString(text)) => text.as_bytes(),
        _ => &[],
    }
}

fn summarize(secret: &Secret) -> Result<SecretSummary, SdsClientError> {
    let name = secret.name.clone();
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => Ok(SecretSummary::Certificate {
            chain: summarize_pem(inline_bytes(tls.certificate_chain.as_ref()), &name)?,
            has_private_key: !inline_bytes(tls.private_key.as_ref()).is_empty(),
            name,
        }),
        Some(secret::Type::ValidationContext(ctx)) => Ok(SecretSummary::TrustedCa {
            roots: summarize_pem(inline_bytes(ctx.trusted_ca.as_ref()), &name)?,
            name,
        }),
        _ => Err(SdsClientError::Malformed(format!(
            "secret {name} is neither a certificate nor a validation context"
        ))),
    }
}

fn summarize_pem(pem: &[u8], name: &str) -> Result<Vec<CertSummary>, SdsClientError> {
    let malformed = |problem: String| SdsClientError::Malformed(format!("{name}: {problem}"));
    let mut certs = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| malformed(format!("PEM: {e}")))?;
        let (_, cert) =
            X509Certificate::from_der(&block.contents).map_err(|e| malformed(e.to_string()))?;
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    if let GeneralName::URI(uri) = n {
                        uris.push((*uri).to_string());
                    }
                }
            }
        }
        let rfc3339 = |t: x509_parser::time::ASN1Time| crate::config::time::rfc3339(t.timestamp());
        certs.push(CertSummary {
            subject: cert.subject().to_string(),
            uris,
            serial: cert.raw_serial_as_string(),
            not_before: rfc3339(cert.validity().not_before),
            not_after: rfc3339(cert.validity().not_after),
        });
    }
    if certs.is_empty() {
        return Err(malformed("no certificate".into()));
    }
    Ok(certs)
}
