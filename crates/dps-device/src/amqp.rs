//! The DPS device exchange over AMQP 1.0, as the C# and Node SDKs perform it: TLS (with the
//! device's certificate for X.509), SASL PLAIN with the SAS token for a symmetric-key device (no
//! SASL layer for an X.509 one), one session, a sender and a receiver link on
//! `{idScope}/registrations/{registrationId}`, requests named by `iotdps-operation-type` with a
//! correlation id, answers in one Data section with `retry-after`, and refusals as rejected
//! deliveries whose error description is the DPS error JSON.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_json::Value as Json;

use crate::exchange::Reply;
use crate::mqtt::Carrier;

/// How long to wait for any answer from the service.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An open AMQP connection of one device, with its two links.
pub struct DpsAmqp {
    connection: ConnectionHandle<()>,
    /// Held for as long as the links are used; closing the connection ends it.
    _session: SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
    next_id: u64,
    registration_id: String,
}

impl DpsAmqp {
    /// Connects to DPS at `host:port` (TLS with `config`; over a WebSocket on the HTTPS port
    /// with [`Carrier::WebSocket`]), logs in with `sas` (SASL PLAIN) or, without one, with the
    /// certificate in `config` and no SASL, and attaches both links.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        config: &Arc<rustls::ClientConfig>,
        host: &str,
        port: u16,
        carrier: Carrier,
        scope: &str,
        registration_id: &str,
        sas: Option<&str>,
    ) -> anyhow::Result<Self> {
        let tls = crate::mqtt::connect_tls(config, host, port, "AMQP").await?;
        let address = format!("{scope}/registrations/{registration_id}");
        let opened = match carrier {
            Carrier::Tls => open(tls, host, registration_id, &address, sas).await,
            Carrier::WebSocket => {
                let socket = crate::ws::open(tls, host, port, "AMQPWSB10").await?;
                open(socket, host, registration_id, &address, sas).await
            }
        };
        let mut connection = opened.context("the service refused the AMQP connection")?;
        let mut session = Session::begin(&mut connection)
            .await
            .context("the service refused the AMQP session")?;
        let sender = Sender::attach(&mut session, "sender_link", address.clone())
            .await
            .context("the service refused the sending link")?;
        let receiver = Receiver::attach(&mut session, "recv_link", address)
            .await
            .context("the service refused the receiving link")?;
        Ok(Self {
            connection,
            _session: session,
            sender,
            receiver,
            next_id: 1,
            registration_id: registration_id.to_owned(),
        })
    }

    /// Detaches the links and closes the connection.
    pub async fn close(mut self) {
        // As the C# SDK does: closing the connection ends its session and links.
        let _ = self.connection.close().await;
    }

    /// Sends one request and waits for its answer (or its rejection).
    async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        let correlation = format!("{}-{}", self.registration_id, self.next_id);
        self.next_id += 1;
        let mut application = ApplicationProperties::builder().insert(
            "iotdps-operation-type",
            SimpleValue::String(operation.into()),
        );
        if let Some(id) = operation_id {
            application = application.insert("iotdps-operation-id", SimpleValue::String(id.into()));
        }
        let message = Message::builder()
            .properties(
                Properties::builder()
                    .correlation_id(MessageId::String(correlation.clone()))
                    .build(),
            )
            .application_properties(application.build())
            .data(Binary::from(body))
            .build();
        let outcome = tokio::time::timeout(ANSWER_TIMEOUT, self.sender.send(message))
            .await
            .context("the request was not settled in time")?
            .context("sending the request failed")?;
        match outcome {
            Outcome::Accepted(_) => {}
            Outcome::Rejected(rejected) => {
                let description = rejected
                    .error
                    .as_ref()
                    .and_then(|e| e.description.clone())
                    .unwrap_or_default();
                let body: Json = serde_json::from_str(&description)
                    .unwrap_or_else(|_| serde_json::json!({ "message": description }));
                let status = body["errorCode"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c / 1000).ok())
                    .unwrap_or(400);
                return Ok(Reply {
                    status,
                    retry_after: crate::exchange::retry_after(None),
                    body,
                });
            }
            other => bail!("the service settled the request as {other:?}"),
        }
        loop {
            let delivery: Delivery<Body<Value>> =
                tokio::time::timeout(ANSWER_TIMEOUT, self.receiver.recv())
                    .await
                    .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))?
                    .context("the receiving link failed")?;
            self.receiver.accept(&delivery).await?;
            let message = delivery.message();
            let matches = message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.as_ref())
                .is_some_and(|c| *c == MessageId::String(correlation.clone()));
            if !matches {
                continue;
            }
            let bytes: Vec<u8> = match &message.body {
                Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
                _ => bail!("the answer has no data section"),
            };
            let body: Json = serde_json::from_slice(&bytes).context("the answer is not JSON")?;
            let retry = message
                .application_properties
                .as_ref()
                .and_then(|p| p.0.get("retry-after"))
                .and_then(|v| match v {
                    SimpleValue::String(s) => Some(s.clone()),
                    _ => None,
                });
            let status = if body["status"] == "assigning" {
                202
            } else {
                200
            };
            return Ok(Reply {
                status,
                retry_after: crate::exchange::retry_after(retry.as_deref()),
                body,
            });
        }
    }
}

/// Opens the AMQP connection over `stream`: SASL PLAIN with the SAS token when there is one.
async fn open<Io>(
    stream: Io,
    host: &str,
    registration_id: &str,
    address: &str,
    sas: Option<&str>,
) -> Result<ConnectionHandle<()>, fe2o3_amqp::connection::OpenError>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let builder = Connection::builder()
        .container_id(format!("opendps-device-{registration_id}"))
        .hostname(host);
    match sas {
        Some(sas) => {
            builder
                .sasl_profile(SaslProfile::Plain {
                    username: address.to_owned(),
                    password: sas.to_owned(),
                })
                .open_with_stream(stream)
                .await
        }
        None => builder.open_with_stream(stream).await,
    }
}

impl crate::exchange::DeviceExchange for DpsAmqp {
    async fn register(&mut self, body: &Json) -> anyhow::Result<Reply> {
        self.request("iotdps-register", None, serde_json::to_vec(body)?)
            .await
    }

    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
        self.request("iotdps-get-operationstatus", Some(operation_id), Vec::new())
            .await
    }
}
