//! A client WebSocket (`/$iothub/websocket` on the HTTPS port) as a byte stream, for MQTT and
//! AMQP: each write goes out as one binary message, and binary messages are read back as bytes.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error, Message};

/// A WebSocket to `host:port` over `tls`, asking for `subprotocol`.
pub(crate) async fn open(
    tls: TlsStream<TcpStream>,
    host: &str,
    port: u16,
    subprotocol: &'static str,
) -> anyhow::Result<WsBytes> {
    let mut request = format!("wss://{host}:{port}/$iothub/websocket")
        .into_client_request()
        .context("the host is not valid in a URL")?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(subprotocol),
    );
    let (socket, _) = tokio::time::timeout(
        crate::mqtt::ANSWER_TIMEOUT,
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .context("the WebSocket upgrade timed out")?
    .with_context(|| format!("{host}:{port} refused the WebSocket upgrade"))?;
    Ok(WsBytes {
        socket,
        pending: Bytes::new(),
    })
}

/// See the module documentation.
pub struct WsBytes {
    socket: WebSocketStream<TlsStream<TcpStream>>,
    pending: Bytes,
}

impl std::fmt::Debug for WsBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsBytes")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

fn io_error(err: Error) -> std::io::Error {
    std::io::Error::other(err)
}

impl AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(Sink::<Message>::poll_ready(Pin::new(&mut self.socket), cx)).map_err(io_error)?;
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.socket), cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Sink::<Message>::poll_close(Pin::new(&mut self.socket), cx).map_err(io_error)
    }
}
