//! Protocol definitions shared by the meshvm agent and the local control
//! plane: Istio's CA service and NameTable. Envoy's xDS types come from the
//! `envoy-types` crate.
