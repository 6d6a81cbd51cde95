//! fulgur's controller. For now: the client that keeps every agent's dataplane in sync with the
//! desired state. Providers and Gateway API translation come next. This crate never links aya:
//! it meets the agents only through `fulgur.dataplane.v1`.

pub mod agents;
