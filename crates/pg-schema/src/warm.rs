//! Connections kept out of the pool between statements.
//!
//! sqlx checks every connection it takes back into its pool with a round trip to the server (a
//! `Sync` answered by `ReadyForQuery`), so that a connection left mid-statement by a cancelled
//! future is never reused. For a one-statement call that doubles the round trips. A [`WarmPool`]
//! keeps the connections whose statements finished and hands them to the next statement without
//! that check; a connection whose statement failed, or whose future was dropped, goes back to the
//! pool, which checks it (and closes it if it is broken).

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Postgres};

/// A pool, and up to `keep` of its connections kept for the next statement.
pub struct WarmPool {
    pool: PgPool,
    kept: Mutex<Kept>,
    keep: usize,
    /// Signalled when a connection is kept: a caller waiting for the pool takes it instead (the
    /// pool does not know of it).
    returned: tokio::sync::Notify,
}

#[derive(Default)]
struct Kept {
    conns: Vec<PoolConnection<Postgres>>,
    /// Closing: nothing is kept any more.
    closed: bool,
}

impl WarmPool {
    /// Keeps at most `keep` connections of `pool`, which should leave room for the connections
    /// that callers take from `pool` directly (transactions, listeners): kept ones count as in use.
    pub fn new(pool: PgPool, keep: usize) -> Self {
        Self {
            pool,
            kept: Mutex::default(),
            keep,
            returned: tokio::sync::Notify::new(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A kept connection, or one from the pool, whichever comes first (waiting at most as long
    /// as the pool waits).
    pub async fn acquire(&self) -> Result<WarmConnection<'_>, sqlx::Error> {
        if let Some(conn) = self.pop() {
            return Ok(WarmConnection { warm: self, conn });
        }
        let from_pool = self.pool.acquire();
        tokio::pin!(from_pool);
        loop {
            tokio::select! {
                conn = &mut from_pool => return Ok(WarmConnection { warm: self, conn: conn? }),
                () = self.returned.notified() => {
                    if let Some(conn) = self.pop() {
                        return Ok(WarmConnection { warm: self, conn });
                    }
                }
            }
        }
    }

    fn pop(&self) -> Option<PoolConnection<Postgres>> {
        self.lock().conns.pop()
    }

    /// Runs `f` on a connection, kept for the next statement when `f` succeeds; `unavailable` says
    /// why no connection came.
    pub async fn run<R, E>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<R, E>,
        unavailable: impl FnOnce(sqlx::Error) -> E,
    ) -> Result<R, E> {
        let mut conn = self.acquire().await.map_err(unavailable)?;
        let result = f(&mut conn).await;
        conn.done(result)
    }

    /// Closes the pool once the statements running now are done, keeping nothing from now on.
    pub async fn close(&self) {
        let kept = {
            let mut kept = self.lock();
            kept.closed = true;
            std::mem::take(&mut kept.conns)
        };
        // The pool's close waits for every connection to come back.
        drop(kept);
        self.pool.close().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection of a [`WarmPool`]: kept for the next statement by [`WarmConnection::done`], else
/// given back to the pool when dropped.
pub struct WarmConnection<'a> {
    warm: &'a WarmPool,
    conn: PoolConnection<Postgres>,
}

impl WarmConnection<'_> {
    /// `result` of the statements run on this connection; when it is a success the connection
    /// finished them and is kept for the next statement (if there is room), else it goes back to
    /// the pool to be checked.
    pub fn done<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        let Self { warm, conn } = self;
        if result.is_ok() {
            let mut kept = warm.lock();
            if kept.conns.len() < warm.keep && !kept.closed {
                kept.conns.push(conn);
                warm.returned.notify_one();
            }
        }
        result
    }
}

impl Deref for WarmConnection<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for WarmConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sqlx::postgres::PgPoolOptions;

    use super::*;

    /// A pool of `size` connections to the test database.
    async fn pool(size: u32) -> PgPool {
        let url = std::env::var("OPENDPS_TEST_POSTGRES")
            .unwrap_or_else(|_| crate::testing::DEFAULT_URL.to_owned());
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&url)
            .await
            .expect("PostgreSQL for the tests (set OPENDPS_TEST_POSTGRES)")
    }

    async fn backend_pid(warm: &WarmPool) -> i32 {
        let mut conn = warm.acquire().await.expect("acquire");
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await;
        conn.done(pid).expect("pid")
    }

    #[tokio::test]
    async fn a_finished_statement_leaves_its_connection_for_the_next() {
        let warm = WarmPool::new(pool(2).await, 1);
        let first = backend_pid(&warm).await;
        assert_eq!(backend_pid(&warm).await, first, "the kept connection");
        assert_eq!(warm.lock().conns.len(), 1);
        warm.close().await;
    }

    #[tokio::test]
    async fn a_failed_statement_gives_its_connection_back_to_the_pool() {
        let warm = WarmPool::new(pool(2).await, 1);
        let mut conn = warm.acquire().await.expect("acquire");
        let failed = sqlx::query("SELECT 1 / 0").execute(&mut *conn).await;
        assert!(conn.done(failed).is_err());
        assert!(warm.lock().conns.is_empty(), "nothing kept");
        backend_pid(&warm).await;
        warm.close().await;
    }

    /// A statement whose caller gave up mid-way leaves its connection to the pool's check, never to
    /// the next statement, which runs on another connection.
    #[tokio::test]
    async fn a_cancelled_statement_leaves_its_connection_to_the_pool() {
        let warm = WarmPool::new(pool(2).await, 2);
        let busy = backend_pid(&warm).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(200), async {
            let mut conn = warm.acquire().await.expect("acquire");
            let slept = sqlx::query("SELECT pg_sleep(2)").execute(&mut *conn).await;
            conn.done(slept)
        })
        .await;
        assert!(cancelled.is_err(), "given up mid-statement");
        assert!(warm.lock().conns.is_empty(), "not kept");
        // Not the connection still busy with the sleep: the next statement need not wait for it.
        assert_ne!(backend_pid(&warm).await, busy, "another connection");
        warm.close().await;
    }

    /// Callers waiting for the pool's only connection get it when it is kept: the pool does not
    /// know of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_callers_take_kept_connections() {
        let warm = Arc::new(WarmPool::new(pool(1).await, 1));
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let warm = Arc::clone(&warm);
                tokio::spawn(async move { backend_pid(&warm).await })
            })
            .collect();
        for caller in callers {
            caller
                .await
                .expect("each caller got the connection in time");
        }
        tokio::time::timeout(Duration::from_secs(5), warm.close())
            .await
            .expect("closing does not wait for kept connections");
    }
}
