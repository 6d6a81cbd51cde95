//! Test support that needs no kernel and no eBPF toolchain, so the controller's provider tests
//! run with `cargo test -p fulgur-controller` on any machine:
//! - [`fake_agent`]: an in-process agent serving `fulgur.dataplane.v1.Dataplane` over real gRPC
//!   (optionally mutual TLS), recording what it is asked to apply;
//! - [`fake_kube`]: an in-process Kubernetes API server for the real kube client;
//! - [`pki`]: throwaway certificates for mutual TLS;
//! - [`process`]: a child process cleaned up on drop, and free loopback addresses.

pub mod fake_agent;
pub mod fake_kube;
pub mod pki;
pub mod process;
