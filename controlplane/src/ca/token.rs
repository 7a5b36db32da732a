//! Bootstrap tokens: JWTs shaped like Kubernetes TokenRequest tokens (the
//! `istio-token` istioctl writes), signed ES256 with a key the control plane
//! keeps next to its root, and verified the way istiod's TokenReview judges
//! them: signature, issuer, audience `istio-ca`, expiry, and a subject
//! `system:serviceaccount:<namespace>:<name>` that becomes the caller's
//! SPIFFE identity.
//!
//! Hand-rolled on `ring` + `base64` + `serde_json` (one algorithm, one key):
//! no JWT crate and no second crypto stack. Only `ES256` is accepted, so
//! `alg: none` and algorithm-confusion tokens are refused before any check.
//! No error message contains the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize};

use super::spiffe::{self, SpiffeId, SpiffeIdError};

/// The audience istiod requires (`TOKEN_AUDIENCES` default).
pub const CA_AUDIENCE: &str = "istio-ca";
/// The issuer a Kubernetes API server names in its tokens by default; ours
/// uses it too, so tokens look like the real thing.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// `istioctl x workload entry configure --tokenDuration` default.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// How far in the future `nbf`/`iat` may be (clock skew between hosts).
const LEEWAY_SECS: i64 = 60;
const ALGORITHM: &str = "ES256";
const SUBJECT_PREFIX: &str = "system:serviceaccount:";
/// DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why a token could not be minted or was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm `{0}` is not accepted (only ES256)")]
    UnsupportedAlgorithm(String),
    #[error(
        "token signature does not verify with this control plane's key (token key id {}, ours {ours})",
        found.as_deref().unwrap_or("none")
    )]
    BadSignature { found: Option<String>, ours: String },
    #[error("token issuer `{found}` is not `{expected}`")]
    WrongIssuer { found: String, expected: String },
    #[error("token audiences [{}] do not include `{CA_AUDIENCE}`", found.join(", "))]
    WrongAudience { found: Vec<String> },
    #[error("token expired {ago} s ago (exp {exp})")]
    Expired { exp: i64, ago: i64 },
    #[error("token is not valid before {nbf} ({ahead} s from now)")]
    NotYetValid { nbf: i64, ahead: i64 },
    #[error("token subject `{0}` is not system:serviceaccount:<namespace>:<name>")]
    Subject(String),
    #[error("token identity: {0}")]
    Identity(SpiffeIdError),
    #[error("token signing key: {0}")]
    Key(String),
}

from_error!(SpiffeIdError => TokenError::Identity);

/// The JOSE header.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// A Kubernetes service-account token's claims, in the order the API server
/// writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Audiences: a string or a list in JSON; written as a list.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    pub iss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(
        rename = "kubernetes.io",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes: Option<KubernetesClaims>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub sub: String,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
}

/// A named Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Mints and verifies bootstrap tokens with one ES256 key.
pub struct TokenIssuer {
    key: EcdsaKeyPair,
    kid: String,
    issuer: String,
    trust_domain: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// A fresh P-256 key as PKCS#8 DER (to be saved and passed to
    /// [`TokenIssuer::from_pkcs8`]).
    pub fn generate_key() -> Result<Vec<u8>, TokenError> {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|_| TokenError::Key("cannot generate a P-256 key".into()))?;
        Ok(doc.as_ref().to_vec())
    }

    /// An issuer signing with `pkcs8` (a P-256 key) whose tokens map to
    /// identities in `trust_domain`.
    pub fn from_pkcs8(pkcs8: &[u8], trust_domain: &str) -> Result<Self, TokenError> {
        if !spiffe::is_trust_domain(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_string()).into());
        }
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
                .map_err(|e| TokenError::Key(format!("not a PKCS#8 P-256 key: {e}")))?;
        // Key id as Kubernetes computes it: SHA-256 of the DER public key.
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(key.public_key().as_ref());
        let kid = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &spki));
        Ok(Self {
            key,
            kid,
            issuer: DEFAULT_ISSUER.to_string(),
            trust_domain: trust_domain.to_string(),
            rng,
        })
    }

    /// The key id (`kid`) in the tokens' header.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The `iss` of minted tokens, also required of verified ones.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The trust domain of the identities verified tokens map to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The claims of a token for `namespace`/`service_account`, audience
    /// `istio-ca`, valid from `now` (Unix seconds) for `lifetime`.
    pub fn claims(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
        now: i64,
    ) -> TokenClaims {
        let uid_digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{namespace}/{service_account}").as_bytes(),
        );
        let mut jti = [0u8; 16];
        // SystemRandom failing means the OS has no randomness: a zero jti
        // still makes a valid token.
        let _ = self.rng.fill(&mut jti);
        TokenClaims {
            aud: vec![CA_AUDIENCE.to_string()],
            exp: now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            iat: Some(now),
            iss: self.issuer.clone(),
            jti: Some(uuid(&jti)),
            kubernetes: Some(KubernetesClaims {
                namespace: namespace.to_string(),
                serviceaccount: ObjectRef {
                    name: service_account.to_string(),
                    uid: uuid(uid_digest.as_ref()),
                },
            }),
            nbf: Some(now),
            sub: format!("{SUBJECT_PREFIX}{namespace}:{service_account}"),
        }
    }

    /// A token for `namespace`/`service_account`, valid from now for `lifetime`.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        // Refuse names the verifier would refuse.
        SpiffeId::new(&self.trust_domain, namespace, service_account)?;
        self.sign(&self.claims(namespace, service_account, lifetime, now_unix()))
    }

    /// Signs arbitrary claims (tests use it for expired or mis-addressed tokens).
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        let header = Header {
            alg: ALGORITHM.into(),
            kid: Some(self.kid.clone()),
            typ: None,
        };
        let mut token = encode_json(&header)?;
        token.push('.');
        token.push_str(&encode_json(claims)?);
        let sig = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| TokenError::Key("signing failed".into()))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }

    /// Verifies a token now; see [`TokenIssuer::verify_at`].
    pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
        self.verify_at(token, now_unix())
    }

    /// Verifies `token` at `now` (Unix seconds) and returns the identity of
    /// its service account.
    pub fn verify_at(&self, token: &str, now: i64) -> Result<SpiffeId, TokenError> {
        let malformed = |m: &str| TokenError::Malformed(m.to_string());
        let parts: Vec<&str> = token.split('.').collect();
        let [header_b64, claims_b64, sig_b64] = parts.as_slice() else {
            return Err(TokenError::Malformed(format!(
                "a JWT has 3 dot-separated parts, this has {}",
                parts.len()
            )));
        };
        let header: Header =
            decode_json(header_b64).map_err(|e| malformed(&format!("header: {e}")))?;
        if header.alg != ALGORITHM {
            return Err(TokenError::UnsupportedAlgorithm(header.alg));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| malformed("signature is not base64url"))?;
        let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
        UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        )
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature {
            found: header.kid.clone(),
            ours: self.kid.clone(),
        })?;
        let claims: TokenClaims =
            decode_json(claims_b64).map_err(|e| malformed(&format!("claims: {e}")))?;
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer {
                found: claims.iss,
                expected: self.issuer.clone(),
            });
        }
        if !claims.aud.iter().any(|a| a == CA_AUDIENCE) {
            return Err(TokenError::WrongAudience { found: claims.aud });
        }
        if claims.exp <= now {
            return Err(TokenError::Expired {
                exp: claims.exp,
                ago: now - claims.exp,
            });
        }
        if let Some(nbf) = claims.nbf.into_iter().chain(claims.iat).max()
            && nbf > now + LEEWAY_SECS
        {
            return Err(TokenError::NotYetValid {
                nbf,
                ahead: nbf - now,
            });
        }
        let (namespace, service_account) = claims
            .sub
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| TokenError::Subject(claims.sub.clone()))?;
        if let Some(k) = &claims.kubernetes
            && (k.namespace != namespace || k.serviceaccount.name != service_account)
        {
            return Err(malformed(
                "the kubernetes.io claim names another service account than `sub`",
            ));
        }
        Ok(SpiffeId::new(
            &self.trust_domain,
            namespace,
            service_account,
        )?)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(segment: &str) -> Result<T, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| "not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn encode_json<T: Serialize>(value: &T) -> Result<String, TokenError> {
    let json = serde_json::to_vec(value).map_err(|e| TokenError::Key(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// Formats 16 bytes (or the first 16) as a version-4-shaped UUID.
fn uuid(bytes: &[u8]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::from_pkcs8(&TokenIssuer::generate_key().unwrap(), "cluster.local").unwrap()
    }

    #[test]
    fn round_trip() {
        let tokens = issuer();
        let token = tokens
            .mint("vm-ns", "ratings-sa", DEFAULT_TOKEN_LIFETIME)
            .unwrap();
        let id = tokens.verify(&token).unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa");

        // The claims are Kubernetes-shaped, in the API server's order.
        let payload = token.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json)
                .unwrap()
                .keys()
                .cloned()
                .collect();
        assert!(json.starts_with(r#"{"aud":["istio-ca"],"exp":"#), "{json}");
        assert!(json.contains(r#""sub":"system:serviceaccount:vm-ns:ratings-sa""#));
        assert!(keys.contains(&"kubernetes.io".to_string()));
        let claims: TokenClaims = decode_json(payload).unwrap();
        assert_eq!(claims.exp - claims.iat.unwrap(), 3600);
        let header = token.split('.').next().unwrap();
        let header: Header = decode_json(header).unwrap();
        assert_eq!(header.alg, "ES256");
        assert_eq!(header.kid.as_deref(), Some(tokens.key_id()));
    }

    #[test]
    fn expired_token_is_refused() {
        let tokens = issuer();
        let now = now_unix();
        let claims = tokens.claims("vm-ns", "ratings-sa", Duration::from_secs(3600), now - 7200);
        let token = tokens.sign(&claims).unwrap();
        let err = tokens.verify_at(&token, now).unwrap_err();
        assert!(
            matches!(err, TokenError::Expired { ago: 3600, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn future_token_is_refused() {
        let tokens = issuer();
        let now = now_unix();
        let claims = tokens.claims("vm-ns", "ratings-sa", Duration::from_secs(3600), now + 600);
        let token = tokens.sign(&claims).unwrap();
        assert!(matches!(
            tokens.verify_at(&token, now),
            Err(TokenError::NotYetValid { .. })
        ));
    }

    #[test]
    fn wrong_audience_is_refused() {
        let tokens = issuer();
        let mut claims =
            tokens.claims("vm-ns", "ratings-sa", Duration::from_secs(3600), now_unix());
        claims.aud = vec!["https://kubernetes.default.svc".into()];
        let token = tokens.sign(&claims).unwrap();
        let err = tokens.verify(&token).unwrap_err();
        assert!(matches!(err, TokenError::WrongAudience { .. }), "{err}");
        assert!(err.to_string().contains("istio-ca"));

        // A single-string audience is accepted when it is istio-ca.
        claims.aud = vec![CA_AUDIENCE.into()];
        let token = tokens.sign(&claims).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        let single: TokenClaims =
            serde_json::from_str(&json.replace(r#"["istio-ca"]"#, r#""istio-ca""#)).unwrap();
        assert_eq!(single.aud, vec!["istio-ca".to_string()]);
    }

    #[test]
    fn token_from_another_key_is_refused() {
        let ours = issuer();
        let theirs = issuer();
        let token = theirs
            .mint("vm-ns", "ratings-sa", DEFAULT_TOKEN_LIFETIME)
            .unwrap();
        let err = ours.verify(&token).unwrap_err();
        assert!(matches!(err, TokenError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains(theirs.key_id()), "{err}");
    }

    #[test]
    fn tampered_claims_are_refused() {
        let tokens = issuer();
        let token = tokens
            .mint("vm-ns", "ratings-sa", DEFAULT_TOKEN_LIFETIME)
            .unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut claims: TokenClaims = decode_json(&parts[1]).unwrap();
        claims.sub = "system:serviceaccount:kube-system:admin".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        assert!(matches!(
            tokens.verify(&parts.join(".")),
            Err(TokenError::BadSignature { .. })
        ));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let tokens = issuer();
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&tokens.claims("a", "b", DEFAULT_TOKEN_LIFETIME, now_unix()))
                .unwrap(),
        );
        for (token, want) in [
            ("", "3 dot-separated parts"),
            ("abc", "3 dot-separated parts"),
            ("a.b.c.d", "3 dot-separated parts"),
            ("!!!.e30.AA", "header"),
            (
                &format!("{none_header}.{claims}."),
                "`none` is not accepted",
            ),
        ] {
            let err = tokens.verify(token).unwrap_err().to_string();
            assert!(err.contains(want), "{token:?}: {err}");
        }
        // A signed token whose subject is not a service account.
        let mut c = tokens.claims("vm-ns", "sa", DEFAULT_TOKEN_LIFETIME, now_unix());
        c.sub = "alice".into();
        c.kubernetes = None;
        let err = tokens.verify(&tokens.sign(&c).unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::Subject(_)), "{err}");
        // Or whose names are not Kubernetes names.
        c.sub = "system:serviceaccount:Bad_NS:sa".into();
        let err = tokens.verify(&tokens.sign(&c).unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::Identity(_)), "{err}");
    }
}
