//! Pieces of MQTT 3.1.1 that every session here shares: packet identifiers for the server's own
//! QoS 1 publishes, request parameters read from topics, and acknowledging a request first.

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};

/// Identifiers for server-initiated QoS 1 publishes: 1 to 65535, wrapping, never 0.
#[derive(Debug)]
pub struct PacketIds(u16);

impl Default for PacketIds {
    fn default() -> Self {
        Self(1)
    }
}

impl PacketIds {
    /// The next identifier.
    pub fn next_id(&mut self) -> u16 {
        let id = self.0;
        self.0 = self.0.checked_add(1).unwrap_or(1);
        id
    }
}

/// A parameter of a topic's query part (the text after its last `/`, with or without a leading
/// `?`), unchanged: no percent-decoding, because `$rid` must be echoed byte for byte.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .trim_start_matches('?')
        .split('&')
        .find_map(|pair| {
            pair.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        })
        .filter(|v| !v.is_empty())
}

/// The PUBACK a QoS 1 publish gets before anything else is sent in answer to it (the C# SDK expects
/// it as the very next packet).
pub fn puback_for(publish: &Publish) -> Option<Packet> {
    (publish.qos == QoS::AtLeastOnce).then(|| Packet::PubAck(PubAck::new(publish.pkid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_wrap_and_skip_zero() {
        let mut ids = PacketIds(u16::MAX);
        assert_eq!(ids.next_id(), u16::MAX);
        assert_eq!(ids.next_id(), 1);
    }

    #[test]
    fn query_params_are_not_decoded() {
        assert_eq!(
            query_param("?$rid=a%2Fb&operationId=4.x", "$rid").as_deref(),
            Some("a%2Fb")
        );
        assert_eq!(
            query_param("$rid=1&operationId=4.x", "operationId").as_deref(),
            Some("4.x")
        );
        assert_eq!(query_param("?$rid=", "$rid"), None);
        assert_eq!(query_param("", "$rid"), None);
    }

    #[test]
    fn only_qos1_publishes_are_acknowledged() {
        let mut p = Publish::new("t", QoS::AtLeastOnce, Vec::new());
        p.pkid = 3;
        assert_eq!(puback_for(&p), Some(Packet::PubAck(PubAck::new(3))));
        assert_eq!(
            puback_for(&Publish::new("t", QoS::AtMostOnce, Vec::new())),
            None
        );
    }
}
