//! meshvm's local control plane: a stand-in for istiod in tests and the demo.
//!
//! It is never a production control plane. It provides:
//!
//! - [`ca`]: the mesh CA (root, workload certificates, bootstrap tokens,
//!   caller authentication, `IstioCertificateService` over TLS);
//! - [`onboard`]: the onboarding files `istioctl x workload entry configure`
//!   writes for a WorkloadGroup, made with this CA;
//! - [`config`]: the Kubernetes objects istiod would read from the cluster
//!   (WorkloadGroups, WorkloadEntries, Services, Pods), from manifests in a
//!   watched directory;
//! - [`node`]: who a proxy says it is (its Envoy node), parsed as istiod does;
//! - [`registry`]: WorkloadEntry auto-registration of connecting VMs, kept
//!   in a state directory;
//! - [`xds`]: the ADS server VMs' agents connect to (registration, the
//!   NameTable, health reports), served with the CA by [`server`];
//! - [`get`]: WorkloadEntries printed as `kubectl get` prints them;
//! - [`yaml`]: YAML written as Go's YAML library writes it;
//! - [`echo`]: the echo app that plays a workload behind Envoy.

/// `impl From<$from> for $to` building `$to::$variant`: like thiserror's
/// `#[from]`, without making the inner error a `source()` as well, since the
/// variant's message already includes it (anyhow would print it twice).
macro_rules! from_error {
    ($from:ty => $to:ident :: $variant:ident) => {
        impl From<$from> for $to {
            fn from(e: $from) -> Self {
                $to::$variant(e)
            }
        }
    };
}

pub mod ca;
pub mod config;
pub mod echo;
pub mod files;
pub mod get;
pub mod mesh;
pub mod node;
pub mod onboard;
pub mod registry;
pub mod run_pod;
pub mod server;
pub mod xds;
pub mod yaml;
