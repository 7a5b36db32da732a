//! Who is calling: the authenticators istiod runs for its CA and xDS, in its
//! order (first success wins):
//!
//! 1. a client certificate chain this CA issued (how a VM renews once its
//!    bootstrap token has expired), validated by `rustls-webpki` against the
//!    root (signature path, validity, `clientAuth`), with exactly one SPIFFE
//!    URI SAN;
//! 2. a bearer token this control plane minted ([`TokenIssuer`]), for the
//!    cluster named by the `clusterid` header (empty means this one).
//!
//! These are plain functions of the caller's credentials, so the gRPC
//! services and tests share them.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::MeshCa;
use super::spiffe::{SpiffeId, SpiffeIdError};
use super::token::{TokenError, TokenIssuer};

/// Why a client certificate chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerCertError {
    #[error("no client certificate")]
    Missing,
    #[error("client certificate is not valid X.509 ({0})")]
    Malformed(String),
    #[error("client certificate was not issued by this mesh's CA")]
    UnknownIssuer,
    #[error("client certificate has expired")]
    Expired,
    #[error("client certificate is not valid yet")]
    NotYetValid,
    #[error("client certificate is not for client authentication")]
    NotForClientAuth,
    #[error("client certificate refused ({0})")]
    Invalid(String),
    #[error("client certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("client certificate has {0} SPIFFE URI SANs, expected one")]
    ManyIdentities(usize),
    #[error("client certificate identity: {0}")]
    Identity(SpiffeIdError),
    #[error("client certificate identity {identity} is outside trust domain `{trust_domain}`")]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
}

from_error!(SpiffeIdError => PeerCertError::Identity);

impl MeshCa {
    /// Validates a client certificate chain (leaf first) against this CA's
    /// root at `now` and returns the leaf's SPIFFE identity.
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, PeerCertError> {
        let (leaf, intermediates) = chain.split_first().ok_or(PeerCertError::Missing)?;
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| PeerCertError::Malformed(format!("{e:?}")))?;
        let anchor = webpki::anchor_from_trusted_cert(self.root_cert_der())
            .map_err(|e| PeerCertError::Invalid(format!("our root: {e:?}")))?;
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                intermediates,
                time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| match e {
                // Another CA with the same subject (e.g. `O=cluster.local`)
                // fails on the signature rather than on the name.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    PeerCertError::UnknownIssuer
                }
                webpki::Error::CertExpired { .. } => PeerCertError::Expired,
                webpki::Error::CertNotValidYet { .. } => PeerCertError::NotYetValid,
                webpki::Error::RequiredEkuNotFoundContext(_) => PeerCertError::NotForClientAuth,
                other => PeerCertError::Invalid(format!("{other:?}")),
            })?;

        let (_, cert) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| PeerCertError::Malformed(e.to_string()))?;
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .map_err(|e| PeerCertError::Malformed(e.to_string()))?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let identity = match uris.as_slice() {
            [] => return Err(PeerCertError::NoIdentity),
            [one] => SpiffeId::parse(one)?,
            many => return Err(PeerCertError::ManyIdentities(many.len())),
        };
        if identity.trust_domain() != self.trust_domain() {
            return Err(PeerCertError::ForeignTrustDomain {
                identity,
                trust_domain: self.trust_domain().to_string(),
            });
        }
        Ok(identity)
    }
}

/// A caller's credentials, as a gRPC request carries them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Caller<'a> {
    /// The TLS peer's certificate chain, leaf first, if it sent one.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    /// The `authorization` header's value.
    pub authorization: Option<&'a str>,
    /// The `clusterid` header's value.
    pub cluster_id: Option<&'a str>,
}

/// Every authenticator's reason for refusing a caller.
#[derive(Debug, thiserror::Error)]
#[error("request authenticate failure: {}", reasons.join("; "))]
pub struct AuthError {
    pub reasons: Vec<String>,
}

/// Authenticates callers for one cluster of the mesh.
#[derive(Debug, Clone)]
pub struct Authenticator {
    cluster_id: String,
}

/// Why a bearer token was refused.
#[derive(Debug, thiserror::Error)]
pub enum BearerError {
    #[error("no bearer token")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("cluster `{found}` is not known here (this control plane is cluster `{ours}`)")]
    UnknownCluster { found: String, ours: String },
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl Authenticator {
    /// An authenticator for the cluster `cluster_id` (what `clusterid`
    /// headers must name, when not empty).
    pub fn new(cluster_id: impl Into<String>) -> Self {
        Self {
            cluster_id: cluster_id.into(),
        }
    }

    /// This control plane's cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The caller's identity: from its client certificate if it has a valid
    /// one, else from its bearer token.
    pub fn authenticate(
        &self,
        ca: &MeshCa,
        caller: &Caller<'_>,
        now: SystemTime,
    ) -> Result<SpiffeId, AuthError> {
        let mut reasons = Vec::new();
        if let Some(chain) = caller.peer_certs.filter(|c| !c.is_empty()) {
            match ca.verify_client_chain(chain, now) {
                Ok(id) => return Ok(id),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        match self.bearer(ca.tokens(), caller, now) {
            Ok(id) => return Ok(id),
            Err(BearerError::Missing) if !reasons.is_empty() => {}
            Err(e) => reasons.push(e.to_string()),
        }
        Err(AuthError { reasons })
    }

    fn bearer(
        &self,
        tokens: &TokenIssuer,
        caller: &Caller<'_>,
        now: SystemTime,
    ) -> Result<SpiffeId, BearerError> {
        let header = caller.authorization.ok_or(BearerError::Missing)?;
        let token = bearer_token(header).ok_or(BearerError::NotBearer)?;
        if let Some(cluster) = caller.cluster_id.filter(|c| !c.is_empty())
            && cluster != self.cluster_id
        {
            return Err(BearerError::UnknownCluster {
                found: cluster.to_string(),
                ours: self.cluster_id.clone(),
            });
        }
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(tokens.verify_at(token, now)?)
    }
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
