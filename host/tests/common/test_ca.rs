//! A small CA for tests, shaped like Istio's (security/pkg/pki/ca): a root
//! `O=cluster.local`, optional intermediates, and leaves with an empty
//! subject, the SPIFFE URI SAN only, digitalSignature + keyEncipherment,
//! serverAuth + clientAuth, CA:FALSE. Used by the identity unit tests
//! (`#[path]`-included) and the integration tests.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn offset(time: SystemTime) -> time::OffsetDateTime {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("in range")
}

fn ca_params(org: &str, name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(now - Duration::from_secs(86_400));
    params.not_after = offset(now + Duration::from_secs(10 * 365 * 86_400));
    params
}

impl TestCa {
    /// A self-signed root, `O=<org>, CN=<name>`.
    pub fn root(org: &str, name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(ca_params(org, name, None), key).expect("root");
        Self { issuer }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = ca_params("cluster.local", name, Some(0));
        params.use_authority_key_identifier_extension = true;
        let issuer = CertifiedIssuer::signed_by(params, key, &self.issuer).expect("intermediate");
        Self { issuer }
    }

    /// A certificate signed by this CA with CA:FALSE, used to sign anyway.
    pub fn child_without_ca_flag(&self, name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = ca_params("cluster.local", name, None);
        params.is_ca = IsCa::ExplicitNoCa;
        let issuer = CertifiedIssuer::signed_by(params, key, &self.issuer).expect("child");
        Self { issuer }
    }

    /// This CA's certificate, PEM (ends with a newline).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Signs the key of `csr_pem` (after checking the CSR's self-signature)
    /// for `spiffe_id`, valid from `not_before` to `not_after`. Like Istio's
    /// CA it ignores the names in the CSR.
    pub fn issue(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> String {
        self.issue_with(csr_pem, |params| {
            params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("IA5"))];
            params.not_before = offset(not_before);
            params.not_after = offset(not_after);
        })
    }

    /// Signs the key of `csr_pem` with Istio's leaf profile (valid for 24 h
    /// from a minute ago, no SAN yet) changed by `tweak`.
    pub fn issue_with(&self, csr_pem: &str, tweak: impl FnOnce(&mut CertificateParams)) -> String {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).expect("a valid CSR");
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
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
        params.not_before = offset(now - Duration::from_secs(60));
        params.not_after = offset(now + Duration::from_secs(86_400 - 60));
        tweak(&mut params);
        params
            .signed_by(&csr.public_key, &self.issuer)
            .expect("leaf")
            .pem()
    }

    /// [`TestCa::issue`] for 24 h starting a minute ago.
    pub fn issue_now(&self, csr_pem: &str, spiffe_id: &str) -> String {
        let now = SystemTime::now();
        self.issue(
            csr_pem,
            spiffe_id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86_400 - 60),
        )
    }
}
