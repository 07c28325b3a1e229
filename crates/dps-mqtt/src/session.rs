//! The DPS MQTT session as a state machine without I/O: packets in, packets and requests out.
//!
//! Order matters to the C# SDK: a QoS 1 request is PUBACKed *before* its response is published,
//! and nothing unsolicited is ever sent. `$rid` is echoed byte for byte; every response carries a
//! JSON body. DPS is not a broker: only its own topics are accepted.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck};

use crate::protocol::{PacketIds, puback_for, query_param};

/// The topic filter devices subscribe to for responses.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/";
const POLL_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";

/// What the session asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this packet.
    Send(Packet),
    /// Register the device with this body; answer with [`DpsSession::respond`].
    Register {
        /// `$rid` of the request, as received.
        rid: String,
        /// The request payload (may be empty).
        body: Bytes,
    },
    /// Report on an operation; answer with [`DpsSession::respond`].
    Poll {
        /// `$rid` of the request, as received.
        rid: String,
        /// The operation id.
        operation_id: String,
    },
    /// Close the connection (protocol violation, or the client said goodbye).
    Close(&'static str),
}

/// One device's MQTT session with DPS, after a successful CONNECT.
#[derive(Debug)]
pub struct DpsSession {
    packet_ids: PacketIds,
}

impl Default for DpsSession {
    fn default() -> Self {
        Self::new()
    }
}

impl DpsSession {
    /// A fresh session (DPS keeps no session state: CONNACK always says SessionPresent=0).
    pub fn new() -> Self {
        Self {
            packet_ids: PacketIds::default(),
        }
    }

    /// Handles one packet from the device.
    pub fn handle(&mut self, packet: Packet) -> Vec<Output> {
        match packet {
            Packet::Subscribe(subscribe) => vec![Output::Send(Packet::SubAck(suback(&subscribe)))],
            Packet::Unsubscribe(unsubscribe) => vec![Output::Send(Packet::UnsubAck(
                UnsubAck::new(unsubscribe.pkid),
            ))],
            Packet::Publish(publish) => self.publish(publish),
            Packet::PingReq => vec![Output::Send(Packet::PingResp)],
            // Acknowledgements of our QoS 1 responses need nothing further.
            Packet::PubAck(_) => Vec::new(),
            Packet::Disconnect => vec![Output::Close("the device disconnected")],
            Packet::Connect(_) => vec![Output::Close("a second CONNECT on one connection")],
            _ => vec![Output::Close("a packet a device never sends")],
        }
    }

    fn publish(&mut self, publish: Publish) -> Vec<Output> {
        if publish.qos == QoS::ExactlyOnce {
            return vec![Output::Close("QoS 2 is not supported by DPS")];
        }
        let request = if let Some(query) = publish.topic.strip_prefix(REGISTER_PREFIX) {
            rid(query).map(|rid| Output::Register {
                rid,
                body: publish.payload.clone(),
            })
        } else if let Some(query) = publish.topic.strip_prefix(POLL_PREFIX) {
            rid(query)
                .zip(query_param(query, "operationId"))
                .map(|(rid, operation_id)| Output::Poll { rid, operation_id })
        } else {
            None
        };
        let Some(request) = request else {
            return vec![Output::Close("a publish to a topic DPS does not serve")];
        };
        let mut out: Vec<Output> = puback_for(&publish).map(Output::Send).into_iter().collect();
        out.push(request);
        out
    }

    /// The response to a request: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]`,
    /// published at QoS 1 with a JSON body.
    pub fn respond(
        &mut self,
        rid: &str,
        status: u16,
        retry_after: Option<u32>,
        json: Vec<u8>,
    ) -> Packet {
        let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
        if let Some(seconds) = retry_after {
            topic.push_str(&format!("&retry-after={seconds}"));
        }
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, json);
        publish.pkid = self.packet_ids.next_id();
        Packet::Publish(publish)
    }
}

/// Grants QoS 1 (at most) on the response filter; refuses everything else.
fn suback(subscribe: &Subscribe) -> SubAck {
    let codes = subscribe
        .filters
        .iter()
        .map(|f| {
            if f.path == RESPONSE_FILTER {
                SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                })
            } else {
                SubscribeReasonCode::Failure
            }
        })
        .collect();
    SubAck::new(subscribe.pkid, codes)
}

/// `$rid` of a request topic's query part, unchanged.
fn rid(query: &str) -> Option<String> {
    query_param(query, "$rid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::PubAck;
    use rumqttc::mqttbytes::v4::{SubscribeFilter, Unsubscribe};

    fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Packet {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    }

    #[test]
    fn puback_comes_before_the_request() {
        let mut s = DpsSession::new();
        let out = s.handle(publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=42",
            QoS::AtLeastOnce,
            7,
            b"{}",
        ));
        assert_eq!(
            out,
            vec![
                Output::Send(Packet::PubAck(PubAck::new(7))),
                Output::Register {
                    rid: "42".into(),
                    body: Bytes::from_static(b"{}")
                },
            ]
        );
    }

    #[test]
    fn qos0_requests_get_no_puback() {
        let mut s = DpsSession::new();
        let out = s.handle(publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtMostOnce,
            0,
            b"",
        ));
        assert_eq!(
            out,
            vec![Output::Register {
                rid: "1".into(),
                body: Bytes::new()
            }]
        );
    }

    #[test]
    fn rid_is_echoed_byte_for_byte() {
        let mut s = DpsSession::new();
        let rid = "2a0c4f1e-7f49-4b56-bd61-%7Bodd%7D";
        let out = s.handle(publish(
            &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId=4.abc.def"),
            QoS::AtLeastOnce,
            3,
            b" ",
        ));
        assert_eq!(
            out[1],
            Output::Poll {
                rid: rid.into(),
                operation_id: "4.abc.def".into()
            }
        );
        let Packet::Publish(response) = s.respond(rid, 202, Some(2), b"{}".to_vec()) else {
            panic!("a publish")
        };
        assert_eq!(
            response.topic,
            format!("$dps/registrations/res/202/?$rid={rid}&retry-after=2")
        );
        assert_eq!(response.qos, QoS::AtLeastOnce);
        assert_ne!(response.pkid, 0);
        let Packet::Publish(terminal) = s.respond(rid, 200, None, b"{}".to_vec()) else {
            panic!("a publish")
        };
        assert_eq!(
            terminal.topic,
            format!("$dps/registrations/res/200/?$rid={rid}")
        );
        assert_ne!(terminal.pkid, response.pkid);
    }

    #[test]
    fn subscriptions_only_to_the_response_filter() {
        let mut s = DpsSession::new();
        let sub = Subscribe {
            pkid: 9,
            filters: vec![
                SubscribeFilter::new(RESPONSE_FILTER.into(), QoS::ExactlyOnce),
                SubscribeFilter::new("devices/+/messages".into(), QoS::AtLeastOnce),
            ],
        };
        let out = s.handle(Packet::Subscribe(sub));
        assert_eq!(
            out,
            vec![Output::Send(Packet::SubAck(SubAck::new(
                9,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure,
                ]
            )))]
        );
        let unsub = s.handle(Packet::Unsubscribe(Unsubscribe {
            pkid: 10,
            topics: vec![RESPONSE_FILTER.into()],
        }));
        assert_eq!(
            unsub,
            vec![Output::Send(Packet::UnsubAck(UnsubAck::new(10)))]
        );
    }

    #[test]
    fn anything_else_closes_the_connection() {
        let mut s = DpsSession::new();
        for packet in [
            publish("devices/x/messages/events/", QoS::AtLeastOnce, 1, b"{}"),
            publish(
                "$dps/registrations/PUT/iotdps-register/",
                QoS::AtLeastOnce,
                1,
                b"{}",
            ),
            publish(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
                QoS::AtLeastOnce,
                1,
                b"",
            ),
            publish(
                "$dps/registrations/PUT/iotdps-register/?$rid=1",
                QoS::ExactlyOnce,
                1,
                b"{}",
            ),
            Packet::Disconnect,
            Packet::PingResp,
        ] {
            assert!(
                matches!(s.handle(packet.clone())[..], [Output::Close(_)]),
                "{packet:?}"
            );
        }
        assert_eq!(
            s.handle(Packet::PingReq),
            vec![Output::Send(Packet::PingResp)]
        );
    }
}
