//! The TLS accept loop: HTTP/1.1 and HTTP/2 over rustls, one task per connection, a bounded
//! handshake, and a graceful stop that lets requests in flight finish.

use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves once the shutdown flag turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
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
                let _ = tcp.set_nodelay(true);
                let (tls, app, builder, watcher) = (tls.clone(), app.clone(), builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let _open = OpenConnection::new("https");
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

/// Counts a connection in `opendps_open_connections` while it lives.
struct OpenConnection(&'static str);

impl OpenConnection {
    fn new(listener: &'static str) -> Self {
        metrics::gauge!("opendps_open_connections", "listener" => listener).increment(1.0);
        Self(listener)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("opendps_open_connections", "listener" => self.0).decrement(1.0);
    }
}
