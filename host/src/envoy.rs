//! Envoy on the VM: the bootstrap the agent writes for it ([`bootstrap`]).
//!
//! Envoy reaches the agent only through the bootstrap's static clusters:
//! `xds-grpc` (the agent's xDS proxy, on a Unix socket), `sds-grpc` (the
//! agent's SDS server) and `agent` (its status and health-report server).

pub mod bootstrap;

pub use bootstrap::{Bootstrap, BootstrapError, BootstrapOptions, Node, XdsApi};
