//! The one error type of telemetry set-up. Nothing here answers a gRPC call, so there is
//! no mapping to status codes: these errors stop a process at start, naming the setting.

/// Why logs, traces or metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable has a value Kiln cannot use; the text names it.
    #[error("{0}")]
    Setting(String),
    /// Something the process needs (a thread, a runtime, the log subscriber) did not start.
    #[error("cannot {what}: {detail}")]
    Start {
        /// What was being started, as the end of "cannot …".
        what: &'static str,
        /// The reason the system or library gave.
        detail: String,
    },
}

impl Error {
    /// A [`Error::Start`] from the error that stopped it.
    pub fn start(what: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Start {
            what,
            detail: error.to_string(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
