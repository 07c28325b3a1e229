//! The store a service keeps its state in, as the configuration chooses it: a SQLite file in the
//! data directory, or a PostgreSQL database that several nodes share.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use dps_core::clock::Clock;
use dps_core::secret::Secret;
use dps_core::store::{IdentityStore as _, Store};
use dps_store::{PgLocation, PgStore, SqliteStore};
use minihub::{HubInfo, Minihub};

use crate::config::{Config, StoreLocation};
use crate::datadir::{DataDir, SCOPE_FILE};

/// minihub's file in the data directory, next to a SQLite store.
const MINIHUB_FILE: &str = "minihub.db";

/// An open store.
#[derive(Clone)]
pub enum ServiceStore {
    /// A SQLite file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PgStore),
}

impl ServiceStore {
    /// Opens the store the service writes to, creating or migrating its schema.
    pub async fn open(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        match config.store_location() {
            StoreLocation::Sqlite(path) => SqliteStore::open_with_clock(&path, clock)
                .map(Self::Sqlite)
                .with_context(|| format!("while opening the database {}", path.display())),
            StoreLocation::Postgres { url, password_file } => {
                let location = postgres_location(url, password_file.as_deref())?;
                PgStore::open(&location, clock)
                    .await
                    .map(Self::Postgres)
                    .with_context(|| unreachable_hint(&location))
            }
        }
    }

    /// Opens the store of a service that may be running, to read it: no lock, no migration.
    pub async fn open_existing(config: &Config) -> anyhow::Result<Self> {
        match config.store_location() {
            StoreLocation::Sqlite(path) => {
                if !path.exists() {
                    anyhow::bail!(
                        "there is no opendps database at {}; start the service once with `opendps serve --data-dir {}`",
                        path.display(),
                        config.data_dir.display()
                    );
                }
                SqliteStore::open_read_only(&path)
                    .map(Self::Sqlite)
                    .with_context(|| format!("while opening {}", path.display()))
            }
            StoreLocation::Postgres { url, password_file } => {
                let location = postgres_location(url, password_file.as_deref())?;
                PgStore::open_existing(&location)
                    .await
                    .map(Self::Postgres)
                    .with_context(|| unreachable_hint(&location))
            }
        }
    }

    /// Checks that this store holds the service the data directory `data` belongs to: the one it
    /// served before (`id-scope`), or, for a node moving from a SQLite file to PostgreSQL, the one
    /// in the file it leaves. A database of another service, or one without the service the node
    /// had, is refused before anything is written to it.
    pub async fn check_belongs_to(&self, config: &Config, data: &DataDir) -> anyhow::Result<()> {
        let Self::Postgres(store) = self else {
            // The SQLite file is in (or named by) the data directory's own configuration.
            return Ok(());
        };
        let served = data.served_scope();
        let found = store
            .identity()
            .await
            .context("while reading the service identity")?;
        if let (Some(served), Some(found)) = (&served, &found)
            && found.id_scope.as_str() == served
        {
            // The usual start: the node's own service.
            return Ok(());
        }
        // The SQLite file a single-node installation may have left, read only when it can matter.
        let left_file = config.sqlite_path();
        let left = match left_file.exists() {
            true => {
                let old = SqliteStore::open_read_only(&left_file)
                    .with_context(|| format!("while reading {}", left_file.display()))?;
                let identity = old.identity().await?;
                old.close();
                identity.map(|i| i.id_scope.to_string())
            }
            false => None,
        };
        let (expected, from) = match (served, &left) {
            (Some(scope), _) => (scope, format!("{}/{SCOPE_FILE}", data.root().display())),
            (None, Some(scope)) => (scope.clone(), left_file.display().to_string()),
            (None, None) => return Ok(()),
        };
        match found {
            Some(identity) if identity.id_scope.as_str() == expected => Ok(()),
            Some(identity) => anyhow::bail!(
                "the database {} belongs to another opendps service (ID scope {}), but this node's data directory belongs to ID scope {expected} ({from}); point storage.url at that service's database, or give this node a new --data-dir to join {}",
                store_name(config),
                identity.id_scope,
                identity.id_scope
            ),
            None if left.is_some() => anyhow::bail!(
                "the data directory holds an opendps database ({}, ID scope {expected}) and the database {} holds no service yet; copy it first with `opendps migrate-store --from {} --to <storage.url>`, or give this node a new --data-dir to start a new service",
                left_file.display(),
                store_name(config),
                data.root().display()
            ),
            None => anyhow::bail!(
                "the database {} holds no opendps service, but this node served ID scope {expected} ({from}); check storage.url (was the database restored?), or remove {from} to start a new service there",
                store_name(config)
            ),
        }
    }

    /// The store for the core.
    pub fn shared(&self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite(store) => Arc::new(store.clone()),
            Self::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// Wakes `wake` when work is recorded by another node sharing the store (PostgreSQL); work
    /// recorded by this node wakes it in-process, and a SQLite file has no other node. Ends when
    /// the store closes.
    pub fn watch_work(&self, wake: Arc<tokio::sync::Notify>) {
        if let Self::Postgres(store) = self {
            drop(store.watch_work(wake));
        }
    }

    /// minihub in the same storage: `minihub.db` in the data directory next to a SQLite store, or
    /// minihub's tables in the PostgreSQL database, shared by every node.
    pub async fn open_minihub(
        &self,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Minihub> {
        match self {
            Self::Sqlite(_) => {
                let path = data_dir.join(MINIHUB_FILE);
                Minihub::open_with_clock(&path, clock)
                    .with_context(|| format!("while opening {}", path.display()))
            }
            Self::Postgres(store) => Minihub::open_postgres(store.connections(), clock)
                .await
                .context("while opening minihub's tables in the PostgreSQL database"),
        }
    }

    /// The in-process hubs recorded in this storage, read only (none when minihub never ran).
    pub async fn read_minihubs(&self, data_dir: &Path) -> anyhow::Result<Vec<HubInfo>> {
        match self {
            Self::Sqlite(_) => {
                let path = data_dir.join(MINIHUB_FILE);
                if !path.exists() {
                    return Ok(Vec::new());
                }
                Minihub::read_hubs(&path)
                    .with_context(|| format!("while opening {}", path.display()))
            }
            Self::Postgres(store) => Minihub::read_hubs_postgres(store.pool())
                .await
                .context("while reading minihub's hubs from the PostgreSQL database"),
        }
    }

    /// Finishes what is being written and closes the store.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(store) => store.close(),
            Self::Postgres(store) => store.close().await,
        }
    }
}

/// The PostgreSQL location of `url`, with the password from `password_file` when there is one.
pub(crate) fn postgres_location(
    url: String,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<PgLocation> {
    let password = match password_file {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| {
                format!(
                    "while reading the PostgreSQL password from {} (storage.password_file)",
                    file.display()
                )
            })?;
            Some(Secret::new(
                text.lines().next().unwrap_or_default().to_owned(),
            ))
        }
        None => None,
    };
    Ok(PgLocation { url, password })
}

/// The database `config` names, for messages: never the password.
fn store_name(config: &Config) -> String {
    match config.store_location() {
        StoreLocation::Sqlite(path) => path.display().to_string(),
        StoreLocation::Postgres { url, .. } => PgLocation {
            url,
            password: None,
        }
        .describe(),
    }
}

/// What to check when PostgreSQL cannot be reached or refuses.
pub(crate) fn unreachable_hint(location: &PgLocation) -> String {
    format!(
        "while opening the PostgreSQL database {} (storage.url): check that the server runs and accepts this user, and its password (storage.password_file or PGPASSWORD)",
        location.describe()
    )
}
