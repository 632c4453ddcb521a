//! The one error type of Kiln's shared types: a value that breaks a rule. Each service
//! crate turns it into its own error (and so into INVALID_ARGUMENT at its edge).

/// What is wrong with a spec, a job, a dataset, weights or a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value broke a rule; the message names the field and the limit.
    #[error("{0}")]
    Invalid(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
