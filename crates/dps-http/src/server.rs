//! The TLS accept loop: HTTP/1.1 and HTTP/2 over rustls, one task per connection, a bounded
//! handshake, and a graceful stop that lets requests in flight finish.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one listener serves at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// How long open connections get to finish after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves once the shutdown flag turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, with at most
/// `max_connections` connections open at once.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = ConnectionSlots::new("https", max_connections);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Azure answers with `Retry-After`, `Content-Type`, …; some device stacks look headers up with
    // their exact case, so HTTP/1.1 responses use it too.
    builder.http1().title_case_headers(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(open) = slots.admit(&peer) else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (tls, app, builder, watcher) = (tls.clone(), app.clone(), builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let _open = open;
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, %err, "TLS handshake failed");
                            metrics::counter!("opendps_tls_handshake_failures_total", "listener" => "https").increment(1);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            metrics::counter!("opendps_tls_handshake_failures_total", "listener" => "https").increment(1);
                            return;
                        }
                    };
                    let service = TowerToHyperService::new(app.map_request(|req: hyper::Request<Incoming>| req.map(axum::body::Body::new)));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(err) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, %err, "connection ended with an error");
                    }
                });
            }
            () = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTPS connections did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// The connection cap of one listener. A connection over the cap is closed before its TLS
/// handshake (the work the cap protects), counted in `opendps_connections_refused_total`, and
/// logged at most once every ten seconds.
struct ConnectionSlots {
    listener: &'static str,
    max: usize,
    free: Arc<Semaphore>,
    last_warning: Mutex<Option<Instant>>,
}

impl ConnectionSlots {
    fn new(listener: &'static str, max: usize) -> Self {
        Self {
            listener,
            max,
            free: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            last_warning: Mutex::new(None),
        }
    }

    /// A slot for a new connection from `peer`, or `None` (and the refusal counted) when all
    /// are taken.
    fn admit(&self, peer: &std::net::SocketAddr) -> Option<OpenConnection> {
        match Arc::clone(&self.free).try_acquire_owned() {
            Ok(permit) => Some(OpenConnection::new(self.listener, permit)),
            Err(_) => {
                metrics::counter!("opendps_connections_refused_total", "listener" => self.listener)
                    .increment(1);
                let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        %peer,
                        listener = self.listener,
                        max = self.max,
                        "refusing connections: the listener is at its connection limit; raise max_connections if the host can take more"
                    );
                }
                None
            }
        }
    }
}

/// Counts a connection in `opendps_open_connections` and holds its slot while it lives.
struct OpenConnection {
    listener: &'static str,
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(listener: &'static str, slot: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("opendps_open_connections", "listener" => listener).increment(1.0);
        Self {
            listener,
            _slot: slot,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("opendps_open_connections", "listener" => self.listener).decrement(1.0);
    }
}
