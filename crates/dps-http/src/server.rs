//! HTTPS on a [`TlsListener`]: HTTP/1.1 and HTTP/2 over rustls, one task per connection, and a
//! graceful stop that lets requests in flight finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
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

/// How long a connection may go without a request unless configured otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the HTTPS server allows its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// How long a connection may go without a request in flight (a request whose head is still
    /// being sent is not in flight yet): a connection idle that long between requests is closed,
    /// so that idle keep-alive connections cannot hold every slot. (The first request's first
    /// bytes must come within [`HANDSHAKE_TIMEOUT`] of the handshake.)
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
    builder.http1().title_case_headers(true);
    while let Some(accepted) = listener.accept(&mut shutdown).await {
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        accepted.spawn(move |stream, peer| async move {
            let certificates =
                crate::ClientCertificates(tls_accept::peer_certificates(&stream).into());
            let Some(stream) = http_only(stream, peer).await else {
                return;
            };
            let activity = Arc::new(Activity::new());
            let counted = Arc::clone(&activity);
            let service = TowerToHyperService::new(
                app.map_request(move |req: hyper::Request<Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(certificates.clone());
                    req.extensions_mut().insert(crate::PeerAddr(peer));
                    req
                })
                .map_future(move |answer| {
                    let request = counted.begin();
                    async move {
                        // Until its body is sent: a slow reader is not idle.
                        let answer = answer.await;
                        answer.map(|response| {
                            response.map(|body| axum::body::Body::new(Counted {
                                body,
                                _request: request,
                            }))
                        })
                    }
                }),
            );
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                ended = watcher.watch(conn.into_owned()) => {
                    if let Err(err) = ended {
                        tracing::debug!(%peer, %err, "connection ended with an error");
                    }
                }
                () = activity.idle_for(limits.idle_timeout) => {
                    tracing::debug!(%peer, "closed a connection idle for {:?}", limits.idle_timeout);
                }
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

/// The requests of one connection: how many are in flight (a request counts from the end of its
/// head to the end of its response's body), and when the last one ended. A connection of either
/// protocol without a request in flight for the idle time is closed by this count, a client still
/// sending a head included.
struct Activity {
    in_flight: AtomicUsize,
    /// When the connection was last busy, as milliseconds since `opened`.
    last_ms: AtomicU64,
    opened: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }
    }

    /// A request started; it ends when the guard goes (answered or cancelled).
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let quiet = self.since_last();
            if self.in_flight.load(Ordering::SeqCst) == 0 && quiet >= idle {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet).max(Duration::from_millis(100))).await;
        }
    }
}

/// A request of an [`Activity`] in flight.
struct InFlight(Arc<Activity>);

/// A response body holding its request [`InFlight`] until it is sent or dropped.
struct Counted {
    body: axum::body::Body,
    _request: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
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
