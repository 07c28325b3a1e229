//! Opening a database file: the settings every connection gets, the writer's open that waits out
//! another process and migrates, and the read-only open that only checks the schema version.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// How long a statement waits for another connection's lock before SQLite reports busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the writer's open waits for another process (a starting service, `opendps info`) to
/// release the file while it is being created or migrated.
const OPEN_PATIENCE: Duration = Duration::from_secs(15);
/// The pause between two attempts of that open.
const OPEN_RETRY: Duration = Duration::from_millis(25);

/// Opens a read-write connection to `path`, creating the file if needed: WAL journal,
/// `synchronous = FULL` (a commit has been fsynced when it returns), foreign keys enforced, and a
/// busy timeout. The writer and the readers of a writable database use it alike.
pub fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// Opens a read-only connection to an existing `path`, with the busy timeout; nothing in the file
/// changes, so a service that owns it is never in its way.
pub fn open_read_only_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Why a database could not be opened at the schema this build knows.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite failed: opening or setting up the file, or a migration step. A file that stayed
    /// locked by another process for the whole wait is reported here too.
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    /// The file has a newer schema than this build knows: a newer build wrote it.
    #[error("schema version {found} is newer than this build knows ({known})")]
    TooNew {
        /// The file's `user_version`.
        found: i64,
        /// The version this build writes.
        known: usize,
    },
    /// A read-only open found an older schema: the file is still being created, or waits for its
    /// writer to migrate it.
    #[error("schema version {found} is not yet the {known} this build reads")]
    NotMigrated {
        /// The file's `user_version`.
        found: i64,
        /// The version this build reads.
        known: usize,
    },
}

/// A database schema: the SQL steps that build it, applied in order and counted in
/// `PRAGMA user_version`.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    name: &'static str,
    steps: &'static [&'static str],
}

impl Schema {
    /// The schema called `name` (in logs); step `i` moves it from version `i` to `i + 1`. A released
    /// step is never edited: a change is a new step.
    pub const fn new(name: &'static str, steps: &'static [&'static str]) -> Self {
        Self { name, steps }
    }

    /// The version this build writes: the number of steps.
    pub fn version(&self) -> usize {
        self.steps.len()
    }

    /// Brings the schema of `conn` up to date in one transaction. Refuses a database newer than this
    /// build. A database already up to date is only read: the write lock is taken only to migrate,
    /// and the version is read again under it, so two processes never apply a step twice.
    pub fn migrate(&self, conn: &mut Connection) -> Result<(), OpenError> {
        if usize::try_from(user_version(conn)?).ok() == Some(self.version()) {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = user_version(&tx)?;
        let from = match usize::try_from(found) {
            Ok(version) if version <= self.version() => version,
            _ => {
                return Err(OpenError::TooNew {
                    found,
                    known: self.version(),
                });
            }
        };
        for (index, sql) in self.steps.iter().enumerate().skip(from) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (index + 1) as i64)?;
            tracing::info!(
                schema = self.name,
                version = index + 1,
                "applied schema migration"
            );
        }
        Ok(tx.commit()?)
    }

    /// Opens (creating if needed) the writer's connection to `path` and migrates it. Another process
    /// creating or migrating the same file at the same moment can make SQLite report busy at once,
    /// without its busy handler (switching a new file to WAL does); that is waited out for a while.
    pub fn open(&self, path: &Path) -> Result<Connection, OpenError> {
        let started = Instant::now();
        loop {
            let attempt = open_connection(path)
                .map_err(OpenError::Sql)
                .and_then(|mut conn| {
                    self.migrate(&mut conn)?;
                    Ok(conn)
                });
            match attempt {
                Err(OpenError::Sql(err)) if is_busy(&err) && started.elapsed() < OPEN_PATIENCE => {
                    thread::sleep(OPEN_RETRY);
                }
                other => return other,
            }
        }
    }

    /// Opens an existing database at `path` for reading only: no migration and no lock that could
    /// get in the way of the process that owns the file. Refuses a schema other than this build's.
    pub fn open_read_only(&self, path: &Path) -> Result<Connection, OpenError> {
        let conn = open_read_only_connection(path)?;
        let found = user_version(&conn)?;
        let known = self.version();
        match usize::try_from(found) {
            Ok(version) if version == known => Ok(conn),
            Ok(version) if version > known => Err(OpenError::TooNew { found, known }),
            _ => Err(OpenError::NotMigrated { found, known }),
        }
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock; worth waiting for.
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: Schema = Schema::new(
        "test",
        &["CREATE TABLE a (x INTEGER);", "CREATE TABLE b (y INTEGER);"],
    );

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().expect("open");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "first");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "second");
        assert_eq!(user_version(&conn).expect("version"), 2);
    }

    #[test]
    fn only_the_missing_steps_run() {
        let mut conn = Connection::open_in_memory().expect("open");
        Schema::new("test", &SCHEMA.steps[..1])
            .migrate(&mut conn)
            .expect("version 1");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "step 1 is not run again");
        assert_eq!(user_version(&conn).expect("version"), 2);
    }

    #[test]
    fn an_up_to_date_database_is_not_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut conn = Connection::open(&path).expect("open");
        assert!(SCHEMA.migrate(&mut conn).is_ok(), "create");
        let other = Connection::open(&path).expect("open");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("hold the write lock");
        conn.busy_timeout(Duration::ZERO).expect("timeout");
        assert!(
            SCHEMA.migrate(&mut conn).is_ok(),
            "nothing to migrate, so the held lock is not needed"
        );
    }

    #[test]
    fn newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set");
        assert!(matches!(
            SCHEMA.migrate(&mut conn),
            Err(OpenError::TooNew {
                found: 99,
                known: 2
            })
        ));
    }

    #[test]
    fn open_sets_up_and_migrates_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let conn = SCHEMA.open(&path).expect("open");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
        assert_eq!(user_version(&conn).expect("version"), 2);
    }

    #[test]
    fn read_only_open_wants_this_builds_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        assert!(
            matches!(SCHEMA.open_read_only(&path), Err(OpenError::Sql(_))),
            "a missing file is not created"
        );
        let older = Schema::new("test", &SCHEMA.steps[..1])
            .open(&path)
            .expect("v1");
        assert!(matches!(
            SCHEMA.open_read_only(&path),
            Err(OpenError::NotMigrated { found: 1, known: 2 })
        ));
        drop(older);
        drop(SCHEMA.open(&path).expect("v2"));
        let reader = SCHEMA.open_read_only(&path).expect("read only");
        assert!(
            reader.execute_batch("INSERT INTO a VALUES (1)").is_err(),
            "the connection cannot write"
        );
        assert!(matches!(
            Schema::new("test", &SCHEMA.steps[..1]).open_read_only(&path),
            Err(OpenError::TooNew { found: 2, known: 1 })
        ));
    }
}
