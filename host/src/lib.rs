//! The meshvm VM agent.
//!
//! It will read the onboarding files, obtain and rotate the workload
//! certificate, serve it to Envoy over SDS, proxy Envoy's xDS stream to the
//! control plane and run the VM's DNS proxy. This crate currently holds the
//! command-line entry point only.
