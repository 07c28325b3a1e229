//! SQLite as opendps uses it, shared by the DPS store and minihub: one database file in WAL mode,
//! one writer thread that commits the writes of many callers together ([`GroupCommit`]), reads on
//! the calling thread over a few pooled connections ([`ReaderPool`]), and a [`Schema`] of numbered
//! migrations kept in `PRAGMA user_version`, opened with patience for another process that is
//! creating or migrating the same file.

mod group_commit;
mod schema;

pub use group_commit::{CommitError, GroupCommit, ReaderPool};
pub use schema::{OpenError, Schema, open_connection, open_read_only_connection};
