//! The one error type of channels and reflection set-up. These errors are for the
//! process that opens the channel (its logs, its CLI output); services turn them into
//! gRPC statuses without the address (see each service crate's error mapping).

/// Why a channel or a reflection service could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not `HOST:PORT` or an `http://` URL.
    #[error("`{address}` is not a gRPC address (HOST:PORT or http://HOST:PORT)")]
    Address {
        /// The address as given.
        address: String,
    },
    /// Nothing answered at the address within the connect timeout.
    #[error("cannot reach {address}: {detail}")]
    Unreachable {
        /// The address as given.
        address: String,
        /// The innermost cause (connection refused, timed out, no such host).
        detail: String,
    },
    /// A certificate, key or CA file that cannot be read or used; names the file and flag.
    #[error("TLS: {0}")]
    Tls(String),
    /// The reflection service could not read a descriptor set (a build problem).
    #[error("reflection: {0}")]
    Reflection(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
