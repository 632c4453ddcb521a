//! The worker's one error type, and its mapping to gRPC status codes.

use kiln_core::records::VersionKey;

/// What can go wrong on a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request broke a rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The version is not loaded here.
    #[error("model version {0} is not loaded on this worker")]
    NotLoaded(VersionKey),
    /// The version's queue is full.
    #[error("the batcher queue is full ({0} requests); retry later")]
    QueueFull(u32),
    /// The deadline passed before compute.
    #[error("the deadline passed before the request reached the device")]
    DeadlineExceeded,
    /// The device failed.
    #[error("device error: {0}")]
    Device(String),
    /// The engine thread is gone (the worker is shutting down).
    #[error("the worker is shutting down")]
    EngineStopped,
    /// A training job was cancelled.
    #[error("the training job was cancelled")]
    Cancelled,
    /// A training job failed; the message says why.
    #[error("training failed: {0}")]
    TrainingFailed(String),
    /// Cluster state or artifacts failed.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
}

impl Error {
    /// The same error for another caller (one failure of a decode step fails each
    /// sequence in it). Cluster-state errors keep only their message.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Invalid(m) => Error::Invalid(m.clone()),
            Error::NotLoaded(k) => Error::NotLoaded(k.clone()),
            Error::QueueFull(n) => Error::QueueFull(*n),
            Error::DeadlineExceeded => Error::DeadlineExceeded,
            Error::Device(m) => Error::Device(m.clone()),
            Error::EngineStopped => Error::EngineStopped,
            Error::Cancelled => Error::Cancelled,
            Error::TrainingFailed(m) => Error::TrainingFailed(m.clone()),
            Error::Registry(e) => Error::Device(e.to_string()),
        }
    }
}

/// The worker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kiln_core::Error> for Error {
    fn from(e: kiln_core::Error) -> Self {
        match e {
            kiln_core::Error::Invalid(m) => Error::Invalid(m),
        }
    }
}

impl Error {
    /// The text a caller may read: a registry failure's public text (no locations), else
    /// the error's own.
    pub fn public_text(&self) -> String {
        match self {
            Error::Registry(e) => e.public_text(),
            other => other.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let message = e.to_string();
        match e {
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::NotLoaded(_) => Status::unavailable(message),
            Error::QueueFull(_) => Status::resource_exhausted(message),
            Error::DeadlineExceeded => Status::deadline_exceeded(message),
            Error::Device(_) => Status::internal("the device failed to run the model"),
            Error::EngineStopped => Status::unavailable(message),
            Error::Cancelled => Status::cancelled(message),
            Error::TrainingFailed(_) => Status::failed_precondition(message),
            // The one mapping every service uses (kiln-registry).
            Error::Registry(e) => e.into(),
        }
    }
}
