//! The SQLite file behind minihub: one WAL-mode database holding every hub (with its keys), device
//! identity and twin. Migrations are numbered in `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::MinihubError;
use crate::model::{Device, HubInfo};
use crate::twin::TwinState;

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // 1: hubs with their policies; devices with their twins, one row each.
    "CREATE TABLE hubs (host_name TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
     CREATE TABLE devices (
         hub TEXT NOT NULL, device_id TEXT NOT NULL, device TEXT NOT NULL, twin TEXT NOT NULL,
         PRIMARY KEY (hub, device_id)
     ) WITHOUT ROWID;",
];

/// Opens (creating if needed) the database and brings its schema up to date. Another process
/// creating or migrating the same file at the same moment (a starting service and `opendps info`)
/// can make SQLite report busy without waiting; that is waited out for a while.
pub(crate) fn open(path: &Path) -> Result<Connection, MinihubError> {
    let started = std::time::Instant::now();
    loop {
        match try_open(path) {
            Ok((conn, Ok(()))) => return Ok(conn),
            Ok((_, Err(version))) => {
                return Err(MinihubError::Storage(format!(
                    "the minihub database has schema version {version}, newer than this build knows ({})",
                    MIGRATIONS.len()
                )));
            }
            Err(err) if is_busy(&err) && started.elapsed() < Duration::from_secs(15) => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Another connection to a database [`open`] has created and migrated, for reading.
pub(crate) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// The hubs of an existing database, read without a writer, a migration or any lock that could get
/// in the way of the service that owns the file (`opendps info`).
pub(crate) fn read_hubs(path: &Path) -> Result<Vec<HubInfo>, MinihubError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if usize::try_from(version).ok() != Some(MIGRATIONS.len()) {
        return Err(MinihubError::Storage(format!(
            "the minihub database has schema version {version}, this build reads {}; start `opendps serve` on it",
            MIGRATIONS.len()
        )));
    }
    hubs(&conn)
}

fn try_open(path: &Path) -> rusqlite::Result<(Connection, Result<(), usize>)> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
    let migrated = migrate(&mut conn)?;
    Ok((conn, migrated))
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Brings the schema up to date; `Ok(Err(version))` when the file is newer than this build.
/// A database already up to date is only read: the write lock is taken only to migrate.
fn migrate(conn: &mut Connection) -> rusqlite::Result<Result<(), usize>> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if usize::try_from(version).ok() == Some(MIGRATIONS.len()) {
        return Ok(Ok(()));
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Ok(Err(version));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tracing::info!(version = index + 1, "applied minihub schema migration");
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// Every hub.
pub(crate) fn hubs(conn: &Connection) -> Result<Vec<HubInfo>, MinihubError> {
    let mut stmt = conn.prepare("SELECT doc FROM hubs ORDER BY host_name")?;
    let docs = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    docs.iter()
        .map(|doc| Ok(serde_json::from_str(doc)?))
        .collect()
}

/// Stores `hub` unless a hub of that name exists; returns whichever is stored.
pub(crate) fn insert_hub(conn: &Connection, hub: &HubInfo) -> Result<HubInfo, MinihubError> {
    conn.execute(
        "INSERT OR IGNORE INTO hubs (host_name, doc) VALUES (?1, ?2)",
        params![hub.host_name, serde_json::to_string(hub)?],
    )?;
    let doc: String = conn.query_row(
        "SELECT doc FROM hubs WHERE host_name = ?1",
        params![hub.host_name],
        |r| r.get(0),
    )?;
    Ok(serde_json::from_str(&doc)?)
}

fn decode(device: &str, twin: &str) -> Result<(Device, TwinState), MinihubError> {
    Ok((serde_json::from_str(device)?, serde_json::from_str(twin)?))
}

/// One device and its twin.
pub(crate) fn device(
    conn: &Connection,
    hub: &str,
    device_id: &str,
) -> Result<Option<(Device, TwinState)>, MinihubError> {
    let row = conn
        .query_row(
            "SELECT device, twin FROM devices WHERE hub = ?1 AND device_id = ?2",
            params![hub, device_id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?;
    row.map(|(device, twin)| decode(&device, &twin)).transpose()
}

/// Up to `limit` devices with ids after `after`, in id order.
pub(crate) fn devices(
    conn: &Connection,
    hub: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(Device, TwinState)>, MinihubError> {
    let mut stmt = conn.prepare(
        "SELECT device, twin FROM devices WHERE hub = ?1 AND (?2 IS NULL OR device_id > ?2)
         ORDER BY device_id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(
            params![hub, after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?
        .collect::<Result<Vec<_>, _>>()?;
    rows.iter().map(|(d, t)| decode(d, t)).collect()
}

/// Inserts or overwrites a device and its twin.
pub(crate) fn put_device(
    conn: &Connection,
    hub: &str,
    device: &Device,
    twin: &TwinState,
) -> Result<(), MinihubError> {
    conn.execute(
        "INSERT OR REPLACE INTO devices (hub, device_id, device, twin) VALUES (?1, ?2, ?3, ?4)",
        params![
            hub,
            device.device_id,
            serde_json::to_string(device)?,
            serde_json::to_string(twin)?
        ],
    )?;
    Ok(())
}

/// Removes a device and its twin.
pub(crate) fn delete_device(
    conn: &Connection,
    hub: &str,
    device_id: &str,
) -> Result<(), MinihubError> {
    conn.execute(
        "DELETE FROM devices WHERE hub = ?1 AND device_id = ?2",
        params![hub, device_id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_up_to_date_database_is_not_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).expect("open");
        migrate(&mut conn).expect("create").expect("known");
        let other = Connection::open(&path).expect("open");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("hold the write lock");
        conn.busy_timeout(Duration::ZERO).expect("timeout");
        assert!(matches!(migrate(&mut conn), Ok(Ok(()))));
    }

    #[test]
    fn migrating_twice_is_a_no_op_and_newer_schemas_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        drop(open(&path).expect("first open"));
        let conn = open(&path).expect("second open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        conn.pragma_update(None, "user_version", 99)
            .expect("set version");
        drop(conn);
        assert!(matches!(open(&path), Err(MinihubError::Storage(_))));
    }
}
