//! Schema migrations, applied in order and recorded in `PRAGMA user_version`.

use dps_core::error::Internal;
use dps_core::store::StoreError;
use sqlite_commit::{OpenError, Schema};

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // 1: service identity, enrollments, registration states, linked hubs.
    "CREATE TABLE service_identity (id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT NOT NULL);
     CREATE TABLE enrollments (
         kind TEXT NOT NULL, id_key TEXT NOT NULL, etag TEXT NOT NULL, doc TEXT NOT NULL,
         PRIMARY KEY (kind, id_key)
     ) WITHOUT ROWID;
     CREATE TABLE registrations (
         id_key TEXT PRIMARY KEY, group_key TEXT, etag TEXT NOT NULL, doc TEXT NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX registrations_by_group ON registrations (group_key, id_key);
     CREATE TABLE linked_hubs (host_name TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;",
    // 2: registration operations, leased by workers.
    "CREATE TABLE operations (
         operation_id TEXT PRIMARY KEY, registration_key TEXT NOT NULL, pending INTEGER NOT NULL,
         next_attempt_ms INTEGER NOT NULL, lease_owner TEXT, lease_until_ms INTEGER, updated_ms INTEGER NOT NULL,
         doc TEXT NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX operations_due ON operations (pending, next_attempt_ms);
     CREATE INDEX operations_finished ON operations (pending, updated_ms);",
    // 3: leases held per process incarnation, so a worker never re-claims its own leases.
    "ALTER TABLE operations ADD COLUMN lease_incarnation TEXT;",
    // 4: CA certificates uploaded to the service (verified by proof of possession).
    "CREATE TABLE certificates (
         name_key TEXT PRIMARY KEY, etag TEXT NOT NULL, doc TEXT NOT NULL
     ) WITHOUT ROWID;",
];

/// The store's schema.
pub(super) const SCHEMA: Schema = Schema::new("opendps", MIGRATIONS);

/// How the store reports a failed open. SQLite's own errors are worded by the caller: only the
/// writer's open migrates.
pub(super) fn open_failed(err: OpenError, context: &str) -> StoreError {
    StoreError::Backend(match err {
        OpenError::Sql(e) => Internal::caused(context, e),
        OpenError::TooNew { found, known } => Internal::new(format!(
            "the database has schema version {found}, newer than this opendps knows ({known}); upgrade opendps"
        )),
        OpenError::NotMigrated { .. } => Internal::new(
            "the database is still being created or needs a newer schema; start `opendps serve` on it",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().expect("open");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "first");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "second");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version as usize, SCHEMA.version());
    }
}
