//! Helpers for meshvm's integration tests that run real components: Envoy on
//! ephemeral ports (admin and listeners on port 0, discovered through the
//! admin API), a throwaway mesh CA writing SPIFFE certificates to files, and
//! a curl client, and a real OCI registry with skopeo. Test-only; never a
//! dependency of shipped code.

pub mod envoy;
pub mod pki;
pub mod process;
pub mod registry;
