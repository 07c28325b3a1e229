//! The DPS device exchange over AMQP 1.0, as the C# and Node SDKs perform it: TLS (with the
//! device's certificate for X.509), SASL PLAIN with the SAS token for a symmetric-key device (no
//! SASL layer for an X.509 one), one session, a sender and a receiver link on
//! `{idScope}/registrations/{registrationId}`, requests named by `iotdps-operation-type` with a
//! correlation id, answers in one Data section with `retry-after`, and refusals as rejected
//! deliveries whose error description is the DPS error JSON.
//!
//! A device needs one request and a few polls on one connection, so this client drives that
//! exchange itself in the caller's task, with fe2o3-amqp's types and frame decoder: no engine
//! tasks or channels (a general AMQP client costs the load generator of `opendps bench` about
//! three times the CPU of its MQTT client). It pipelines what AMQP 1.0 lets a client pipeline
//! (§2.4.1): the protocol header, open, begin, both attaches and the receiver's credit go in one
//! write; a request waits for the service's credit on the sending link, as the spec requires.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf as _, BytesMut};
use fe2o3_amqp::frames::amqp::{Frame, FrameBody, FrameDecoder};
use fe2o3_amqp::frames::sasl::{Frame as SaslFrame, FrameCodec as SaslCodec};
use fe2o3_amqp::types::definitions::{
    DeliveryTag, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp::types::messaging::Data;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage as _;
use fe2o3_amqp::types::messaging::{
    Accepted, ApplicationProperties, Body, DeliveryState, MessageId, Properties, Source, Target,
    TargetArchetype,
};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, Flow, MaxFrameSize, Open, Transfer,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit};
use serde_json::Value as Json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::codec::Decoder as _;

use crate::exchange::Reply;
use crate::mqtt::Carrier;

/// How long to wait for any answer from the service.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The SASL protocol header (`AMQP 3 1 0 0`).
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The AMQP protocol header (`AMQP 0 1 0 0`).
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// The largest frame this client announces and reads (DPS answers are a few KiB).
const MAX_FRAME: u32 = 256 * 1024;
/// Frame types (AMQP 1.0 §2.3).
const FRAME_AMQP: u8 = 0;
const FRAME_SASL: u8 = 1;

/// Room left in a frame for the transfer performative and the frame header.
const FRAME_OVERHEAD: usize = 128;

/// This client's link handles: its sender (requests) and its receiver (answers).
const SENDER: Handle = Handle(0);
const RECEIVER: Handle = Handle(1);
/// Credit granted on the receiving link: more than the answers of one registration.
const CREDIT: u32 = 64;

/// Anything the AMQP frames travel on: TLS, or a WebSocket's bytes.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open AMQP connection of one device, with its two links attached.
pub struct DpsAmqp {
    io: Box<dyn Io>,
    /// Bytes read and not yet decoded.
    inbox: BytesMut,
    /// Frames to send with the next write (settlements of the service's answers).
    outbox: BytesMut,
    /// The service's handle of the link it receives our requests on.
    peer_receiver: Option<Handle>,
    /// The service's handle of the link it sends answers on.
    peer_sender: Option<Handle>,
    /// Credit the service gave our sending link.
    credit: u32,
    /// The largest frame the service accepts (its open's max-frame-size).
    peer_max_frame: usize,
    /// Our next delivery id (and delivery tag).
    next_delivery: u32,
    registration_id: String,
}

impl DpsAmqp {
    /// Connects to DPS at `host:port` (TLS with `config`; over a WebSocket on the HTTPS port
    /// with [`Carrier::WebSocket`]), logs in with `sas` (SASL PLAIN) or, without one, with the
    /// certificate in `config` and no SASL, and attaches both links.
    pub async fn connect(
        config: &std::sync::Arc<rustls::ClientConfig>,
        host: &str,
        port: u16,
        carrier: Carrier,
        scope: &str,
        registration_id: &str,
        sas: Option<&str>,
    ) -> anyhow::Result<Self> {
        let tls = crate::mqtt::connect_tls(config, host, port, "AMQP").await?;
        let io: Box<dyn Io> = match carrier {
            Carrier::Tls => Box::new(tls),
            Carrier::WebSocket => Box::new(crate::ws::open(tls, host, port, "AMQPWSB10").await?),
        };
        let mut amqp = Self {
            io,
            inbox: BytesMut::with_capacity(4096),
            outbox: BytesMut::new(),
            peer_receiver: None,
            peer_sender: None,
            credit: 0,
            peer_max_frame: 512,
            next_delivery: 0,
            registration_id: registration_id.to_owned(),
        };
        let address = format!("{scope}/registrations/{registration_id}");
        tokio::time::timeout(ANSWER_TIMEOUT, async {
            if let Some(sas) = sas {
                amqp.sasl_plain(host, &address, sas).await?;
            }
            amqp.open(host, &address).await
        })
        .await
        .context("the service did not open the AMQP connection in time")??;
        Ok(amqp)
    }

    /// Closes the connection, as the C# SDK does: its session and links end with it. The
    /// service's answering close is not awaited.
    pub async fn close(mut self) {
        if put_frame(&mut self.outbox, FRAME_AMQP, &Close { error: None }, &[]).is_err() {
            return;
        }
        let outbox = std::mem::take(&mut self.outbox);
        if self.send(&outbox).await.is_ok() {
            let _ = self.io.shutdown().await;
        }
    }

    /// SASL PLAIN (RFC 4616) with the SAS token; the authorization id is empty, the
    /// authentication id is the link address.
    async fn sasl_plain(&mut self, host: &str, address: &str, sas: &str) -> anyhow::Result<()> {
        self.send(&SASL_HEADER).await?;
        self.expect_header(SASL_HEADER).await?;
        let SaslFrame::Mechanisms(offered) = self.read_sasl().await? else {
            bail!("the service did not start SASL with its mechanisms");
        };
        if !offered
            .sasl_server_mechanisms
            .0
            .iter()
            .any(|m| m.0 == "PLAIN")
        {
            bail!("the service does not offer SASL PLAIN: {offered:?}");
        }
        let mut login = Vec::with_capacity(address.len() + sas.len() + 2);
        login.push(0);
        login.extend_from_slice(address.as_bytes());
        login.push(0);
        login.extend_from_slice(sas.as_bytes());
        let init = SaslInit {
            mechanism: Symbol::from("PLAIN"),
            initial_response: Some(Binary::from(login)),
            hostname: Some(host.to_owned()),
        };
        let mut out = BytesMut::new();
        put_frame(&mut out, FRAME_SASL, &init, &[])?;
        self.send(&out).await?;
        match self.read_sasl().await? {
            SaslFrame::Outcome(outcome) if outcome.code == SaslCode::Ok => Ok(()),
            SaslFrame::Outcome(outcome) => {
                bail!(
                    "the service refused the SAS token (SASL outcome {:?})",
                    outcome.code
                )
            }
            other => bail!("expected the SASL outcome, got {other:?}"),
        }
    }

    /// Opens the connection, begins the session and attaches both links in one write, then reads
    /// until the service has answered each and given credit to the sending link.
    async fn open(&mut self, host: &str, address: &str) -> anyhow::Result<()> {
        let mut out = BytesMut::with_capacity(1024);
        out.extend_from_slice(&AMQP_HEADER);
        let open = Open {
            container_id: format!("opendps-device-{}", self.registration_id),
            hostname: Some(host.to_owned()),
            max_frame_size: MaxFrameSize(MAX_FRAME),
            channel_max: ChannelMax(0),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        put_frame(&mut out, FRAME_AMQP, &open, &[])?;
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: Handle(1),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        put_frame(&mut out, FRAME_AMQP, &begin, &[])?;
        put_frame(
            &mut out,
            FRAME_AMQP,
            &attach("sender_link", SENDER, Role::Sender, address),
            &[],
        )?;
        put_frame(
            &mut out,
            FRAME_AMQP,
            &attach("recv_link", RECEIVER, Role::Receiver, address),
            &[],
        )?;
        let flow = Flow {
            next_incoming_id: None,
            incoming_window: 2048,
            next_outgoing_id: 0,
            outgoing_window: 2048,
            handle: Some(RECEIVER),
            delivery_count: Some(0),
            link_credit: Some(CREDIT),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        put_frame(&mut out, FRAME_AMQP, &flow, &[])?;
        self.send(&out).await?;
        self.expect_header(AMQP_HEADER).await?;
        while self.peer_sender.is_none() || self.credit == 0 {
            let frame = self.read_frame().await?;
            self.on_frame(frame).await?;
        }
        Ok(())
    }

    /// Sends one request and waits for its answer (or its rejection).
    async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        while self.credit == 0 {
            let frame = self.read_frame().await?;
            self.on_frame(frame).await?;
        }
        let delivery = self.next_delivery;
        self.next_delivery = self.next_delivery.wrapping_add(1);
        self.credit -= 1;
        let correlation = format!("{}-{delivery}", self.registration_id);
        let mut application = ApplicationProperties::builder().insert(
            "iotdps-operation-type",
            SimpleValue::String(operation.into()),
        );
        if let Some(id) = operation_id {
            application = application.insert("iotdps-operation-id", SimpleValue::String(id.into()));
        }
        let properties = Properties::builder()
            .correlation_id(MessageId::String(correlation.clone()))
            .build();
        // A message is its sections one after the other (AMQP 1.0 §3.2).
        let mut payload = serde_amqp::to_vec(&properties)?;
        payload.extend(serde_amqp::to_vec(&application.build())?);
        payload.extend(serde_amqp::to_vec(&Data(Binary::from(body)))?);
        let transfer = Transfer {
            delivery_id: Some(delivery),
            delivery_tag: Some(DeliveryTag::from(delivery.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(false),
            ..continuation(SENDER)
        };
        // One frame, or as many as the service's largest frame needs (`more` on all but the
        // last); what is too big for the link is the service's to refuse.
        let mut out = std::mem::take(&mut self.outbox);
        let room = self.peer_max_frame.saturating_sub(FRAME_OVERHEAD).max(512);
        let mut chunks = payload.chunks(room).peekable();
        let mut transfer = Some(transfer);
        while let Some(chunk) = chunks.next() {
            let mut frame = transfer.take().unwrap_or_else(|| continuation(SENDER));
            frame.more = chunks.peek().is_some();
            put_frame(&mut out, FRAME_AMQP, &frame, chunk)?;
        }
        self.send(&out).await?;
        tokio::time::timeout(ANSWER_TIMEOUT, self.answer(delivery, &correlation))
            .await
            .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))?
    }

    /// Reads until the request `delivery` is rejected, or its answer (the message whose
    /// correlation id is `correlation`) arrives.
    async fn answer(&mut self, delivery: u32, correlation: &str) -> anyhow::Result<Reply> {
        loop {
            let frame = self.read_frame().await?;
            match frame.body {
                FrameBody::Disposition(d)
                    if d.role == Role::Receiver
                        && d.first <= delivery
                        && d.last.unwrap_or(d.first) >= delivery =>
                {
                    match d.state {
                        Some(DeliveryState::Rejected(rejected)) => {
                            let description = rejected
                                .error
                                .and_then(|e| e.description)
                                .unwrap_or_default();
                            return Ok(rejection(&description));
                        }
                        Some(DeliveryState::Accepted(_)) | None => {}
                        Some(other) => bail!("the service settled the request as {other:?}"),
                    }
                }
                FrameBody::Transfer {
                    performative,
                    payload,
                } if self.peer_sender.as_ref() == Some(&performative.handle) => {
                    if performative.more {
                        bail!("the service split an answer over several frames");
                    }
                    if performative.settled != Some(true) {
                        let first = performative
                            .delivery_id
                            .context("the service's answer has no delivery id")?;
                        let settle = Disposition {
                            role: Role::Receiver,
                            first,
                            last: None,
                            settled: true,
                            state: Some(DeliveryState::Accepted(Accepted {})),
                            batchable: false,
                        };
                        put_frame(&mut self.outbox, FRAME_AMQP, &settle, &[])?;
                    }
                    let message = Body::<Value>::decode_message_from_reader(
                        serde_amqp::read::SliceReader::new(&payload),
                    )
                    .context("the service's answer is not an AMQP message")?;
                    let matches = message
                        .properties
                        .as_ref()
                        .and_then(|p| p.correlation_id.as_ref())
                        .is_some_and(|c| *c == MessageId::String(correlation.to_owned()));
                    if !matches {
                        continue;
                    }
                    let bytes: Vec<u8> = match &message.body {
                        Body::Data(batch) => {
                            batch.iter().flat_map(|d| d.0.iter().copied()).collect()
                        }
                        _ => bail!("the answer has no data section"),
                    };
                    let body: Json =
                        serde_json::from_slice(&bytes).context("the answer is not JSON")?;
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
                body => self.on_frame(Frame::new(frame.channel, body)).await?,
            }
        }
    }

    /// Takes in what the service says about the connection, session and links.
    async fn on_frame(&mut self, frame: Frame) -> anyhow::Result<()> {
        match frame.body {
            FrameBody::Open(open) => {
                self.peer_max_frame = usize::try_from(open.max_frame_size.0).unwrap_or(usize::MAX);
            }
            FrameBody::Attach(attach) => {
                // A refused link comes back without its terminus and is detached at once with
                // the error, which the Detach arm reports.
                match attach.role {
                    // The service receives on the link we send on.
                    Role::Receiver => self.peer_receiver = Some(attach.handle),
                    Role::Sender => self.peer_sender = Some(attach.handle),
                }
            }
            FrameBody::Flow(flow) if flow.handle.is_some() && flow.handle == self.peer_receiver => {
                // The service's view of our sending link: credit = its delivery count + its
                // credit - ours (AMQP 1.0 §2.6.7).
                let theirs = flow.delivery_count.unwrap_or(0);
                let credit = flow.link_credit.unwrap_or(0);
                self.credit = theirs.wrapping_add(credit).wrapping_sub(self.next_delivery);
            }
            FrameBody::Detach(detach) => {
                // Answer the detach, as AMQP 1.0 §2.6.5 asks (the service waits for it), and
                // close: this client needs both links.
                let ours = if Some(&detach.handle) == self.peer_receiver.as_ref() {
                    SENDER
                } else {
                    RECEIVER
                };
                let reply = Detach {
                    handle: ours,
                    closed: true,
                    error: None,
                };
                let mut out = std::mem::take(&mut self.outbox);
                put_frame(&mut out, FRAME_AMQP, &reply, &[])?;
                put_frame(&mut out, FRAME_AMQP, &Close { error: None }, &[])?;
                let _ = self.send(&out).await;
                bail!("the service detached a link{}", because(detach.error))
            }
            FrameBody::End(end) => bail!("the service ended the session{}", because(end.error)),
            FrameBody::Close(close) => {
                bail!("the service closed the connection{}", because(close.error))
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes `bytes` and flushes them (a WebSocket sends its message on flush).
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads the service's protocol header and checks it is `expected`.
    async fn expect_header(&mut self, expected: [u8; 8]) -> anyhow::Result<()> {
        self.fill(8).await?;
        let header = self.inbox.split_to(8);
        if header[..] != expected {
            bail!(
                "the service answered with protocol header {:?}, not {:?}",
                &header[..],
                &expected
            );
        }
        Ok(())
    }

    /// Reads one whole frame of `kind`; its bytes from the data offset on.
    async fn read_raw(&mut self, kind: u8) -> anyhow::Result<BytesMut> {
        loop {
            self.fill(8).await?;
            let size = u32::from_be_bytes(self.inbox[..4].try_into().unwrap_or_default());
            if !(8..=MAX_FRAME).contains(&size) {
                bail!("the service sent a frame of {size} bytes");
            }
            self.fill(size as usize).await?;
            let mut frame = self.inbox.split_to(size as usize);
            frame.advance(4);
            if frame[1] != kind {
                bail!("the service sent a frame of type {}, not {kind}", frame[1]);
            }
            if frame.len() == 4 {
                continue; // an empty frame keeps the connection alive
            }
            return Ok(frame);
        }
    }

    async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        let mut raw = self.read_raw(FRAME_AMQP).await?;
        FrameDecoder {}
            .decode(&mut raw)
            .context("the service sent a frame this client cannot decode")?
            .context("the service sent an incomplete frame")
    }

    async fn read_sasl(&mut self) -> anyhow::Result<SaslFrame> {
        let mut raw = self.read_raw(FRAME_SASL).await?;
        SaslCodec {}
            .decode(&mut raw)
            .context("the service sent a SASL frame this client cannot decode")?
            .context("the service sent an incomplete SASL frame")
    }

    /// Reads until at least `n` bytes are buffered.
    async fn fill(&mut self, n: usize) -> anyhow::Result<()> {
        while self.inbox.len() < n {
            if self.io.read_buf(&mut self.inbox).await? == 0 {
                bail!("the service closed the connection");
            }
        }
        Ok(())
    }
}

/// What an AMQP error says, as the end of a sentence: ": " and its description (or condition),
/// or nothing without an error.
fn because(error: Option<fe2o3_amqp::types::definitions::Error>) -> String {
    error.map_or_else(String::new, |e| {
        format!(
            ": {}",
            e.description
                .unwrap_or_else(|| format!("{:?}", e.condition))
        )
    })
}

/// A transfer on `handle` with no field of its own: a further frame of the delivery being sent
/// (whose fields are the first frame's), or the base of a first frame.
fn continuation(handle: Handle) -> Transfer {
    Transfer {
        handle,
        delivery_id: None,
        delivery_tag: None,
        message_format: None,
        settled: None,
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    }
}

/// The attach of one of our links on `address`.
fn attach(name: &str, handle: Handle, role: Role, address: &str) -> Attach {
    let (source, target) = match role {
        Role::Sender => (
            Source::default(),
            Target::builder().address(address).build(),
        ),
        Role::Receiver => (
            Source::builder().address(address).build(),
            Target::default(),
        ),
    };
    let initial_delivery_count = (role == Role::Sender).then_some(0);
    Attach {
        name: name.to_owned(),
        handle,
        role,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(source)),
        target: Some(Box::new(TargetArchetype::Target(target))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count,
        max_message_size: Some(u64::from(MAX_FRAME)),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

/// Reserves a frame's size and writes its header (doff 2, `kind`, channel 0); returns where the
/// frame starts, for [`end_frame`].
fn begin_frame(out: &mut BytesMut, kind: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, 2, kind, 0, 0]);
    at
}

/// Writes the frame's size into the place [`begin_frame`] reserved.
fn end_frame(out: &mut BytesMut, at: usize) {
    let size = u32::try_from(out.len() - at).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&size.to_be_bytes());
}

/// Appends one frame on channel 0: the performative, then `payload`.
fn put_frame<P: serde::Serialize>(
    out: &mut BytesMut,
    kind: u8,
    performative: &P,
    payload: &[u8],
) -> anyhow::Result<()> {
    let encoded = serde_amqp::to_vec(performative).context("encoding an AMQP frame")?;
    let at = begin_frame(out, kind);
    out.extend_from_slice(&encoded);
    out.extend_from_slice(payload);
    end_frame(out, at);
    Ok(())
}

/// The reply a rejected request stands for: the DPS error JSON from the error's description.
fn rejection(description: &str) -> Reply {
    let body: Json = serde_json::from_str(description)
        .unwrap_or_else(|_| serde_json::json!({ "message": description }));
    let status = body["errorCode"]
        .as_u64()
        .and_then(|c| u16::try_from(c / 1000).ok())
        .unwrap_or(400);
    Reply {
        status,
        retry_after: crate::exchange::retry_after(None),
        body,
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
