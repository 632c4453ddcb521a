//! Sockets: serving gRPC on an already-bound listener.

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
