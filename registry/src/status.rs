//! The one mapping from registry errors to gRPC statuses. Every service (gateway, worker,
//! scheduler) answers a registry error through it, so the same failure gets the same code
//! and text wherever it surfaces.
//!
//! What the caller may act on (a missing model, a name taken, a bad value) keeps its text.
//! Failures of the machinery (the store, etcd, the artifact store, a damaged record) get a
//! fixed text that names the part at fault and what to do; their details, which hold
//! keys, paths and addresses, go only to this process's log. The table is in
//! docs/architecture.md ("Errors").

use tonic::{Code, Status};

use crate::Error;

/// The code and the caller's text for `error`; `None` text means the error's own.
fn answer(error: &Error) -> (Code, Option<&'static str>) {
    match error {
        Error::NotFound { .. } => (Code::NotFound, None),
        Error::AlreadyExists { .. } => (Code::AlreadyExists, None),
        Error::Invalid(_) => (Code::InvalidArgument, None),
        Error::Contention { .. } => (
            Code::Unavailable,
            Some("the cluster state is busy with concurrent changes; try again"),
        ),
        Error::Compacted { .. } | Error::LeaseExpired(_) => (
            Code::Unavailable,
            Some("the cluster state changed during the call; try again"),
        ),
        Error::Corrupt { .. } => (
            Code::DataLoss,
            Some("a stored artifact failed its sha256 check; register the version again"),
        ),
        Error::Decode { .. } => (
            Code::Internal,
            Some("a stored record cannot be read by this version of Kiln; see the server's log"),
        ),
        Error::Etcd(_) => (
            Code::Unavailable,
            Some("the cluster state store (etcd) is unavailable; try again"),
        ),
        Error::Storage(_) => (
            Code::Unavailable,
            Some("the cluster state store is unavailable; see the server's log"),
        ),
        Error::Artifacts(_) => (
            Code::Unavailable,
            Some("the artifact store is unavailable; try again"),
        ),
    }
}

impl Error {
    /// The gRPC code a caller gets for this error.
    pub fn code(&self) -> Code {
        answer(self).0
    }

    /// The text a caller may read (the status message this error is answered with): for
    /// example a failed load's reason, which ModelReady and RepositoryIndex show.
    pub fn public_text(&self) -> String {
        match (self, answer(self).1) {
            // The checksums are the caller's to compare; the location is not.
            (
                Error::Corrupt {
                    expected, actual, ..
                },
                _,
            ) => format!(
                "the artifact with sha256 {expected} is corrupt: its bytes hash to {actual}; \
                 register the version again"
            ),
            (_, Some(text)) => text.to_owned(),
            (_, None) => self.to_string(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match answer(&error) {
            (code, None) => Status::new(code, error.to_string()),
            (code, Some(_)) => {
                tracing::warn!(error = %error, code = ?code, "cluster state error");
                Status::new(code, error.public_text())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_code_and_internal_details_stay_in_the_log() {
        let secret = ["/kiln/v1/", "10.1.2.3", "/var/lib/kiln", "s3://bucket"];
        let cases = [
            (
                Error::NotFound {
                    what: "model \"iris\"".into(),
                },
                Code::NotFound,
                "model \"iris\" not found",
            ),
            (
                Error::AlreadyExists {
                    what: "alias \"prod\"".into(),
                },
                Code::AlreadyExists,
                "alias \"prod\" already exists",
            ),
            (
                Error::Invalid("name: at most 128 characters".into()),
                Code::InvalidArgument,
                "name: at most 128 characters",
            ),
            (
                Error::Contention {
                    key: "/kiln/v1/models/iris".into(),
                },
                Code::Unavailable,
                "busy",
            ),
            (
                Error::Compacted {
                    requested: 3,
                    oldest: 9,
                },
                Code::Unavailable,
                "try again",
            ),
            (Error::LeaseExpired(7), Code::Unavailable, "try again"),
            (
                Error::Corrupt {
                    uri: "s3://bucket/sha256/ab.safetensors".into(),
                    expected: "ab".into(),
                    actual: "cd".into(),
                },
                Code::DataLoss,
                "sha256",
            ),
            (
                Error::Decode {
                    key: "/kiln/v1/workers/w".into(),
                    reason: "missing field".into(),
                },
                Code::Internal,
                "cannot be read",
            ),
            (
                Error::Etcd("connect to 10.1.2.3:2379 refused".into()),
                Code::Unavailable,
                "etcd",
            ),
            (
                Error::Storage("/var/lib/kiln/state.redb: disk full".into()),
                Code::Unavailable,
                "store",
            ),
            (
                Error::Artifacts("cannot create /var/lib/kiln/artifacts: denied".into()),
                Code::Unavailable,
                "artifact store",
            ),
        ];
        for (error, code, text) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(text), "{text} in {status:?}");
            for s in secret {
                assert!(!status.message().contains(s), "{s} leaked: {status:?}");
            }
        }
    }
}
