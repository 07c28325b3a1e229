//! opendps core: the DPS domain, free of transports and databases.
//!
//! Front ends decode bytes into the types here, make one core call and encode the result: the service
//! API calls [`management::Management`] (after [`management::Management::authenticate`]), the device
//! API over HTTPS and MQTT calls [`provisioning::Provisioning`], and the worker drives each accepted
//! registration through [`provisioning::Provisioning::process`]. Storage, hubs, webhooks and time
//! come in through the seams in [`store`], [`hub`], [`webhook`] and [`clock`].

pub mod access;
pub mod allocation;
pub mod ca;
pub mod certificate;
pub mod clock;
pub mod device;
pub mod error;
pub mod hub;
pub mod ids;
pub mod linked_hub;
pub mod management;
pub mod model;
pub mod provisioning;
pub mod request_body;
pub mod sas;
pub mod secret;
pub mod store;
pub mod time;
pub mod webhook;

pub use error::ProvisioningError;
