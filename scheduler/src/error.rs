//! The scheduler's one error type and its one mapping to gRPC status codes. Cluster-state
//! failures keep the registry's own mapping (`kiln-registry`), and a worker's answer is
//! passed on as the worker gave it.

use tonic::{Code, Status};

/// Why a training call or a job failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job, dataset or upload broke a rule; the text names the field and the limit.
    #[error("{0}")]
    Invalid(String),
    /// A request over one of the server's size limits; the text names the limit.
    #[error("{0}")]
    Limit(String),
    /// A job, dataset or version the call names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// What the call would create exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// No worker can take the work now, or this scheduler does not lead.
    #[error("{0}")]
    Unavailable(String),
    /// The job was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// Stored data is gone or damaged.
    #[error("{0}")]
    DataLoss(String),
    /// The coordinator or a worker broke the training protocol.
    #[error("{0}")]
    Internal(String),
    /// A worker's answer, passed on.
    #[error("{}", .0.message())]
    Worker(Status),
    /// The cluster state failed.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// [`Error::Invalid`].
    pub fn invalid(text: impl Into<String>) -> Self {
        Self::Invalid(text.into())
    }
    /// [`Error::NotFound`].
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::NotFound(text.into())
    }
    /// [`Error::AlreadyExists`].
    pub fn already_exists(text: impl Into<String>) -> Self {
        Self::AlreadyExists(text.into())
    }
    /// [`Error::Unavailable`].
    pub fn unavailable(text: impl Into<String>) -> Self {
        Self::Unavailable(text.into())
    }
    /// [`Error::Cancelled`].
    pub fn cancelled(text: impl Into<String>) -> Self {
        Self::Cancelled(text.into())
    }
    /// [`Error::DataLoss`].
    pub fn data_loss(text: impl Into<String>) -> Self {
        Self::DataLoss(text.into())
    }
    /// [`Error::Internal`].
    pub fn internal(text: impl Into<String>) -> Self {
        Self::Internal(text.into())
    }

    /// The gRPC code the caller gets.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::Limit(_) => Code::ResourceExhausted,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Cancelled(_) => Code::Cancelled,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Internal(_) => Code::Internal,
            Error::Worker(s) => s.code(),
            Error::Registry(e) => e.code(),
        }
    }
}

impl From<kiln_core::Error> for Error {
    fn from(e: kiln_core::Error) -> Self {
        match e {
            kiln_core::Error::Invalid(m) => Error::Invalid(m),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Worker(s)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Worker(s) => s,
            Error::Registry(e) => e.into(),
            Error::Internal(m) => {
                tracing::error!(error = %m, "training coordinator error");
                Status::internal(
                    "internal error in the training coordinator; see the scheduler's log",
                )
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_code_and_keeps_its_text() {
        let cases = [
            (
                Error::invalid("epochs: at most 10000"),
                Code::InvalidArgument,
            ),
            (Error::not_found("job j-1 not found"), Code::NotFound),
            (Error::already_exists("model m exists"), Code::AlreadyExists),
            (Error::unavailable("no worker"), Code::Unavailable),
            (Error::cancelled("cancelled by request"), Code::Cancelled),
            (Error::data_loss("dataset gone"), Code::DataLoss),
            (
                Error::Limit("the dataset has 11 rows; at most 10 are allowed".into()),
                Code::ResourceExhausted,
            ),
            (
                Error::Worker(Status::resource_exhausted("queue full")),
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            assert_eq!(error.code(), code);
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, text.as_str()));
        }
        // Internal failures keep their details in the log.
        let internal = Status::from(Error::internal("replica w-3 at 10.1.2.3:8101 out of turn"));
        assert_eq!(internal.code(), Code::Internal);
        assert!(internal.message().contains("scheduler's log"));
        assert!(!internal.message().contains("10.1.2.3"));
        let hidden = Error::from(kiln_registry::Error::Etcd("10.1.2.3:2379 refused".into()));
        assert_eq!(hidden.code(), Code::Unavailable);
        assert!(!Status::from(hidden).message().contains("10.1.2.3"));
    }
}
