//! What the AMQP front end makes of what a device sends, beyond the framing and the message
//! encoding (fe2o3-amqp's and serde_amqp's; see docs/fuzzing.md for what fuzzing found there): a
//! request message (any application properties, correlation id and body) becomes a DPS request or
//! the error to reject it with; a SASL PLAIN response becomes a login or is refused; a link
//! address names a registration or not. Never a panic.
//!
//! Input: the first byte chooses (mode % 3: 0 a message, 1 a SASL PLAIN response, 2 a link
//! address; bits 2 and 3 pick string or symbol properties and the body kind), the rest is the
//! input. A message is `operation-type NUL operation-id NUL correlation-id NUL body`; an empty
//! part is left out.

#![no_main]

use dps_amqp::{Request, decode, parse_address, parse_plain};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => message(mode, input),
        1 => {
            if let Some(login) = parse_plain(input) {
                assert!(!login.authcid.is_empty() && !login.password.is_empty());
                let _ = parse_address(&login.authcid);
            }
        }
        _ => {
            if let Ok(address) = std::str::from_utf8(input)
                && let Some((scope, rid)) = parse_address(address)
            {
                assert!(!scope.is_empty() && !rid.is_empty());
                assert!(!scope.contains('/') && !rid.contains('/'));
            }
        }
    }
});

fn message(mode: u8, input: &[u8]) {
    let mut parts = input.splitn(4, |b| *b == 0);
    let mut text = || {
        parts
            .next()
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
    };
    let (operation, operation_id, correlation) = (text(), text(), text());
    let body = parts.next().unwrap_or_default().to_vec();
    let property = |value: String| match mode & 4 {
        0 => SimpleValue::String(value),
        _ => SimpleValue::Symbol(Symbol::from(value)),
    };
    let mut application = ApplicationProperties::builder();
    if let Some(operation) = &operation {
        application = application.insert("iotdps-operation-type", property(operation.clone()));
    }
    if let Some(id) = &operation_id {
        application = application.insert("iotdps-operation-id", property(id.clone()));
    }
    let built = Message::builder()
        .properties(match &correlation {
            Some(c) => Properties::builder()
                .correlation_id(MessageId::String(c.clone()))
                .build(),
            None => Properties::default(),
        })
        .application_properties(application.build())
        .data(Binary::from(body.clone()))
        .build();
    let message = Message {
        header: built.header,
        delivery_annotations: built.delivery_annotations,
        message_annotations: built.message_annotations,
        properties: built.properties,
        application_properties: built.application_properties,
        body: match mode & 8 {
            0 => Body::Data(vec![Data(Binary::from(body.clone()))].into()),
            _ => Body::Value(AmqpValue(Value::Binary(Binary::from(body.clone())))),
        },
        footer: built.footer,
    };
    match decode(&message) {
        Ok((echoed, request)) => {
            assert_eq!(echoed, correlation.map(MessageId::String));
            match request {
                Request::Register { body: decoded } => {
                    assert_eq!(operation.as_deref(), Some("iotdps-register"));
                    assert_eq!(decoded, if mode & 8 == 0 { body } else { Vec::new() });
                    let _ = dps_core::device::DeviceRegistration::from_body(&decoded);
                }
                Request::OperationStatus { operation_id: id } => {
                    assert_eq!(operation.as_deref(), Some("iotdps-get-operationstatus"));
                    assert_eq!(Some(id), operation_id);
                }
            }
        }
        Err(error) => assert!(error.description.is_some_and(|d| !d.is_empty())),
    }
}
