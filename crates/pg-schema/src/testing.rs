//! A schema of a test's own in the test database (`OPENDPS_TEST_POSTGRES`, default the local
//! `test` database), so that tests running in parallel never see each other's tables. Dropped with
//! everything in it when the guard goes.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

/// The database tests use unless `OPENDPS_TEST_POSTGRES` names another.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema made for one test.
pub struct TestSchema {
    admin: PgConnectOptions,
    name: String,
}

impl TestSchema {
    /// A new, empty schema. Panics when the test database cannot be reached: tests need it.
    pub async fn create(prefix: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let url = std::env::var("OPENDPS_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let admin: PgConnectOptions = url
            .parse()
            .expect("OPENDPS_TEST_POSTGRES is a PostgreSQL URL");
        // The process id and a counter keep names apart on this machine; a random part keeps
        // them apart from leftovers of earlier runs.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = format!(
            "{prefix}_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random as u32
        );
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin.clone())
            .await
            .expect("PostgreSQL for the tests (set OPENDPS_TEST_POSTGRES)");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&pool)
            .await
            .expect("create schema");
        pool.close().await;
        Self { admin, name }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options whose search path is this schema.
    pub fn options(&self) -> PgConnectOptions {
        self.admin
            .clone()
            .options([("search_path", self.name.as_str())])
    }

    /// A pool of `size` connections on this schema.
    pub async fn pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect_with(self.options())
            .await
            .expect("connect to the test schema")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Dropped outside the test's runtime, which may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(pool) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect_with(admin)
                        .await
                    {
                        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS {name} CASCADE"
                        )))
                        .execute(&pool)
                        .await;
                        pool.close().await;
                    }
                });
            }
        })
        .join();
    }
}
