//! The PostgreSQL schema and its migrations, applied by `pg_schema` (in order, recorded in
//! `opendps_schema`, one node at a time, all or nothing).

use dps_core::error::Internal;
use dps_core::store::StoreError;
use pg_schema::{Schema, SchemaError};
use sqlx::PgPool;

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // 1: the tables of SQLite's schema version 4, in PostgreSQL's types. Keys compare bytewise
    //    (collation "C"), as SQLite's do, so listings page in the same order on both.
    r#"CREATE TABLE service_identity (id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT NOT NULL);
     CREATE TABLE enrollments (
         kind TEXT NOT NULL, id_key TEXT COLLATE "C" NOT NULL, etag TEXT NOT NULL, doc TEXT NOT NULL,
         PRIMARY KEY (kind, id_key)
     );
     CREATE TABLE registrations (
         id_key TEXT COLLATE "C" PRIMARY KEY, group_key TEXT COLLATE "C", etag TEXT NOT NULL, doc TEXT NOT NULL
     );
     CREATE INDEX registrations_by_group ON registrations (group_key, id_key);
     CREATE TABLE linked_hubs (host_name TEXT COLLATE "C" PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE operations (
         operation_id TEXT PRIMARY KEY, registration_key TEXT NOT NULL, pending BOOLEAN NOT NULL,
         next_attempt_ms BIGINT NOT NULL, lease_owner TEXT, lease_incarnation TEXT,
         lease_until_ms BIGINT, updated_ms BIGINT NOT NULL, doc TEXT NOT NULL
     );
     CREATE INDEX operations_due ON operations (next_attempt_ms) WHERE pending;
     CREATE INDEX operations_finished ON operations (updated_ms) WHERE NOT pending;
     CREATE TABLE certificates (name_key TEXT COLLATE "C" PRIMARY KEY, etag TEXT NOT NULL, doc TEXT NOT NULL);"#,
];

/// opendps' schema.
const SCHEMA: Schema = Schema::new("opendps", MIGRATIONS);

fn store_error(err: SchemaError) -> StoreError {
    match err.is_unavailable() {
        true => StoreError::Unavailable(Internal::caused("opening the database", err)),
        false => StoreError::Backend(Internal::caused("opening the database", err)),
    }
}

/// Brings the schema of `pool`'s database (its search path) up to date, or fails without changing
/// anything when the database is newer than this build.
pub(super) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    SCHEMA.migrate(pool).await.map_err(store_error)
}

/// Checks, without changing anything, that the schema is exactly the one this build knows: for
/// commands that read a service's state while it may be running.
pub(super) async fn check(pool: &PgPool) -> Result<(), StoreError> {
    SCHEMA.check(pool).await.map_err(store_error)
}
