//! fulgur's controller: Gateway API semantics (`translate`, pure, over the `model` Snapshot) and
//! the client that keeps every agent's dataplane in sync with the desired state. The providers
//! (manifest folder, Kubernetes API) come next. This crate never links aya:
//! it meets the agents only through `fulgur.dataplane.v1`.

pub mod agents;
pub mod announce;
pub mod backends;
pub mod convert;
pub mod file;
pub mod gateway_api;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod resources;
pub mod shutdown;
pub mod standalone;
pub mod status;
pub mod translate;
