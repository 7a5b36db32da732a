//! The meshvm VM agent.
//!
//! It reads the onboarding files ([`config`]); later it will obtain and rotate
//! the workload certificate, serve it to Envoy over SDS, proxy Envoy's xDS
//! stream to the control plane and run the VM's DNS proxy.

pub mod config;
