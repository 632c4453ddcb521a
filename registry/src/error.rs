//! The registry's one error type.

/// What can go wrong reading or writing cluster state and artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A record that should exist does not.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, in the user's words (e.g. "model \"iris\"").
        what: String,
    },
    /// A record that must not exist yet does.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What collided.
        what: String,
    },
    /// A request broke a rule; the message names the field and the limit.
    #[error("{0}")]
    Invalid(String),
    /// A compare-and-swap kept losing to concurrent writers.
    #[error("too much contention on {key}; try again")]
    Contention {
        /// The contended key.
        key: String,
    },
    /// A watch asked for history that the store no longer keeps.
    #[error("revision {requested} was compacted (oldest kept: {oldest})")]
    Compacted {
        /// Revision asked for.
        requested: i64,
        /// Oldest revision still available.
        oldest: i64,
    },
    /// A lease that expired or was revoked.
    #[error("lease {0} is not alive")]
    LeaseExpired(i64),
    /// An artifact whose bytes do not hash to the recorded sha256.
    #[error("artifact {uri} is corrupt: expected sha256 {expected}, found {actual}")]
    Corrupt {
        /// Artifact location.
        uri: String,
        /// Recorded checksum.
        expected: String,
        /// Checksum of the bytes read.
        actual: String,
    },
    /// A stored record that does not decode (written by another version, or damaged).
    #[error("record at {key} does not decode: {reason}")]
    Decode {
        /// The key.
        key: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// etcd failed or could not be reached.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The embedded file store failed.
    #[error("embedded store: {0}")]
    Storage(String),
    /// The artifact store failed.
    #[error("artifact store: {0}")]
    Artifacts(String),
}

impl From<kiln_core::Error> for Error {
    fn from(e: kiln_core::Error) -> Self {
        match e {
            kiln_core::Error::Invalid(m) => Error::Invalid(m),
        }
    }
}

/// The registry's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
