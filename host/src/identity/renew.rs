//! When to renew: Istio's agent rotates after
//! `max(0, expire − r·(expire − created) − now)` with
//! `r = clamp(0.5 ± rand[0,1)·0.01, 0, 1)` (`SECRET_GRACE_PERIOD_RATIO` and
//! its `_JITTER`), i.e. at 50 % ± 1 % of the lifetime, so that a fleet of VMs
//! onboarded together does not renew in step.

use std::time::SystemTime;

use ring::rand::SecureRandom as _;

/// The share of the lifetime after which a certificate is renewed.
pub const RENEW_RATIO: f64 = 0.5;

/// The most the renewal point moves either way, as a share of the lifetime.
pub const RENEW_RATIO_JITTER: f64 = 0.01;

/// When to renew a certificate valid from `not_before` to `not_after`:
/// `not_before + lifetime × (0.5 + 0.01 × jitter)`. `jitter` is clamped to
/// [-1, 1]; pass [`random_jitter`] in production and fixed values in tests.
/// A certificate with no lifetime renews at `not_before`. When the result is
/// already past, the caller renews at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(-1.0, 1.0)
    };
    let ratio = (RENEW_RATIO + RENEW_RATIO_JITTER * jitter).clamp(0.0, 1.0);
    not_before + lifetime.mul_f64(ratio)
}

/// A uniformly distributed value in [-1, 1) from the operating system's RNG,
/// for [`renew_at`]. If the RNG fails (it does not on Linux), 0.
pub fn random_jitter() -> f64 {
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.0;
    }
    // The top 53 bits as a fraction in [0, 1), then mapped to [-1, 1).
    let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    unit * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn half_life_with_jitter() {
        let nb = at(1_795_640_400);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_at(nb, nb + day, 0.0), nb + day / 2);
        // ±1 % of 24 h is ±14.4 min.
        assert_eq!(
            renew_at(nb, nb + day, 1.0),
            nb + Duration::from_secs(43_200 + 864)
        );
        assert_eq!(
            renew_at(nb, nb + day, -1.0),
            nb + Duration::from_secs(43_200 - 864)
        );
        // Out-of-range jitter is clamped.
        assert_eq!(renew_at(nb, nb + day, 7.0), renew_at(nb, nb + day, 1.0));
        assert_eq!(renew_at(nb, nb + day, -7.0), renew_at(nb, nb + day, -1.0));
        assert_eq!(renew_at(nb, nb + day, f64::NAN), nb + day / 2);
        // No lifetime, or a negative one.
        assert_eq!(renew_at(nb, nb, 0.3), nb);
        assert_eq!(renew_at(nb + day, nb, 0.3), nb + day);
    }

    #[test]
    fn always_within_49_to_51_percent() {
        let nb = at(1_700_000_000);
        for lifetime in [1, 59, 3_600, 86_400, 90 * 86_400, 10 * 365 * 86_400] {
            let na = nb + Duration::from_secs(lifetime);
            let low = nb + Duration::from_secs(lifetime).mul_f64(0.49);
            let high = nb + Duration::from_secs(lifetime).mul_f64(0.51);
            let fixed = [-1.0, -0.5, 0.0, 0.25, 0.999_999, 1.0];
            for jitter in fixed.into_iter().chain((0..1000).map(|_| random_jitter())) {
                let t = renew_at(nb, na, jitter);
                assert!(low <= t && t <= high, "{lifetime} s, jitter {jitter}");
            }
        }
    }

    #[test]
    fn random_jitter_spreads_over_the_range() {
        let draws: Vec<f64> = (0..2000).map(|_| random_jitter()).collect();
        assert!(draws.iter().all(|j| (-1.0..1.0).contains(j)));
        assert!(draws.iter().any(|j| *j < -0.5) && draws.iter().any(|j| *j > 0.5));
    }
}
