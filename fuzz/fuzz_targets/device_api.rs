//! What a device sends to register or poll, over either transport, through the decoders the
//! handlers use, never panicking.
//!
//! An input that starts with `$dps/` is an MQTT publish: its first line the topic, the rest the
//! payload, handed to the DPS session (topic and `$rid`/`operationId` parsing) and then, for a
//! register, to the body decoder. Anything else is an HTTP request: the device API's path decoder,
//! the registration id check, and the `DeviceRegistration` body decoder.

#![no_main]

use dps_core::device::DeviceRegistration;
use dps_core::ids::RegistrationId;
use dps_http::DeviceRequest;
use dps_mqtt::session::{DpsSession, Output};
use libfuzzer_sys::fuzz_target;
use opendps_fuzz::HttpRequest;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"$dps/") {
        mqtt(data);
    } else {
        https(data);
    }
});

fn mqtt(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(topic) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let payload = data.get(split + 1..).unwrap_or_default();
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = 1;
    for output in DpsSession::new().handle(Packet::Publish(publish)) {
        match output {
            Output::Register { rid, body } => {
                assert!(!rid.is_empty(), "a register request carries a $rid");
                body_decodes(&body);
            }
            Output::Poll { rid, operation_id } => {
                assert!(!rid.is_empty() && !operation_id.is_empty());
            }
            Output::Send(_) | Output::Close(_) => {}
        }
    }
}

fn https(data: &[u8]) {
    let Some(request) = HttpRequest::parse(data) else {
        return;
    };
    let Some(device) = DeviceRequest::from_path(&request.method, &request.path) else {
        return;
    };
    let registration_id = match &device {
        DeviceRequest::Register {
            registration_id, ..
        }
        | DeviceRequest::Status {
            registration_id, ..
        } => {
            body_decodes(request.body);
            registration_id
        }
        DeviceRequest::Operation {
            registration_id, ..
        } => registration_id,
    };
    let _ = RegistrationId::parse(registration_id);
}

/// The body decoder refuses or yields a registration that serializes again (it is forwarded to
/// the allocation webhook as JSON).
fn body_decodes(body: &[u8]) {
    if let Ok(registration) = DeviceRegistration::from_body(body) {
        serde_json::to_vec(&registration).expect("a decoded registration serializes");
    }
}
