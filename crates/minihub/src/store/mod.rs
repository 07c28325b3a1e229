//! Where minihub keeps its hubs, device identities and twins: a SQLite file (one node), or the
//! PostgreSQL database the provisioning service's nodes share, so that every node serves the same
//! hubs. Both run the same contract suite (`contract`).
//!
//! Every write to a device is a read-modify-write of its row ([`HubStore::update`]): the change is
//! decided from the row as it is, and no other write to that device comes in between.

#[cfg(test)]
mod contract;
mod postgres;
mod sqlite;

use std::path::Path;

use sqlite_commit::{GroupCommit, ReaderPool};

use crate::error::MinihubError;
use crate::model::{Device, HubInfo};
use crate::twin::TwinState;

pub(crate) use postgres::{PgHubStore, RemotePatch, import_sqlite};
pub(crate) use sqlite::read_hubs;

/// A device with its twin, as stored.
pub(crate) type Row = (Device, TwinState);

/// What an update does to the device's row, and what it answers.
pub(crate) enum Change<R> {
    /// Store this device and twin (created or replaced).
    Put(Box<Row>, R),
    /// Remove the device and its twin.
    Delete(R),
}

/// An open store.
pub(crate) enum HubStore {
    /// A SQLite file: the only writer (a thread committing in groups) and readers used on the
    /// calling thread.
    Sqlite {
        writer: GroupCommit,
        readers: ReaderPool,
    },
    /// A PostgreSQL database shared with other nodes.
    Postgres(PgHubStore),
}

impl HubStore {
    /// Opens (creating if needed) the SQLite file at `path` and brings its schema up to date;
    /// returns it with the hubs it holds.
    pub(crate) fn open_sqlite(path: &Path) -> Result<(Self, Vec<HubInfo>), MinihubError> {
        let conn = sqlite::open(path)?;
        let hubs = sqlite::hubs(&conn)?;
        let store = Self::Sqlite {
            writer: GroupCommit::start(conn, "minihub-writer")
                .map_err(|e| MinihubError::Storage(format!("starting the writer: {e}")))?,
            readers: ReaderPool::new(path, sqlite_commit::open_connection, None),
        };
        Ok((store, hubs))
    }

    /// Every hub, by host name.
    pub(crate) async fn hubs(&self) -> Result<Vec<HubInfo>, MinihubError> {
        match self {
            Self::Sqlite { readers, .. } => readers.read(sqlite::hubs, MinihubError::from),
            Self::Postgres(pg) => pg.hubs().await,
        }
    }

    /// Stores `hub` unless a hub of that name exists; returns whichever is stored.
    pub(crate) async fn insert_hub(&self, hub: HubInfo) -> Result<HubInfo, MinihubError> {
        match self {
            Self::Sqlite { writer, .. } => {
                writer.write(move |tx| sqlite::insert_hub(tx, &hub)).await
            }
            Self::Postgres(pg) => pg.insert_hub(&hub).await,
        }
    }

    /// One device and its twin.
    pub(crate) async fn device(
        &self,
        hub: &str,
        device_id: &str,
    ) -> Result<Option<Row>, MinihubError> {
        match self {
            Self::Sqlite { readers, .. } => readers.read(
                |conn| sqlite::device(conn, hub, device_id),
                MinihubError::from,
            ),
            Self::Postgres(pg) => pg.device(hub, device_id).await,
        }
    }

    /// Up to `limit` devices of `hub` with ids after `after`, in id order (bytewise).
    pub(crate) async fn devices(
        &self,
        hub: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, MinihubError> {
        match self {
            Self::Sqlite { readers, .. } => readers.read(
                |conn| sqlite::devices(conn, hub, after, limit),
                MinihubError::from,
            ),
            Self::Postgres(pg) => pg.devices(hub, after, limit).await,
        }
    }

    /// Reads the device's row, lets `decide` choose the change, and applies it, with no other write
    /// to that device in between. Nothing is written when `decide` fails.
    pub(crate) async fn update<R: Send + 'static>(
        &self,
        hub: String,
        device_id: String,
        mut decide: impl FnMut(Option<Row>) -> Result<Change<R>, MinihubError> + Send + 'static,
    ) -> Result<R, MinihubError> {
        match self {
            Self::Sqlite { writer, .. } => {
                writer
                    .write(move |tx| {
                        let current = sqlite::device(tx, &hub, &device_id)?;
                        match decide(current)? {
                            Change::Put(row, answer) => {
                                let (device, twin) = *row;
                                sqlite::put_device(tx, &hub, &device, &twin)?;
                                Ok(answer)
                            }
                            Change::Delete(answer) => {
                                sqlite::delete_device(tx, &hub, &device_id)?;
                                Ok(answer)
                            }
                        }
                    })
                    .await
            }
            Self::Postgres(pg) => pg.update(&hub, &device_id, decide).await,
        }
    }

    /// This store, written without waiting for each commit's flush where that is possible (see
    /// `PgHubStore::flushed_later`); none for SQLite.
    pub(crate) fn flushed_later(&self) -> Option<Self> {
        match self {
            Self::Sqlite { .. } => None,
            Self::Postgres(pg) => Some(Self::Postgres(pg.flushed_later())),
        }
    }

    /// As [`HubStore::update`], for a write that most likely finds no row (a device being
    /// created): on PostgreSQL `decide` first chooses as if there were none and that row is
    /// inserted unless one exists, one round trip instead of a read and a write; when one exists,
    /// it goes on as `update` does. On SQLite, `update`.
    pub(crate) async fn create<R: Send + 'static>(
        &self,
        hub: String,
        device_id: String,
        mut decide: impl FnMut(Option<Row>) -> Result<Change<R>, MinihubError> + Send + 'static,
    ) -> Result<R, MinihubError> {
        if let Self::Postgres(pg) = self
            && let Ok(Change::Put(row, answer)) = decide(None)
            && pg.insert_row(&hub, &device_id, &row).await?
        {
            return Ok(answer);
        }
        self.update(hub, device_id, decide).await
    }

    /// Tells the other nodes sharing the database about a desired-property change, for the
    /// device's connections there. A SQLite file has no other node.
    pub(crate) async fn announce_desired(
        &self,
        hub: &str,
        device_id: &str,
        patch: &crate::DesiredPatch,
    ) -> Result<(), MinihubError> {
        match self {
            Self::Sqlite { .. } => Ok(()),
            Self::Postgres(pg) => pg.announce_desired(hub, device_id, patch).await,
        }
    }
}
