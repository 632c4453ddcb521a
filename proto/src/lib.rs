//! Kiln's wire contracts, generated from the `.proto` files in this crate's folder, and
//! nothing else: hand-written code lives in the crates that use them (`kiln-rpc` for
//! channels and reflection, `kiln-telemetry` for tracing). The lint allowances below are
//! for generated code only.
//!
//! - [`inference`]: the Open Inference Protocol (KServe v2) with Triton's extensions;
//! - [`kiln::v1`]: the public model registry API;
//! - [`kiln::internal::v1`]: calls between gateway, scheduler and workers.
//!
//! [`FILE_DESCRIPTOR_SET`] describes all of them for gRPC server reflection.

#![allow(missing_docs, clippy::all)]

/// The Open Inference Protocol, package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Kiln's own packages.
pub mod kiln {
    /// Public API, package `kiln.v1`.
    pub mod v1 {
        tonic::include_proto!("kiln.v1");
    }
    /// Between components, package `kiln.internal.v1`.
    pub mod internal {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("kiln.internal.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every Kiln proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
