//! Tools built on opendps, for the `opendps` command: the service API client the admin commands
//! use ([`client`]) and their output formats ([`output`]), the load generator ([`mod@bench`]) and the
//! custom allocation tutorial on one machine ([`demo`]), and a test PKI for X.509 devices ([`pki`]). The device side comes from `dps-device`,
//! the service from `dps-server`.

pub mod bench;
pub mod client;
pub mod demo;
pub mod output;
pub mod pki;

use clap::ValueEnum;

/// How simulated devices talk to the service (a command-line choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// The DPS device REST API over HTTPS.
    Https,
    /// MQTT 3.1.1 over TLS, as the Python, C, C# and Node SDKs can.
    Mqtt,
    /// MQTT 3.1.1 over WebSockets on the HTTPS port, as the SDKs' websockets option does.
    #[value(name = "mqtt-ws")]
    MqttWs,
    /// AMQP 1.0 over TLS, as the C, C#, Node and Java SDKs can.
    Amqp,
    /// AMQP 1.0 over WebSockets on the HTTPS port.
    #[value(name = "amqp-ws")]
    AmqpWs,
}

impl From<Transport> for dps_device::Transport {
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Https => Self::Https,
            Transport::Mqtt => Self::Mqtt,
            Transport::MqttWs => Self::MqttWs,
            Transport::Amqp => Self::Amqp,
            Transport::AmqpWs => Self::AmqpWs,
        }
    }
}
