//! A device's MQTT session with an IoT hub as a state machine without I/O: packets in, packets and
//! requests out.
//!
//! As on IoT Hub, a QoS 1 request is PUBACKed before its response is published, `$rid` is echoed
//! byte for byte, and responses go out at the QoS the device subscribed with (never above 1);
//! desired-property updates only to devices that subscribed to them. The hub is not a broker: only
//! the device topics are accepted.

use std::collections::BTreeMap;

use bytes::Bytes;
use dps_mqtt::protocol::{PacketIds, puback_for, query_param};
use percent_encoding::percent_decode_str;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, SubAck, Subscribe, SubscribeReasonCode, UnsubAck};
use serde_json::Value;

/// Twin responses (`$iothub/twin/res/{status}/?$rid={rid}`).
pub const TWIN_RESPONSE_FILTER: &str = "$iothub/twin/res/#";
/// Desired-property updates (`$iothub/twin/PATCH/properties/desired/?$version={n}`).
pub const DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
/// Direct-method requests (`$iothub/methods/POST/{name}/?$rid={rid}`).
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";

const TWIN_GET_PREFIX: &str = "$iothub/twin/GET/";
const REPORTED_PREFIX: &str = "$iothub/twin/PATCH/properties/reported/";
const METHOD_RESPONSE_PREFIX: &str = "$iothub/methods/res/";

/// What the session asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this packet.
    Send(Packet),
    /// Read the twin; answer with [`HubSession::twin_response`].
    GetTwin {
        /// `$rid` of the request, as received.
        rid: String,
    },
    /// Merge this reported-properties patch; answer with [`HubSession::twin_response`].
    PatchReported {
        /// `$rid` of the request, as received.
        rid: String,
        /// The request payload (should be a JSON object).
        body: Bytes,
    },
    /// Keep this device-to-cloud message.
    Telemetry {
        /// Application properties from the topic.
        properties: BTreeMap<String, String>,
        /// System properties from the topic's `$.{name}` pairs, under their HTTPS names
        /// (`messageid`, `contenttype`, …).
        system_properties: BTreeMap<String, String>,
        /// The message body.
        body: Bytes,
    },
    /// Close the connection (protocol violation, or the device said goodbye).
    Close(&'static str),
}

/// One device's MQTT session with a hub, after a successful CONNECT.
#[derive(Debug)]
pub struct HubSession {
    device_id: String,
    packet_ids: PacketIds,
    /// Granted QoS of the twin-response subscription, if any.
    twin_responses: Option<QoS>,
    /// Granted QoS of the desired-property subscription, if any.
    desired: Option<QoS>,
}

impl HubSession {
    /// A fresh session of `device_id` (nothing subscribed; sessions are never persisted).
    pub fn new(device_id: &str) -> Self {
        Self {
            device_id: device_id.to_owned(),
            packet_ids: PacketIds::default(),
            twin_responses: None,
            desired: None,
        }
    }

    fn devicebound_filter(&self) -> String {
        format!("devices/{}/messages/devicebound/#", self.device_id)
    }

    fn events_prefix(&self) -> String {
        format!("devices/{}/messages/events", self.device_id)
    }

    /// Handles one packet from the device.
    pub fn handle(&mut self, packet: Packet) -> Vec<Output> {
        match packet {
            Packet::Subscribe(subscribe) => {
                vec![Output::Send(Packet::SubAck(self.subscribe(&subscribe)))]
            }
            Packet::Unsubscribe(unsubscribe) => {
                for topic in &unsubscribe.topics {
                    match topic.as_str() {
                        TWIN_RESPONSE_FILTER => self.twin_responses = None,
                        DESIRED_FILTER => self.desired = None,
                        _ => {}
                    }
                }
                vec![Output::Send(Packet::UnsubAck(UnsubAck::new(
                    unsubscribe.pkid,
                )))]
            }
            Packet::Publish(publish) => self.publish(publish),
            Packet::PingReq => vec![Output::Send(Packet::PingResp)],
            // Acknowledgements of our QoS 1 publishes need nothing further.
            Packet::PubAck(_) => Vec::new(),
            Packet::Disconnect => vec![Output::Close("the device disconnected")],
            Packet::Connect(_) => vec![Output::Close("a second CONNECT on one connection")],
            _ => vec![Output::Close("a packet a device never sends")],
        }
    }

    /// Grants the device topics (QoS 2 is granted as 1); refuses everything else.
    fn subscribe(&mut self, subscribe: &Subscribe) -> SubAck {
        let devicebound = self.devicebound_filter();
        let codes = subscribe
            .filters
            .iter()
            .map(|f| {
                let qos = if f.qos == QoS::AtMostOnce {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                match f.path.as_str() {
                    TWIN_RESPONSE_FILTER => self.twin_responses = Some(qos),
                    DESIRED_FILTER => self.desired = Some(qos),
                    METHODS_FILTER => {}
                    path if path == devicebound => {}
                    _ => return SubscribeReasonCode::Failure,
                }
                SubscribeReasonCode::Success(qos)
            })
            .collect();
        SubAck::new(subscribe.pkid, codes)
    }

    fn publish(&mut self, publish: Publish) -> Vec<Output> {
        if publish.qos == QoS::ExactlyOnce {
            return vec![Output::Close("QoS 2 is not supported by IoT Hub")];
        }
        let topic = publish.topic.as_str();
        let events = self.events_prefix();
        let request = if let Some(query) = topic.strip_prefix(TWIN_GET_PREFIX) {
            rid(query).map(|rid| Some(Output::GetTwin { rid }))
        } else if let Some(query) = topic.strip_prefix(REPORTED_PREFIX) {
            rid(query).map(|rid| {
                Some(Output::PatchReported {
                    rid,
                    body: publish.payload.clone(),
                })
            })
        } else if let Some(tail) = topic.strip_prefix(METHOD_RESPONSE_PREFIX) {
            // Direct methods are not offered, so a response answers nothing; accept it quietly.
            tail.split_once('/')
                .and_then(|(_, query)| rid(query))
                .map(|_| None)
        } else if let Some(tail) = topic.strip_prefix(events.as_str()) {
            match tail {
                "" => Some(""),
                _ => tail.strip_prefix('/'),
            }
            .map(|props| {
                let (properties, system_properties) = message_properties(props);
                Some(Output::Telemetry {
                    properties,
                    system_properties,
                    body: publish.payload.clone(),
                })
            })
        } else {
            None
        };
        let Some(request) = request else {
            return vec![Output::Close("a publish to a topic IoT Hub does not serve")];
        };
        let mut out: Vec<Output> = puback_for(&publish).map(Output::Send).into_iter().collect();
        out.extend(request);
        out
    }

    /// The response to a twin request, `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`, at
    /// the QoS the device subscribed with. It answers the device's own request, so it is sent even
    /// without a subscription (at QoS 0): the Python SDK publishes its first twin GET before it
    /// subscribes to the responses, and waits for that answer.
    pub fn twin_response(
        &mut self,
        rid: &str,
        status: u16,
        version: Option<u64>,
        body: Vec<u8>,
    ) -> Packet {
        let qos = self.twin_responses.unwrap_or(QoS::AtMostOnce);
        let mut topic = format!("$iothub/twin/res/{status}/?$rid={rid}");
        if let Some(version) = version {
            topic.push_str(&format!("&$version={version}"));
        }
        self.outgoing(topic, qos, body)
    }

    /// The desired-property update `$iothub/twin/PATCH/properties/desired/?$version={n}` with
    /// `body` (which carries `$version`), or `None` when the device has not subscribed to them.
    pub fn desired_update(&mut self, version: u64, body: &Value) -> Option<Packet> {
        let qos = self.desired?;
        let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
        Some(self.outgoing(topic, qos, serde_json::to_vec(body).unwrap_or_default()))
    }

    fn outgoing(&mut self, topic: String, qos: QoS, body: Vec<u8>) -> Packet {
        let mut publish = Publish::new(topic, qos, body);
        if qos != QoS::AtMostOnce {
            publish.pkid = self.packet_ids.next_id();
        }
        Packet::Publish(publish)
    }
}

/// `$rid` from the text after the topic's last `/` (with or without its leading `?`), unchanged.
fn rid(query: &str) -> Option<String> {
    query_param(query, "$rid")
}

/// The HTTPS (`iothub-{name}`) name of an MQTT system property `$.{short}`.
fn system_property_name(short: &str) -> String {
    match short {
        "mid" => "messageid".into(),
        "cid" => "correlationid".into(),
        "uid" => "userid".into(),
        "ct" => "contenttype".into(),
        "ce" => "contentencoding".into(),
        "exp" => "expiry".into(),
        "to" => "to".into(),
        "on" => "outputname".into(),
        "ifid" => "interfaceid".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// Application and system properties from the url-encoded `k=v&…` tail of a telemetry topic. Only
/// percent-decoding: a `+` stays a `+`.
fn message_properties(tail: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut app, mut system) = (BTreeMap::new(), BTreeMap::new());
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    for pair in tail.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode(key), decode(value));
        match key.strip_prefix("$.") {
            Some(short) => system.insert(system_property_name(short), value),
            None => app.insert(key, value),
        };
    }
    (app, system)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::PubAck;
    use rumqttc::mqttbytes::v4::{SubscribeFilter, Unsubscribe};
    use serde_json::json;

    fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Packet {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    }

    fn subscribed(qos: QoS) -> HubSession {
        let mut s = HubSession::new("dev-1");
        s.handle(Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![
                SubscribeFilter::new(TWIN_RESPONSE_FILTER.into(), qos),
                SubscribeFilter::new(DESIRED_FILTER.into(), qos),
            ],
        }));
        s
    }

    #[test]
    fn subscriptions_to_device_topics_only() {
        let mut s = HubSession::new("dev-1");
        let filters = [
            (TWIN_RESPONSE_FILTER, QoS::AtLeastOnce),
            (DESIRED_FILTER, QoS::AtMostOnce),
            (METHODS_FILTER, QoS::ExactlyOnce),
            ("devices/dev-1/messages/devicebound/#", QoS::AtLeastOnce),
            ("devices/dev-2/messages/devicebound/#", QoS::AtLeastOnce),
            ("$iothub/twin/#", QoS::AtLeastOnce),
            ("#", QoS::AtMostOnce),
        ];
        let out = s.handle(Packet::Subscribe(Subscribe {
            pkid: 9,
            filters: filters
                .iter()
                .map(|(f, q)| SubscribeFilter::new((*f).into(), *q))
                .collect(),
        }));
        assert_eq!(
            out,
            vec![Output::Send(Packet::SubAck(SubAck::new(
                9,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Failure,
                ]
            )))]
        );
        let out = s.handle(Packet::Unsubscribe(Unsubscribe {
            pkid: 10,
            topics: vec![DESIRED_FILTER.into()],
        }));
        assert_eq!(out, vec![Output::Send(Packet::UnsubAck(UnsubAck::new(10)))]);
        assert_eq!(s.desired_update(2, &json!({"$version": 2})), None);
    }

    #[test]
    fn puback_comes_before_the_twin_response_and_rid_is_echoed() {
        let mut s = subscribed(QoS::AtLeastOnce);
        let rid = "2a0c4f1e-7f49-%7Bodd%7D";
        let out = s.handle(publish(
            &format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtLeastOnce,
            7,
            b" ",
        ));
        assert_eq!(
            out,
            vec![
                Output::Send(Packet::PubAck(PubAck::new(7))),
                Output::GetTwin { rid: rid.into() },
            ]
        );
        let Packet::Publish(response) = s.twin_response(rid, 200, None, b"{}".to_vec()) else {
            panic!("a publish")
        };
        assert_eq!(response.topic, format!("$iothub/twin/res/200/?$rid={rid}"));
        assert_eq!(response.qos, QoS::AtLeastOnce);
        assert_ne!(response.pkid, 0);

        let out = s.handle(publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=8",
            QoS::AtLeastOnce,
            8,
            b"{\"a\":1}",
        ));
        assert_eq!(
            out,
            vec![
                Output::Send(Packet::PubAck(PubAck::new(8))),
                Output::PatchReported {
                    rid: "8".into(),
                    body: Bytes::from_static(b"{\"a\":1}")
                },
            ]
        );
        let Packet::Publish(patched) = s.twin_response("8", 204, Some(5), Vec::new()) else {
            panic!("a publish")
        };
        assert_eq!(patched.topic, "$iothub/twin/res/204/?$rid=8&$version=5");
        assert!(patched.payload.is_empty());
        assert_ne!(patched.pkid, response.pkid);
    }

    #[test]
    fn qos0_requests_and_subscriptions() {
        let mut s = subscribed(QoS::AtMostOnce);
        let out = s.handle(publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, 0, b""));
        assert_eq!(out, vec![Output::GetTwin { rid: "1".into() }]);
        let Packet::Publish(response) = s.twin_response("1", 200, None, b"{}".to_vec()) else {
            panic!("a publish")
        };
        assert_eq!((response.qos, response.pkid), (QoS::AtMostOnce, 0));
        // Without a subscription the answer still goes out, at QoS 0.
        let mut bare = HubSession::new("dev-1");
        let Packet::Publish(response) = bare.twin_response("1", 200, None, Vec::new()) else {
            panic!("a publish")
        };
        assert_eq!((response.qos, response.pkid), (QoS::AtMostOnce, 0));
        let mut bare = subscribed(QoS::AtLeastOnce);
        bare.handle(Packet::Unsubscribe(Unsubscribe {
            pkid: 2,
            topics: vec![TWIN_RESPONSE_FILTER.into()],
        }));
        let Packet::Publish(response) = bare.twin_response("2", 200, None, Vec::new()) else {
            panic!("a publish")
        };
        assert_eq!(response.qos, QoS::AtMostOnce);
    }

    #[test]
    fn telemetry_with_properties() {
        let mut s = HubSession::new("dev-1");
        let out = s.handle(publish(
            "devices/dev-1/messages/events/temp=21.5&%24.ct=application%2Fjson&%24.ce=utf-8&$.mid=m%201&a%2Bb=c+d",
            QoS::AtLeastOnce,
            3,
            b"{\"t\":21.5}",
        ));
        let props = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            out,
            vec![
                Output::Send(Packet::PubAck(PubAck::new(3))),
                Output::Telemetry {
                    properties: props(&[("temp", "21.5"), ("a+b", "c+d")]),
                    system_properties: props(&[
                        ("contenttype", "application/json"),
                        ("contentencoding", "utf-8"),
                        ("messageid", "m 1"),
                    ]),
                    body: Bytes::from_static(b"{\"t\":21.5}"),
                },
            ]
        );
        for topic in [
            "devices/dev-1/messages/events/",
            "devices/dev-1/messages/events",
        ] {
            let out = s.handle(publish(topic, QoS::AtMostOnce, 0, b"x"));
            assert!(
                matches!(&out[..], [Output::Telemetry { properties, .. }] if properties.is_empty()),
                "{topic}"
            );
        }
    }

    #[test]
    fn method_responses_are_acknowledged() {
        let mut s = HubSession::new("dev-1");
        let out = s.handle(publish(
            "$iothub/methods/res/200/?$rid=1",
            QoS::AtLeastOnce,
            4,
            b"{}",
        ));
        assert_eq!(out, vec![Output::Send(Packet::PubAck(PubAck::new(4)))]);
    }

    #[test]
    fn desired_update_shape() {
        let mut s = subscribed(QoS::AtLeastOnce);
        let body = json!({"mode": "eco", "$version": 4});
        let Some(Packet::Publish(update)) = s.desired_update(4, &body) else {
            panic!("a publish")
        };
        assert_eq!(
            update.topic,
            "$iothub/twin/PATCH/properties/desired/?$version=4"
        );
        assert_eq!(update.qos, QoS::AtLeastOnce);
        assert_ne!(update.pkid, 0);
        assert_eq!(
            serde_json::from_slice::<Value>(&update.payload).expect("json"),
            body
        );
    }

    #[test]
    fn anything_else_closes_the_connection() {
        let mut s = subscribed(QoS::AtLeastOnce);
        for packet in [
            publish("devices/dev-2/messages/events/", QoS::AtLeastOnce, 1, b"{}"),
            publish("devices/dev-1/messages/eventsX", QoS::AtLeastOnce, 1, b"{}"),
            publish("$iothub/twin/GET/", QoS::AtLeastOnce, 1, b""),
            publish("$iothub/twin/GET/?$rid=1", QoS::ExactlyOnce, 1, b""),
            publish(
                "$dps/registrations/PUT/iotdps-register/?$rid=1",
                QoS::AtLeastOnce,
                1,
                b"",
            ),
            publish("some/topic", QoS::AtMostOnce, 0, b""),
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
