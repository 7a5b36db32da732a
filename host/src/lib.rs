//! The meshvm VM agent.
//!
//! It reads the onboarding files ([`config`]) and keeps the workload's key and
//! certificate ([`identity`]); later it will obtain and rotate the certificate
//! over the CA API, serve it to Envoy over SDS, proxy Envoy's xDS stream to
//! the control plane and run the VM's DNS proxy.

pub mod ca_client;
pub mod config;
pub mod identity;
pub mod identity_manager;
pub mod sds;
