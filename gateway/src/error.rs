//! The gateway's one error type and its one mapping to gRPC status codes.

use tonic::Status;

/// What can go wrong serving a public request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request broke a rule; the message names the field and the limit.
    #[error("{0}")]
    Invalid(String),
    /// The model, version or alias does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by something different.
    #[error("{0}")]
    AlreadyExists(String),
    /// No replica of the version is ready.
    #[error("{0}")]
    Unavailable(String),
    /// A queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// The deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The call carries no token, or one that is not (or no longer) valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token's role does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// Something failed inside Kiln; details are logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// The cluster state failed; answered through the registry's one mapping.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
}

/// The gateway's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kiln_core::Error> for Error {
    fn from(e: kiln_core::Error) -> Self {
        match e {
            kiln_core::Error::Invalid(m) => Error::Invalid(m),
        }
    }
}

impl From<crate::codec::CodecError> for Error {
    fn from(e: crate::codec::CodecError) -> Self {
        Error::Invalid(e.0)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Overloaded(m) => Status::resource_exhausted(m),
            Error::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Registry(e) => e.into(),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error; see the gateway's log")
            }
        }
    }
}
