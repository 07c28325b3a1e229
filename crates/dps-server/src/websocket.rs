//! MQTT and AMQP over WebSockets on the HTTPS listener, as devices behind firewalls that pass only
//! 443 use them: `GET /$iothub/websocket` (the C, Node and Python SDKs; C# asks on `/`) with the
//! subprotocol `mqtt` or `AMQPWSB10`. Binary messages carry the protocol's bytes, and the
//! connection is then served exactly as one on the MQTT listener (by the same connector: DPS, or an
//! in-process hub by CONNECT username) or on the AMQP listener.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Bytes;
use axum::extract::FromRequestParts as _;
use axum::extract::Request;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use dps_amqp::AmqpLimits;
use dps_core::provisioning::{Provisioning, Transport};
use dps_http::{ClientCertificates, PeerAddr};
use dps_mqtt::{Connector, MqttLimits};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tower::ServiceExt as _;

/// The paths SDKs open WebSockets on.
const PATHS: [&str; 2] = ["/$iothub/websocket", "/"];

/// The MQTT subprotocol names (the C SDK asks for `MQTT`, the others for `mqtt`).
const MQTT_PROTOCOLS: [&str; 2] = ["mqtt", "MQTT"];
/// The AMQP subprotocol name.
const AMQP_PROTOCOL: &str = "AMQPWSB10";

/// What a WebSocket connection is served with.
pub(crate) struct WebSockets {
    /// DPS, then the in-process hubs, as on the MQTT listener.
    pub connector: Arc<dyn Connector>,
    /// The MQTT listener's limits (the largest packet bounds a message too).
    pub mqtt_limits: MqttLimits,
    /// Device registration, for AMQP.
    pub provisioning: Arc<Provisioning>,
    /// The AMQP listener's limits.
    pub amqp_limits: AmqpLimits,
    /// Turns true when the service stops.
    pub stop: watch::Receiver<bool>,
}

/// `app`, with WebSocket upgrades on [`PATHS`] served as MQTT or AMQP connections; every other request,
/// a plain `GET /` included, goes to `app`.
pub(crate) fn with_websockets(app: Router, sockets: Arc<WebSockets>) -> Router {
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let (app, sockets) = (app.clone(), Arc::clone(&sockets));
        async move {
            if !wants_websocket(&request) {
                return app.oneshot(request).await;
            }
            if !PATHS.contains(&request.uri().path()) {
                let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
                tracing::warn!(
                    ?peer,
                    path = request.uri().path(),
                    "refused a WebSocket upgrade on a path no device SDK uses; devices connect on /$iothub/websocket"
                );
                return app.oneshot(request).await;
            }
            Ok(upgrade(request, sockets).await)
        }
    }))
}

fn wants_websocket(request: &Request) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts the upgrade with the client's MQTT or AMQP subprotocol, or refuses it with a 400 that
/// names the subprotocols served.
async fn upgrade(request: Request, sockets: Arc<WebSockets>) -> Response {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.0);
    let certificates = request
        .extensions()
        .get::<ClientCertificates>()
        .map(|c| c.0.to_vec())
        .unwrap_or_default();
    let asked: Vec<String> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let Some(protocol) = asked
        .iter()
        .find(|p| MQTT_PROTOCOLS.contains(&p.as_str()) || p.as_str() == AMQP_PROTOCOL)
        .cloned()
    else {
        let asked = match asked.is_empty() {
            true => "none".to_owned(),
            false => asked.join(", "),
        };
        tracing::warn!(%peer, subprotocols = %asked, "refused a WebSocket upgrade: no subprotocol this service speaks");
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "Unsupported WebSocket subprotocol ({asked}). This service speaks MQTT 3.1.1 ('mqtt') and AMQP 1.0 ('AMQPWSB10') over WebSockets.\n"
            ),
        )
            .into_response();
    };
    let (mut parts, _) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let amqp = protocol == AMQP_PROTOCOL;
    upgrade
        .protocols([protocol])
        .max_message_size(sockets.mqtt_limits.max_packet_bytes)
        .on_upgrade(move |socket| async move {
            let stream = WsBytes::new(socket);
            match amqp {
                true => {
                    dps_amqp::serve_connection(
                        stream,
                        peer,
                        certificates,
                        Arc::clone(&sockets.provisioning),
                        Transport::AmqpWs,
                        sockets.amqp_limits,
                        sockets.stop.clone(),
                    )
                    .await;
                }
                false => {
                    dps_mqtt::serve_connection(
                        stream,
                        peer,
                        certificates,
                        Arc::clone(&sockets.connector),
                        sockets.mqtt_limits,
                        sockets.stop.clone(),
                    )
                    .await;
                }
            }
        })
}

/// A WebSocket as a byte stream: binary messages in, each write out as one binary message.
struct WsBytes {
    socket: WebSocket,
    /// What is left of the last message read.
    pending: Bytes,
}

impl std::fmt::Debug for WsBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsBytes")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl WsBytes {
    fn new(socket: WebSocket) -> Self {
        Self {
            socket,
            pending: Bytes::new(),
        }
    }
}

fn io_error(err: axum::Error) -> std::io::Error {
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
                // Pings are answered by the WebSocket layer; pongs need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a text message: MQTT travels in binary messages",
                    )));
                }
                // A close, or the end of the stream: end of file.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
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
        let socket = Pin::new(&mut self.socket);
        ready!(Sink::<Message>::poll_ready(socket, cx)).map_err(io_error)?;
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
