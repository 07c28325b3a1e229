//! A device client of the Azure IoT DPS device API, as the official SDKs speak it, for Rust
//! devices, simulators and load generators.
//!
//! [`Device`] registers one device with a symmetric key or an X.509 certificate over HTTPS
//! ([`https`]), MQTT 3.1.1 over TLS or WebSockets ([`mqtt`]) or AMQP 1.0 ([`amqp`]) and polls its operation until it ends, honouring `Retry-After` by one rule
//! ([`exchange::retry_after`]); the replies are the core's wire types
//! ([`dps_core::device::RegistrationOperationStatus`]). [`exchange::register_and_poll`] runs the
//! same loop over any [`DeviceExchange`], so other transports (a load generator's own HTTP client)
//! share it. After assignment, [`Device::read_twin`] connects to the hub and reads the twin.
//!
//! This crate knows nothing of the service's own side: it is what a device would run.

pub mod amqp;
pub mod device;
pub mod exchange;
pub mod https;
pub mod mqtt;
mod ws;

pub use device::{Attestation, ClientIdentity, Device, Transport, failure_line, refusal};
pub use exchange::{DeviceExchange, Ended, Reply, register_and_poll, retry_after};
