//! opendps MQTT 3.1.1 front end over TLS.
//!
//! [`session`] is the DPS protocol as a state machine without I/O; [`server`] is the socket shell
//! that frames packets, handles CONNECT and keep-alive, and routes each connection by its CONNECT
//! (DPS in [`dps`]; other usernames, such as devices of an in-process IoT hub, to another
//! [`Connector`]).

pub mod dps;
pub mod protocol;
pub mod server;
pub mod session;

pub use dps::DpsConnector;
pub use server::{
    Connection, Connector, DEFAULT_MAX_KEEP_ALIVE, Handled, MqttLimits, serve, serve_connection,
};
