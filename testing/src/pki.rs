//! A throwaway mesh CA and SPIFFE workload certificates, written to files for
//! Envoy and curl.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Certificate and key files of one identity.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test CA that issues workload certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root: PathBuf,
    dir: PathBuf,
}

impl TestCa {
    /// Creates a CA and writes its root certificate to `dir/root-cert.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let root = dir.join(format!("{name}-root-cert.pem"));
        std::fs::write(&root, cert.pem()).expect("write root");
        TestCa {
            issuer: Issuer::new(params, key),
            root,
            dir: dir.to_path_buf(),
        }
    }

    /// Issues a workload certificate with the given URI SANs (plus
    /// `localhost`/127.0.0.1 so it also serves as a server certificate).
    pub fn issue(&self, file_stem: &str, uri_sans: &[&str]) -> CertFiles {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshvm test");
        params.subject_alt_names = uri_sans
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().expect("ia5 URI")))
            .collect();
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into().expect("dns")));
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("workload key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// Asserts that the real `openssl verify` accepts `chain` (PEM, leaf first)
/// against `root`, for both TLS client and server use: a check of issued
/// certificates that involves none of our code.
pub fn assert_openssl_verifies(root: &Path, chain: &Path) {
    for purpose in ["sslclient", "sslserver"] {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(root)
            .arg(chain)
            .output()
            .expect("openssl is installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": OK"),
            "openssl verify ({purpose}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The base64 bodies of the PEM certificates in `text`, in order
/// (whitespace removed), for comparing certificates as text.
pub fn pem_certs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let body = &rest[start + "-----BEGIN CERTIFICATE-----".len()..];
        let Some(end) = body.find("-----END CERTIFICATE-----") else {
            break;
        };
        out.push(body[..end].split_whitespace().collect());
        rest = &body[end..];
    }
    out
}

/// The certificates a TLS server on 127.0.0.1:`port` presents, leaf first,
/// as `openssl s_client` sees them (empty if the handshake failed).
pub fn presented_certs(port: u16) -> Vec<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-showcerts",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed");
    pem_certs(&String::from_utf8_lossy(&out.stdout))
}
