//! The workload's key pair and its certificate signing request.

use std::fmt;
use std::str::FromStr;

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_RSA_SHA256, SanType, SignatureAlgorithm,
};
use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// The kind of key the agent generates. Istio's agent defaults to RSA 2048
/// (`ECC_SIGNATURE_ALGORITHM=ECDSA` selects `ECC_CURVE` P256 or P384); meshvm
/// defaults to ECDSA P-256, which is smaller and faster for Envoy's handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256, signing with SHA-256.
    #[default]
    #[value(name = "ecdsa-p256", alias = "p256")]
    EcdsaP256,
    /// ECDSA on P-384, signing with SHA-384.
    #[value(name = "ecdsa-p384", alias = "p384")]
    EcdsaP384,
    /// RSA with a 2048-bit modulus, signing with PKCS#1 v1.5 SHA-256.
    #[value(name = "rsa-2048", alias = "rsa")]
    Rsa2048,
}

impl KeyAlgorithm {
    /// Every algorithm, the default first.
    pub const ALL: [Self; 3] = [Self::EcdsaP256, Self::EcdsaP384, Self::Rsa2048];

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
        }
    }

    fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 => &PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A key algorithm name that is none of [`KeyAlgorithm`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key algorithm `{0}`; expected ecdsa-p256 (the default), ecdsa-p384 or rsa-2048")]
pub struct UnknownKeyAlgorithm(pub String);

impl FromStr for KeyAlgorithm {
    type Err = UnknownKeyAlgorithm;

    /// The names [`KeyAlgorithm::name`] gives, and `p256`, `p384`, `rsa`;
    /// any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "p256" => Ok(Self::EcdsaP256),
            "ecdsa-p384" | "p384" => Ok(Self::EcdsaP384),
            "rsa-2048" | "rsa" => Ok(Self::Rsa2048),
            _ => Err(UnknownKeyAlgorithm(s.to_string())),
        }
    }
}

/// Why a key could not be made, read or used for a CSR. No message contains
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate an {algorithm} key: {reason}")]
    Generate {
        algorithm: KeyAlgorithm,
        reason: String,
    },
    /// A PEM private key that is not one the agent can use.
    #[error("{0}")]
    Parse(String),
    #[error("cannot build a certificate signing request for `{spiffe_id}`: {reason}")]
    Csr { spiffe_id: String, reason: String },
}

/// The workload's private key. `Debug` shows the algorithm only; the key
/// itself leaves through [`WorkloadKey::private_key_pem`] and
/// [`WorkloadKey::private_key_der`] alone.
pub struct WorkloadKey {
    algorithm: KeyAlgorithm,
    pair: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a fresh key pair from the operating system's RNG.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyError> {
        let generate_error = |reason: String| KeyError::Generate { algorithm, reason };
        let pair = match algorithm {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                KeyPair::generate_for(algorithm.signature_algorithm())
                    .map_err(|e| generate_error(e.to_string()))?
            }
            KeyAlgorithm::Rsa2048 => {
                // ring signs with RSA keys but cannot generate them.
                let pkcs8 = generate_rsa_pkcs8(2048).map_err(generate_error)?;
                KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
                    &PKCS_RSA_SHA256,
                )
                .map_err(|e| generate_error(e.to_string()))?
            }
        };
        Ok(Self { algorithm, pair })
    }

    /// Reads a PEM private key as [`WorkloadKey::private_key_pem`] writes it:
    /// PKCS#8 (`PRIVATE KEY`) holding an ECDSA P-256, P-384 or RSA 2048 key.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| {
            KeyError::Parse(match e {
                pem::Error::NoItemsFound => "no PEM private key block found".to_string(),
                e => format!("not a readable PEM private key: {e}"),
            })
        })?;
        let pkcs8 = match der {
            PrivateKeyDer::Pkcs8(pkcs8) => pkcs8,
            PrivateKeyDer::Sec1(_) => {
                return Err(KeyError::Parse(
                    "the key is an `EC PRIVATE KEY` (SEC1, as Istio's agent writes with \
                     PKCS8_KEY=false); meshvm uses PKCS#8 `PRIVATE KEY` keys"
                        .into(),
                ));
            }
            PrivateKeyDer::Pkcs1(_) => {
                return Err(KeyError::Parse(
                    "the key is an `RSA PRIVATE KEY` (PKCS#1, as Istio's agent writes with \
                     PKCS8_KEY=false); meshvm uses PKCS#8 `PRIVATE KEY` keys"
                        .into(),
                ));
            }
            _ => return Err(KeyError::Parse("unsupported private key encoding".into())),
        };
        let unsupported = || {
            KeyError::Parse(
                "the PKCS#8 key is malformed or of an unsupported kind (supported: ECDSA \
                 P-256, ECDSA P-384, RSA 2048)"
                    .into(),
            )
        };
        let pair = KeyPair::try_from(&pkcs8).map_err(|_| unsupported())?;
        let alg = pair.algorithm();
        let algorithm = if alg == &PKCS_ECDSA_P256_SHA256 {
            KeyAlgorithm::EcdsaP256
        } else if alg == &PKCS_ECDSA_P384_SHA384 {
            KeyAlgorithm::EcdsaP384
        } else if alg == &PKCS_RSA_SHA256 {
            let rsa = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
                .map_err(|_| unsupported())?;
            let bits = rsa.public().modulus_len() * 8;
            if bits != 2048 {
                return Err(KeyError::Parse(format!(
                    "the key is RSA {bits}; meshvm uses RSA 2048 (or ECDSA P-256, P-384)"
                )));
            }
            KeyAlgorithm::Rsa2048
        } else {
            return Err(unsupported());
        };
        Ok(Self { algorithm, pair })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The public key as it appears in a certificate's SubjectPublicKeyInfo
    /// BIT STRING (an uncompressed EC point, or a PKCS#1 RSAPublicKey).
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// The private key as PKCS#8 PEM, for `key.pem` and Envoy's SDS secret.
    /// The buffer is zeroed when dropped.
    pub fn private_key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.pair.serialize_pem())
    }

    /// The private key as PKCS#8 DER, for a TLS client (rustls).
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            self.pair.serialized_der().to_vec(),
        ))
    }

    /// A PEM PKCS#10 request signed with this key, with an empty subject and
    /// one name, the URI SAN `spiffe_id` (marked critical, as RFC 5280 asks
    /// when the subject is empty). Istio's CA ignores the CSR's names and
    /// issues the caller's authenticated identity; the CSR carries it anyway,
    /// as Istio's agent's does.
    pub fn csr_pem(&self, spiffe_id: &str) -> Result<String, KeyError> {
        let csr_error = |reason: String| KeyError::Csr {
            spiffe_id: spiffe_id.to_string(),
            reason,
        };
        if !spiffe_id.starts_with("spiffe://") {
            return Err(csr_error("not a SPIFFE ID (spiffe://...)".into()));
        }
        let uri = spiffe_id
            .try_into()
            .map_err(|e: rcgen::Error| csr_error(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| csr_error(e.to_string()))
    }
}

/// A new RSA key of `bits`, as PKCS#8 DER (zeroed on drop).
fn generate_rsa_pkcs8(bits: usize) -> Result<Zeroizing<Vec<u8>>, String> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let mut rng = SystemRng(ring::rand::SystemRandom::new());
    let key = rsa::PrivateKey::new(&mut rng, bits).map_err(|e| e.to_string())?;
    let document = key.to_pkcs8_der().map_err(|e| e.to_string())?;
    Ok(document.to_bytes())
}

/// The operating system's RNG (through ring) for the `rsa` crate.
struct SystemRng(ring::rand::SystemRandom);

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
struct RngFailure;

impl rsa::rand_core::TryRng for SystemRng {
    type Error = RngFailure;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        ring::rand::SecureRandom::fill(&self.0, dst).map_err(|_| RngFailure)
    }
}

impl rsa::rand_core::TryCryptoRng for SystemRng {}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::cri_attributes::ParsedCriAttribute;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer as _;

    const ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";

    #[test]
    fn names() {
        for algorithm in KeyAlgorithm::ALL {
            assert_eq!(algorithm.to_string().parse::<KeyAlgorithm>(), Ok(algorithm));
            let value = <KeyAlgorithm as clap::ValueEnum>::from_str(algorithm.name(), false);
            assert_eq!(value, Ok(algorithm));
        }
        assert_eq!(KeyAlgorithm::default(), KeyAlgorithm::EcdsaP256);
        assert_eq!("P384".parse(), Ok(KeyAlgorithm::EcdsaP384));
        assert_eq!("rsa".parse(), Ok(KeyAlgorithm::Rsa2048));
        let e = "ed25519".parse::<KeyAlgorithm>().unwrap_err();
        assert!(e.to_string().contains("`ed25519`"), "{e}");
    }

    /// Parses a CSR, checks its self-signature and empty subject, and returns
    /// its URI SANs, its other SANs (as text), whether every requested
    /// extension is critical, and its public key.
    fn inspect_csr(pem_text: &str) -> (Vec<String>, Vec<String>, bool, Vec<u8>) {
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem_text.as_bytes())
                .unwrap();
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature()
            .expect("the CSR's self-signature verifies");
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        let (mut uris, mut others, mut critical) = (vec![], vec![], true);
        let mut sans = 0;
        for attr in info.attributes() {
            let ParsedCriAttribute::ExtensionRequest(request) = attr.parsed_attribute() else {
                panic!("unexpected attribute {attr:?}");
            };
            for ext in &request.extensions {
                critical &= ext.critical;
                let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                    panic!("unexpected extension {ext:?}");
                };
                sans += 1;
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        other => others.push(other.to_string()),
                    }
                }
            }
        }
        assert_eq!(sans, 1, "one SAN extension");
        let spki = info.subject_pki.subject_public_key.data.to_vec();
        (uris, others, critical, spki)
    }

    #[test]
    fn every_algorithm_makes_a_key_and_a_csr() {
        for algorithm in KeyAlgorithm::ALL {
            let key = WorkloadKey::generate(algorithm).unwrap();
            assert_eq!(key.algorithm(), algorithm);
            let csr = key.csr_pem(ID).unwrap();
            assert!(
                csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"),
                "{csr}"
            );
            let (uris, others, critical, spki) = inspect_csr(&csr);
            assert_eq!(uris, [ID], "{algorithm}");
            assert!(others.is_empty(), "{others:?}");
            assert!(critical, "SAN critical with an empty subject");
            assert_eq!(spki, key.public_key_raw(), "{algorithm}");

            // The PEM reads back as the same key.
            let pem_text = key.private_key_pem();
            assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
            let again = WorkloadKey::from_pem(&pem_text).unwrap();
            assert_eq!(again.algorithm(), algorithm);
            assert_eq!(again.public_key_raw(), key.public_key_raw());
            assert!(matches!(key.private_key_der(), PrivateKeyDer::Pkcs8(_)));
        }
    }

    #[test]
    fn key_sizes() {
        let p256 = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        assert_eq!(p256.public_key_raw().len(), 65);
        let p384 = WorkloadKey::generate(KeyAlgorithm::EcdsaP384).unwrap();
        assert_eq!(p384.public_key_raw().len(), 97);
        let rsa = WorkloadKey::generate(KeyAlgorithm::Rsa2048).unwrap();
        let public = ring::signature::RsaPublicKeyComponents::<Vec<u8>>::from(
            ring::signature::RsaKeyPair::from_pkcs8(match &rsa.private_key_der() {
                PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
                _ => unreachable!(),
            })
            .unwrap()
            .public(),
        );
        assert_eq!(public.n.len(), 256);
        assert_eq!(public.e, [1, 0, 1]);
    }

    #[test]
    fn debug_hides_the_key() {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        assert_eq!(
            format!("{key:?}"),
            "WorkloadKey { algorithm: EcdsaP256, .. }"
        );
    }

    #[test]
    fn csr_needs_a_spiffe_id() {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let e = key.csr_pem("cluster.local/ns/a/sa/b").unwrap_err();
        assert!(e.to_string().contains("not a SPIFFE ID"), "{e}");
        let e = key.csr_pem("spiffe://cluster.local/ns/ä/sa/b").unwrap_err();
        assert!(matches!(e, KeyError::Csr { .. }), "{e}");
    }

    #[test]
    fn unusable_keys() {
        let parse = |text: &str| match WorkloadKey::from_pem(text) {
            Err(KeyError::Parse(problem)) => problem,
            other => panic!("{other:?}"),
        };
        assert_eq!(parse(""), "no PEM private key block found");
        assert_eq!(
            parse("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "no PEM private key block found"
        );
        let sec1 = include_str!("../../../testdata/identity/istio-sec1-key.pem");
        assert!(parse(sec1).contains("`EC PRIVATE KEY` (SEC1"));
        let pkcs1 = include_str!("../../../testdata/identity/istio-pkcs1-key.pem");
        assert!(parse(pkcs1).contains("`RSA PRIVATE KEY` (PKCS#1"));
        let rsa3072 = include_str!("../../../testdata/identity/rsa-3072-key.pem");
        assert_eq!(
            parse(rsa3072),
            "the key is RSA 3072; meshvm uses RSA 2048 (or ECDSA P-256, P-384)"
        );
        let garbage = "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n";
        assert!(parse(garbage).contains("malformed or of an unsupported kind"));
        let truncated = "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n";
        assert!(parse(truncated).contains("not a readable PEM private key"));
    }
}
