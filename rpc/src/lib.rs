//! How Kiln's processes talk gRPC, in one place:
//!
//! - [`channel`]: the one channel factory (connect timeout, keep-alive, tracing);
//! - [`local`]: the in-process transport `kiln up` uses between its gateway and workers;
//! - [`net`]: serving on an already-bound listener (`TCP_NODELAY` on every connection),
//!   in plaintext or TLS;
//! - [`tls`]: certificates for listeners (re-read when they change) and channels;
//! - [`deadline`]: the caller's `grpc-timeout`;
//! - [`reflection`](mod@reflection): server reflection, v1 and v1alpha, per port.

#![forbid(unsafe_code)]

pub mod channel;
pub mod deadline;
mod error;
pub mod local;
pub mod net;
pub mod reflection;
pub mod tls;

pub use error::{Error, Result};
pub use reflection::reflection;
