//! The one place Kiln opens gRPC channels: the gateway to workers and the scheduler, the
//! scheduler to workers, and the CLI to a gateway all get the same connect timeout and
//! keep-alive policy from here.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::local::Transport;
use crate::{Error, Result};

/// How long a connection attempt may take before the peer counts as unreachable. Long
/// enough for a loaded machine's accept queue; short enough that a call retried on
/// another replica still has most of its deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on a connection with calls in flight, so a peer that vanished without a
/// FIN (a killed VM, a dropped route) is noticed within interval + timeout, not when the
/// kernel gives up minutes later. Idle connections are not pinged: gRPC servers of other
/// implementations answer frequent idle pings with GOAWAY.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `address` (`HOST:PORT`, or a URL with `http://`) as an endpoint with Kiln's settings.
/// With TLS set for the process ([`crate::tls::set_client`]), every endpoint is `https`.
pub fn endpoint(address: &str) -> Result<Endpoint> {
    let tls = crate::tls::client();
    let bare = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"));
    let url = match (bare, tls) {
        (Some(host), Some(_)) => format!("https://{host}"),
        (Some(_), None) => address.to_owned(),
        (None, Some(_)) => format!("https://{address}"),
        (None, None) => format!("http://{address}"),
    };
    let bad = || Error::Address {
        address: address.to_owned(),
    };
    let mut endpoint = Endpoint::from_shared(url).map_err(|_| bad())?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.config.clone())
            .map_err(|e| Error::Tls(format!("{address}: {e}")))?;
    }
    Ok(endpoint
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(false))
}

/// A channel to `address` that connects on first use (and again after the peer went away).
pub fn lazy(address: &str) -> Result<Channel> {
    Ok(endpoint(address)?.connect_lazy())
}

/// A channel to `address`, connected now: an unreachable peer is an error here.
pub async fn connect(address: &str) -> Result<Channel> {
    endpoint(address)?
        .connect()
        .await
        .map_err(|e| Error::Unreachable {
            address: address.to_owned(),
            detail: source_text(&e),
        })
}

/// A lazy channel to `address` whose calls get client spans (see `kiln_telemetry::trace`).
pub fn traced(address: &str) -> Result<kiln_telemetry::trace::TracedChannel> {
    Ok(kiln_telemetry::trace::TracedChannel::new(
        lazy(address)?,
        address,
    ))
}

/// The transport to the worker at `address`, connected now: its service in this process if
/// it runs here (see [`crate::local`]), else a traced channel that has connected, so that
/// an unreachable peer is an error here rather than at the first call.
pub async fn connect_transport(address: &str) -> Result<Transport> {
    if let Some(local) = crate::local::lookup(address) {
        return Ok(local);
    }
    Ok(crate::local::traced(connect(address).await?, address))
}

/// The transport to the worker at `address`: its service in this process if it runs here
/// (see [`crate::local`]), else a traced lazy channel.
pub fn transport(address: &str) -> Result<Transport> {
    let endpoint = endpoint(address)?;
    Ok(crate::local::transport(address, || endpoint.connect_lazy()))
}

/// The innermost cause of a transport error: tonic's own text is only "transport error".
fn source_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_a_scheme_or_get_http() {
        assert_eq!(
            endpoint("127.0.0.1:8001").unwrap().uri().to_string(),
            "http://127.0.0.1:8001/"
        );
        assert_eq!(
            endpoint("http://h:1").unwrap().uri().to_string(),
            "http://h:1/"
        );
        let e = endpoint("bad address with spaces").unwrap_err();
        assert!(e.to_string().contains("bad address with spaces"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_an_error_that_says_why() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect(&format!("127.0.0.1:{port}")).await.unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot reach 127.0.0.1:"), "{text}");
        assert!(
            text.to_lowercase().contains("refused"),
            "the cause is kept: {text}"
        );
    }
}
