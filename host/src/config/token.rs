//! `istio-token`: the bootstrap bearer token (a Kubernetes TokenRequest JWT
//! for the WorkloadGroup's service account, audience `istio-ca`).
//!
//! The agent never verifies it (istiod does, with a TokenReview); it only
//! reads the payload's claims to say when it expires and for whom it is, and
//! tolerates opaque tokens. The value itself stays inside a [`Secret`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Serialize, Serializer};

use super::secret::Secret;
use super::time;

/// The bootstrap token and what its payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioToken {
    value: Secret<String>,
    /// The JWT claims, or `None` for a token that is not a readable JWT.
    pub claims: Option<Claims>,
}

/// The JWT claims the agent reports on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `aud`, a string or a list of strings.
    pub audiences: Vec<String>,
    /// `exp`, Unix seconds.
    pub expires: Option<i64>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `sub`, e.g. `system:serviceaccount:vm-ns:ratings-sa`.
    pub subject: Option<String>,
}

/// Where and why the token file is unusable. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub line: usize,
    pub column: Option<usize>,
    pub problem: String,
}

impl IstioToken {
    /// Reads a token file's bytes: one line of visible ASCII (a trailing
    /// newline is tolerated), since it goes out as `authorization: Bearer <token>`.
    pub fn parse(bytes: &[u8]) -> Result<Self, TokenError> {
        let trimmed = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(&bytes[..0], |end| &bytes[..=end]);
        if trimmed.is_empty() {
            return Err(TokenError {
                line: 1,
                column: None,
                problem: "the file is empty".into(),
            });
        }
        let mut line = 1;
        let mut column = 0;
        for &b in trimmed {
            column += 1;
            let problem = match b {
                b'\n' => {
                    line += 1;
                    column = 0;
                    continue;
                }
                _ if line > 1 => "a token is a single line; the file has more than one".into(),
                b' ' | b'\t' => "unexpected space: the file must hold only the token, without a \
                                 `Bearer ` prefix or quotes"
                    .to_string(),
                b'"' | b'\'' => "unexpected quote: the file must hold only the token, without \
                                 quotes"
                    .to_string(),
                0x21..=0x7e => continue,
                _ => format!(
                    "byte 0x{b:02x} is not printable ASCII: the file must hold only the token"
                ),
            };
            return Err(TokenError {
                line,
                column: (line == 1).then_some(column),
                problem,
            });
        }
        let value = String::from_utf8(trimmed.to_vec()).expect("checked ASCII");
        let claims = jwt_claims(&value);
        Ok(Self {
            value: Secret::new(value),
            claims,
        })
    }

    /// The token, for the `authorization` header.
    pub fn secret(&self) -> &Secret<String> {
        &self.value
    }

    /// True if the token has an `exp` at or before `now` (Unix seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        self.expires().is_some_and(|exp| exp <= now)
    }

    /// `exp`, if the token is a JWT that has one.
    pub fn expires(&self) -> Option<i64> {
        self.claims.as_ref().and_then(|c| c.expires)
    }

    /// `<redacted, N bytes, expires ..., aud ..., sub ...>`.
    pub fn summary(&self, now: i64) -> String {
        let mut out = format!("<redacted, {} bytes", self.value.len());
        match &self.claims {
            None => out.push_str(", not a JWT"),
            Some(c) => {
                if let Some(exp) = c.expires {
                    out.push_str(", expires ");
                    out.push_str(&time::rfc3339(exp));
                    if exp <= now {
                        out.push_str(" (expired)");
                    }
                }
                if !c.audiences.is_empty() {
                    out.push_str(", aud ");
                    out.push_str(&c.audiences.join(","));
                }
                if let Some(sub) = &c.subject {
                    out.push_str(", sub ");
                    out.push_str(sub);
                }
            }
        }
        out.push('>');
        out
    }
}

impl Serialize for IstioToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.summary(time::now_unix()))
    }
}

/// The claims of a `header.payload.signature` JWT, or `None` if it is not one.
fn jwt_claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let decode = |part: &str| -> Option<serde_json::Map<String, serde_json::Value>> {
        let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        }
    };
    if !decode(header)?.get("alg")?.is_string() {
        return None;
    }
    let payload = decode(payload)?;
    let string = |key: &str| payload.get(key).and_then(|v| v.as_str()).map(String::from);
    let audiences = match payload.get("aud") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let expires = payload.get("exp").and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
    });
    Some(Claims {
        audiences,
        expires,
        issuer: string("iss"),
        subject: string("sub"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATINGS: &str = include_str!("../../../testdata/onboarding/ratings-vm/istio-token");

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn istioctl_token() {
        let token = IstioToken::parse(RATINGS.as_bytes()).unwrap();
        assert_eq!(token.secret().expose(), RATINGS);
        let claims = token.claims.clone().unwrap();
        assert_eq!(claims.audiences, ["istio-ca"]);
        assert_eq!(claims.expires, Some(1_795_640_400));
        assert_eq!(
            claims.issuer.as_deref(),
            Some("https://kubernetes.default.svc.cluster.local")
        );
        assert_eq!(
            claims.subject.as_deref(),
            Some("system:serviceaccount:vm-ns:ratings-sa")
        );
        assert_eq!(
            token.summary(1_795_636_800),
            format!(
                "<redacted, {} bytes, expires 2026-11-25T21:00:00Z, aud istio-ca, \
                 sub system:serviceaccount:vm-ns:ratings-sa>",
                RATINGS.len()
            )
        );
        assert!(token.summary(1_795_640_400).contains("21:00:00Z (expired)"));
        assert!(token.is_expired_at(1_795_640_400));
        assert!(!token.is_expired_at(1_795_640_399));
        assert!(!format!("{token:?}").contains(RATINGS));
        let json = serde_json::to_string(&token).unwrap();
        assert!(json.starts_with("\"<redacted, "), "{json}");
        assert!(!json.contains(RATINGS));
    }

    #[test]
    fn claim_shapes() {
        let t = IstioToken::parse(jwt(r#"{"aud":"istio-ca","exp":1.7e9}"#).as_bytes()).unwrap();
        let c = t.claims.unwrap();
        assert_eq!(c.audiences, ["istio-ca"]);
        assert_eq!(c.expires, Some(1_700_000_000));
        let token = jwt(r#"{"sub":"x"}"#);
        let t = IstioToken::parse(token.as_bytes()).unwrap();
        assert_eq!(
            t.summary(0),
            format!("<redacted, {} bytes, sub x>", token.len())
        );
        // Padded base64url is tolerated.
        let padded = format!(
            "{}.{}==.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"exp":5}"#)
        );
        assert_eq!(
            IstioToken::parse(padded.as_bytes()).unwrap().expires(),
            Some(5)
        );
    }

    #[test]
    fn opaque_tokens_are_fine() {
        for opaque in [
            "s3cr3t-opaque-token",
            "a.b.c",
            "a.b",
            "x.y.z.w",
            &jwt("[1]"),
        ] {
            let t = IstioToken::parse(opaque.as_bytes()).unwrap();
            assert_eq!(t.claims, None, "{opaque}");
            assert!(t.summary(0).ends_with(", not a JWT>"));
            assert_eq!(t.secret().expose(), opaque);
        }
    }

    #[test]
    fn trailing_newline_is_tolerated() {
        let t = IstioToken::parse(format!("{RATINGS}\n").as_bytes()).unwrap();
        assert_eq!(t.secret().expose(), RATINGS);
        let t = IstioToken::parse(b"abc\r\n").unwrap();
        assert_eq!(t.secret().expose(), "abc");
    }

    #[test]
    fn malformed_files() {
        let e = IstioToken::parse(b"").unwrap_err();
        assert_eq!((e.line, e.problem.as_str()), (1, "the file is empty"));
        assert_eq!(
            IstioToken::parse(b" \n").unwrap_err().problem,
            "the file is empty"
        );
        let e = IstioToken::parse(format!("Bearer {RATINGS}").as_bytes()).unwrap_err();
        assert_eq!((e.line, e.column), (1, Some(7)));
        assert!(e.problem.contains("without a `Bearer ` prefix"));
        assert!(!e.problem.contains(&RATINGS[..20]));
        let e = IstioToken::parse(b"abc\ndef").unwrap_err();
        assert_eq!((e.line, e.column), (2, None));
        assert!(e.problem.contains("single line"));
        let e = IstioToken::parse(b"\"abc\"").unwrap_err();
        assert_eq!(e.column, Some(1));
        let e = IstioToken::parse("abc\u{e9}".as_bytes()).unwrap_err();
        assert_eq!(e.column, Some(4));
        assert!(e.problem.starts_with("byte 0xc3"));
    }
}
