//! `opendps migrate-store`: a single-node installation's SQLite database, with its in-process hubs,
//! copied into PostgreSQL so that it can go on with several nodes. The copy is one transaction: the
//! target holds all of it or nothing. The source is only read, under the data directory's lock, so
//! no service changes it meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use dps_core::clock::SystemClock;
use dps_core::store::IdentityStore as _;
use dps_store::{PgStore, SqliteStore};
use minihub::Minihub;

use crate::datadir::DataDir;
use crate::storage::{postgres_location, unreachable_hint};

/// What was copied.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The service's ID scope.
    pub id_scope: String,
    /// The rows copied per table, in order.
    pub tables: Vec<(&'static str, u64)>,
    /// The database copied into, for messages (never the password).
    pub target: String,
}

/// Copies the store in the data directory `from` (`opendps.db`, and `minihub.db` when there is one)
/// into the PostgreSQL database `url`, which must hold no opendps service yet. `progress` is told
/// each table's running count.
pub async fn migrate_store(
    from: &Path,
    url: &str,
    password_file: Option<PathBuf>,
    progress: &mut dyn FnMut(&str, u64),
) -> anyhow::Result<Migrated> {
    let data = DataDir::new(from);
    let source = from.join("opendps.db");
    if !source.exists() {
        anyhow::bail!(
            "there is no opendps database at {}; give --from the data directory of a service that ran on SQLite",
            source.display()
        );
    }
    let _lock = data
        .lock("copy")
        .context("the service must be stopped while its database is copied")?;
    let id_scope = {
        let store = SqliteStore::open_read_only(&source)
            .with_context(|| format!("while opening {}", source.display()))?;
        let identity = store.identity().await?;
        store.close();
        identity
            .with_context(|| format!("{} holds no service yet; nothing to copy", source.display()))?
            .id_scope
            .to_string()
    };
    let location = postgres_location(url.to_owned(), password_file.as_deref())?;
    let target = PgStore::open(&location, Arc::new(SystemClock))
        .await
        .with_context(|| unreachable_hint(&location))?;
    let hubs = from.join("minihub.db");
    if hubs.exists() {
        Minihub::migrate_postgres(target.pool())
            .await
            .context("while creating minihub's tables")?;
    }
    let mut tx = target
        .pool()
        .begin()
        .await
        .context("while starting the copy")?;
    let mut tables = dps_store::import_sqlite(&source, &mut tx, progress)
        .await
        .with_context(|| format!("while copying {}", source.display()))?;
    if hubs.exists() {
        tables.extend(
            Minihub::import_sqlite(&hubs, &mut tx, progress)
                .await
                .with_context(|| format!("while copying {}", hubs.display()))?,
        );
    }
    tx.commit().await.context("while committing the copy")?;
    target.close().await;
    data.record_scope(&id_scope)?;
    Ok(Migrated {
        id_scope,
        tables,
        target: location.describe(),
    })
}
