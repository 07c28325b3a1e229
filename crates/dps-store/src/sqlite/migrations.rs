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
    // 5: operations and registration states in rowid tables: new rows are appended (their
    // documents, a kilobyte or more, no longer split pages all over a tree keyed by random ids)
    // and found by a small unique index; each operation is in one partial index, due (pending) or
    // finished, instead of two.
    "CREATE TABLE operations_by_rowid (
         operation_id TEXT NOT NULL UNIQUE, registration_key TEXT NOT NULL, pending INTEGER NOT NULL,
         next_attempt_ms INTEGER NOT NULL, lease_owner TEXT, lease_until_ms INTEGER, updated_ms INTEGER NOT NULL,
         doc TEXT NOT NULL, lease_incarnation TEXT
     );
     INSERT INTO operations_by_rowid (operation_id, registration_key, pending, next_attempt_ms, lease_owner,
                                      lease_until_ms, updated_ms, doc, lease_incarnation)
         SELECT operation_id, registration_key, pending, next_attempt_ms, lease_owner, lease_until_ms,
                updated_ms, doc, lease_incarnation
         FROM operations ORDER BY updated_ms;
     DROP TABLE operations;
     ALTER TABLE operations_by_rowid RENAME TO operations;
     CREATE INDEX operations_due ON operations (next_attempt_ms) WHERE pending = 1;
     CREATE INDEX operations_finished ON operations (updated_ms) WHERE pending = 0;
     CREATE TABLE registrations_by_rowid (
         id_key TEXT NOT NULL UNIQUE, group_key TEXT, etag TEXT NOT NULL, doc TEXT NOT NULL
     );
     INSERT INTO registrations_by_rowid (id_key, group_key, etag, doc)
         SELECT id_key, group_key, etag, doc FROM registrations;
     DROP TABLE registrations;
     ALTER TABLE registrations_by_rowid RENAME TO registrations;
     CREATE INDEX registrations_by_group ON registrations (group_key, id_key);",
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

    /// Migration 5 rebuilds the operations and registrations tables: every row survives, and the
    /// new indexes answer the worker's queries.
    #[test]
    fn rows_survive_the_move_to_rowid_tables() {
        let mut conn = Connection::open_in_memory().expect("open");
        Schema::new("opendps", &MIGRATIONS[..4])
            .migrate(&mut conn)
            .expect("version 4");
        conn.execute_batch(
            "INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms, lease_owner, lease_until_ms, updated_ms, doc, lease_incarnation)
                 VALUES ('op-due', 'dev-1', 1, 10, 'node-a', 70, 5, '{\"a\":1}', 'inc-1'),
                        ('op-done', 'dev-2', 0, 20, NULL, NULL, 6, '{\"b\":2}', NULL);
             INSERT INTO registrations (id_key, group_key, etag, doc) VALUES ('dev-2', 'grp', 'e1', '{}');",
        )
        .expect("rows at version 4");
        SCHEMA.migrate(&mut conn).expect("latest");
        let due: Vec<(String, String, Option<String>)> = conn
            .prepare("SELECT operation_id, doc, lease_incarnation FROM operations WHERE pending = 1 AND next_attempt_ms <= 10")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .expect("due");
        assert_eq!(
            due,
            [("op-due".into(), r#"{"a":1}"#.into(), Some("inc-1".into()))]
        );
        let text = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).expect(sql) };
        assert_eq!(
            text("SELECT operation_id FROM operations WHERE pending = 0 AND updated_ms < 7"),
            "op-done"
        );
        assert_eq!(
            text("SELECT etag FROM registrations WHERE group_key = 'grp' AND id_key > ''"),
            "e1"
        );
        let duplicate = conn.execute(
            "INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms, updated_ms, doc) VALUES ('op-due', 'x', 1, 0, 0, '{}')",
            [],
        );
        assert!(duplicate.is_err(), "operation ids stay unique");
    }
}
