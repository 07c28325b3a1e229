//! Schema migrations, applied in order and recorded in `PRAGMA user_version`.

use dps_core::store::StoreError;
use rusqlite::Connection;

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
];

/// The schema version this build writes.
pub(super) fn current_version() -> usize {
    MIGRATIONS.len()
}

/// Why the schema could not be brought up to date.
pub(super) enum MigrateError {
    /// SQLite failed (possibly only busy).
    Sql(rusqlite::Error),
    /// The file was written by a newer opendps.
    TooNew(usize),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(err: rusqlite::Error) -> Self {
        Self::Sql(err)
    }
}

impl From<MigrateError> for StoreError {
    fn from(err: MigrateError) -> Self {
        match err {
            MigrateError::Sql(e) => StoreError::Backend(format!("migrating the schema: {e}")),
            MigrateError::TooNew(version) => StoreError::Backend(format!(
                "the database has schema version {version}, newer than this opendps knows ({}); upgrade opendps",
                MIGRATIONS.len()
            )),
        }
    }
}

/// Brings the schema up to date in one transaction. Refuses a database newer than this binary.
/// A database already up to date is only read: the write lock is taken only to migrate.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if usize::try_from(version).ok() == Some(MIGRATIONS.len()) {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(MigrateError::TooNew(version));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tracing::info!(version = index + 1, "applied schema migration");
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().expect("open");
        assert!(migrate(&mut conn).is_ok(), "first");
        assert!(migrate(&mut conn).is_ok(), "second");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version as usize, MIGRATIONS.len());
    }

    #[test]
    fn an_up_to_date_database_is_not_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).expect("open");
        assert!(migrate(&mut conn).is_ok(), "create");
        let other = Connection::open(&path).expect("open");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("hold the write lock");
        conn.busy_timeout(std::time::Duration::ZERO)
            .expect("timeout");
        assert!(
            migrate(&mut conn).is_ok(),
            "nothing to migrate, so the held lock is not needed"
        );
    }

    #[test]
    fn newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set");
        assert!(matches!(migrate(&mut conn), Err(MigrateError::TooNew(99))));
    }
}
