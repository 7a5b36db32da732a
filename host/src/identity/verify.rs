//! Checking the CA's answer before it is stored or served.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::{CLOCK_SKEW, WorkloadKey, rfc3339, system_time};
use crate::config::RootCerts;

/// Why the CA's answer (or a stored certificate) cannot be used. Each names
/// the problem; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the CA returned an empty certificate chain")]
    EmptyChain,
    #[error(
        "the CA returned a one-element certificate chain; Istio's CA sends the leaf first and \
         its root last (Istio's agent rejects this as \"invalid empty CertChain\")"
    )]
    MissingRoot,
    #[error("certificate chain element {element} is not PEM certificates: {problem}")]
    BadPem { element: usize, problem: String },
    #[error("certificate chain element {element} holds a certificate that is not X.509: {problem}")]
    BadCertificate { element: usize, problem: String },
    #[error(
        "the issued certificate is for another key: its public key is not the one our CSR carried"
    )]
    NotOurKey,
    #[error("the issued certificate is for {}, not {expected}", names(found))]
    WrongIdentity {
        expected: String,
        /// The leaf's URI SANs.
        found: Vec<String>,
    },
    #[error(
        "the issued certificate is not valid before {} (now {}; {} s of clock skew allowed)",
        rfc3339(not_before), rfc3339(now), CLOCK_SKEW.as_secs()
    )]
    NotYetValid {
        not_before: SystemTime,
        now: SystemTime,
    },
    #[error(
        "the issued certificate expired at {} (now {})",
        rfc3339(not_after),
        rfc3339(now)
    )]
    Expired {
        not_after: SystemTime,
        now: SystemTime,
    },
    #[error("root certificate {index} of root-cert.pem cannot be a trust anchor: {reason}")]
    BadRoot { index: usize, reason: webpki::Error },
    #[error(
        "the certificate chain does not verify to a root of root-cert.pem for {usage}: {reason}"
    )]
    Untrusted {
        /// `TLS server auth` or `TLS client auth`: a workload certificate must
        /// serve both.
        usage: &'static str,
        reason: webpki::Error,
    },
}

fn names(found: &[String]) -> String {
    match found {
        [] => "no URI SAN".into(),
        [one] => one.clone(),
        many => format!("the URI SANs {}", many.join(", ")),
    }
}

/// A verified workload certificate, with what the SDS server, the TLS client
/// and the renewal timer need.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    spiffe_id: String,
    not_before: SystemTime,
    not_after: SystemTime,
    chain_pem: String,
    root_pem: String,
    chain_der: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_before", &rfc3339(&self.not_before))
            .field("not_after", &rfc3339(&self.not_after))
            .field("certificates", &self.chain_der.len())
            .finish()
    }
}

impl IssuedCert {
    /// The leaf's SPIFFE ID (its only URI SAN).
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// `not_after − not_before`.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Every element of the CA's answer, leaf first, root last, each ending
    /// in a newline: `cert-chain.pem`, and the `default` SDS secret's chain.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The CA's root bundle (the answer's last element): `root-cert.pem`,
    /// and the `ROOTCA` SDS secret.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The leaf certificate, DER.
    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain_der[0]
    }

    /// Every certificate of the chain, DER, leaf first (for a TLS client).
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain_der
    }

    /// [`super::renew_at`] for this certificate.
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        super::renew_at(self.not_before, self.not_after, jitter)
    }
}

/// Checks the CA's `cert_chain` (leaf first, root last; an element may hold
/// several certificates, e.g. the root bundle) for the key that signed the
/// CSR, in this order:
///
/// 1. there are at least two elements, each one or more PEM certificates;
/// 2. the leaf's public key is `key`'s;
/// 3. its URI SANs are exactly `expected_spiffe_id`;
/// 4. `notBefore ≤ now + CLOCK_SKEW` and `now < notAfter`;
/// 5. a path from the leaf through the other certificates reaches one of
///    `roots` (the onboarding `root-cert.pem`, never the CA's own answer),
///    valid for both TLS server and client auth (rustls-webpki's validator:
///    signatures, validity of every certificate, CA flags, path length,
///    name constraints, extended key usage).
pub fn verify_issued(
    chain_pem: &[String],
    key: &WorkloadKey,
    expected_spiffe_id: &str,
    roots: &RootCerts,
    now: SystemTime,
) -> Result<IssuedCert, IdentityError> {
    let Some(root_pem) = chain_pem.last() else {
        return Err(IdentityError::EmptyChain);
    };
    if chain_pem.len() < 2 {
        return Err(IdentityError::MissingRoot);
    }
    let mut joined = String::new();
    for element in chain_pem {
        joined.push_str(element);
        if !element.ends_with('\n') {
            joined.push('\n');
        }
    }
    verify_elements(
        chain_pem.iter().map(String::as_str),
        joined,
        root_pem.clone(),
        key,
        expected_spiffe_id,
        roots,
        now,
    )
}

/// [`verify_issued`] for the elements `elements`, whose concatenation is
/// `chain_pem`; `root_pem` is what to serve as the CA's roots. The stored
/// `cert-chain.pem` is checked as one element.
pub(super) fn verify_elements<'a>(
    elements: impl IntoIterator<Item = &'a str>,
    chain_pem: String,
    root_pem: String,
    key: &WorkloadKey,
    expected_spiffe_id: &str,
    roots: &RootCerts,
    now: SystemTime,
) -> Result<IssuedCert, IdentityError> {
    // 1. PEM, then X.509.
    let mut chain_der = Vec::new();
    for (element, text) in elements.into_iter().enumerate() {
        let before = chain_der.len();
        for der in CertificateDer::pem_slice_iter(text.as_bytes()) {
            let der = der.map_err(|e| IdentityError::BadPem {
                element,
                problem: e.to_string(),
            })?;
            if let Err(problem) = parse(&der) {
                return Err(IdentityError::BadCertificate { element, problem });
            }
            chain_der.push(der);
        }
        if chain_der.len() == before {
            return Err(IdentityError::BadPem {
                element,
                problem: "no CERTIFICATE block".into(),
            });
        }
    }
    let Some(leaf_der) = chain_der.first() else {
        return Err(IdentityError::EmptyChain);
    };
    let leaf = parse(leaf_der).map_err(|problem| IdentityError::BadCertificate {
        element: 0,
        problem,
    })?;

    // 2. Our key.
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(IdentityError::NotOurKey);
    }

    // 3. Our identity.
    let found = uri_sans(&leaf).map_err(|problem| IdentityError::BadCertificate {
        element: 0,
        problem,
    })?;
    if found != [expected_spiffe_id] {
        return Err(IdentityError::WrongIdentity {
            expected: expected_spiffe_id.to_string(),
            found,
        });
    }

    // 4. In its validity period.
    let validity = leaf.validity();
    let not_before = system_time(validity.not_before.timestamp());
    let not_after = system_time(validity.not_after.timestamp());
    if not_before > now + CLOCK_SKEW {
        return Err(IdentityError::NotYetValid { not_before, now });
    }
    if now >= not_after {
        return Err(IdentityError::Expired { not_after, now });
    }

    // 5. A path to a trusted root. A notBefore within the skew counts as now.
    let root_ders: Vec<CertificateDer<'_>> = roots
        .der()
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map_err(|reason| IdentityError::BadRoot { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let end_entity =
        EndEntityCert::try_from(leaf_der).map_err(|reason| IdentityError::Untrusted {
            usage: "TLS server auth",
            reason,
        })?;
    let at = now.max(not_before);
    let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default());
    for (usage, name) in [
        (KeyUsage::server_auth(), "TLS server auth"),
        (KeyUsage::client_auth(), "TLS client auth"),
    ] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &chain_der[1..],
                at,
                usage,
                None,
                None,
            )
            .map_err(|reason| IdentityError::Untrusted {
                usage: name,
                reason,
            })?;
    }

    let spiffe_id = expected_spiffe_id.to_string();
    Ok(IssuedCert {
        spiffe_id,
        not_before,
        not_after,
        chain_pem,
        root_pem,
        chain_der,
    })
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    Ok(cert)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
    Ok(san
        .iter()
        .flat_map(|san| &san.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::KeyAlgorithm;
    use super::super::test_ca::TestCa;
    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";

    struct Setup {
        root: TestCa,
        roots: RootCerts,
        key: WorkloadKey,
        csr: String,
    }

    fn setup() -> Setup {
        let root = TestCa::root("cluster.local", "test root");
        let roots = RootCerts::parse(&root.pem()).unwrap();
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = key.csr_pem(ID).unwrap();
        Setup {
            root,
            roots,
            key,
            csr,
        }
    }

    fn verify(s: &Setup, chain: &[String]) -> Result<IssuedCert, IdentityError> {
        verify_issued(chain, &s.key, ID, &s.roots, SystemTime::now())
    }

    fn hours(h: u64) -> Duration {
        Duration::from_secs(h * 3600)
    }

    #[test]
    fn good_chain() {
        let s = setup();
        let now = SystemTime::now();
        let leaf = s.root.issue(&s.csr, ID, now - hours(1), now + hours(23));
        let chain = [leaf.clone(), s.root.pem()];
        let cert = verify(&s, &chain).unwrap();
        assert_eq!(cert.spiffe_id(), ID);
        assert_eq!(cert.chain_pem(), format!("{leaf}{}", s.root.pem()));
        assert_eq!(cert.root_pem(), s.root.pem());
        assert_eq!(cert.chain_der().len(), 2);
        assert_eq!(
            cert.leaf_der().as_ref(),
            CertificateDer::from_pem_slice(leaf.as_bytes())
                .unwrap()
                .as_ref()
        );
        assert_eq!(cert.lifetime(), hours(24));
        let nb = super::super::unix_seconds(cert.not_before());
        let expected = super::super::unix_seconds(now - hours(1));
        assert_eq!(nb, expected);
        let half = cert.renew_at(0.0);
        assert_eq!(half, cert.not_before() + hours(12));
        assert!(format!("{cert:?}").contains(ID));
    }

    #[test]
    fn every_key_algorithm() {
        let root = TestCa::root("cluster.local", "test root");
        let roots = RootCerts::parse(&root.pem()).unwrap();
        for algorithm in KeyAlgorithm::ALL {
            let key = WorkloadKey::generate(algorithm).unwrap();
            let leaf = root.issue_now(&key.csr_pem(ID).unwrap(), ID);
            let chain = [leaf, root.pem()];
            verify_issued(&chain, &key, ID, &roots, SystemTime::now())
                .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
        }
    }

    #[test]
    fn intermediate_chain() {
        let s = setup();
        let intermediate = s.root.intermediate("istiod intermediate");
        let leaf = intermediate.issue_now(&s.csr, ID);
        let chain = [leaf, intermediate.pem(), s.root.pem()];
        let cert = verify(&s, &chain).unwrap();
        assert_eq!(cert.chain_der().len(), 3);
        // Without the intermediate there is no path.
        let chain = [chain[0].clone(), s.root.pem()];
        let e = verify(&s, &chain).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Untrusted {
                    reason: webpki::Error::UnknownIssuer,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn root_bundle_as_last_element() {
        // Istio sends the root bundle unsplit as the last element; the
        // trusted root need not be its first certificate.
        let s = setup();
        let other = TestCa::root("cluster.local", "new root");
        let leaf = s.root.issue_now(&s.csr, ID);
        let bundle = format!("{}{}", other.pem(), s.root.pem());
        let cert = verify(&s, &[leaf, bundle.clone()]).unwrap();
        assert_eq!(cert.root_pem(), bundle);
        assert_eq!(cert.chain_der().len(), 3);
    }

    #[test]
    fn empty_chain() {
        let s = setup();
        let e = verify(&s, &[]).unwrap_err();
        assert!(matches!(e, IdentityError::EmptyChain), "{e:?}");
        assert_eq!(e.to_string(), "the CA returned an empty certificate chain");
    }

    #[test]
    fn leaf_without_root() {
        let s = setup();
        let leaf = s.root.issue_now(&s.csr, ID);
        let e = verify(&s, &[leaf]).unwrap_err();
        assert!(matches!(e, IdentityError::MissingRoot), "{e:?}");
        assert!(e.to_string().contains("one-element"), "{e}");
    }

    #[test]
    fn garbage_pem() {
        let s = setup();
        let leaf = s.root.issue_now(&s.csr, ID);
        let e = verify(&s, &["garbage".into(), s.root.pem()]).unwrap_err();
        assert!(
            matches!(&e, IdentityError::BadPem { element: 0, problem } if problem == "no CERTIFICATE block"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "certificate chain element 0 is not PEM certificates: no CERTIFICATE block"
        );
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        let e = verify(&s, &[leaf.clone(), broken.into()]).unwrap_err();
        assert!(
            matches!(e, IdentityError::BadPem { element: 1, .. }),
            "{e:?}"
        );
        let truncated = &leaf[..leaf.len() / 2];
        let e = verify(&s, &[truncated.into(), s.root.pem()]).unwrap_err();
        assert!(
            matches!(e, IdentityError::BadPem { element: 0, .. }),
            "{e:?}"
        );
        let not_x509 = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let e = verify(&s, &[not_x509.into(), s.root.pem()]).unwrap_err();
        assert!(
            matches!(e, IdentityError::BadCertificate { element: 0, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("not X.509"), "{e}");
    }

    #[test]
    fn chain_for_another_key() {
        let s = setup();
        let other = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = s.root.issue_now(&other.csr_pem(ID).unwrap(), ID);
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert!(matches!(e, IdentityError::NotOurKey), "{e:?}");
        assert!(e.to_string().contains("for another key"), "{e}");
    }

    #[test]
    fn another_identity() {
        let s = setup();
        let other = "spiffe://cluster.local/ns/vm-ns/sa/reviews-sa";
        let leaf = s.root.issue_now(&s.csr, other);
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert!(
            matches!(&e, IdentityError::WrongIdentity { expected, found } if expected == ID && found == &[other]),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("the issued certificate is for {other}, not {ID}")
        );
        // Another trust domain is another identity.
        let leaf = s
            .root
            .issue_now(&s.csr, "spiffe://other.local/ns/vm-ns/sa/ratings-sa");
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert!(matches!(e, IdentityError::WrongIdentity { .. }), "{e:?}");
    }

    #[test]
    fn expired_leaf() {
        let s = setup();
        let now = SystemTime::now();
        let leaf = s.root.issue(&s.csr, ID, now - hours(25), now - hours(1));
        let e = verify(&s, &[leaf.clone(), s.root.pem()]).unwrap_err();
        assert!(matches!(e, IdentityError::Expired { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("the issued certificate expired at "),
            "{e}"
        );
        // Valid until the second it expires; no skew on that side.
        let cert = verify_issued(
            &[leaf.clone(), s.root.pem()],
            &s.key,
            ID,
            &s.roots,
            now - hours(2),
        )
        .unwrap();
        let e = verify_issued(
            &[leaf, s.root.pem()],
            &s.key,
            ID,
            &s.roots,
            cert.not_after(),
        )
        .unwrap_err();
        assert!(matches!(e, IdentityError::Expired { .. }), "{e:?}");
    }

    #[test]
    fn not_yet_valid_leaf() {
        let s = setup();
        let now = SystemTime::now();
        let leaf = s.root.issue(&s.csr, ID, now + hours(1), now + hours(25));
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert!(matches!(e, IdentityError::NotYetValid { .. }), "{e:?}");
        assert!(e.to_string().contains("300 s of clock skew allowed"), "{e}");
        // A CA clock a little ahead is tolerated.
        let leaf = s
            .root
            .issue(&s.csr, ID, now + Duration::from_secs(120), now + hours(24));
        verify(&s, &[leaf, s.root.pem()]).unwrap();
    }

    #[test]
    fn wrong_root() {
        let s = setup();
        let other = TestCa::root("cluster.local", "impostor");
        let leaf = other.issue_now(&s.csr, ID);
        // The answer's own root is not trusted: only root-cert.pem is.
        let e = verify(&s, &[leaf, other.pem()]).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Untrusted {
                    reason: webpki::Error::UnknownIssuer,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("does not verify to a root of root-cert.pem"),
            "{e}"
        );
    }

    #[test]
    fn leaf_signed_by_a_non_ca() {
        // A leaf "issued" by a certificate without CA:TRUE does not verify,
        // even though that certificate chains to the trusted root.
        let s = setup();
        let fake = s.root.child_without_ca_flag("not a CA");
        let leaf = fake.issue_now(&s.csr, ID);
        let e = verify(&s, &[leaf, fake.pem(), s.root.pem()]).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Untrusted {
                    reason: webpki::Error::EndEntityUsedAsCa,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn leaf_for_server_auth_only() {
        let s = setup();
        let leaf = s.root.issue_with(&s.csr, |params| {
            params.subject_alt_names = vec![rcgen::SanType::URI(ID.try_into().unwrap())];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        });
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Untrusted {
                    usage: "TLS client auth",
                    reason: webpki::Error::RequiredEkuNotFoundContext(_)
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn several_uri_sans() {
        let s = setup();
        let other = "spiffe://cluster.local/ns/vm-ns/sa/admin";
        let leaf = s.root.issue_with(&s.csr, |params| {
            params.subject_alt_names = vec![
                rcgen::SanType::URI(ID.try_into().unwrap()),
                rcgen::SanType::URI(other.try_into().unwrap()),
            ];
        });
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the issued certificate is for the URI SANs {ID}, {other}, not {ID}")
        );
        let leaf = s.root.issue_with(&s.csr, |params| {
            params.subject_alt_names =
                vec![rcgen::SanType::DnsName("vm.example".try_into().unwrap())];
        });
        let e = verify(&s, &[leaf, s.root.pem()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the issued certificate is for no URI SAN, not {ID}")
        );
    }

    #[test]
    fn the_onboarding_roots_are_usable_anchors() {
        for dir in ["ratings-vm", "billing-vm"] {
            let path = format!(
                "{}/../testdata/onboarding/{dir}/root-cert.pem",
                env!("CARGO_MANIFEST_DIR")
            );
            let roots = RootCerts::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
            for der in roots.der() {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice())).unwrap();
            }
        }
    }
}
