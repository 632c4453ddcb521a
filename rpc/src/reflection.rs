//! gRPC server reflection, in both protocol versions tools speak: `grpc.reflection.v1`
//! (grpcurl, Postman, recent clients) and `grpc.reflection.v1alpha` (Python's
//! `grpcio-reflection`, older grpcurl and most other tools). Each process lists only the
//! services its port answers, so a tool never offers a call that would be UNIMPLEMENTED.

use tonic_reflection::server::{Builder, v1, v1alpha};

use crate::{Error, Result};

/// Services every Kiln port serves besides its own: health and reflection itself.
const ALWAYS: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The two reflection services for a port that serves `services` (fully qualified names,
/// e.g. `inference.GRPCInferenceService`) plus health and reflection.
pub struct Reflection<A, B> {
    /// `grpc.reflection.v1.ServerReflection`.
    pub v1: A,
    /// `grpc.reflection.v1alpha.ServerReflection`.
    pub v1alpha: B,
}

/// Reflection over Kiln's descriptors, listing `services` (and health and reflection).
pub fn reflection(
    services: &[&str],
) -> Result<
    Reflection<
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    >,
> {
    let builder = || {
        let mut builder = Builder::configure()
            .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Both versions' descriptors, so either service can describe the other.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for name in services.iter().chain(ALWAYS.iter()) {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let invalid = |e: tonic_reflection::server::Error| Error::Reflection(e.to_string());
    Ok(Reflection {
        v1: builder().build_v1().map_err(invalid)?,
        v1alpha: builder().build_v1alpha().map_err(invalid)?,
    })
}
