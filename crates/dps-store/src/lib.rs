//! opendps storage backends.
//!
//! [`sqlite::SqliteStore`] is the embedded default; [`postgres::PgStore`] serves several nodes on one
//! PostgreSQL database. Every backend implements the seam traits of
//! `dps_core::store` and must pass the shared contract suite (module `contract`, feature `contract-tests`).

mod columns;
#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod postgres;
mod read_cache;
pub mod sqlite;

pub use postgres::{PgLocation, PgStore, import_sqlite};
pub use sqlite::SqliteStore;
