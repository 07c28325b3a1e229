//! SQLite as opendps uses it, shared by the DPS store and minihub: one database file in WAL mode,
//! one writer thread that commits the writes of many callers together ([`GroupCommit`]), reads on
//! the calling thread over a few pooled connections ([`ReaderPool`]), and a [`Schema`] of numbered
//! migrations kept in `PRAGMA user_version`, opened with patience for another process that is
//! creating or migrating the same file.

mod group_commit;
mod schema;

pub use group_commit::{CommitError, GroupCommit, ReaderPool};
pub use schema::{OpenError, Schema, open_connection, open_read_only_connection};

/// `execute`, `query_row` and whole queries through the connection's prepared-statement cache, so a
/// hot statement is parsed once per connection rather than once per call.
pub trait CachedStatements {
    /// `execute` through the cache.
    fn execute_cached(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize>;
    /// `query_row` through the cache.
    fn query_row_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
    /// Every row of a query through the cache, each made by `f`.
    fn query_all_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>>;
}

impl CachedStatements for rusqlite::Connection {
    fn execute_cached(&self, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn query_all_cached<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>> {
        self.prepare_cached(sql)?.query_map(params, f)?.collect()
    }
}
