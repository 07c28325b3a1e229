//! minihub in PostgreSQL: the tables live next to the provisioning service's, in the database its
//! nodes share, so every node serves the same hubs, keys, identities and twins. A device's
//! read-modify-write is optimistic: the write is conditional on the row's revision being the one
//! read (or on there being no row), and is decided again from the new row when another write came
//! first, so writes through any node follow one another in two statements. A desired-property change is announced with `NOTIFY`, so that a
//! device connected to another node hears of it too.

use std::sync::Arc;
use std::time::Duration;

use pg_schema::import::{Column, ImportError, Table};
use pg_schema::{Schema, WarmPool};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row as _;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgConnection, PgPool};

use super::{Change, Row};
use crate::DesiredPatch;
use crate::error::MinihubError;
use crate::model::HubInfo;

/// Each entry moves minihub's schema from version `index` to `index + 1`. Never edit a released
/// entry.
const MIGRATIONS: &[&str] = &[
    // 1: hubs with their policies; devices with their twins, one row each. Ids compare bytewise
    //    (collation "C"), as SQLite's do, so listings page in the same order on both.
    r#"CREATE TABLE minihub_hubs (host_name TEXT COLLATE "C" PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE minihub_devices (
         hub TEXT COLLATE "C" NOT NULL, device_id TEXT COLLATE "C" NOT NULL,
         device TEXT NOT NULL, twin TEXT NOT NULL, revision BIGINT NOT NULL DEFAULT 0,
         PRIMARY KEY (hub, device_id)
     );"#,
];

const SCHEMA: Schema = Schema::new("minihub", MIGRATIONS);

/// How often a device write is decided again because other writes to the device kept coming first,
/// before it gives up (with 503: the caller may try again).
const MAX_WRITE_ATTEMPTS: usize = 100;

/// Connections of the pool that writes without waiting for the flush.
const FLUSHED_LATER_CONNECTIONS: u32 = 8;

/// The channel prefix of desired-property announcements; the schema follows, so that services in
/// other schemas of the same database are not told.
const DESIRED_CHANNEL: &str = "minihub_desired:";

/// The largest patch sent inside an announcement; PostgreSQL's limit is 8000 bytes. A larger one is
/// announced without it, and the listening node reads the desired properties instead.
const MAX_ANNOUNCED_PATCH: usize = 7000;

/// minihub's tables in a shared PostgreSQL database. Clones share the pool.
#[derive(Clone)]
pub(crate) struct PgHubStore {
    /// The pool, and connections kept out of it between statements.
    conns: Arc<WarmPool>,
    /// This node's mark on its announcements, so it does not hear its own.
    origin: String,
}

/// A desired-property change announced by another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RemotePatch {
    origin: String,
    /// The hub.
    pub hub: String,
    /// The device.
    pub device: String,
    /// The new desired `$version`.
    pub version: u64,
    /// The patch as the device is to receive it, when it fitted in the announcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

fn failed(context: &'static str) -> impl Fn(sqlx::Error) -> MinihubError {
    move |e| match pg_schema::is_unavailable(&e) {
        true => MinihubError::Unavailable(format!("{context}: {e}")),
        false => MinihubError::Storage(format!("{context}: {e}")),
    }
}

/// A schema that could not be opened: out of reach (503) or not usable (500).
fn schema_failed(e: pg_schema::SchemaError) -> MinihubError {
    match e.is_unavailable() {
        true => MinihubError::Unavailable(format!("opening minihub's tables: {e}")),
        false => MinihubError::Storage(format!("opening minihub's tables: {e}")),
    }
}

fn row_of(row: &PgRow) -> Result<Row, MinihubError> {
    let device: String = row.try_get("device").map_err(failed("reading a device"))?;
    let twin: String = row.try_get("twin").map_err(failed("reading a twin"))?;
    Ok((serde_json::from_str(&device)?, serde_json::from_str(&twin)?))
}

impl PgHubStore {
    /// minihub's tables in the database of `conns` (its search path), created or migrated as
    /// needed.
    pub(crate) async fn open(conns: Arc<WarmPool>) -> Result<Self, MinihubError> {
        Self::migrate(conns.pool()).await?;
        Ok(Self {
            conns,
            origin: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// The same tables, written through sessions that commit without waiting for the commit's
    /// flush to disk (`synchronous_commit = off`, a pool of its own opened as needed). Only for a
    /// writer whose own next commit in the same database follows each of these writes and is
    /// flushed: PostgreSQL flushes its log in order, so that commit makes these durable too, and a
    /// crash before it loses only writes that writer had not yet relied on (see
    /// `Minihub::flushed_with_callers_commit`).
    pub(crate) fn flushed_later(&self) -> Self {
        let options = (*self.conns.pool().connect_options())
            .clone()
            .options([("synchronous_commit", "off")]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(FLUSHED_LATER_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Self {
            // Only statements take connections from this pool, so it may keep them all.
            conns: Arc::new(WarmPool::new(pool, FLUSHED_LATER_CONNECTIONS as usize)),
            origin: self.origin.clone(),
        }
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &PgPool {
        self.conns.pool()
    }

    /// Runs `f` on a connection, kept for the next statement when `f` succeeds (see
    /// [`WarmPool`]).
    async fn run<R>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<R, MinihubError>,
    ) -> Result<R, MinihubError> {
        self.conns.run(f, failed("connecting to PostgreSQL")).await
    }

    /// Creates or migrates minihub's tables in `pool`'s database, and nothing else.
    pub(crate) async fn migrate(pool: &PgPool) -> Result<(), MinihubError> {
        SCHEMA.migrate(pool).await.map_err(schema_failed)
    }

    /// The hubs of `pool`'s database, read without migrating anything (for `opendps info`).
    pub(crate) async fn read_hubs(pool: &PgPool) -> Result<Vec<HubInfo>, MinihubError> {
        match SCHEMA.check(pool).await {
            Ok(()) => hubs(pool).await,
            // No minihub has run on this database: no hubs.
            Err(pg_schema::SchemaError::NotMigrated { found: 0, .. }) => Ok(Vec::new()),
            Err(e) => Err(schema_failed(e)),
        }
    }

    pub(crate) async fn hubs(&self) -> Result<Vec<HubInfo>, MinihubError> {
        hubs(self.conns.pool()).await
    }

    pub(crate) async fn insert_hub(&self, hub: &HubInfo) -> Result<HubInfo, MinihubError> {
        let doc = serde_json::to_string(hub)?;
        self.run(async |c| {
            sqlx::query(
                "INSERT INTO minihub_hubs (host_name, doc) VALUES ($1, $2)
                 ON CONFLICT (host_name) DO NOTHING",
            )
            .bind(&hub.host_name)
            .bind(doc)
            .execute(c)
            .await
            .map_err(failed("storing a hub"))
        })
        .await?;
        let doc: String = self
            .run(async |c| {
                sqlx::query_scalar("SELECT doc FROM minihub_hubs WHERE host_name = $1")
                    .bind(&hub.host_name)
                    .fetch_one(c)
                    .await
                    .map_err(failed("reading a hub"))
            })
            .await?;
        Ok(serde_json::from_str(&doc)?)
    }

    pub(crate) async fn device(
        &self,
        hub: &str,
        device_id: &str,
    ) -> Result<Option<Row>, MinihubError> {
        Ok(self.read(hub, device_id).await?.map(|(row, _)| row))
    }

    /// A device and its twin with the row's revision (bumped by every write).
    async fn read(&self, hub: &str, device_id: &str) -> Result<Option<(Row, i64)>, MinihubError> {
        let found = self
            .run(async |c| {
                sqlx::query(
                    "SELECT device, twin, revision FROM minihub_devices
                     WHERE hub = $1 AND device_id = $2",
                )
                .bind(hub)
                .bind(device_id)
                .fetch_optional(c)
                .await
                .map_err(failed("reading a device"))
            })
            .await?;
        found
            .map(|row| {
                let revision = row
                    .try_get("revision")
                    .map_err(failed("reading a device"))?;
                Ok((row_of(&row)?, revision))
            })
            .transpose()
    }

    /// Writes a device's row: inserted if `revision` is none (and no row exists), else replaced if
    /// its revision is still `revision`. Whether it was written.
    async fn put_row(
        &self,
        hub: &str,
        device_id: &str,
        (device, twin): &Row,
        revision: Option<i64>,
    ) -> Result<bool, MinihubError> {
        let sql = match revision {
            None => {
                "INSERT INTO minihub_devices (hub, device_id, device, twin) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (hub, device_id) DO NOTHING"
            }
            Some(_) => {
                "UPDATE minihub_devices SET device = $3, twin = $4, revision = revision + 1
                 WHERE hub = $1 AND device_id = $2 AND revision = $5"
            }
        };
        let mut query = sqlx::query(sql)
            .bind(hub)
            .bind(device_id)
            .bind(serde_json::to_string(device)?)
            .bind(serde_json::to_string(twin)?);
        if let Some(revision) = revision {
            query = query.bind(revision);
        }
        let done = self
            .run(async |c| query.execute(c).await.map_err(failed("writing a device")))
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Inserts a device's row unless one exists. Whether it was written.
    pub(crate) async fn insert_row(
        &self,
        hub: &str,
        device_id: &str,
        row: &Row,
    ) -> Result<bool, MinihubError> {
        self.put_row(hub, device_id, row, None).await
    }

    /// Deletes a device's row if its revision is still `revision`. Whether it was deleted.
    async fn delete_row(
        &self,
        hub: &str,
        device_id: &str,
        revision: i64,
    ) -> Result<bool, MinihubError> {
        let done = self
            .run(async |c| {
                sqlx::query(
                    "DELETE FROM minihub_devices
                     WHERE hub = $1 AND device_id = $2 AND revision = $3",
                )
                .bind(hub)
                .bind(device_id)
                .bind(revision)
                .execute(c)
                .await
                .map_err(failed("deleting a device"))
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn devices(
        &self,
        hub: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, MinihubError> {
        self.run(async |c| {
            sqlx::query(
                "SELECT device, twin FROM minihub_devices
                 WHERE hub = $1 AND ($2::TEXT IS NULL OR device_id > $2)
                 ORDER BY device_id LIMIT $3",
            )
            .bind(hub)
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(c)
            .await
            .map_err(failed("listing devices"))
        })
        .await?
        .iter()
        .map(row_of)
        .collect()
    }

    pub(crate) async fn update<R>(
        &self,
        hub: &str,
        device_id: &str,
        mut decide: impl FnMut(Option<Row>) -> Result<Change<R>, MinihubError>,
    ) -> Result<R, MinihubError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let (current, revision) = match self.read(hub, device_id).await? {
                Some((row, revision)) => (Some(row), Some(revision)),
                None => (None, None),
            };
            let (written, answer) = match (decide(current)?, revision) {
                (Change::Put(row, answer), revision) => {
                    (self.put_row(hub, device_id, &row, revision).await?, answer)
                }
                (Change::Delete(answer), None) => (true, answer),
                (Change::Delete(answer), Some(revision)) => {
                    (self.delete_row(hub, device_id, revision).await?, answer)
                }
            };
            if written {
                return Ok(answer);
            }
            // Another write to the device came first: decide again from what it wrote.
        }
        Err(MinihubError::Unavailable(format!(
            "device '{device_id}' kept changing under {MAX_WRITE_ATTEMPTS} attempts to write it"
        )))
    }

    pub(crate) async fn announce_desired(
        &self,
        hub: &str,
        device_id: &str,
        patch: &DesiredPatch,
    ) -> Result<(), MinihubError> {
        let mut announced = RemotePatch {
            origin: self.origin.clone(),
            hub: hub.to_owned(),
            device: device_id.to_owned(),
            version: patch.version,
            body: Some(patch.body.clone()),
        };
        let mut payload = serde_json::to_string(&announced)?;
        if payload.len() > MAX_ANNOUNCED_PATCH {
            announced.body = None;
            payload = serde_json::to_string(&announced)?;
        }
        self.run(async |c| {
            sqlx::query("SELECT pg_notify($1 || current_schema(), $2)")
                .bind(DESIRED_CHANNEL)
                .bind(payload)
                .execute(c)
                .await
                .map_err(failed("announcing a desired-property change"))
        })
        .await?;
        Ok(())
    }

    /// Listens for the desired-property changes other nodes announce, and once listening, calls
    /// `heard` with each until the pool is closed or `heard` returns `false`. After a lost
    /// connection it listens again; changes announced meanwhile are missed, as a device connection
    /// that drops misses them on a real hub (the device reads its twin again when it reconnects).
    pub(crate) async fn watch_desired(
        &self,
        mut heard: impl FnMut(RemotePatch) -> bool + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, MinihubError> {
        let (pool, origin) = (self.conns.pool().clone(), self.origin.clone());
        let mut listener = listen(&pool)
            .await
            .map_err(failed("listening for other nodes' twin changes"))?;
        Ok(tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(note)) => match serde_json::from_str::<RemotePatch>(note.payload()) {
                        Ok(patch) if patch.origin == origin => {}
                        Ok(patch) => {
                            if !heard(patch) {
                                return;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(%err, "an announcement of a twin change does not parse");
                        }
                    },
                    // The connection was lost; the next call reconnects and listens again.
                    Ok(None) => {}
                    // The pool is closing, or the reconnection failed.
                    Err(err) => {
                        if pool.is_closed() {
                            return;
                        }
                        tracing::warn!(%err, "minihub cannot listen for other nodes' twin changes; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        match listen(&pool).await {
                            Ok(again) => listener = again,
                            Err(_) => continue,
                        }
                    }
                }
            }
        }))
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let channel: String = sqlx::query_scalar("SELECT $1 || current_schema()")
        .bind(DESIRED_CHANNEL)
        .fetch_one(pool)
        .await?;
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(&channel).await?;
    Ok(listener)
}

async fn hubs(pool: &PgPool) -> Result<Vec<HubInfo>, MinihubError> {
    let docs: Vec<String> = sqlx::query_scalar("SELECT doc FROM minihub_hubs ORDER BY host_name")
        .fetch_all(pool)
        .await
        .map_err(failed("listing hubs"))?;
    docs.iter()
        .map(|doc| Ok(serde_json::from_str(doc)?))
        .collect()
}

/// minihub's tables: their names in a SQLite file and here.
const TABLES: &[Table] = &[
    Table {
        source: "hubs",
        name: "minihub_hubs",
        columns: &[("host_name", Column::Text), ("doc", Column::Text)],
        key_columns: 1,
    },
    Table {
        source: "devices",
        name: "minihub_devices",
        columns: &[
            ("hub", Column::Text),
            ("device_id", Column::Text),
            ("device", Column::Text),
            ("twin", Column::Text),
        ],
        key_columns: 2,
    },
];

/// Copies minihub's SQLite file at `path` into `target`, a transaction on a PostgreSQL database
/// whose minihub tables are up to date and empty. `progress` is told each table's running count.
/// Returns the rows copied per table.
pub(crate) async fn import_sqlite(
    path: &std::path::Path,
    target: &mut sqlx::PgConnection,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Vec<(&'static str, u64)>, MinihubError> {
    let source = super::sqlite::open_read_only(path)?;
    pg_schema::import::copy_tables(&source, TABLES, target, progress)
        .await
        .map_err(|e| match e {
            ImportError::NotEmpty { table } => MinihubError::Storage(format!(
                "the PostgreSQL database already has in-process hubs ({table} is not empty); migrate-store copies into a database without them"
            )),
            e => MinihubError::Storage(format!("copying minihub's database: {e}")),
        })
}
