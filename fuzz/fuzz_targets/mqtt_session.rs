//! Arbitrary bytes on an MQTT connection: the MQTT 3.1.1 decoder, the CONNECT usernames of DPS and
//! of the bundled hub, and both sessions (DPS registration and the hub's twin and telemetry topics)
//! either produce packets that encode again, or refuse; they never panic.
//!
//! The first packet, if it is a CONNECT, opens the connection as the server's shell would (its
//! username names the hub device); every later packet goes to both sessions until each closes.

#![no_main]

use bytes::BytesMut;
use dps_core::device::DeviceRegistration;
use dps_mqtt::session::{DpsSession, Output as DpsOutput};
use libfuzzer_sys::fuzz_target;
use minihub::mqtt::session::{HubSession, Output as HubOutput};
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{Value, json};

/// The listener's largest packet: the 96 KB message limit plus room for the topic.
const MAX: usize = 96 * 1024 + 1024;

fuzz_target!(|data: &[u8]| {
    let mut buffer = BytesMut::from(data);
    let mut dps = Some(DpsSession::new());
    let mut hub = Some(HubSession::new("dev-1"));
    let mut out = BytesMut::new();
    let mut first = true;
    while let Ok(packet) = Packet::read(&mut buffer, MAX) {
        if std::mem::take(&mut first)
            && let Packet::Connect(connect) = &packet
        {
            if let Some(login) = &connect.login {
                let _ = dps_mqtt::dps::parse_username(&login.username);
                if let Some((_, device_id)) = minihub::mqtt::parse_username(&login.username) {
                    hub = Some(HubSession::new(&device_id));
                }
            }
            continue;
        }
        out.clear();
        if let Some(session) = dps.as_mut()
            && !dps_handles(session, packet.clone(), &mut out)
        {
            dps = None;
        }
        if let Some(session) = hub.as_mut()
            && !hub_handles(session, packet, &mut out)
        {
            hub = None;
        }
        if dps.is_none() && hub.is_none() {
            return;
        }
    }
});

/// One packet through the DPS session; `false` once it closes the connection.
fn dps_handles(session: &mut DpsSession, packet: Packet, out: &mut BytesMut) -> bool {
    for output in session.handle(packet) {
        match output {
            DpsOutput::Send(reply) => {
                reply
                    .write(out, MAX)
                    .expect("the session's own packets encode");
            }
            DpsOutput::Register { rid, body } => {
                let status = match DeviceRegistration::from_body(&body) {
                    Ok(_) => 202,
                    Err(_) => 400,
                };
                let reply = session.respond(&rid, status, Some(2), b"{}".to_vec());
                // A `$rid` near the topic limit leaves no room for the response prefix: the
                // shell then fails to encode and closes the connection.
                let _ = reply.write(out, MAX);
            }
            DpsOutput::Poll { rid, operation_id } => {
                let reply = session.respond(&rid, 200, None, operation_id.into_bytes());
                let _ = reply.write(out, MAX);
            }
            DpsOutput::Close(_) => return false,
        }
    }
    true
}

/// One packet through the hub session; `false` once it closes the connection.
fn hub_handles(session: &mut HubSession, packet: Packet, out: &mut BytesMut) -> bool {
    for output in session.handle(packet) {
        match output {
            HubOutput::Send(reply) => {
                reply
                    .write(out, MAX)
                    .expect("the session's own packets encode");
            }
            HubOutput::GetTwin { rid } => {
                let reply = session.twin_response(&rid, 200, None, b"{}".to_vec());
                let _ = reply.write(out, MAX);
            }
            HubOutput::PatchReported { rid, body } => {
                let (status, version) = match serde_json::from_slice::<Value>(&body) {
                    Ok(Value::Object(_)) => (204, Some(2)),
                    _ => (400, None),
                };
                let reply = session.twin_response(&rid, status, version, Vec::new());
                let _ = reply.write(out, MAX);
            }
            HubOutput::Telemetry { .. } => {}
            HubOutput::Close(_) => return false,
        }
    }
    if let Some(update) = session.desired_update(3, &json!({ "$version": 3 })) {
        update
            .write(out, MAX)
            .expect("a desired-property update encodes");
    }
    true
}
