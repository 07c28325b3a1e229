//! The DPS device API over AMQP 1.0, as the C, C#, Node and Java device SDKs speak it: TLS on its
//! own listener (5671) or a WebSocket on the HTTPS listener, SASL PLAIN with the device's SAS token
//! (or the TLS client certificate of an X.509 device), one session with a sender and a receiver
//! link addressed `{idScope}/registrations/{registrationId}`, requests told apart by the
//! application property `iotdps-operation-type`, and answers matched by correlation id. Framing,
//! link credit, settlement and idle timeouts are fe2o3-amqp's; this crate maps requests to the
//! same core calls as the HTTPS and MQTT front ends.

mod exchange;
mod sasl;

pub use exchange::{Request, decode, parse_address};
pub use sasl::{PlainLogin, parse_plain};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dps_core::provisioning::{Provisioning, Transport};
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::types::performatives::Attach;
use tls_accept::{DEFAULT_MAX_CONNECTIONS, TlsListener};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::exchange::{Device, Responders};
use crate::sasl::DeviceSasl;

/// How long a client has after its TLS handshake to send the AMQP protocol header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has from its protocol header to the end of SASL and its Open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection's tasks may take to finish once it has ended.
const LINGER: Duration = Duration::from_secs(1);

/// The SASL protocol header (`AMQP 3 1 0 0`).
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The AMQP protocol header without SASL (`AMQP 0 1 0 0`): X.509 devices of some SDKs.
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// Limits of the AMQP front end.
#[derive(Debug, Clone, Copy)]
pub struct AmqpLimits {
    /// Largest message (and frame) accepted: DPS bodies are small.
    pub max_message_bytes: u32,
    /// Most connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// A connection that sends nothing (not even an empty frame) this long is closed.
    pub idle_timeout: Duration,
}

impl Default for AmqpLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 96 * 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(240),
        }
    }
}

/// Serves AMQP over TLS on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    provisioning: Arc<Provisioning>,
    limits: AmqpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = TlsListener::new(listener, tls, "amqp", limits.max_connections);
    while let Some(accepted) = listener.accept(&mut shutdown).await {
        let (provisioning, stop) = (Arc::clone(&provisioning), shutdown.clone());
        accepted.spawn(move |stream, peer| async move {
            let certificates = tls_accept::peer_certificates(&stream);
            serve_connection(
                stream,
                peer,
                certificates,
                provisioning,
                Transport::Amqp,
                limits,
                stop,
            )
            .await;
        });
    }
}

/// Serves one AMQP connection over `stream` (a TLS stream, or a WebSocket's bytes) until the
/// client closes it or `stop` turns true. `certificates` are those of the TLS session, leaf first.
pub async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    certificates: Vec<Vec<u8>>,
    provisioning: Arc<Provisioning>,
    transport: Transport,
    limits: AmqpLimits,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let device = Device {
        provisioning,
        transport,
        certificates,
        login: None,
    };
    if let Err(reason) = run(stream, peer, device, limits, stop).await {
        tracing::debug!(%peer, %reason, "AMQP connection closed");
    }
}

/// Why a connection ended (logged at debug level: most reasons are the client's doing).
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("no protocol header in time")]
    NoHeader,
    #[error("SASL and Open did not finish in time")]
    NoOpen,
    #[error("reading the protocol header failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client speaks {0}, not AMQP")]
    Foreign(&'static str),
    #[error("the AMQP connection could not be opened: {0}")]
    Open(#[from] fe2o3_amqp::connection::OpenError),
    #[error("a session could not begin: {0}")]
    Begin(#[from] fe2o3_amqp::session::BeginError),
}

async fn run<S>(
    mut stream: S,
    peer: std::net::SocketAddr,
    mut device: Device,
    limits: AmqpLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let mut head = [0u8; 8];
    tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut head))
        .await
        .map_err(|_| Closed::NoHeader)??;
    if head != SASL_HEADER && head != AMQP_HEADER {
        let protocol = match tls_accept::protocol_of(&head) {
            Some("AMQP") => "another AMQP version",
            Some(other) => other,
            None => "an unknown protocol",
        };
        tracing::warn!(
            %peer,
            protocol,
            "refused a connection speaking {protocol} on the AMQP listener; it serves AMQP 1.0 (devices use SASL PLAIN, or TLS client certificates)"
        );
        // AMQP 1.0 §2.2: answer a header we do not support with the one we do, then close.
        let _ = stream.write_all(&SASL_HEADER).await;
        return Err(Closed::Foreign(protocol));
    }
    let stream = tls_accept::Prefixed::new(head.to_vec(), stream);
    let idle_ms = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let acceptor = ConnectionAcceptor::builder()
        .container_id("opendps")
        .max_frame_size(limits.max_message_bytes.max(4096))
        .idle_time_out(idle_ms);
    let login: Arc<Mutex<Option<PlainLogin>>> = Arc::default();
    let opened = match head == SASL_HEADER {
        true => {
            let acceptor = acceptor
                .sasl_acceptor(DeviceSasl::new(Arc::clone(&login), peer))
                .build();
            tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(stream)).await
        }
        false => tokio::time::timeout(OPEN_TIMEOUT, acceptor.build().accept(stream)).await,
    };
    let mut connection: ListenerConnectionHandle = opened.map_err(|_| Closed::NoOpen)??;
    device.login = login.lock().ok().and_then(|mut l| l.take());
    let device = Arc::new(device);
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                let session = SessionAcceptor::new()
                    .accept_incoming_session(incoming, &mut connection)
                    .await?;
                sessions.spawn(serve_session(session, Arc::clone(&device), peer, limits));
            }
            _ = stop.changed() => break,
        }
    }
    let _ = connection.close().await;
    linger(sessions).await;
    Ok(())
}

/// Gives the tasks of a connection's sessions (or of a session's links) a moment to see their
/// connection end and finish (a link that refused a message logs why once the client has
/// answered its detach), then drops the rest.
async fn linger(mut tasks: tokio::task::JoinSet<()>) {
    let _ =
        tokio::time::timeout(LINGER, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

/// The links of one session: the device's sender (our receiver) brings requests, its receiver
/// (our sender) takes the answers.
async fn serve_session(
    mut session: ListenerSessionHandle,
    device: Arc<Device>,
    peer: std::net::SocketAddr,
    limits: AmqpLimits,
) {
    let acceptor = LinkAcceptor::builder()
        .max_message_size(u64::from(limits.max_message_bytes))
        .build();
    let responders = Arc::new(Responders::default());
    let mut links = tokio::task::JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = attach_address(&attach);
        let checked = device.registration_of(address.as_deref().unwrap_or_default());
        let endpoint = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(endpoint) => endpoint,
            Err(err) => {
                tracing::debug!(%peer, %err, "a link attach failed");
                continue;
            }
        };
        let (scope, rid) = match checked {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(
                    %peer,
                    address = address.as_deref().unwrap_or(""),
                    why = error.description.as_deref().unwrap_or(""),
                    "refused an AMQP link"
                );
                match endpoint {
                    LinkEndpoint::Sender(link) => {
                        let _ = link.close_with_error(error).await;
                    }
                    LinkEndpoint::Receiver(link) => {
                        let _ = link.close_with_error(error).await;
                    }
                }
                continue;
            }
        };
        match endpoint {
            LinkEndpoint::Receiver(link) => {
                links.spawn(exchange::requests(
                    link,
                    Arc::clone(&device),
                    scope,
                    rid,
                    Arc::clone(&responders),
                ));
            }
            LinkEndpoint::Sender(link) => {
                links.spawn(exchange::responses(link, rid, Arc::clone(&responders)));
            }
        }
    }
    responders.close_all();
    let _ = session.end().await;
    linger(links).await;
}

/// The address a device attached a link to: the target of its sender, the source of its
/// receiver.
fn attach_address(attach: &Attach) -> Option<String> {
    use fe2o3_amqp::types::definitions::Role;
    use fe2o3_amqp::types::messaging::TargetArchetype;
    match attach.role {
        // The device sends: its target.
        Role::Sender => attach.target.as_deref().and_then(|t| match t {
            TargetArchetype::Target(target) => target.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        }),
        Role::Receiver => attach.source.as_deref().and_then(|s| s.address.clone()),
    }
}
