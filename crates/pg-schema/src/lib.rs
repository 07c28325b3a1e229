//! PostgreSQL as opendps uses it, shared by `dps-store` and minihub: each component's numbered
//! migrations, recorded in one `opendps_schema` table of the search path's schema and applied under
//! an advisory lock, so that nodes starting together on one database migrate one at a time and a
//! migration is all or nothing; which errors mean that the database is out of reach (as opposed
//! to a statement that failed); and [`WarmPool`], connections reused without sqlx's check.

use sqlx::PgPool;

mod warm;
pub use warm::{WarmConnection, WarmPool};

/// The advisory lock key of opendps' migrations (any constant; it only has to be ours).
const MIGRATION_LOCK: i64 = 0x6f70_656e_6470_7301;

/// One component's schema: its name in `opendps_schema` and its migrations in order.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    name: &'static str,
    migrations: &'static [&'static str],
}

/// Why a schema could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database was migrated by a newer build.
    #[error(
        "the database has {name} schema version {found}, newer than this opendps knows ({known}); upgrade opendps"
    )]
    TooNew {
        /// The component.
        name: &'static str,
        /// The version found.
        found: usize,
        /// The newest version this build knows.
        known: usize,
    },
    /// The schema is older than this build (or absent), and the caller asked not to migrate.
    #[error(
        "the database holds no {name} schema of this opendps version (found version {found}, this build reads {known}); start `opendps serve` on it"
    )]
    NotMigrated {
        /// The component.
        name: &'static str,
        /// The version found (0: none).
        found: usize,
        /// The version this build reads.
        known: usize,
    },
    /// A statement failed.
    #[error("{context}")]
    Sql {
        /// What was being done.
        context: String,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
}

impl SchemaError {
    /// Whether the failure is the database being out of reach (see [`is_unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Sql { source, .. } if is_unavailable(source))
    }
}

fn sql(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SchemaError {
    let context = context.into();
    move |source| SchemaError::Sql { context, source }
}

impl Schema {
    /// The schema `name`, whose migration `i` moves it from version `i` to `i + 1`. Never edit a
    /// released entry.
    pub const fn new(name: &'static str, migrations: &'static [&'static str]) -> Self {
        Self { name, migrations }
    }

    /// The version this build knows: the number of migrations.
    pub const fn version(&self) -> usize {
        self.migrations.len()
    }

    /// Brings the schema up to date in `pool`'s database (its search path), or fails without
    /// changing anything when the database is newer than this build. Another node migrating at the
    /// same time is waited for.
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), SchemaError> {
        let mut tx = pool.begin().await.map_err(sql("starting the migration"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(sql("waiting for another node's migration"))?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS opendps_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(sql("creating the schema version table"))?;
        let found = self.found(&mut tx).await?;
        if found > self.version() {
            return Err(self.too_new(found));
        }
        for (index, step) in self.migrations.iter().enumerate().skip(found) {
            sqlx::raw_sql(*step)
                .execute(&mut *tx)
                .await
                .map_err(sql(format!(
                    "applying {} schema migration {}",
                    self.name,
                    index + 1
                )))?;
            tracing::info!(
                schema = self.name,
                version = index + 1,
                "applied schema migration"
            );
        }
        sqlx::query(
            "INSERT INTO opendps_schema (name, version) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version",
        )
        .bind(self.name)
        .bind(i32::try_from(self.version()).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(sql("recording the schema version"))?;
        tx.commit().await.map_err(sql("committing the migration"))
    }

    /// Checks, without changing anything, that the schema is exactly the one this build knows: for
    /// commands that read a service's state while it may be running.
    pub async fn check(&self, pool: &PgPool) -> Result<(), SchemaError> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(sql("connecting to PostgreSQL"))?;
        let found = match self.found(&mut conn).await {
            // No version table: nothing of opendps' is in this database (or its search path).
            Err(SchemaError::Sql {
                source: sqlx::Error::Database(e),
                ..
            }) if e.code().as_deref() == Some("42P01") => 0,
            other => other?,
        };
        match found.cmp(&self.version()) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(self.too_new(found)),
            std::cmp::Ordering::Less => Err(SchemaError::NotMigrated {
                name: self.name,
                found,
                known: self.version(),
            }),
        }
    }

    /// The version recorded for this schema (0 when none is).
    async fn found(&self, conn: &mut sqlx::PgConnection) -> Result<usize, SchemaError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT version FROM opendps_schema WHERE name = $1")
                .bind(self.name)
                .fetch_optional(conn)
                .await
                .map_err(sql("reading the schema version"))?;
        Ok(usize::try_from(found.unwrap_or(0)).unwrap_or(0))
    }

    fn too_new(&self, found: usize) -> SchemaError {
        SchemaError::TooNew {
            name: self.name,
            found,
            known: self.version(),
        }
    }
}

/// Whether `error` means the database is out of reach rather than that a statement failed: no
/// connection in time, a broken connection, a server shutting down or starting, too many
/// connections. Such a failure changed nothing and may pass.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        // Class 08: connection exceptions; 57P01-03: shutting down or not accepting yet; 53300:
        // too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

#[cfg(feature = "import")]
pub mod import;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
