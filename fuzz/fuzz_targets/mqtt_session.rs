//! Arbitrary bytes through the MQTT decoder and the DPS session: whatever a device sends, decoding
//! and the session either produce packets that encode again, or refuse; they never panic.

#![no_main]

use bytes::BytesMut;
use dps_mqtt::session::{DpsSession, Output};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;

const MAX: usize = 96 * 1024 + 1024;

fuzz_target!(|data: &[u8]| {
    let mut buffer = BytesMut::from(data);
    let mut session = DpsSession::new();
    let mut out = BytesMut::new();
    while let Ok(packet) = Packet::read(&mut buffer, MAX) {
        if let Packet::Connect(connect) = &packet {
            if let Some(login) = &connect.login {
                let _ = dps_mqtt::dps::parse_username(&login.username);
            }
        }
        for output in session.handle(packet) {
            match output {
                Output::Send(reply) => {
                    reply.write(&mut out, MAX).expect("the session's own packets encode");
                }
                Output::Register { rid, body } => {
                    let reply = session.respond(&rid, 202, Some(2), body.to_vec());
                    let _ = reply.write(&mut out, MAX);
                }
                Output::Poll { rid, operation_id } => {
                    let reply = session.respond(&rid, 200, None, operation_id.into_bytes());
                    let _ = reply.write(&mut out, MAX);
                }
                Output::Close(_) => return,
            }
        }
    }
});
