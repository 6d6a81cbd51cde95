//! `fulgur.dataplane.v1`, generated from `fulgur/dataplane/v1/dataplane.proto`.

#![expect(clippy::allow_attributes_without_reason, reason = "generated code")]

pub mod v1 {
    tonic::include_proto!("fulgur.dataplane.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fulgur_descriptor.bin"));

/// Feature names an agent lists in `GetResponse.features`: what it understands, so a controller
/// never relies on a field an older agent would ignore.
pub mod features {
    /// `Backend.remote`: SNAT for new flows to backends on other nodes.
    pub const REMOTE_BACKENDS: &str = "remote-backends";
    /// `DesiredState.announce` and `announce_lease_ms`: ARP / NDP announcement with a lease.
    pub const ANNOUNCE: &str = "announce";
}
