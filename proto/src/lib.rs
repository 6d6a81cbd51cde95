//! `fulgur.dataplane.v1`, generated from `fulgur/dataplane/v1/dataplane.proto`.

#![expect(clippy::allow_attributes_without_reason, reason = "generated code")]

pub mod v1 {
    tonic::include_proto!("fulgur.dataplane.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fulgur_descriptor.bin"));
