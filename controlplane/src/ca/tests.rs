//! Unit tests of the CA: root lifecycle, issuing, client chains, callers.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};

use super::*;

fn ca_in(dir: &Path) -> MeshCa {
    MeshCa::load_or_create(dir, None).unwrap()
}

fn identity() -> SpiffeId {
    SpiffeId::new("cluster.local", "vm-ns", "ratings-sa").unwrap()
}

/// A CSR as an agent makes it, asking for `sans`.
fn csr(sans: &[&str]) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.contains("://") {
                SanType::URI((*s).try_into().unwrap())
            } else {
                SanType::DnsName((*s).try_into().unwrap())
            }
        })
        .collect();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

fn der_of(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

fn pem_of(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[test]
fn root_is_created_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let first = ca_in(&ca_dir);
    assert_eq!(first.trust_domain(), "cluster.local");
    let second = ca_in(&ca_dir);
    assert_eq!(first.root_cert_pem(), second.root_cert_pem());
    assert_eq!(first.tokens().key_id(), second.tokens().key_id());

    let mode = |name: &str| {
        std::fs::metadata(ca_dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(ROOT_KEY_FILE), 0o600);
    assert_eq!(mode(TOKEN_KEY_FILE), 0o600);
    assert_eq!(mode(ROOT_CERT_FILE), 0o644);

    let der = der_of(first.root_cert_pem());
    let (_, root) = X509Certificate::from_der(&der).unwrap();
    assert!(root.is_ca());
    assert_eq!(root.subject().to_string(), "O=cluster.local");
    let life = unix(root.validity().not_after.to_datetime())
        - unix(root.validity().not_before.to_datetime());
    assert!(life >= 3650 * 86400, "{life}");
}

#[test]
fn concurrent_starts_share_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let roots: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| ca_in(&ca_dir).root_cert_pem().to_string()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(ca_in(&ca_dir).root_cert_pem(), roots[0]);
}

#[test]
fn trust_domain_is_kept_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::load_or_create(dir.path(), Some("example.org")).unwrap();
    assert_eq!(ca.trust_domain(), "example.org");
    let again = MeshCa::load_or_create(dir.path(), None).unwrap();
    assert_eq!(again.trust_domain(), "example.org");
    let err = MeshCa::load_or_create(dir.path(), Some("cluster.local")).unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
}

#[test]
fn incomplete_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    ca_in(dir.path());
    std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let err = MeshCa::load_or_create(dir.path(), None).unwrap_err();
    assert!(err.to_string().contains("root-key.pem"), "{err}");
}

#[test]
fn key_of_another_root_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ca_in(a.path());
    ca_in(b.path());
    std::fs::copy(a.path().join(ROOT_KEY_FILE), b.path().join(ROOT_KEY_FILE)).unwrap();
    let err = MeshCa::load_or_create(b.path(), None).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn issue_ignores_the_csr_sans() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let (csr_pem, _key) = csr(&[
        "spiffe://cluster.local/ns/kube-system/sa/admin",
        "evil.example.com",
    ]);
    let chain = ca.issue(&csr_pem, &identity(), None).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_cert_pem());
    assert!(
        chain
            .iter()
            .all(|c| c.ends_with("-----\n") && !c.contains('\r'))
    );

    let der = der_of(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "the subject is empty, so the SAN is critical");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa"
        )]
    );
    assert_eq!(leaf.subject().to_string(), "");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Some(bc.ca),
            _ => None,
        });
    assert_eq!(bc, Some(false));
    assert!(leaf.issuer().to_string().contains("cluster.local"));

    // The leaf is a valid client certificate for its identity.
    let chain_der = [CertificateDer::from(der.clone())];
    assert_eq!(
        ca.verify_client_chain(&chain_der, SystemTime::now())
            .unwrap(),
        identity()
    );
}

#[test]
fn ttl_default_explicit_and_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let (csr_pem, _) = csr(&[]);
    let validity = |ttl: Option<Duration>| {
        let chain = ca.issue(&csr_pem, &identity(), ttl).unwrap();
        let der = der_of(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        (
            unix(leaf.validity().not_before.to_datetime()),
            unix(leaf.validity().not_after.to_datetime()),
        )
    };
    for ttl in [None, Some(Duration::ZERO)] {
        let (nb, na) = validity(ttl);
        let t = now();
        assert!(
            (t - 125..=t - 115).contains(&nb),
            "backdated 2 min: {nb} vs {t}"
        );
        assert!(
            (t + 86400 - 5..=t + 86400 + 5).contains(&na),
            "24 h: {na} vs {t}"
        );
    }
    let (_, na) = validity(Some(Duration::from_secs(3600)));
    assert!((now() + 3595..=now() + 3605).contains(&na));
    // 90 days is allowed, a second more is not.
    validity(Some(MAX_CERT_TTL));
    let err = ca
        .issue(
            &csr_pem,
            &identity(),
            Some(MAX_CERT_TTL + Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(matches!(err, IssueError::TtlTooLong { .. }));
    assert_eq!(
        err.to_string(),
        "requested TTL 2160h0m1s is greater than the max allowed TTL 2160h0m0s"
    );
}

#[test]
fn garbage_csrs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let (good, _) = csr(&[]);
    let mut der = der_of(&good);
    let last = der.len() - 1;
    der[last] ^= 0x55; // the signature's last byte
    let tampered = pem_of("CERTIFICATE REQUEST", &der);
    let cert_not_csr = ca.root_cert_pem().to_string();
    let not_der = pem_of("CERTIFICATE REQUEST", b"not a request");
    for (input, want) in [
        ("", "no CSR"),
        ("hello", "not PEM"),
        (cert_not_csr.as_str(), "is `CERTIFICATE`"),
        (not_der.as_str(), "not a PKCS#10 request"),
        (tampered.as_str(), "self-signature does not verify"),
    ] {
        let err = ca.issue(input, &identity(), None).unwrap_err();
        assert!(matches!(err, IssueError::Csr(_)), "{input:?}: {err}");
        assert!(err.to_string().contains(want), "{input:?}: {err}");
    }
}

#[test]
fn rsa_csrs_are_signed() {
    // Agents may use RSA 2048 keys; a fixed test key keeps this fast.
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let key = KeyPair::from_pem(RSA_TEST_KEY).unwrap();
    let pem = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let chain = ca.issue(&pem, &identity(), None).unwrap();
    let der = der_of(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    let spki = der_of(&key.public_key_pem());
    assert_eq!(leaf.public_key().raw, spki.as_slice());
}

#[test]
fn identity_outside_the_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let (csr_pem, _) = csr(&[]);
    let other = SpiffeId::new("other.domain", "vm-ns", "sa").unwrap();
    assert!(matches!(
        ca.issue(&csr_pem, &other, None),
        Err(IssueError::ForeignIdentity { .. })
    ));
}

#[test]
fn client_chains_from_other_cas_or_expired_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = ca_in(&dir.path().join("ours"));
    let theirs = ca_in(&dir.path().join("theirs"));
    let (csr_pem, _) = csr(&[]);
    let leaf = theirs.issue(&csr_pem, &identity(), None).unwrap();
    let chain = [CertificateDer::from(der_of(&leaf[0]))];
    let err = ours
        .verify_client_chain(&chain, SystemTime::now())
        .unwrap_err();
    assert!(matches!(err, PeerCertError::UnknownIssuer), "{err}");
    // Even with their root appended: only our root is a trust anchor.
    let with_root = [chain[0].clone(), CertificateDer::from(der_of(&leaf[1]))];
    assert!(
        ours.verify_client_chain(&with_root, SystemTime::now())
            .is_err()
    );

    let leaf = ours
        .issue(&csr_pem, &identity(), Some(Duration::from_secs(3600)))
        .unwrap();
    let chain = [CertificateDer::from(der_of(&leaf[0]))];
    let later = SystemTime::now() + Duration::from_secs(7200);
    assert!(matches!(
        ours.verify_client_chain(&chain, later),
        Err(PeerCertError::Expired)
    ));
    assert!(matches!(
        ours.verify_client_chain(&[], SystemTime::now()),
        Err(PeerCertError::Missing)
    ));
    // The serving certificate has no client-auth usage and no identity.
    let serving = ours.serving_cert(&[]).unwrap();
    let chain = [CertificateDer::from(der_of(&serving.cert_chain_pem))];
    assert!(matches!(
        ours.verify_client_chain(&chain, SystemTime::now()),
        Err(PeerCertError::NotForClientAuth)
    ));
    // Garbage.
    assert!(matches!(
        ours.verify_client_chain(&[CertificateDer::from(vec![1, 2, 3])], SystemTime::now()),
        Err(PeerCertError::Malformed(_))
    ));
}

#[test]
fn serving_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let serving = ca
        .serving_cert(&["istiod-canary.istio-system.svc".to_string()])
        .unwrap();
    let der = der_of(&serving.cert_chain_pem);
    let der = CertificateDer::from(der);
    let end_entity = webpki::EndEntityCert::try_from(&der).unwrap();
    for name in [
        "istiod.istio-system.svc",
        "localhost",
        "istiod-canary.istio-system.svc",
        "127.0.0.1",
    ] {
        let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
        end_entity
            .verify_is_valid_for_subject_name(&server_name)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    assert!(serving.key_pem.contains("PRIVATE KEY"));
    assert!(!format!("{serving:?}").contains("PRIVATE KEY"));
}

#[test]
fn callers_are_authenticated_by_certificate_then_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let auth = Authenticator::new("cluster1");
    let now = SystemTime::now();
    let token = ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    let bearer = format!("Bearer {token}");

    // Token only, with and without the cluster header.
    for cluster in [None, Some(""), Some("cluster1")] {
        let caller = Caller {
            authorization: Some(&bearer),
            cluster_id: cluster,
            ..Caller::default()
        };
        assert_eq!(auth.authenticate(&ca, &caller, now).unwrap(), identity());
    }
    // Another cluster's token.
    let caller = Caller {
        authorization: Some(&bearer),
        cluster_id: Some("cluster2"),
        ..Caller::default()
    };
    let err = auth.authenticate(&ca, &caller, now).unwrap_err();
    assert!(err.to_string().contains("cluster `cluster2`"), "{err}");
    assert!(!err.to_string().contains(&token), "never echo the token");

    // Nothing at all.
    let err = auth.authenticate(&ca, &Caller::default(), now).unwrap_err();
    assert_eq!(
        err.to_string(),
        "request authenticate failure: no bearer token"
    );
    // Not a bearer header.
    let caller = Caller {
        authorization: Some("Basic dXNlcjpwYXNz"),
        ..Caller::default()
    };
    assert!(auth.authenticate(&ca, &caller, now).is_err());

    // A certificate wins over a (here expired) token.
    let (csr_pem, _) = csr(&[]);
    let other = SpiffeId::new("cluster.local", "vm-ns", "other-sa").unwrap();
    let leaf = ca.issue(&csr_pem, &other, None).unwrap();
    let chain = vec![CertificateDer::from(der_of(&leaf[0]))];
    let expired = ca
        .tokens()
        .sign(&ca.tokens().claims(
            "vm-ns",
            "ratings-sa",
            Duration::from_secs(60),
            token::now_unix() - 3600,
        ))
        .unwrap();
    let expired = format!("Bearer {expired}");
    let caller = Caller {
        peer_certs: Some(&chain),
        authorization: Some(&expired),
        cluster_id: None,
    };
    assert_eq!(auth.authenticate(&ca, &caller, now).unwrap(), other);
    // A bad certificate falls back to the token, and both reasons are told.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = ca_in(foreign_dir.path());
    let bad_chain = vec![CertificateDer::from(der_of(
        &foreign.issue(&csr_pem, &other, None).unwrap()[0],
    ))];
    let caller = Caller {
        peer_certs: Some(&bad_chain),
        authorization: Some(&bearer),
        cluster_id: None,
    };
    assert_eq!(auth.authenticate(&ca, &caller, now).unwrap(), identity());
    let caller = Caller {
        peer_certs: Some(&bad_chain),
        authorization: Some(&expired),
        cluster_id: None,
    };
    let err = auth.authenticate(&ca, &caller, now).unwrap_err();
    assert_eq!(err.reasons.len(), 2, "{err}");
    // Only a certificate, a bad one: no "no bearer token" noise.
    let caller = Caller {
        peer_certs: Some(&bad_chain),
        ..Caller::default()
    };
    let err = auth.authenticate(&ca, &caller, now).unwrap_err();
    assert_eq!(err.reasons.len(), 1, "{err}");
}

#[test]
fn go_durations() {
    assert_eq!(go_duration(Duration::from_secs(86400)), "24h0m0s");
    assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
    assert_eq!(go_duration(Duration::from_secs(45)), "45s");
}

/// An RSA 2048 key made for this test only (`openssl genpkey -algorithm RSA`).
const RSA_TEST_KEY: &str = include_str!("../../tests/data/rsa-test-key.pem");

#[test]
fn a_ttl_policy_sets_the_default_and_the_maximum_and_short_ttls_backdate_less() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path()).with_ttl_policy(CertTtlPolicy {
        default: Duration::from_secs(60),
        max: Duration::from_secs(600),
    });
    let (csr_pem, _) = csr(&[]);
    let validity = |ttl: Option<Duration>| {
        let chain = ca.issue(&csr_pem, &identity(), ttl).unwrap();
        let der = der_of(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        (
            unix(leaf.validity().not_before.to_datetime()),
            unix(leaf.validity().not_after.to_datetime()),
        )
    };
    let (nb, na) = validity(None);
    let t = now();
    assert!(
        (t + 55..=t + 65).contains(&na),
        "60 s by default: {na} vs {t}"
    );
    assert!((t - 8..=t - 4).contains(&nb), "backdated 6 s: {nb} vs {t}");
    let (_, na) = validity(Some(Duration::from_secs(600)));
    assert!((t + 595..=t + 605).contains(&na));
    let err = ca
        .issue(&csr_pem, &identity(), Some(Duration::from_secs(601)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "requested TTL 10m1s is greater than the max allowed TTL 10m0s"
    );
    assert_eq!(
        workload_backdate(Duration::from_secs(86_400)),
        CLOCK_SKEW_GRACE
    );
    assert_eq!(
        workload_backdate(Duration::from_secs(20)),
        Duration::from_secs(2)
    );
}
