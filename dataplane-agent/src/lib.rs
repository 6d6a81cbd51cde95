//! fulgur's node agent: loads and attaches the dataplane, turns service sets into map writes.

pub mod announce;
pub mod bpf_log;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod grpc;
pub mod inspect;
pub mod maglev;
pub mod metrics;
pub mod mmap;
mod netlink;
pub mod paths;
pub mod snat;
pub mod tc_hook;
pub mod writer;

/// The eBPF object built by build.rs (the nightly toolchain) from `dataplane-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fulgur"));
