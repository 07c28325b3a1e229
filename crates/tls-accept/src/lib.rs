//! The TLS accept loop of opendps's listeners (HTTPS and MQTT alike): the caller binds the socket
//! (with [`bind`], for a queue deep enough for bursts of connects) and builds the acceptor; a
//! [`TlsListener`] admits connections up to a cap, and each admitted connection finishes its TLS
//! handshake within [`HANDSHAKE_TIMEOUT`] in its own task before the protocol's handler gets the
//! stream. What happens on the stream is the caller's.
//!
//! Metrics, each labelled with the listener's name (`listener`): `opendps_open_connections`,
//! `opendps_connections_refused_total` and `opendps_tls_handshake_failures_total`.
//!
//! ```no_run
//! # async fn serve(
//! #     tcp: tokio::net::TcpListener,
//! #     tls: tokio_rustls::TlsAcceptor,
//! #     mut shutdown: tokio::sync::watch::Receiver<bool>,
//! # ) {
//! use tls_accept::{DEFAULT_MAX_CONNECTIONS, TlsListener};
//!
//! let listener = TlsListener::new(tcp, tls, "echo", DEFAULT_MAX_CONNECTIONS);
//! while let Some(accepted) = listener.accept(&mut shutdown).await {
//!     accepted.spawn(|stream, peer| async move {
//!         // Speak the protocol on `stream`; the connection closes when this returns.
//!         tracing::debug!(%peer, "connected");
//!         drop(stream);
//!     });
//! }
//! // Stopped: no new connections; those open end on their own (or watch `shutdown` too).
//! # }
//! ```

mod client_auth;
mod prefixed;

pub use client_auth::{RequestClientCertificates, peer_certificates};
pub use prefixed::{Prefixed, protocol_of};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one listener serves at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// The pause after a failed `accept` (out of file descriptors and similar), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The least time between two warnings about refused connections.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Connections the kernel queues for a listener until the accept loop takes them (the kernel caps
/// it at `net.core.somaxconn`, 4096 on current Linux). Devices connect in bursts (a fleet powering
/// on after an outage); past the queue the kernel drops their connects, and each client's TCP
/// tries again only a second later, then two, then four. The usual 128 overflowed at 500 devices
/// connecting at once.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a queue of [`LISTEN_BACKLOG`] connections (and the address
/// reusable at once after a restart, as `TcpListener::bind` makes it on Unix).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves once the shutdown flag turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A bound TCP listener, its TLS acceptor and its connection cap.
pub struct TlsListener {
    tcp: TcpListener,
    tls: TlsAcceptor,
    slots: ConnectionSlots,
}

impl TlsListener {
    /// Serves TLS on `tcp` with `tls`, at most `max_connections` connections at once. `name`
    /// (`https`, `mqtt`) labels the metrics and logs.
    pub fn new(
        tcp: TcpListener,
        tls: TlsAcceptor,
        name: &'static str,
        max_connections: usize,
    ) -> Self {
        Self {
            tcp,
            tls,
            slots: ConnectionSlots::new(name, max_connections),
        }
    }

    /// The next connection admitted under the cap, or `None` once `shutdown` turns true. A failed
    /// accept is logged and retried after a pause; a connection over the cap is closed at once,
    /// before its handshake (the work the cap protects).
    pub async fn accept(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Accepted> {
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                () = stopped(shutdown) => return None,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(listener = self.slots.listener, %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Some(open) = self.slots.admit(&peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            return Some(Accepted {
                tcp,
                peer,
                tls: self.tls.clone(),
                open,
            });
        }
    }
}

/// A TCP connection admitted under the cap, its TLS handshake still to come.
pub struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    tls: TlsAcceptor,
    open: OpenConnection,
}

impl Accepted {
    /// Serves the connection in a task of its own: the TLS handshake, bounded by
    /// [`HANDSHAKE_TIMEOUT`] (a failure is counted and ends the connection), then
    /// `handler(stream, peer)`. The connection keeps its slot, and counts as open, until the
    /// handler returns.
    pub fn spawn<H, F>(self, handler: H)
    where
        H: FnOnce(TlsStream<TcpStream>, SocketAddr) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            tcp,
            peer,
            tls,
            open,
        } = self;
        tokio::spawn(async move {
            let listener = open.listener;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(listener, %peer, %err, "TLS handshake failed");
                    metrics::counter!("opendps_tls_handshake_failures_total", "listener" => listener)
                        .increment(1);
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener, %peer, "TLS handshake timed out");
                    metrics::counter!("opendps_tls_handshake_failures_total", "listener" => listener)
                        .increment(1);
                    return;
                }
            };
            handler(stream, peer).await;
            drop(open);
        });
    }
}

/// The connection cap of one listener. A connection over the cap is counted in
/// `opendps_connections_refused_total` and logged at most once every ten seconds.
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
    fn admit(&self, peer: &SocketAddr) -> Option<OpenConnection> {
        match Arc::clone(&self.free).try_acquire_owned() {
            Ok(permit) => Some(OpenConnection::new(self.listener, permit)),
            Err(_) => {
                metrics::counter!("opendps_connections_refused_total", "listener" => self.listener)
                    .increment(1);
                let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_INTERVAL) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsConnector;

    /// A server acceptor for `localhost` and a client that trusts it.
    fn pki() -> (TlsAcceptor, TlsConnector) {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_cert.der().to_vec()))
            .expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            TlsAcceptor::from(Arc::new(server)),
            TlsConnector::from(Arc::new(client)),
        )
    }

    struct Echo {
        addr: SocketAddr,
        client: TlsConnector,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    /// An echo server on port 0 with at most `max` connections.
    async fn echo(max: usize) -> Echo {
        let (acceptor, client) = pki();
        let tcp = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = TlsListener::new(tcp, acceptor, "test", max);
        let (stop, mut shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Some(accepted) = listener.accept(&mut shutdown).await {
                accepted.spawn(|mut stream, _peer| async move {
                    let mut buf = [0u8; 256];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Echo {
            addr,
            client,
            stop,
            task,
        }
    }

    impl Echo {
        /// A TLS connection on which one echo went through, or why not.
        async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").expect("name");
            let mut tls = self
                .client
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut answer = [0u8; 4];
            tls.read_exact(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(&answer, b"ping");
            Ok(tls)
        }
    }

    /// Reads until the server closes the connection; fails the test if it does not within 5 s.
    async fn closed_by_server(mut stream: TcpStream) {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection")
            .ok();
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_until_a_slot_is_free() {
        let server = echo(1).await;
        let first = server
            .connect()
            .await
            .expect("the first connection is served");
        closed_by_server(TcpStream::connect(server.addr).await.expect("connect")).await;
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(err) = server.connect().await {
            assert!(
                Instant::now() < deadline,
                "the freed slot serves again: {err}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_handshake_ends_only_its_connection() {
        let server = echo(2).await;
        let mut plain = TcpStream::connect(server.addr).await.expect("connect");
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        closed_by_server(plain).await;
        server.connect().await.expect("TLS clients are served");
    }

    #[tokio::test]
    async fn shutdown_ends_the_accept_loop() {
        let server = echo(2).await;
        server.connect().await.expect("served");
        server.stop.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("accept returns None once stopped")
            .expect("join");
    }

    /// A burst of connects that the accept loop has not taken yet waits in the kernel's queue
    /// instead of being dropped: with the usual queue of 128 the rest would be retried by TCP only
    /// a second later.
    #[tokio::test]
    async fn a_burst_of_connects_waits_in_the_queue() {
        let tcp = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..400 {
            connects.spawn(tokio::time::timeout(
                Duration::from_millis(900),
                TcpStream::connect(addr),
            ));
        }
        let mut queued = Vec::new();
        while let Some(done) = connects.join_next().await {
            if let Ok(Ok(Ok(stream))) = done {
                queued.push(stream);
            }
        }
        assert_eq!(
            queued.len(),
            400,
            "every connect queued before anything was accepted"
        );
        drop(tcp);
    }
}
