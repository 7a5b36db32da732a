//! The mesh CA: what istiod's built-in CA does for VMs, in-process.
//!
//! - A root (ECDSA P-256, `CA:true`, ten years, `O = <trust domain>`) created
//!   on first start in a directory and loaded from it afterwards, next to the
//!   key that signs bootstrap tokens ([`TokenIssuer`]).
//! - [`MeshCa::issue`]: a workload certificate for a CSR, with exactly the
//!   caller's authenticated SPIFFE ID as URI SAN (the CSR's own SANs are
//!   ignored, as istiod does), TTL 24 h by default and at most 90 days.
//! - [`MeshCa::serving_cert`]: istiod's serving certificate
//!   (`istiod.istio-system.svc`, plus `localhost` for tests).
//! - Caller authentication ([`auth`]): a bearer token it minted, or a client
//!   certificate chain it issued.
//! - [`CaService`]: `istio.v1.auth.IstioCertificateService` for tonic, and
//!   [`server`] to serve it over TLS.
//!
//! Files in the CA directory: `root-cert.pem`, `root-key.pem` (0600),
//! `token-key.pem` (0600), each written atomically.

pub mod auth;
pub mod server;
pub mod service;
pub mod spiffe;
pub mod token;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::files;

pub use auth::{AuthError, Authenticator, Caller, PeerCertError};
pub use service::CaService;
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use token::{TokenClaims, TokenError, TokenIssuer};

/// Trust domain of a new CA unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Workload certificate TTL when the request asks for none
/// (`DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate TTL (`MAX_WORKLOAD_CERT_TTL`).
pub const MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// How far back `notBefore` is set, for clock skew (istio
/// `ClockSkewGracePeriod`); a workload certificate shorter than ten times
/// this is backdated by a tenth of its lifetime instead, so that a short TTL
/// (tests, demos) still renews near the middle of the time it was asked for.
pub const CLOCK_SKEW_GRACE: Duration = Duration::from_secs(120);

/// The workload certificate lifetimes the CA grants
/// (`DEFAULT_WORKLOAD_CERT_TTL`, `MAX_WORKLOAD_CERT_TTL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertTtlPolicy {
    /// Granted when the request asks for none (or zero).
    pub default: Duration,
    /// Longer requests are refused, as istiod refuses them.
    pub max: Duration,
}

impl Default for CertTtlPolicy {
    /// Istio's: 24 h by default, at most 90 days.
    fn default() -> Self {
        Self {
            default: DEFAULT_CERT_TTL,
            max: MAX_CERT_TTL,
        }
    }
}

/// How far back a workload certificate of lifetime `ttl` starts.
pub fn workload_backdate(ttl: Duration) -> Duration {
    CLOCK_SKEW_GRACE.min(ttl / 10)
}
/// Lifetime of a new root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Lifetime of the serving certificate made at each start.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The name the agent expects in istiod's certificate (§4.2).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";
/// DNS names of the serving certificate besides any extra ones.
pub const SERVING_DNS_NAMES: &[&str] = &[
    ISTIOD_SERVER_NAME,
    "istiod.istio-system",
    "istiod.istio-system.svc.cluster.local",
    "istiod",
    "istio-pilot.istio-system.svc",
    "localhost",
];

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// Held (`flock`) while the CA is loaded or created.
const LOCK_FILE: &str = ".lock";

/// Why the CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{}: has {present} but not {missing}; restore it or empty the directory", dir.display())]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{}: the CA's trust domain is `{found}`, not `{wanted}`", dir.display())]
    TrustDomainMismatch {
        dir: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("trust domain: {0}")]
    TrustDomain(SpiffeIdError),
    #[error("certificate generation: {0}")]
    Generate(rcgen::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Not a PEM CSR, not parseable, or its self-signature does not verify.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// Longer than [`MAX_CERT_TTL`] (istiod's message).
    #[error(
        "requested TTL {} is greater than the max allowed TTL {}",
        go_duration(*requested),
        go_duration(*max)
    )]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("identity {identity} is not in this CA's trust domain `{trust_domain}`")]
    ForeignIdentity {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("signing: {0}")]
    Sign(rcgen::Error),
}

from_error!(SpiffeIdError => CaError::TrustDomain);
from_error!(rcgen::Error => CaError::Generate);
from_error!(rcgen::Error => IssueError::Sign);

/// The serving certificate and its key, PEM.
pub struct ServingCert {
    /// The leaf, then the root.
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .finish_non_exhaustive()
    }
}

/// The mesh CA: root, signing key and token key.
pub struct MeshCa {
    dir: PathBuf,
    trust_domain: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    tokens: TokenIssuer,
    ttl_policy: CertTtlPolicy,
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Loads the CA from `dir`, or creates it there (with `trust_domain`,
    /// default `cluster.local`) if the directory holds none. Given a trust
    /// domain, an existing CA must have it.
    pub fn load_or_create(dir: &Path, trust_domain: Option<&str>) -> Result<Self, CaError> {
        // `onboard` and `serve` may start together on a new directory: one
        // creates the CA, the other waits and loads it.
        files::create_dir(dir, 0o700).map_err(|error| CaError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::File::create(&lock_path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|error| CaError::Io {
                path: lock_path,
                error,
            })?;
        let ca = Self::load_or_create_locked(dir, trust_domain);
        drop(lock);
        ca
    }

    fn load_or_create_locked(dir: &Path, trust_domain: Option<&str>) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let (root_pem, root_key) = match (cert_path.exists(), key_path.exists()) {
            (true, true) => (read(&cert_path)?, read_key(&key_path)?),
            (false, false) => {
                let td = trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN);
                let created = create_root(dir, td)?;
                tracing::info!(dir = %dir.display(), trust_domain = td, "created a mesh root CA");
                created
            }
            (true, false) => {
                return Err(CaError::Incomplete {
                    dir: dir.to_path_buf(),
                    present: ROOT_CERT_FILE,
                    missing: ROOT_KEY_FILE,
                });
            }
            (false, true) => {
                return Err(CaError::Incomplete {
                    dir: dir.to_path_buf(),
                    present: ROOT_KEY_FILE,
                    missing: ROOT_CERT_FILE,
                });
            }
        };
        let (root_der, found_td) = check_root(&cert_path, &root_pem, &root_key)?;
        if let Some(wanted) = trust_domain
            && wanted != found_td
        {
            return Err(CaError::TrustDomainMismatch {
                dir: dir.to_path_buf(),
                found: found_td,
                wanted: wanted.to_string(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key)?;

        let token_path = dir.join(TOKEN_KEY_FILE);
        let token_key = if token_path.exists() {
            read_key(&token_path)?
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            write(
                &token_path,
                key.serialize_pem().as_bytes(),
                files::SECRET_MODE,
            )?;
            key
        };
        let tokens =
            TokenIssuer::from_pkcs8(token_key.serialized_der(), &found_td).map_err(|e| {
                CaError::Invalid {
                    path: token_path.clone(),
                    problem: e.to_string(),
                }
            })?;

        Ok(Self {
            dir: dir.to_path_buf(),
            trust_domain: found_td,
            root_pem,
            root_der,
            issuer,
            tokens,
            ttl_policy: CertTtlPolicy::default(),
        })
    }

    /// The same CA granting `policy`'s lifetimes.
    pub fn with_ttl_policy(mut self, policy: CertTtlPolicy) -> Self {
        self.ttl_policy = policy;
        self
    }

    /// The lifetimes this CA grants.
    pub fn ttl_policy(&self) -> CertTtlPolicy {
        self.ttl_policy
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mesh's trust domain (the root's `O`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM (what `root-cert.pem` holds).
    pub fn root_cert_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_cert_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The bootstrap token issuer.
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// Signs the CSR `csr_pem` for `identity` and returns the chain, leaf
    /// first and root last, each PEM ending in a newline.
    ///
    /// The CSR's self-signature must verify; its subject and SANs are
    /// ignored: the certificate carries exactly `identity` as URI SAN.
    /// `requested_ttl` `None` or zero means the policy's default; more than
    /// its maximum is refused (see [`MeshCa::with_ttl_policy`]).
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested_ttl: Option<Duration>,
    ) -> Result<Vec<String>, IssueError> {
        let ttl = match requested_ttl {
            None | Some(Duration::ZERO) => self.ttl_policy.default,
            Some(ttl) if ttl > self.ttl_policy.max => {
                return Err(IssueError::TtlTooLong {
                    requested: ttl,
                    max: self.ttl_policy.max,
                });
            }
            Some(ttl) => ttl,
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(IssueError::ForeignIdentity {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key = csr_public_key(csr_pem)?;

        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - workload_backdate(ttl);
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        tracing::info!(%identity, ttl_secs = ttl.as_secs(), "issued a workload certificate");
        Ok(vec![leaf.pem(), self.root_pem_single()])
    }

    /// A fresh serving certificate for istiod's names (see
    /// [`SERVING_DNS_NAMES`]), `127.0.0.1`, `::1` and `extra_dns_names`.
    pub fn serving_cert(&self, extra_dns_names: &[String]) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - CLOCK_SKEW_GRACE;
        params.not_after = now + SERVING_VALIDITY;
        params.serial_number = Some(random_serial());
        for name in SERVING_DNS_NAMES
            .iter()
            .copied()
            .chain(extra_dns_names.iter().map(String::as_str))
        {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.try_into()?));
        }
        params.subject_alt_names.extend([
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServingCert {
            cert_chain_pem: format!("{}{}", cert.pem(), self.root_pem_single()),
            key_pem: key.serialize_pem(),
        })
    }

    /// The root as one PEM block ending in a newline.
    fn root_pem_single(&self) -> String {
        let mut pem = self.root_pem.trim_end().to_string();
        pem.push('\n');
        pem
    }
}

/// Parses a PEM CSR, checks its self-signature and returns its public key.
fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, IssueError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let csr = |m: String| IssueError::Csr(m);
    if csr_pem.trim().is_empty() {
        return Err(csr("the request has no CSR".into()));
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|_| csr("not PEM (expected -----BEGIN CERTIFICATE REQUEST-----)".into()))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(csr(format!(
            "PEM block is `{}`, expected `CERTIFICATE REQUEST`",
            pem.label
        )));
    }
    let (_, request) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| csr(format!("not a PKCS#10 request: {e}")))?;
    request
        .verify_signature()
        .map_err(|e| csr(format!("its self-signature does not verify ({e})")))?;
    rcgen::SubjectPublicKeyInfo::from_der(request.certification_request_info.subject_pki.raw)
        .map_err(|e| csr(format!("unsupported public key: {e}")))
}

/// Creates the root key and certificate in `dir`.
fn create_root(dir: &Path, trust_domain: &str) -> Result<(String, KeyPair), CaError> {
    if !spiffe::is_trust_domain(trust_domain) {
        return Err(SpiffeIdError::TrustDomain(trust_domain.to_string()).into());
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.not_before = now - CLOCK_SKEW_GRACE;
    params.not_after = now + ROOT_VALIDITY;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    // Key first: a certificate without its key is an incomplete CA.
    write(
        &dir.join(ROOT_KEY_FILE),
        key.serialize_pem().as_bytes(),
        files::SECRET_MODE,
    )?;
    let pem = cert.pem();
    write(
        &dir.join(ROOT_CERT_FILE),
        pem.as_bytes(),
        files::PUBLIC_MODE,
    )?;
    Ok((pem, key))
}

/// Checks the saved root: a CA certificate, current, matching its key.
/// Returns its DER and trust domain (`O`).
fn check_root(
    path: &Path,
    pem_text: &str,
    key: &KeyPair,
) -> Result<(CertificateDer<'static>, String), CaError> {
    let invalid = |problem: String| CaError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .map_err(|_| invalid("not a PEM certificate".into()))?;
    let (_, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(invalid("not a CA certificate".into()));
    }
    if !cert.validity().is_valid() {
        return Err(invalid(format!(
            "the root is not valid now (valid {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(format!("does not match {ROOT_KEY_FILE}")));
    }
    let td = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .ok_or_else(|| invalid("the root's subject has no O (the trust domain)".into()))?
        .to_string();
    Ok((CertificateDer::from(pem.contents.clone()), td))
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|error| CaError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "a private key is readable by others; chmod 600 it");
    }
    KeyPair::from_pem(&read(path)?).map_err(|e| CaError::Invalid {
        path: path.to_path_buf(),
        problem: format!("not a private key: {e}"),
    })
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    files::write_atomic(path, contents, mode).map_err(|error| CaError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// A random positive serial number below 2^128.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS provides randomness");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte: DER stays minimal
    SerialNumber::from_slice(&bytes)
}

/// A duration as Go prints it (`24h0m0s`, `1m30s`, `45s`).
pub fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests;
