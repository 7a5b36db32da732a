//! Envoy on the VM: the bootstrap the agent writes for it ([`bootstrap`]),
//! the process the agent runs and keeps running ([`supervisor`]), its log
//! lines in the agent's log ([`log`]), and the admin calls the agent makes
//! ([`admin`]).
//!
//! Envoy reaches the agent only through the bootstrap's static clusters:
//! `xds-grpc` (the agent's xDS proxy, on a Unix socket), `sds-grpc` (the
//! agent's SDS server) and `agent` (its status and health-report server).

pub mod admin;
pub mod bootstrap;
pub mod log;
pub mod supervisor;

pub use bootstrap::{Bootstrap, BootstrapError, BootstrapOptions, HealthService, Node, XdsApi};
pub use supervisor::{EnvoyStatus, Phase, Supervisor, SupervisorOptions};
