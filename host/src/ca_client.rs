//! The client of Istio's CA API (reference §4.1–4.2):
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` on istiod's
//! port 15012, over TLS verified against the onboarding roots.
//!
//! - Server name: the host of the CA address; a host containing `localhost`
//!   means `istiod.istio-system.svc`; `ISTIOD_SAN` overrides it only when
//!   `CA_ADDR` is not set apart from the discovery address ([`server_name`]).
//! - Headers: `ClusterID: <ISTIO_META_CLUSTER_ID>` when set, and
//!   `authorization: Bearer <token>` when authenticating with the bootstrap
//!   token, read afresh from its file on each call (a missing file means no
//!   header). The token never reaches a log or an error message.
//! - Renewals authenticate with the current certificate instead (mTLS,
//!   [`CaAuth::ClientCert`]).
//!
//! Each call dials a new connection: calls are rare (one per renewal) and the
//! client certificate changes between them.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshvm_proto::istio::v1::auth::IstioCertificateRequest;
use meshvm_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::{Config, RootCerts};
use crate::identity::{IssuedCert, WorkloadKey};

/// The name in istiod's certificate, expected when the address names
/// `localhost` (§4.2).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";

/// How long dialling (TCP + TLS) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one `CreateCertificate` call may take.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a certificate could not be obtained. No message contains the token or
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA address `{address}` is invalid: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("`{cluster_id}` cannot be sent as the ClusterID header")]
    InvalidClusterId { cluster_id: String },
    /// The token file exists but could not be read.
    #[error("cannot read the CA token {}: {error}", path.display())]
    Token { path: PathBuf, error: io::Error },
    /// The token holds bytes an HTTP header cannot carry.
    #[error("the CA token {} cannot be sent as a header (it holds control characters)", path.display())]
    InvalidToken { path: PathBuf },
    /// TCP (or HTTP/2) connection to the CA failed.
    #[error("cannot connect to the CA at {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The TLS handshake failed: usually the CA's certificate does not
    /// verify to the onboarding roots or is not for `server_name`, or the
    /// CA refused our client certificate.
    #[error(
        "TLS handshake with the CA at {address} (expecting server name `{server_name}`) failed: {reason}"
    )]
    Tls {
        address: String,
        server_name: String,
        reason: String,
    },
    /// The CA answered with an error status.
    #[error("the CA at {address} refused the request: {code:?}: {message}")]
    Status {
        address: String,
        code: tonic::Code,
        message: String,
    },
}

impl CaClientError {
    /// Whether retrying the same request later may succeed (everything but
    /// local configuration errors).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::InvalidAddress { .. } | Self::InvalidClusterId { .. }
        )
    }
}

/// How a `CreateCertificate` call authenticates.
#[derive(Debug, Clone, Copy)]
pub enum CaAuth<'a> {
    /// The bootstrap token in this file (`authorization: Bearer`), read at
    /// each call; if the file is missing, no header is sent.
    Token(&'a Path),
    /// mTLS with the current workload certificate and its key.
    ClientCert(&'a WorkloadKey, &'a IssuedCert),
}

/// Where the CA is and how to trust it.
#[derive(Clone)]
pub struct CaClientOptions {
    /// `host:port` (or `https://host:port`).
    pub address: String,
    /// The name the CA's certificate must carry (see [`server_name`]).
    pub server_name: String,
    /// The trust anchors (the onboarding `root-cert.pem`).
    pub roots: RootCerts,
    /// Sent as the `ClusterID` header when set.
    pub cluster_id: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for CaClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClientOptions")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl CaClientOptions {
    /// The CA of `config`: `CA_ADDR` (else the discovery address), Istio's
    /// server-name rule, the onboarding roots and `ISTIO_META_CLUSTER_ID`.
    pub fn from_config(config: &Config) -> Self {
        // `ca_address` equals the discovery address when CA_ADDR is unset;
        // only then does ISTIOD_SAN apply to the CA.
        let san = (config.ca_address == config.discovery_address)
            .then_some(config.istiod_san.as_deref())
            .flatten();
        Self {
            address: config.ca_address.clone(),
            server_name: server_name(&config.ca_address, san),
            roots: config.root_certs.clone(),
            cluster_id: config.cluster_id.clone().filter(|c| !c.is_empty()),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Options for `address` with Istio's server-name rule (no `ISTIOD_SAN`).
    pub fn new(address: impl Into<String>, roots: RootCerts, cluster_id: Option<String>) -> Self {
        let address = address.into();
        Self {
            server_name: server_name(&address, None),
            address,
            roots,
            cluster_id,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The TLS server name for a CA address (§4.2): `istiod_san` if given, else
/// the address's host, except that a host containing `localhost` means
/// `istiod.istio-system.svc`. An IP address is verified against the
/// certificate's IP SANs.
pub fn server_name(address: &str, istiod_san: Option<&str>) -> String {
    if let Some(san) = istiod_san.filter(|s| !s.is_empty()) {
        return san.to_string();
    }
    let host = host_of(address);
    if host.contains("localhost") {
        ISTIOD_SERVER_NAME.to_string()
    } else {
        host.to_string()
    }
}

/// `host` of `[scheme://]host[:port][/...]`, brackets of IPv6 removed.
fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match rest.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((host, _)) if !host.contains(':') => host,
        _ => rest,
    }
}

/// The CA client.
#[derive(Debug, Clone)]
pub struct CaClient {
    options: CaClientOptions,
    uri: String,
}

impl CaClient {
    pub fn new(options: CaClientOptions) -> Result<Self, CaClientError> {
        let uri = if options.address.contains("://") {
            options.address.replacen("http://", "https://", 1)
        } else {
            format!("https://{}", options.address)
        };
        Endpoint::from_shared(uri.clone()).map_err(|e| CaClientError::InvalidAddress {
            address: options.address.clone(),
            reason: e.source().map_or_else(|| e.to_string(), |s| s.to_string()),
        })?;
        if let Some(cluster_id) = &options.cluster_id
            && MetadataValue::try_from(cluster_id.as_str()).is_err()
        {
            return Err(CaClientError::InvalidClusterId {
                cluster_id: cluster_id.clone(),
            });
        }
        Ok(Self { options, uri })
    }

    pub fn options(&self) -> &CaClientOptions {
        &self.options
    }

    /// Sends `csr_pem` asking for `ttl` and returns the CA's chain (leaf
    /// first, root last), unverified: pass it to
    /// [`crate::identity::verify_issued`].
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        ttl: Duration,
        auth: CaAuth<'_>,
    ) -> Result<Vec<String>, CaClientError> {
        let o = &self.options;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(o.roots.pem()))
            .domain_name(o.server_name.clone());
        let mut bearer = None;
        match auth {
            CaAuth::Token(path) => bearer = read_token(path)?,
            CaAuth::ClientCert(key, cert) => {
                let key_pem = key.private_key_pem();
                tls = tls.identity(Identity::from_pem(cert.chain_pem(), key_pem.as_bytes()));
            }
        }
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        if let Some(cluster_id) = &o.cluster_id {
            let value = MetadataValue::try_from(cluster_id.as_str()).map_err(|_| {
                CaClientError::InvalidClusterId {
                    cluster_id: cluster_id.clone(),
                }
            })?;
            request.metadata_mut().insert("clusterid", value);
        }
        if let Some(value) = bearer {
            request.metadata_mut().insert("authorization", value);
        }
        request.set_timeout(o.request_timeout);

        let endpoint = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| CaClientError::InvalidAddress {
                address: o.address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(o.connect_timeout)
            .timeout(o.request_timeout)
            .tls_config(tls)
            .map_err(|e| self.transport_error(&e))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let response = client
            .create_certificate(request)
            .await
            .map_err(|status| self.status_error(status))?;
        Ok(response.into_inner().cert_chain)
    }

    /// A connection error: TLS if rustls is in its source chain.
    fn transport_error(&self, error: &(dyn std::error::Error + 'static)) -> CaClientError {
        let o = &self.options;
        match find_tls_error(error) {
            Some(reason) => CaClientError::Tls {
                address: o.address.clone(),
                server_name: o.server_name.clone(),
                reason,
            },
            None => CaClientError::Connect {
                address: o.address.clone(),
                reason: error_chain(error),
            },
        }
    }

    /// A failed call: a TLS failure (TLS 1.3 reports a refused client
    /// certificate only on the first request), a connection failure, or the
    /// CA's own answer.
    fn status_error(&self, status: tonic::Status) -> CaClientError {
        if let Some(source) = status.source()
            && (find_tls_error(source).is_some() || status.code() == tonic::Code::Unavailable)
        {
            return self.transport_error(source);
        }
        CaClientError::Status {
            address: self.options.address.clone(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// The bearer header for the token in `path`; `None` if the file is missing
/// or empty. The token is neither logged nor put in an error.
fn read_token(path: &Path) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, CaClientError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => zeroize::Zeroizing::new(bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no CA token file; sending no authorization header");
            return Ok(None);
        }
        Err(error) => {
            return Err(CaClientError::Token {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    let token = bytes.trim_ascii();
    if token.is_empty() {
        tracing::debug!(path = %path.display(), "the CA token file is empty; sending no authorization header");
        return Ok(None);
    }
    let mut header = zeroize::Zeroizing::new(Vec::with_capacity(token.len() + 7));
    header.extend_from_slice(b"Bearer ");
    header.extend_from_slice(token);
    let mut value =
        MetadataValue::try_from(header.as_slice()).map_err(|_| CaClientError::InvalidToken {
            path: path.to_path_buf(),
        })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The message of the first rustls error in `error`'s source chain.
pub(crate) fn find_tls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // `io::Error::source` skips the error it wraps (rustls's, from
        // tokio-rustls): look at that one too.
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            if let Some(reason) = find_tls_error(inner) {
                return Some(reason);
            }
        }
        current = e.source();
    }
    None
}

/// `a: b: c` for an error and its sources, repeated messages dropped.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(
            server_name("istiod.istio-system.svc:15012", None),
            "istiod.istio-system.svc"
        );
        assert_eq!(server_name("localhost:15012", None), ISTIOD_SERVER_NAME);
        assert_eq!(
            server_name("https://istiod-localhost.example:15012", None),
            ISTIOD_SERVER_NAME
        );
        assert_eq!(server_name("10.0.0.1:15012", None), "10.0.0.1");
        assert_eq!(server_name("[::1]:15012", None), "::1");
        assert_eq!(
            server_name("10.0.0.1:15012", Some("istiod.example")),
            "istiod.example"
        );
        assert_eq!(server_name("istiod.example", None), "istiod.example");
    }

    #[test]
    fn token_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("istio-token");
        assert!(read_token(&path).unwrap().is_none());
        std::fs::write(&path, "abc.def.ghi\n").unwrap();
        let value = read_token(&path).unwrap().unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer abc.def.ghi");
        assert!(value.is_sensitive());
        std::fs::write(&path, "SECRET\u{1}TOKEN").unwrap();
        let error = read_token(&path).unwrap_err();
        assert!(!error.to_string().contains("SECRET"), "{error}");
    }
}
