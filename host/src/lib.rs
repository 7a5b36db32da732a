//! The meshvm VM agent.
//!
//! It reads the onboarding files ([`config`]), obtains and renews the
//! workload certificate from the mesh CA ([`ca_client`], [`identity`],
//! [`identity_manager`]), serves it to Envoy over SDS ([`sds`]), writes
//! Envoy's bootstrap and runs Envoy ([`envoy`]) on the VM's address
//! ([`address`]), and proxies Envoy's xDS stream to the control plane
//! ([`xds`]), keeping the NameTable for the DNS proxy and reporting the
//! workload's health ([`health`]: its own readiness probe and what the filter
//! posts to the status server, [`status`]) on that stream, and answers the
//! mesh's names over DNS ([`dns`]). Wasm filters that the control plane
//! sends with remote code are fetched and cached first ([`wasm`]).

pub mod address;
pub mod agent;
pub mod ca_client;
pub mod config;
pub mod dns;
pub mod envoy;
pub mod health;
pub mod identity;
pub mod identity_manager;
pub mod sds;
pub mod status;
pub mod uds;
pub mod wasm;
pub mod xds;
