//! The PostgreSQL schema and its migrations, applied in order and recorded in `opendps_schema`.
//! Nodes starting together on one database migrate one at a time (an advisory lock held by the
//! migrating transaction); a migration is all or nothing.

use dps_core::error::Internal;
use dps_core::store::StoreError;
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

/// The advisory lock key of opendps' migrations (any constant; it only has to be ours).
const MIGRATION_LOCK: i64 = 0x6f70_656e_6470_7301;

/// Brings the schema of `pool`'s database (its search path) up to date, or fails without changing
/// anything when the database is newer than this build.
pub(super) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let failed = |context: &'static str| {
        move |e: sqlx::Error| StoreError::Backend(Internal::caused(context, e))
    };
    let mut tx = pool
        .begin()
        .await
        .map_err(failed("starting the migration"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(failed("waiting for another node's migration"))?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS opendps_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(failed("creating the schema version table"))?;
    let found: Option<i32> =
        sqlx::query_scalar("SELECT version FROM opendps_schema WHERE name = 'opendps'")
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed("reading the schema version"))?;
    let found = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    if found > MIGRATIONS.len() {
        return Err(StoreError::Backend(Internal::new(format!(
            "the database has schema version {found}, newer than this opendps knows ({}); upgrade opendps",
            MIGRATIONS.len()
        ))));
    }
    for (index, step) in MIGRATIONS.iter().enumerate().skip(found) {
        sqlx::raw_sql(*step).execute(&mut *tx).await.map_err(|e| {
            StoreError::Backend(Internal::caused(
                format!("applying schema migration {}", index + 1),
                e,
            ))
        })?;
        tracing::info!(
            schema = "opendps",
            version = index + 1,
            "applied schema migration"
        );
    }
    sqlx::query(
        "INSERT INTO opendps_schema (name, version) VALUES ('opendps', $1)
         ON CONFLICT (name) DO UPDATE SET version = excluded.version",
    )
    .bind(i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await
    .map_err(failed("recording the schema version"))?;
    tx.commit()
        .await
        .map_err(failed("committing the migration"))
}

/// Checks, without changing anything, that the schema is exactly the one this build knows: for
/// commands that read a service's state while it may be running.
pub(super) async fn check(pool: &PgPool) -> Result<(), StoreError> {
    let found: Option<i32> =
        match sqlx::query_scalar("SELECT version FROM opendps_schema WHERE name = 'opendps'")
            .fetch_optional(pool)
            .await
        {
            Ok(found) => found,
            // No version table: nothing of opendps' is in this database (or its search path).
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => None,
            Err(e) => {
                return Err(StoreError::Backend(Internal::caused(
                    "reading the schema version",
                    e,
                )));
            }
        };
    let found = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    match found.cmp(&MIGRATIONS.len()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(StoreError::Backend(Internal::new(format!(
            "the database has schema version {found}, newer than this opendps knows ({}); upgrade opendps",
            MIGRATIONS.len()
        )))),
        std::cmp::Ordering::Less => Err(StoreError::Backend(Internal::new(
            "the database holds no opendps service yet, or needs a newer schema; start `opendps serve` on it",
        ))),
    }
}
