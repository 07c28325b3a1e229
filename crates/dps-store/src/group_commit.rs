//! `GroupCommit`: one thread owns a SQLite connection and commits the writes of many callers
//! together. Each write runs in its own savepoint (a failing write is rolled back alone); one
//! `COMMIT`, one fsync, covers every write that queued while the previous commit was on disk; each
//! caller is answered only after that commit. Used by the DPS store and by minihub.

use std::sync::{Mutex, mpsc};
use std::thread;

use rusqlite::Connection;
use tokio::sync::oneshot;

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

/// Why a write did not reach the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CommitError(pub String);

type Completion = Box<dyn FnOnce(Result<(), CommitError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;

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
            let result = f(conn);
            let ok = result.is_ok();
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(commit.map_err(E::from).and(result));
            });
            (ok, done)
        });
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| CommitError("the database is closed or read-only".into()))?;
        sender
            .send(job)
            .map_err(|_| CommitError("the writer thread has stopped".into()))?;
        rx.await
            .map_err(|_| CommitError("the writer thread dropped a write".into()))?
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
        .map_err(|e| CommitError(e.to_string()))
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
                        completions.push((Err(e), None));
                        continue;
                    }
                    let (ok, done) = job(conn);
                    let ended = if ok {
                        run(conn, "RELEASE job")
                    } else {
                        run(conn, "ROLLBACK TO job").and_then(|()| run(conn, "RELEASE job"))
                    };
                    completions.push((ended, Some(done)));
                }
                run(conn, "COMMIT")
            }
            Err(err) => {
                for job in batch {
                    let (_, done) = job(conn);
                    completions.push((Err(err.clone()), Some(done)));
                }
                Err(err)
            }
        };
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(error = ?commit, "SQLite commit failed; the batch was rolled back");
        }
        for (own, done) in completions {
            if let Some(done) = done {
                done(own.and(commit.clone()));
            }
        }
    }
}
