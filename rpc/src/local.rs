//! Workers serving in this process, reachable without a socket. `kiln up` runs its gateway
//! and its workers in one process; a call between them need not cross the loopback
//! interface twice. Each entry is the worker's gRPC service itself, under the address it
//! advertises: the handlers, the protobuf codec and the metadata (deadlines) are those of a
//! call over the network, only the TCP connection and HTTP/2 framing are left out.

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
        kiln_telemetry::trace::Server::in_process(service, address)
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

/// The in-process service registered as `address`, if there is one.
pub fn lookup(address: &str) -> Option<Transport> {
    SERVICES
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(address)
        .cloned()
}

/// A channel to `address` as a transport whose calls get client spans.
pub fn traced(channel: tonic::transport::Channel, address: &str) -> Transport {
    Transport::new(kiln_telemetry::trace::Client::new(
        Transport::new(channel),
        address,
    ))
}

/// The transport to `address`: the in-process service if there is one, else `channel()`.
pub fn transport(address: &str, channel: impl FnOnce() -> tonic::transport::Channel) -> Transport {
    lookup(address).unwrap_or_else(|| traced(channel(), address))
}

#[cfg(test)]
mod tests {
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
        super::register(address, service);
        let lazy = || {
            tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
                .connect_timeout(std::time::Duration::from_millis(200))
                .connect_lazy()
        };
        let mut client = HealthClient::new(super::transport(address, lazy));
        let answer = client
            .check(HealthCheckRequest {
                service: "kiln".into(),
            })
            .await
            .expect("the in-process service answers");
        assert_eq!(answer.into_inner().status, 1, "SERVING");
        super::unregister(address);
        let mut client = HealthClient::new(super::transport(address, lazy));
        let e = client
            .check(HealthCheckRequest {
                service: "kiln".into(),
            })
            .await
            .expect_err("no one listens on the channel's address");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
