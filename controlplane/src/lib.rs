//! meshvm's local control plane: a stand-in for istiod in tests and the demo.
//!
//! It is never a production control plane. Today it provides the echo app
//! that plays a workload behind Envoy; the CA, xDS and WorkloadEntry
//! lifecycle build on it.

pub mod echo;
