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

/// The Prometheus scrape endpoint every process can serve on its own port: `GET /metrics`
/// answers the text exposition format; anything else is 404. A deliberately small HTTP/1.1
/// responder — one request per connection — since a scraper is all that calls it.
pub mod metrics {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Renders the current metrics as Prometheus text.
    pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

    /// Serve `render` at `/metrics` on `listener` until the task is dropped.
    pub async fn serve(listener: TcpListener, render: Render) {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let mut request = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                // Read the request head (bounded), up to the blank line.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        socket.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next(), parts.next());
                let path = path.map(|p| p.split('?').next().unwrap_or(p));
                let (status, body, kind) = if method == Some("GET") && path == Some("/metrics") {
                    (
                        "200 OK",
                        render(),
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_owned(),
                        "text/plain",
                    )
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    }

    /// Upper bounds of the latency histograms, seconds: 100 µs to 10 s.
    pub const SECONDS_BOUNDS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    /// Upper bounds of the batch-size histogram, rows: powers of two to 65,536.
    pub const ROWS_BOUNDS: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
        16384.0, 32768.0, 65536.0,
    ];

    /// Upper bounds of the histograms of long work (model loads, training epochs),
    /// seconds: 10 ms to 10 minutes.
    pub const LONG_SECONDS_BOUNDS: &[f64] = &[
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];

    /// A Prometheus histogram: counts per bucket (not cumulative; cumulated when written).
    #[derive(Debug, Clone)]
    pub struct Histogram {
        bounds: &'static [f64],
        counts: Vec<u64>,
        /// Observations above the last bound.
        over: u64,
        sum: f64,
    }

    impl Histogram {
        pub fn new(bounds: &'static [f64]) -> Self {
            Self {
                bounds,
                counts: vec![0; bounds.len()],
                over: 0,
                sum: 0.0,
            }
        }

        pub fn observe(&mut self, value: f64) {
            self.sum += value;
            match self.bounds.iter().position(|b| value <= *b) {
                Some(i) => self.counts[i] += 1,
                None => self.over += 1,
            }
        }

        pub fn count(&self) -> u64 {
            self.counts.iter().sum::<u64>() + self.over
        }

        /// The `_bucket`, `_sum` and `_count` lines, after `labels` (already formatted).
        pub fn write(&self, out: &mut String, name: &str, labels: &str) {
            use std::fmt::Write;
            let sep = if labels.is_empty() { "" } else { "," };
            let mut cumulative = 0;
            for (bound, n) in self.bounds.iter().zip(&self.counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
                self.count()
            );
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
        }
    }

    /// Escape a label value for the text format.
    pub fn label(value: &str) -> String {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }
}

/// Server reflection over every Kiln service and the health service, for any process.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// Workers serving in this process, reachable without a socket. `kiln up` runs its gateway
/// and its workers in one process; a call between them need not cross the loopback
/// interface twice. Each entry is the worker's gRPC service itself, under the address it
/// advertises: the handlers, the protobuf codec and the metadata (deadlines) are those of a
/// call over the network, only the TCP connection and HTTP/2 framing are left out.
pub mod trace;
pub mod w3c;

pub mod local {
    use std::collections::HashMap;
    use std::sync::{LazyLock, RwLock};

    use tower::ServiceExt;

    /// A gRPC transport: a tonic channel, or a service in this process.
    pub type Transport = tower::util::BoxCloneSyncService<
        http::Request<tonic::body::Body>,
        http::Response<tonic::body::Body>,
        tonic::transport::Error,
    >;

    static SERVICES: LazyLock<RwLock<HashMap<String, Transport>>> =
        LazyLock::new(|| RwLock::new(HashMap::new()));

    /// Make `service` reachable in this process as `address`.
    pub fn register<S>(address: &str, service: S)
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        // Traced like the same service behind a socket, but as a call in this process:
        // a server span under the caller's, no client span, no trace context in text.
        let boxed = Transport::new(
            crate::trace::Server::in_process(service, address)
                .map_response(|response| response.map(tonic::body::Body::new))
                .map_err(|never| match never {}),
        );
        SERVICES
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address.to_owned(), boxed);
    }

    /// Stop answering in this process as `address` (the server is going away).
    pub fn unregister(address: &str) {
        SERVICES
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(address);
    }

    /// The transport to `address`: the in-process service if there is one, else `channel()`.
    pub fn transport(
        address: &str,
        channel: impl FnOnce() -> tonic::transport::Channel,
    ) -> Transport {
        let local = SERVICES
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(address)
            .cloned();
        local.unwrap_or_else(|| {
            Transport::new(crate::trace::Client::new(
                Transport::new(channel()),
                address,
            ))
        })
    }
}

#[cfg(test)]
mod local_tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn a_registered_service_answers_without_a_socket_until_unregistered() {
        // Nothing listens at this address: only the in-process service can answer.
        let address = "in-process.test:1";
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("kiln", tonic_health::ServingStatus::Serving)
            .await;
        super::local::register(address, service);
        let lazy = || {
            tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
                .connect_timeout(std::time::Duration::from_millis(200))
                .connect_lazy()
        };
        let mut client = HealthClient::new(super::local::transport(address, lazy));
        let answer = client
            .check(HealthCheckRequest {
                service: "kiln".into(),
            })
            .await
            .expect("the in-process service answers");
        assert_eq!(answer.into_inner().status, 1, "SERVING");
        super::local::unregister(address);
        let mut client = HealthClient::new(super::local::transport(address, lazy));
        let e = client
            .check(HealthCheckRequest {
                service: "kiln".into(),
            })
            .await
            .expect_err("no one listens on the channel's address");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
