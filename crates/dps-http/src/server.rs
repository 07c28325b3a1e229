//! HTTPS on a [`TlsListener`]: HTTP/1.1 and HTTP/2 over rustls, one task per connection, and a
//! graceful stop that lets requests in flight finish.

use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tls_accept::{DEFAULT_MAX_CONNECTIONS, HANDSHAKE_TIMEOUT, Prefixed, TlsListener};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// How long open connections get to finish after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1.1 connection may go without a request unless configured otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the HTTPS server allows its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// How long an HTTP/1.1 connection may wait for a request's head, or take to send one: a
    /// connection idle that long between requests is closed, so that idle keep-alive connections
    /// cannot hold every slot. (The first request's first bytes must come within
    /// [`HANDSHAKE_TIMEOUT`] of the handshake.)
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, within `limits`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = TlsListener::new(listener, tls, "https", limits.max_connections);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Azure answers with `Retry-After`, `Content-Type`, …; some device stacks look headers up with
    // their exact case, so HTTP/1.1 responses use it too.
    builder
        .http1()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    while let Some(accepted) = listener.accept(&mut shutdown).await {
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        accepted.spawn(move |stream, peer| async move {
            let certificates =
                crate::ClientCertificates(tls_accept::peer_certificates(&stream).into());
            let Some(stream) = http_only(stream, peer).await else {
                return;
            };
            let service =
                TowerToHyperService::new(app.map_request(move |req: hyper::Request<Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(certificates.clone());
                    req.extensions_mut().insert(crate::PeerAddr(peer));
                    req
                }));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTPS connections did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// The stream, with its first bytes read to see what the client speaks and handed back to the HTTP
/// server as if unread; `None` if the client opened with an AMQP header (an AMQP device pointed at
/// this port), sent nothing in time, or closed: those are logged and dropped.
async fn http_only<S: AsyncRead + Unpin>(
    mut inner: S,
    peer: std::net::SocketAddr,
) -> Option<Prefixed<S>> {
    let mut head = vec![0u8; 1024];
    let read = match tokio::time::timeout(HANDSHAKE_TIMEOUT, inner.read(&mut head)).await {
        Ok(Ok(read)) if read > 0 => read,
        Ok(_) => return None,
        Err(_) => {
            tracing::debug!(%peer, "no request within {HANDSHAKE_TIMEOUT:?} of the handshake");
            return None;
        }
    };
    head.truncate(read);
    if tls_accept::protocol_of(&head) == Some("AMQP") {
        tracing::warn!(
            %peer,
            "refused an AMQP connection on the HTTPS listener: AMQP devices connect to the AMQP listener (port 5671 by default), or over WebSockets at /$iothub/websocket"
        );
        return None;
    }
    Some(Prefixed::new(head, inner))
}
