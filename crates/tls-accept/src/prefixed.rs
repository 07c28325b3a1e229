//! What a client's first bytes say it speaks, and a stream whose first bytes were read to see it
//! (HTTP or AMQP, SASL or not), handed on to the protocol's library as if they had not been read.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The protocol a client that opened with `head` speaks, when it is one a device or a person may
/// point at the wrong listener: AMQP (its protocol header), HTTP (a request line, or the HTTP/2
/// preface) or MQTT (a CONNECT packet). Each listener names what it got instead of what it serves.
pub fn protocol_of(head: &[u8]) -> Option<&'static str> {
    const HTTP: [&[u8]; 6] = [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PRI * "];
    if head.starts_with(b"AMQP") {
        Some("AMQP")
    } else if HTTP.iter().any(|method| head.starts_with(method)) {
        Some("HTTP")
    } else if head.first() == Some(&0x10) {
        Some("MQTT")
    } else {
        None
    }
}

/// `head`, then the rest of `inner`; writes go straight to `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    head: Vec<u8>,
    served: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner` with the bytes already read from it in front.
    pub fn new(head: Vec<u8>, inner: S) -> Self {
        Self {
            head,
            served: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.served < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.served);
            let start = self.served;
            buf.put_slice(&self.head[start..start + n]);
            self.served += n;
            if self.served == self.head.len() {
                self.head = Vec::new();
                self.served = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn first_bytes_name_the_protocol() {
        assert_eq!(protocol_of(b"AMQP\x03\x01\x00\x00"), Some("AMQP"));
        assert_eq!(protocol_of(b"GET /healthz HTTP/1.1"), Some("HTTP"));
        assert_eq!(protocol_of(b"PRI * HTTP/2.0\r\n"), Some("HTTP"));
        assert_eq!(protocol_of(b"\x10\x20\x00\x04MQTT"), Some("MQTT"));
        assert_eq!(protocol_of(b"\x16\x03\x01"), None);
        assert_eq!(protocol_of(b""), None);
    }

    #[tokio::test]
    async fn the_head_comes_first_then_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b" world")
            .await
            .expect("write");
        drop(client);
        let mut stream = Prefixed::new(b"hello".to_vec(), server);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }
}
