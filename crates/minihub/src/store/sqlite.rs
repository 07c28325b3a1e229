//! minihub in a SQLite file: one WAL-mode database holding every hub (with its keys), device
//! identity and twin. Migrations are numbered in `PRAGMA user_version`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use sqlite_commit::{CachedStatements, Schema};

use super::Row;
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
    // 2: devices in a rowid table: a new device is appended (its row, device and twin, a kilobyte
    // or more, no longer splits pages all over a tree keyed by id) and found by a small unique index.
    "CREATE TABLE devices_by_rowid (
         hub TEXT NOT NULL, device_id TEXT NOT NULL, device TEXT NOT NULL, twin TEXT NOT NULL,
         UNIQUE (hub, device_id)
     );
     INSERT INTO devices_by_rowid (hub, device_id, device, twin)
         SELECT hub, device_id, device, twin FROM devices;
     DROP TABLE devices;
     ALTER TABLE devices_by_rowid RENAME TO devices;",
];

/// minihub's schema.
const SCHEMA: Schema = Schema::new("minihub", MIGRATIONS);

/// Opens (creating if needed) the database and brings its schema up to date. Another process
/// creating or migrating the same file at the same moment (a starting service and `opendps info`)
/// is waited out for a while.
pub(crate) fn open(path: &Path) -> Result<Connection, MinihubError> {
    Ok(SCHEMA.open(path)?)
}

/// The hubs of an existing database, read without a writer, a migration or any lock that could get
/// in the way of the service that owns the file (`opendps info`).
pub(crate) fn read_hubs(path: &Path) -> Result<Vec<HubInfo>, MinihubError> {
    hubs(&open_read_only(path)?)
}

/// The file at `path` opened read only, without a lock (for `opendps info` and copying); its
/// schema must be this build's.
pub(crate) fn open_read_only(path: &Path) -> Result<Connection, MinihubError> {
    Ok(SCHEMA.open_read_only(path)?)
}

/// Every hub.
pub(crate) fn hubs(conn: &Connection) -> Result<Vec<HubInfo>, MinihubError> {
    let docs = conn.query_all_cached("SELECT doc FROM hubs ORDER BY host_name", [], |r| {
        r.get::<_, String>(0)
    })?;
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

fn decode(device: &str, twin: &str) -> Result<Row, MinihubError> {
    Ok((serde_json::from_str(device)?, serde_json::from_str(twin)?))
}

/// One device and its twin.
pub(crate) fn device(
    conn: &Connection,
    hub: &str,
    device_id: &str,
) -> Result<Option<Row>, MinihubError> {
    let row = conn
        .query_row_cached(
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
) -> Result<Vec<Row>, MinihubError> {
    let rows = conn.query_all_cached(
        "SELECT device, twin FROM devices WHERE hub = ?1 AND (?2 IS NULL OR device_id > ?2)
         ORDER BY device_id LIMIT ?3",
        params![hub, after, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    )?;
    rows.iter().map(|(d, t)| decode(d, t)).collect()
}

/// Inserts or overwrites a device and its twin.
pub(crate) fn put_device(
    conn: &Connection,
    hub: &str,
    device: &Device,
    twin: &TwinState,
) -> Result<(), MinihubError> {
    conn.execute_cached(
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
    conn.execute_cached(
        "DELETE FROM devices WHERE hub = ?1 AND device_id = ?2",
        params![hub, device_id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op_and_newer_schemas_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        drop(open(&path).expect("first open"));
        let conn = open(&path).expect("second open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA.version() as i64);
        conn.pragma_update(None, "user_version", 99)
            .expect("set version");
        drop(conn);
        assert!(matches!(open(&path), Err(MinihubError::Storage(_))));
    }

    /// Migration 2 moves the devices to a rowid table: each survives, found by hub and id, listed
    /// in id order, and unique.
    #[test]
    fn devices_survive_the_move_to_a_rowid_table() {
        let mut conn = Connection::open_in_memory().expect("open");
        Schema::new("minihub", &MIGRATIONS[..1])
            .migrate(&mut conn)
            .expect("version 1");
        conn.execute_batch(
            "INSERT INTO devices (hub, device_id, device, twin) VALUES
                 ('hub-a', 'dev-2', '{\"n\":2}', '{}'), ('hub-a', 'dev-1', '{\"n\":1}', '{}'),
                 ('hub-b', 'dev-1', '{\"n\":3}', '{}');",
        )
        .expect("devices at version 1");
        SCHEMA.migrate(&mut conn).expect("latest");
        let listed: Vec<String> = conn
            .prepare("SELECT device FROM devices WHERE hub = 'hub-a' AND device_id > '' ORDER BY device_id")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("listed");
        assert_eq!(listed, [r#"{"n":1}"#, r#"{"n":2}"#]);
        let duplicate = conn.execute(
            "INSERT INTO devices (hub, device_id, device, twin) VALUES ('hub-b', 'dev-1', '{}', '{}')",
            [],
        );
        assert!(duplicate.is_err(), "one row per device of a hub");
    }
}
