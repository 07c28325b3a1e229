//! Writes and reads of one database. `GroupCommit`: one thread owns a SQLite connection and commits
//! the writes of many callers together. Each write runs in its own savepoint (a failing write is
//! rolled back alone); one `COMMIT`, one fsync, covers every write that queued while the previous
//! commit was on disk; each caller is answered only after that commit. `ReaderPool`: reads run on
//! the calling thread over a few pooled connections (point lookups and short scans of a WAL
//! database whose pages are cached are cheaper than a hop to a blocking thread).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::Connection;
use tokio::sync::oneshot;

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Reader connections kept open.
const MAX_IDLE_READERS: usize = 4;

/// Reader connections of one database file, opened on demand.
pub struct ReaderPool {
    path: PathBuf,
    open: fn(&Path) -> rusqlite::Result<Connection>,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    /// A pool over `path` whose connections `open` makes; `first`, if given, is kept for reuse.
    pub fn new(
        path: &Path,
        open: fn(&Path) -> rusqlite::Result<Connection>,
        first: Option<Connection>,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            open,
            idle: Mutex::new(first.into_iter().collect()),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled connection, on the calling thread; `open_failed` says why no
    /// connection could be opened.
    pub fn read<R, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E>,
        open_failed: impl FnOnce(rusqlite::Error) -> E,
    ) -> Result<R, E> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => (self.open)(&self.path).map_err(open_failed)?,
        };
        let result = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

/// Why a write did not reach the disk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// SQLite refused a statement of the batch (`BEGIN`, a savepoint, `COMMIT`) or of the write.
    #[error("SQLite failed")]
    Sql(#[source] Arc<rusqlite::Error>),
    /// The writer thread is not there to take the write.
    #[error("{0}")]
    Writer(&'static str),
}

impl From<rusqlite::Error> for CommitError {
    fn from(err: rusqlite::Error) -> Self {
        Self::Sql(Arc::new(err))
    }
}

type Completion = Box<dyn FnOnce(Result<(), CommitError>) + Send>;
/// A queued write: given the connection (inside the batch's transaction) it runs and says whether
/// it succeeded; given `None` (the batch could not start) it does not run at all. Either way it
/// hands back how to answer its caller.
type Job = Box<dyn FnOnce(Option<&Connection>) -> (bool, Completion) + Send>;

/// The writer thread of one database.
pub struct GroupCommit {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts a thread called `name` writing through `conn`.
    pub fn start(conn: Connection, name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let label = name.to_owned();
        let handle = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || writer_loop(&conn, &rx, &label))?;
        Ok(Self {
            sender: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Runs `f` in a savepoint of the next batch; resolves once that batch is committed. `f`'s
    /// error rolls back its own changes only. A failed commit is reported through `E: From`.
    pub async fn write<R, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<CommitError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = conn.map(f);
            let ok = matches!(result, Some(Ok(_)));
            let done: Completion = Box::new(move |commit| {
                let answer = match result {
                    Some(result) => commit.map_err(E::from).and(result),
                    None => {
                        Err(E::from(commit.err().unwrap_or_else(|| {
                            CommitError::Writer("the write was not run")
                        })))
                    }
                };
                let _ = tx.send(answer);
            });
            (ok, done)
        });
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| CommitError::Writer("the database is closed or read-only"))?;
        sender
            .send(job)
            .map_err(|_| CommitError::Writer("the writer thread has stopped"))?;
        rx.await
            .map_err(|_| CommitError::Writer("the writer thread dropped a write"))?
    }

    /// Commits everything queued, then stops the thread. Later writes fail.
    pub fn close(&self) {
        drop(self.sender.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.close();
    }
}

/// Runs one statement through the connection's statement cache (each runs once or twice per write).
fn run(conn: &Connection, sql: &str) -> Result<(), CommitError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(CommitError::from)
}

fn writer_loop(conn: &Connection, rx: &mpsc::Receiver<Job>, name: &str) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        #[allow(clippy::cast_precision_loss)]
        // Looked up per batch: the recorder may be installed after the store is opened.
        metrics::histogram!("opendps_store_commit_writes", "writer" => name.to_owned())
            .record(batch.len() as f64);
        let mut completions = Vec::with_capacity(batch.len());
        let commit = match run(conn, "BEGIN IMMEDIATE") {
            Ok(()) => {
                for job in batch {
                    if let Err(e) = run(conn, "SAVEPOINT job") {
                        let (_, done) = job(None);
                        completions.push((Err(e), done));
                        continue;
                    }
                    let (ok, done) = job(Some(conn));
                    let ended = if ok {
                        run(conn, "RELEASE job")
                    } else {
                        run(conn, "ROLLBACK TO job").and_then(|()| run(conn, "RELEASE job"))
                    };
                    completions.push((ended, done));
                }
                run(conn, "COMMIT")
            }
            // Without a transaction nothing may run: in autocommit mode each write would be
            // committed on its own while its caller is told that it failed.
            Err(err) => {
                for job in batch {
                    let (_, done) = job(None);
                    completions.push((Err(err.clone()), done));
                }
                Err(err)
            }
        };
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(error = ?commit, "SQLite commit failed; the batch was rolled back");
        }
        for (own, done) in completions {
            done(own.and(commit.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> Connection {
        let conn = Connection::open(path).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL;")
            .expect("wal");
        conn
    }

    /// A batch whose `BEGIN` fails runs none of its writes. The write below goes to a TEMP table:
    /// it needs no lock on the database file, so in autocommit mode it would succeed and stay
    /// written while its caller is told that it failed.
    #[tokio::test]
    async fn a_batch_that_cannot_begin_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let writer = open(&path);
        writer
            .busy_timeout(std::time::Duration::ZERO)
            .expect("timeout");
        writer
            .execute_batch("CREATE TEMP TABLE t (x INTEGER)")
            .expect("temp table");
        let commit = GroupCommit::start(writer, "test-writer").expect("start");

        let other = open(&path);
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let refused = commit
            .write(|conn: &Connection| {
                conn.execute("INSERT INTO t VALUES (1)", [])
                    .map_err(CommitError::from)
            })
            .await;
        assert!(refused.is_err(), "the caller hears that BEGIN failed");
        other.execute_batch("ROLLBACK").expect("unlock");

        let rows: i64 = commit
            .write(|conn: &Connection| {
                conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .map_err(CommitError::from)
            })
            .await
            .expect("count");
        assert_eq!(rows, 0, "the refused write must not have run");
    }
}
