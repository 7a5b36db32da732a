//! The meshvm VM agent.
//!
//! It reads the onboarding files ([`config`]), keeps the workload's key and
//! certificate ([`identity`]), obtains and rotates the certificate over the
//! CA API ([`ca_client`], [`identity_manager`]), serves it to Envoy over SDS
//! ([`sds`]), and writes Envoy's bootstrap and runs Envoy ([`envoy`]) on the
//! VM's address ([`address`]); later it will proxy Envoy's xDS stream to the
//! control plane and run the VM's DNS proxy.

pub mod address;
pub mod ca_client;
pub mod config;
pub mod envoy;
pub mod identity;
pub mod identity_manager;
pub mod sds;
