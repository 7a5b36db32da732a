//! `root-cert.pem`: the mesh's trust anchor(s) (configmap `istio-ca-root-cert`),
//! one or more PEM `CERTIFICATE` blocks, each of which must be X.509.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;

use super::time;

/// The root certificates, as PEM and DER, with a summary of each. It
/// serializes as the list of summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootCerts {
    pem: String,
    der: Vec<Vec<u8>>,
    /// One entry per certificate, in file order.
    pub certificates: Vec<CertificateSummary>,
}

impl Serialize for RootCerts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.certificates.serialize(serializer)
    }
}

/// What `check-config` shows of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CertificateSummary {
    pub subject: String,
    pub not_before: String,
    pub not_after: String,
    /// Unix seconds of `not_after`.
    #[serde(skip)]
    pub not_after_unix: i64,
    /// basicConstraints CA:TRUE.
    pub ca: bool,
}

/// Where and why the file is not a usable root bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemError {
    /// 1-based line, when the problem is at one.
    pub line: Option<usize>,
    pub problem: String,
}

impl RootCerts {
    /// The file as read, for Envoy's `ROOTCA` secret and TLS trust stores.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Each certificate's DER.
    pub fn der(&self) -> &[Vec<u8>] {
        &self.der
    }

    /// Parses a PEM bundle. Text outside the blocks is ignored (RFC 7468);
    /// every block must be a `CERTIFICATE` holding one X.509 certificate.
    pub fn parse(text: &str) -> Result<Self, PemError> {
        let err = |line: Option<usize>, problem: String| PemError { line, problem };
        let mut der = Vec::new();
        let mut certificates = Vec::new();
        // (label, line of BEGIN, base64 body)
        let mut open: Option<(String, usize, String)> = None;
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = raw.trim();
            if let Some(label) = line
                .strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
            {
                if let Some((_, begin, _)) = &open {
                    return Err(err(
                        Some(line_no),
                        format!(
                            "BEGIN line inside the block that starts at line {begin} (its END line is missing)"
                        ),
                    ));
                }
                if label != "CERTIFICATE" {
                    return Err(err(
                        Some(line_no),
                        format!(
                            "found a `{label}` block; the file must hold only CERTIFICATE blocks"
                        ),
                    ));
                }
                open = Some((label.to_string(), line_no, String::new()));
            } else if let Some(label) = line
                .strip_prefix("-----END ")
                .and_then(|l| l.strip_suffix("-----"))
            {
                let Some((begin_label, begin, body)) = open.take() else {
                    return Err(err(
                        Some(line_no),
                        format!("END {label} line without a BEGIN line"),
                    ));
                };
                if label != begin_label {
                    return Err(err(
                        Some(line_no),
                        format!("END {label} closes the BEGIN {begin_label} of line {begin}"),
                    ));
                }
                let bytes = STANDARD.decode(&body).map_err(|e| {
                    err(
                        Some(begin),
                        format!("the CERTIFICATE block is not valid base64: {e}"),
                    )
                })?;
                certificates.push(summarize(&bytes).map_err(|problem| {
                    err(
                        Some(begin),
                        format!("the CERTIFICATE block is not an X.509 certificate: {problem}"),
                    )
                })?);
                der.push(bytes);
            } else if let Some((_, _, body)) = &mut open {
                body.extend(line.chars().filter(|c| !c.is_whitespace()));
            }
        }
        if let Some((_, begin, _)) = open {
            return Err(err(
                Some(begin),
                "the CERTIFICATE block has no END line (is the file truncated?)".into(),
            ));
        }
        if certificates.is_empty() {
            let problem = if text.contains("-----BEGIN CERTIFICATE-----") {
                "no PEM CERTIFICATE block on lines of its own (is this JSON or YAML, e.g. the \
                 whole ConfigMap? save only its `root-cert.pem` value)"
            } else {
                "no PEM CERTIFICATE block found"
            };
            return Err(err(None, problem.into()));
        }
        Ok(Self {
            pem: text.to_string(),
            der,
            certificates,
        })
    }
}

fn summarize(der: &[u8]) -> Result<CertificateSummary, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    let validity = cert.validity();
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        not_before: time::rfc3339(validity.not_before.timestamp()),
        not_after: time::rfc3339(validity.not_after.timestamp()),
        not_after_unix: validity.not_after.timestamp(),
        ca: cert.is_ca(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATINGS: &str = include_str!("../../../testdata/onboarding/ratings-vm/root-cert.pem");
    const BILLING: &str = include_str!("../../../testdata/onboarding/billing-vm/root-cert.pem");

    #[test]
    fn istioctl_root_cert() {
        let roots = RootCerts::parse(RATINGS).unwrap();
        assert_eq!(roots.certificates.len(), 1);
        let c = &roots.certificates[0];
        assert_eq!(c.subject, "O=cluster.local");
        assert!(c.ca);
        assert!(c.not_after.starts_with("2036-"), "{c:?}");
        assert_eq!(roots.pem(), RATINGS);
        assert_eq!(roots.der().len(), 1);
    }

    #[test]
    fn bundle_with_explanatory_text() {
        let roots = RootCerts::parse(BILLING).unwrap();
        assert_eq!(roots.certificates.len(), 2);
        let text = format!(
            "subject=O = cluster.local\r\n{}",
            RATINGS.replace('\n', "\r\n")
        );
        assert_eq!(RootCerts::parse(&text).unwrap().certificates.len(), 1);
    }

    fn error(text: &str) -> (Option<usize>, String) {
        let e = RootCerts::parse(text).unwrap_err();
        (e.line, e.problem)
    }

    #[test]
    fn malformed() {
        assert_eq!(error(""), (None, "no PEM CERTIFICATE block found".into()));
        let truncated: String = RATINGS.lines().take(6).map(|l| format!("{l}\n")).collect();
        let (line, problem) = error(&truncated);
        assert_eq!(line, Some(1));
        assert!(problem.contains("has no END line"));
        let (line, problem) = error(&format!("{RATINGS}{truncated}"));
        assert_eq!(line, Some(12));
        assert!(problem.contains("has no END line"));
        let (line, problem) =
            error("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n");
        assert_eq!(line, Some(1));
        assert!(problem.contains("found a `EC PRIVATE KEY` block"));
        let (line, problem) = error("-----END CERTIFICATE-----\n");
        assert_eq!(line, Some(1));
        assert!(problem.contains("without a BEGIN"));
        let (line, problem) =
            error("x\n-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----\n");
        assert_eq!(line, Some(2));
        assert!(problem.contains("not valid base64"), "{problem}");
        let (line, problem) =
            error("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n");
        assert_eq!(line, Some(1));
        assert!(problem.contains("not an X.509 certificate"), "{problem}");
        let nested = RATINGS.replace("-----END CERTIFICATE-----\n", "") + RATINGS;
        let (line, problem) = error(&nested);
        assert_eq!(line, Some(11));
        assert!(
            problem.contains("inside the block that starts at line 1"),
            "{problem}"
        );
        let json = serde_json::json!({"data": {"root-cert.pem": RATINGS}}).to_string();
        let (line, problem) = error(&json);
        assert_eq!(line, None);
        assert!(problem.contains("the whole ConfigMap"), "{problem}");
    }
}
