//! Kiln's wire contracts. Every `.proto` lives in this crate's folder and this is the only
//! place with generated code:
//!
//! - [`inference`]: the Open Inference Protocol (KServe v2) with Triton's extensions;
//! - [`kiln::v1`]: the public model registry API;
//! - [`kiln::internal::v1`]: calls between gateway, scheduler and workers.
//!
//! [`FILE_DESCRIPTOR_SET`] describes all of them for gRPC server reflection.

#![allow(missing_docs, clippy::all)]

/// The Open Inference Protocol, package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Kiln's own packages.
pub mod kiln {
    /// Public API, package `kiln.v1`.
    pub mod v1 {
        tonic::include_proto!("kiln.v1");
    }
    /// Between components, package `kiln.internal.v1`.
    pub mod internal {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("kiln.internal.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every Kiln proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");

/// Deadlines as gRPC carries them: the `grpc-timeout` request header.
pub mod deadline {
    use std::time::Duration;

    /// The caller's remaining time budget, if it sent one. The header is digits followed by
    /// a unit: H, M, S, m (milli), u (micro), n (nano).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
        let value = metadata.get("grpc-timeout")?.to_str().ok()?;
        parse(value)
    }

    /// Parse one `grpc-timeout` value.
    pub fn parse(value: &str) -> Option<Duration> {
        if value.len() < 2 || value.len() > 9 {
            return None;
        }
        let (digits, unit) = value.split_at(value.len() - 1);
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n.checked_mul(3600)?),
            "M" => Duration::from_secs(n.checked_mul(60)?),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn grpc_timeout_values_parse() {
            assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
            assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
            assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
            assert_eq!(parse("5x"), None);
            assert_eq!(parse("m"), None);
            assert_eq!(parse("1234567890S"), None);
        }
    }
}

/// Serving gRPC on an already-bound listener.
pub mod net {
    use futures::{Stream, StreamExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Accepted connections of `listener`, with `TCP_NODELAY` set on each. Kiln's calls are
    /// small request/response pairs: left to Nagle's algorithm and delayed ACKs, some of
    /// them wait 40 ms. (tonic sets this only on listeners it binds itself.)
    pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
        tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
            let stream = accepted?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}
