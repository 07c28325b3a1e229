//! The opendps service as a library: layered configuration ([`config`]), the data directory with
//! its lock and runtime file ([`datadir`]), the development PKI ([`pki`]), the service's assembly
//! ([`serve`]: the caller binds the listeners, [`serve::start`] serves on them until told to stop),
//! the registration worker ([`worker`]), what a data directory says about its service ([`info`]),
//! and minihub served on its own ([`hub`]).

pub mod config;
pub mod datadir;
pub mod hub;
pub mod info;
pub mod migrate;
pub mod pki;
pub mod process;
pub mod serve;
pub mod storage;
mod websocket;
pub mod worker;
