//! The workload identity: the local half of what Istio's agent does in
//! `security/pkg/nodeagent/cache/secretcache.go` (reference §4.3).
//!
//! 1. [`WorkloadKey::generate`] makes a key pair ([`KeyAlgorithm`]: ECDSA P-256
//!    by default, P-384, or RSA 2048) and [`WorkloadKey::csr_pem`] a PKCS#10
//!    CSR whose only name is the URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>`.
//! 2. The CA client (not here) sends the CSR to
//!    `IstioCertificateService/CreateCertificate` asking for [`REQUESTED_TTL`].
//! 3. [`verify_issued`] checks the answer (leaf first, root last) before
//!    anything uses it: our key, our identity, in its validity period, and a
//!    path to a root of `root-cert.pem`.
//! 4. [`CertStore`] keeps `key.pem`, `cert-chain.pem` and `root-cert.pem`
//!    (mode 0600, replaced atomically) so that a restarted agent reuses a
//!    certificate that is still good ([`CertStore::load_valid`]) and renews
//!    over mTLS instead of needing a fresh bootstrap token.
//! 5. [`renew_at`] says when to renew: at 50 % ± 1 % of the lifetime.
//!
//! Private keys never reach a log: [`WorkloadKey`]'s `Debug` shows only the
//! algorithm and its PEM comes back in a buffer that is zeroed on drop.

mod key;
mod renew;
mod store;
mod verify;

/// A CA for the tests, shared with the integration tests.
#[cfg(test)]
#[path = "../tests/common/test_ca.rs"]
mod test_ca;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use key::{KeyAlgorithm, KeyError, UnknownKeyAlgorithm, WorkloadKey};
pub use renew::{RENEW_RATIO, RENEW_RATIO_JITTER, random_jitter, renew_at};
pub use store::{CertStore, LoadError, StoreError, write_atomic};
pub use verify::{IdentityError, IssuedCert, verify_issued};

/// The certificate lifetime the agent asks for by default (`SECRET_TTL`, 24 h). The CA
/// may grant less; the expiry is always read from the returned leaf.
pub const REQUESTED_TTL: Duration = crate::config::DEFAULT_SECRET_TTL;

/// How far in the future a new certificate's `notBefore` may be and still be
/// accepted: the CA's clock may run ahead of ours.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Where Istio's VM agent keeps its certificates (`OUTPUT_CERTS` =
/// `PROV_CERT` = `./etc/certs`, the agent running in `/`).
pub const ISTIO_VM_CERT_DIR: &str = "/etc/certs";

/// The workload's private key, PEM (PKCS#8 `PRIVATE KEY`).
pub const KEY_FILE: &str = "key.pem";

/// Every element of the CA's answer, leaf first, root last.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// The CA's root bundle (the last element of its answer).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// The file mode of all three files: never readable by anyone but the agent.
pub const FILE_MODE: u32 = 0o600;

/// A certificate time (Unix seconds, possibly before 1970) as a `SystemTime`.
fn system_time(unix: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        // X.509 times end in 9999, which every platform's SystemTime holds.
        UNIX_EPOCH
            .checked_add(magnitude)
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(253_402_300_799))
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// Unix seconds of a `SystemTime` (negative before 1970).
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, for messages.
fn rfc3339(time: &SystemTime) -> String {
    crate::config::time::rfc3339(unix_seconds(*time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(system_time(0), UNIX_EPOCH);
        assert_eq!(unix_seconds(system_time(1_795_640_400)), 1_795_640_400);
        assert_eq!(unix_seconds(system_time(-86_400)), -86_400);
        assert_eq!(rfc3339(&system_time(1_795_640_400)), "2026-11-25T21:00:00Z");
    }
}
