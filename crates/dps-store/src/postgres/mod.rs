//! The PostgreSQL backend, for several nodes sharing one database: a connection pool (sqlx), one
//! statement per write where a single row is involved (conditions are part of the statement, so
//! they hold under concurrency), a transaction where two rows must change together, and leases
//! claimed with `FOR UPDATE SKIP LOCKED` so that no operation goes to two nodes at once. A write
//! returns once PostgreSQL has committed it.

mod cache;
mod import;
pub use import::import_sqlite;
mod migrations;

use std::sync::Arc;
use std::time::Duration;

use crate::columns::{from_json, kind_tag, to_json};
use crate::read_cache::ReadCache;
use async_trait::async_trait;
use dps_core::access::ServiceIdentity;
use dps_core::clock::{Clock, SystemClock};
use dps_core::error::Internal;
use dps_core::ids::Etag;
use dps_core::linked_hub::LinkedHub;
use dps_core::store::{
    CertificateStore, Durability, EnrollmentKind, EnrollmentStore, IdentityStore, LeaseOwner,
    LinkedHubStore, OperationStore, Page, Precondition, RegistrationStore, StoreError, StoredDoc,
    StoredOperation,
};
use pg_schema::WarmPool;
use sqlx::Postgres;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::query::Query;
// Dynamic SQL here is built only from this file's table and column names, never from input;
// values are always bound.
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row as _};

/// A PostgreSQL-backed store.
#[derive(Clone)]
pub struct PgStore {
    /// The pool, and connections kept out of it between statements.
    conns: Arc<WarmPool>,
    /// When writes happen (operations record when they were last written, for pruning).
    clock: Arc<dyn Clock>,
    /// Enrollments and linked hubs as last read, while [`PgStore::watch_work`] hears changes.
    cache: Arc<ReadCache>,
    /// Tells every node, after the commit, that pending work was written (see [`Announcer`]).
    announcer: Arc<Announcer>,
    /// The operations whose state this node knows, for the polls.
    own: Arc<cache::OwnOperations>,
}

/// Announces pending work to every node (`NOTIFY` on [`WORK_CHANNEL`]) after the writes that
/// made it committed, once for all the writes committed while the previous announcement was on
/// its way.
///
/// Not inside the writing transaction: PostgreSQL serialises the commits of every transaction
/// that notifies (it holds a database-wide lock from before the commit record to after its flush),
/// which would forbid the server to flush the commits of concurrent registrations together. The
/// node that wrote the work wakes its own worker in-process; the others hear it here, or at their
/// next scan if this node stops between its commit and the announcement.
struct Announcer {
    due: tokio::sync::Notify,
}

impl Announcer {
    /// Starts announcing through `pool` until it closes.
    fn start(pool: PgPool) -> Arc<Self> {
        let announcer = Arc::new(Self {
            due: tokio::sync::Notify::new(),
        });
        let this = Arc::clone(&announcer);
        tokio::spawn(async move {
            loop {
                this.due.notified().await;
                if pool.is_closed() {
                    break;
                }
                let sent = sqlx::query("SELECT pg_notify($1 || current_schema(), '')")
                    .bind(WORK_CHANNEL)
                    .execute(&pool)
                    .await;
                if let Err(err) = sent {
                    tracing::debug!(%err, "could not announce pending work; other nodes find it at their next scan");
                }
            }
        });
        announcer
    }

    /// Asks for an announcement of work committed before this call.
    fn announce(&self) {
        self.due.notify_one();
    }
}

/// The channel on which a write of pending work is announced to every node: this prefix and the
/// schema, so that services in other schemas of the same database are not woken.
const WORK_CHANNEL: &str = "opendps_work:";

/// The channel on which a change of an enrollment or a linked hub is announced, so that every node
/// forgets what it kept of them (the schema follows, as for [`WORK_CHANNEL`]).
const CHANGE_CHANNEL: &str = "opendps_changed:";

/// Connections a node keeps open at most.
const MAX_CONNECTIONS: u32 = 16;
/// Connections of the pool never kept between statements (see [`WarmPool`]): room for the
/// listener, the announcer and transactions, which take theirs from the pool.
const NEVER_KEPT: u32 = 4;

/// How many of a pool of `size` connections are kept between statements.
fn kept(size: u32) -> usize {
    usize::try_from(size.saturating_sub(NEVER_KEPT)).unwrap_or(0)
}
/// How long a request waits for a connection (or for the server to answer a new one) before it
/// fails: an unreachable database must not hang clients.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A sqlx error as a store error: the database out of reach (no connection within the timeout, a
/// broken connection, a server shutting down or starting) is `Unavailable`, anything else
/// `Backend`.
fn backend(context: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| match pg_schema::is_unavailable(&e) {
        true => StoreError::Unavailable(Internal::caused(context, e)),
        false => StoreError::Backend(Internal::caused(context, e)),
    }
}

/// Where a PostgreSQL store is: a URL (`postgres://user@host:5432/database?sslmode=…`) and the
/// password, kept out of the URL (read from a file or the environment by the caller; without one,
/// libpq's `PGPASSWORD` and `.pgpass` apply).
#[derive(Clone)]
pub struct PgLocation {
    /// The URL.
    pub url: String,
    /// The password, if given apart from the URL.
    pub password: Option<dps_core::secret::Secret>,
}

impl PgLocation {
    fn options(&self) -> Result<PgConnectOptions, StoreError> {
        let options: PgConnectOptions = self.url.parse().map_err(|e| {
            StoreError::Backend(Internal::caused(
                "the storage URL is not a PostgreSQL URL",
                e,
            ))
        })?;
        Ok(match &self.password {
            Some(password) => options.password(password.expose()),
            None => options,
        })
    }

    /// `user@host:port/database` (the socket's directory for the host when the URL names one),
    /// for logs and messages: never the password.
    pub fn describe(&self) -> String {
        match self.options() {
            Ok(o) => {
                let host = o
                    .get_socket()
                    .map_or_else(|| o.get_host().to_owned(), |s| s.display().to_string());
                format!(
                    "{}@{host}:{}/{}",
                    o.get_username(),
                    o.get_port(),
                    o.get_database().unwrap_or(o.get_username())
                )
            }
            Err(_) => "an invalid URL".to_owned(),
        }
    }
}

impl PgStore {
    /// Connects to `location` and brings the schema up to date.
    pub async fn open(location: &PgLocation, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::connect_with_clock(location.options()?, clock).await
    }

    /// Connects to `location` without migrating: see [`PgStore::connect_existing`].
    pub async fn open_existing(location: &PgLocation) -> Result<Self, StoreError> {
        Self::connect_existing(location.options()?).await
    }

    /// Connects with `options` (host, credentials, database, TLS, search path) and brings the
    /// schema up to date.
    pub async fn connect(options: PgConnectOptions) -> Result<Self, StoreError> {
        Self::connect_with_clock(options, Arc::new(SystemClock)).await
    }

    /// Connects as [`PgStore::connect`] does, with `clock` telling the time of writes.
    pub async fn connect_with_clock(
        options: PgConnectOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let pool = Self::connect_pool(options, MAX_CONNECTIONS).await?;
        migrations::migrate(&pool).await?;
        Ok(Self {
            announcer: Announcer::start(pool.clone()),
            conns: Arc::new(WarmPool::new(pool, kept(MAX_CONNECTIONS))),
            clock,
            cache: Arc::default(),
            own: Arc::default(),
        })
    }

    /// Connects to a database a service has set up, without migrating it: for commands that read
    /// the state of a service that may be running. Fails unless the schema is the one this build
    /// knows.
    pub async fn connect_existing(options: PgConnectOptions) -> Result<Self, StoreError> {
        let pool = Self::connect_pool(options, 2).await?;
        migrations::check(&pool).await?;
        Ok(Self {
            announcer: Announcer::start(pool.clone()),
            conns: Arc::new(WarmPool::new(pool, kept(2))),
            clock: Arc::new(SystemClock),
            cache: Arc::default(),
            own: Arc::default(),
        })
    }

    async fn connect_pool(options: PgConnectOptions, size: u32) -> Result<PgPool, StoreError> {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each use: it would double the round trips of every statement. A
            // connection the server dropped fails its next statement, which is 503 (the caller
            // tries again) and closes it; the pool opens a fresh one.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(backend("connecting to PostgreSQL"))
    }

    /// Wakes `wake` whenever any node records pending work (LISTEN/NOTIFY), so that a node's
    /// worker starts on what another node accepted at once rather than at its next scan; and hears
    /// the changes of enrollments and linked hubs, so that this store may keep what it read of them
    /// (see `cache`). Runs until the store is closed; after a lost connection it listens again (and
    /// keeps nothing meanwhile) and wakes once, for what it may have missed.
    pub fn watch_work(&self, wake: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
        let (pool, cache) = (self.conns.pool().clone(), Arc::clone(&self.cache));
        tokio::spawn(async move {
            while !pool.is_closed() {
                let mut listener = match listen_to_other_nodes(&pool).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::warn!(%err, "cannot listen for other nodes' work; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                cache.set_listening(true);
                wake.notify_one();
                // `None` means the connection was lost, an error that the pool is closing: either
                // way listen afresh (or stop) rather than let the listener reconnect unseen.
                while let Ok(Some(note)) = listener.try_recv().await {
                    match note.channel().starts_with(CHANGE_CHANNEL) {
                        true => cache.clear(),
                        false => wake.notify_one(),
                    }
                }
                cache.set_listening(false);
                wake.notify_one();
            }
        })
    }

    /// The connections, for components that keep their own tables in the same database
    /// (minihub): shared, so that what one keeps between statements the other may use.
    pub fn connections(&self) -> Arc<WarmPool> {
        Arc::clone(&self.conns)
    }

    /// The connection pool, for components that migrate or read their own tables in the same
    /// database (minihub).
    pub fn pool(&self) -> &PgPool {
        self.conns.pool()
    }

    /// Closes every connection, after the queries running now.
    pub async fn close(&self) {
        self.conns.close().await;
        self.announcer.announce();
    }
}

fn doc_of(row: &PgRow) -> Result<StoredDoc, StoreError> {
    Ok(StoredDoc {
        etag: Etag::new(
            row.try_get::<String, _>("etag")
                .map_err(backend("reading a row"))?,
        ),
        doc: row.try_get("doc").map_err(backend("reading a row"))?,
    })
}

fn page_of(rows: &[PgRow], key: &str, limit: usize) -> Result<Page<StoredDoc>, StoreError> {
    let more = rows.len() > limit;
    let rows = &rows[..rows.len().min(limit)];
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(
            last.try_get::<String, _>(key)
                .map_err(backend("reading a row"))?,
        ),
        _ => None,
    };
    Ok(Page {
        items: rows.iter().map(doc_of).collect::<Result<_, _>>()?,
        next,
    })
}

fn fetch_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1
}

/// A table of documents with an etag under one text key (and, for enrollments, a kind): the
/// conditional writes and deletes every such table shares.
struct Docs {
    table: &'static str,
    key: &'static str,
    /// The enrollment kind (`kind` column) for enrollments; none for other tables.
    kind: Option<&'static str>,
    /// What messages call one (`enrollment 'x'` …), by key.
    what: String,
}

impl Docs {
    fn enrollments(kind: EnrollmentKind, key: &str) -> Self {
        Self {
            table: "enrollments",
            key: "id_key",
            kind: Some(kind_tag(kind)),
            what: format!("{} '{key}'", kind.label()),
        }
    }

    fn certificates(key: &str) -> Self {
        Self {
            table: "certificates",
            key: "name_key",
            kind: None,
            what: format!("certificate '{key}'"),
        }
    }

    fn registrations(key: &str) -> Self {
        Self {
            table: "registrations",
            key: "id_key",
            kind: None,
            what: format!("registration '{key}'"),
        }
    }

    /// `kind = '…' AND ` for enrollments (a constant of this file), empty otherwise.
    fn scope(&self) -> String {
        self.kind
            .map(|kind| format!("kind = '{kind}' AND "))
            .unwrap_or_default()
    }

    /// Why an update or delete of `key` under `cond` touched no row.
    async fn why_not(&self, conn: &mut PgConnection, key: &str, cond: &Precondition) -> StoreError {
        let sql = format!(
            "SELECT 1 FROM {} WHERE {}{} = $1",
            self.table,
            self.scope(),
            self.key
        );
        match sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(conn)
            .await
        {
            Ok(None) => StoreError::NotFound(self.what.clone()),
            Ok(Some(_)) if matches!(cond, Precondition::EtagIs(_)) => {
                StoreError::EtagMismatch(self.what.clone())
            }
            Ok(Some(_)) => StoreError::Backend(Internal::new(format!(
                "{} changed while it was written",
                self.what
            ))),
            Err(e) => backend("checking a precondition")(e),
        }
    }

    /// Deletes `key` if `cond` holds; `NotFound` if absent.
    async fn delete(
        &self,
        conn: &mut PgConnection,
        key: &str,
        cond: &Precondition,
    ) -> Result<(), StoreError> {
        let deleted = match cond {
            // A delete that wants the document absent deletes nothing: it is found or not.
            Precondition::MustNotExist => {
                return Err(match self.why_not(conn, key, &Precondition::None).await {
                    StoreError::NotFound(what) => StoreError::NotFound(what),
                    _ => StoreError::AlreadyExists(self.what.clone()),
                });
            }
            Precondition::EtagIs(etag) => {
                let sql = format!(
                    "DELETE FROM {} WHERE {}{} = $1 AND etag = $2",
                    self.table,
                    self.scope(),
                    self.key
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(key)
                    .bind(etag.as_str())
                    .execute(&mut *conn)
                    .await
            }
            Precondition::None => {
                let sql = format!(
                    "DELETE FROM {} WHERE {}{} = $1",
                    self.table,
                    self.scope(),
                    self.key
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(key)
                    .execute(&mut *conn)
                    .await
            }
        }
        .map_err(backend("deleting"))?;
        match deleted.rows_affected() {
            0 => Err(self.why_not(conn, key, cond).await),
            _ => Ok(()),
        }
    }
}

/// The statement writing a document of `docs` under `cond` (without a `RETURNING` clause), with
/// `extra` naming one more column written with it (a registration's group). Its parameters are
/// numbered from 1 in the order [`bind_doc`] binds them: [kind,] key, [extra,] etag, doc, and for
/// `EtagIs` the etag to match. A condition that does not hold writes no row. Returns the statement
/// and its number of parameters.
fn doc_write_sql(docs: &Docs, extra: Option<&str>, cond: &Precondition) -> (String, usize) {
    let mut columns = Vec::new();
    if docs.kind.is_some() {
        columns.push("kind");
    }
    columns.push(docs.key);
    if let Some(column) = extra {
        columns.push(column);
    }
    columns.extend(["etag", "doc"]);
    let values: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let conflict = if docs.kind.is_some() {
        format!("kind, {}", docs.key)
    } else {
        docs.key.to_owned()
    };
    let mut updated: Vec<&str> = Vec::new();
    if let Some(column) = extra {
        updated.push(column);
    }
    updated.extend(["etag", "doc"]);
    let set = updated
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        docs.table,
        columns.join(", "),
        values.join(", ")
    );
    let sql = match cond {
        Precondition::None => format!("{insert} ON CONFLICT ({conflict}) DO UPDATE SET {set}"),
        Precondition::MustNotExist => format!("{insert} ON CONFLICT ({conflict}) DO NOTHING"),
        Precondition::EtagIs(_) => {
            // An update of the row that has the expected etag; the etag to match comes last.
            let assignments = updated
                .iter()
                .map(|c| {
                    let at = columns.iter().position(|x| x == c).unwrap_or(0) + 1;
                    format!("{c} = ${at}")
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "UPDATE {} SET {assignments} WHERE {}{} = ${} AND etag = ${}",
                docs.table,
                docs.scope(),
                docs.key,
                columns.iter().position(|c| *c == docs.key).unwrap_or(0) + 1,
                columns.len() + 1
            )
        }
    };
    let params = columns.len() + usize::from(matches!(cond, Precondition::EtagIs(_)));
    (sql, params)
}

/// Binds the parameters of [`doc_write_sql`], in its order.
fn bind_doc<'q>(
    mut query: Query<'q, Postgres, PgArguments>,
    docs: &Docs,
    key: &'q str,
    extra: Option<Option<&'q str>>,
    doc: &'q StoredDoc,
    cond: &'q Precondition,
) -> Query<'q, Postgres, PgArguments> {
    if let Some(kind) = docs.kind {
        query = query.bind(kind);
    }
    query = query.bind(key);
    if let Some(value) = extra {
        query = query.bind(value);
    }
    query = query.bind(doc.etag.as_str()).bind(&doc.doc);
    if let Precondition::EtagIs(etag) = cond {
        query = query.bind(etag.as_str());
    }
    query
}

/// Writes `doc` under `key` in `docs` if `cond` holds (see [`doc_write_sql`]).
async fn put_doc(
    conn: &mut PgConnection,
    docs: &Docs,
    key: &str,
    extra: Option<(&str, Option<&str>)>,
    doc: &StoredDoc,
    cond: &Precondition,
) -> Result<(), StoreError> {
    let (sql, _) = doc_write_sql(docs, extra.map(|(c, _)| c), cond);
    let query = bind_doc(
        sqlx::query(AssertSqlSafe(sql)),
        docs,
        key,
        extra.map(|(_, v)| v),
        doc,
        cond,
    );
    let written = query
        .execute(&mut *conn)
        .await
        .map_err(backend("writing"))?;
    if written.rows_affected() > 0 {
        return Ok(());
    }
    Err(why_not_written(conn, docs, key, cond).await)
}

/// Why a conditional write wrote nothing.
async fn why_not_written(
    conn: &mut PgConnection,
    docs: &Docs,
    key: &str,
    cond: &Precondition,
) -> StoreError {
    match cond {
        Precondition::MustNotExist => StoreError::AlreadyExists(docs.what.clone()),
        _ => docs.why_not(conn, key, cond).await,
    }
}

/// A listener on this schema's channels: work and changes.
async fn listen_to_other_nodes(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    let (work, changes): (String, String) =
        sqlx::query_as("SELECT $1 || current_schema(), $2 || current_schema()")
            .bind(WORK_CHANNEL)
            .bind(CHANGE_CHANNEL)
            .fetch_one(pool)
            .await?;
    listener
        .listen_all([work.as_str(), changes.as_str()])
        .await?;
    Ok(listener)
}

/// Announces, when the transaction `conn` is in commits, that enrollments or linked hubs changed.
async fn announce_change(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1 || current_schema(), '')")
        .bind(CHANGE_CHANNEL)
        .execute(conn)
        .await
        .map_err(backend("announcing a change"))?;
    Ok(())
}

/// Writes a registration state, with the group it came through, if `cond` holds.
async fn put_registration(
    conn: &mut PgConnection,
    key: &str,
    group_key: Option<&str>,
    doc: &StoredDoc,
    cond: &Precondition,
) -> Result<(), StoreError> {
    let docs = Docs::registrations(key);
    put_doc(conn, &docs, key, Some(("group_key", group_key)), doc, cond).await
}

/// The statement that inserts or replaces an operation (releasing any lease on it), as a `WITH`
/// clause named `op` that returns whether it is pending (then the caller announces it once
/// committed: see [`Announcer`]). Its parameters are numbered from `first`: operation id,
/// registration key, pending, next attempt, updated, document.
fn operation_write_sql(first: usize) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "op AS (
             INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms, lease_owner, lease_incarnation, lease_until_ms, updated_ms, doc)
             SELECT {}, {}, {}, {}, NULL, NULL, NULL, {}, {} FROM written
             ON CONFLICT (operation_id) DO UPDATE SET pending = excluded.pending, next_attempt_ms = excluded.next_attempt_ms,
                 lease_owner = NULL, lease_incarnation = NULL, lease_until_ms = NULL, updated_ms = excluded.updated_ms, doc = excluded.doc
             RETURNING pending)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
    )
}

/// A new operation leased to its node (`$1`…`$9`: id, registration key, pending, next attempt,
/// lease owner, incarnation, lease end, time, document) with `$rows` as its row, and the device's
/// registration as the statement's snapshot has it.
macro_rules! insert_leased {
    ($rows:literal) => {
        concat!(
            "WITH inserted AS (
               INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms,
                 lease_owner, lease_incarnation, lease_until_ms, updated_ms, doc) ",
            $rows,
            ") SELECT etag, doc FROM registrations WHERE id_key = $2"
        )
    };
}

/// [`insert_leased!`], committed as the session commits.
const INSERT_LEASED: &str = insert_leased!("VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");

/// [`insert_leased!`], committed without waiting for its flush (`synchronous_commit` off for its
/// own transaction only).
const INSERT_LEASED_UNFLUSHED: &str = insert_leased!(
    "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
     FROM (SELECT set_config('synchronous_commit', 'off', true)) AS deferred"
);

/// Binds the parameters of [`operation_write_sql`].
fn bind_operation<'q>(
    query: Query<'q, Postgres, PgArguments>,
    op: &'q StoredOperation,
    now_ms: i64,
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(&op.operation_id)
        .bind(&op.registration_key)
        .bind(op.pending)
        .bind(op.next_attempt_ms)
        .bind(now_ms)
        .bind(&op.doc)
}

fn operation_of(row: &PgRow) -> Result<StoredOperation, StoreError> {
    let read = backend("reading an operation");
    Ok(StoredOperation {
        operation_id: row.try_get("operation_id").map_err(&read)?,
        registration_key: row.try_get("registration_key").map_err(&read)?,
        pending: row.try_get("pending").map_err(&read)?,
        next_attempt_ms: row.try_get("next_attempt_ms").map_err(&read)?,
        doc: row.try_get("doc").map_err(&read)?,
    })
}

impl PgStore {
    /// Runs `f` on a connection, kept for the next statement when `f` succeeds (see
    /// [`WarmPool`]).
    async fn run<R>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conns.run(f, backend("connecting to PostgreSQL")).await
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        self.conns
            .pool()
            .begin()
            .await
            .map_err(backend("starting a transaction"))
    }

    /// Commits a change of enrollments or linked hubs, announcing it to every node (delivered at
    /// the commit), and forgets what this node kept of them.
    async fn commit_change(
        &self,
        mut tx: sqlx::Transaction<'static, Postgres>,
    ) -> Result<(), StoreError> {
        announce_change(&mut tx).await?;
        let committed = tx.commit().await.map_err(backend("committing"));
        self.cache.clear();
        committed
    }
}

#[async_trait]
impl EnrollmentStore for PgStore {
    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let docs = Docs::enrollments(kind, key);
        put_doc(&mut tx, &docs, key, None, &doc, &cond).await?;
        self.commit_change(tx).await
    }

    async fn get_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
    ) -> Result<Option<StoredDoc>, StoreError> {
        let kind = kind_tag(kind);
        let list = |limit| self.versions(kind, limit);
        let fetch = async || {
            self.run(async |c| {
                sqlx::query("SELECT etag, doc FROM enrollments WHERE kind = $1 AND id_key = $2")
                    .bind(kind)
                    .bind(key)
                    .fetch_optional(c)
                    .await
                    .map_err(backend("reading an enrollment"))
            })
            .await?
            .as_ref()
            .map(doc_of)
            .transpose()
        };
        self.cache.enrollment_or(kind, key, list, fetch).await
    }

    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        Docs::enrollments(kind, key)
            .delete(&mut tx, key, &cond)
            .await?;
        self.commit_change(tx).await
    }

    async fn list_enrollments(
        &self,
        kind: EnrollmentKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError> {
        let rows = self
            .run(async |c| {
                sqlx::query(
                    "SELECT id_key, etag, doc FROM enrollments WHERE kind = $1 AND id_key > $2
                     ORDER BY id_key LIMIT $3",
                )
                .bind(kind_tag(kind))
                .bind(after.unwrap_or(""))
                .bind(fetch_limit(limit))
                .fetch_all(c)
                .await
                .map_err(backend("listing enrollments"))
            })
            .await?;
        page_of(&rows, "id_key", limit)
    }

    async fn enrollment_versions(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<(String, Etag)>, StoreError> {
        let kind = kind_tag(kind);
        self.cache
            .versions_or(kind, |limit| self.versions(kind, limit))
            .await
    }
}

impl PgStore {
    /// The key and etag of each enrollment of `kind`, in key order; at most `limit` (and one
    /// more, to tell that there are more).
    async fn versions(
        &self,
        kind: &'static str,
        limit: Option<usize>,
    ) -> Result<Vec<(String, Etag)>, StoreError> {
        let rows: Vec<(String, String)> = self
            .run(async |c| {
                sqlx::query_as(
                    "SELECT id_key, etag FROM enrollments
                     WHERE kind = $1 ORDER BY id_key LIMIT $2",
                )
                .bind(kind)
                .bind(limit.map(fetch_limit))
                .fetch_all(c)
                .await
                .map_err(backend("listing enrollment versions"))
            })
            .await?;
        Ok(rows.into_iter().map(|(k, e)| (k, Etag::new(e))).collect())
    }
}

#[async_trait]
impl RegistrationStore for PgStore {
    async fn put_registration(
        &self,
        key: &str,
        group_key: Option<&str>,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        self.run(async |c| put_registration(c, key, group_key, &doc, &cond).await)
            .await
    }

    async fn get_registration(&self, key: &str) -> Result<Option<StoredDoc>, StoreError> {
        self.run(async |c| {
            sqlx::query("SELECT etag, doc FROM registrations WHERE id_key = $1")
                .bind(key)
                .fetch_optional(c)
                .await
                .map_err(backend("reading a registration"))
        })
        .await?
        .as_ref()
        .map(doc_of)
        .transpose()
    }

    async fn delete_registration(&self, key: &str, cond: Precondition) -> Result<(), StoreError> {
        self.run(async |c| Docs::registrations(key).delete(c, key, &cond).await)
            .await
    }

    async fn list_registrations_by_group(
        &self,
        group_key: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError> {
        let rows = self
            .run(async |c| {
                sqlx::query(
                    "SELECT id_key, etag, doc FROM registrations
                     WHERE group_key = $1 AND id_key > $2 ORDER BY id_key LIMIT $3",
                )
                .bind(group_key)
                .bind(after.unwrap_or(""))
                .bind(fetch_limit(limit))
                .fetch_all(c)
                .await
                .map_err(backend("listing registrations"))
            })
            .await?;
        page_of(&rows, "id_key", limit)
    }
}

#[async_trait]
impl LinkedHubStore for PgStore {
    async fn put_linked_hub(&self, hub: &LinkedHub) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO linked_hubs (host_name, doc) VALUES ($1, $2)
             ON CONFLICT (host_name) DO UPDATE SET doc = excluded.doc",
        )
        .bind(&hub.host_name)
        .bind(to_json(hub)?)
        .execute(&mut *tx)
        .await
        .map_err(backend("writing a linked hub"))?;
        self.commit_change(tx).await
    }

    async fn list_linked_hubs(&self) -> Result<Vec<LinkedHub>, StoreError> {
        self.cache
            .linked_hubs_or(async || {
                let docs: Vec<String> = self
                    .run(async |c| {
                        sqlx::query_scalar("SELECT doc FROM linked_hubs ORDER BY host_name")
                            .fetch_all(c)
                            .await
                            .map_err(backend("listing linked hubs"))
                    })
                    .await?;
                docs.iter().map(|d| from_json(d)).collect()
            })
            .await
    }

    async fn delete_linked_hub(&self, host_name: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let deleted = sqlx::query("DELETE FROM linked_hubs WHERE host_name = $1")
            .bind(host_name)
            .execute(&mut *tx)
            .await
            .map_err(backend("deleting a linked hub"))?;
        match deleted.rows_affected() {
            0 => Err(StoreError::NotFound(format!("linked hub '{host_name}'"))),
            _ => self.commit_change(tx).await,
        }
    }
}

#[async_trait]
impl CertificateStore for PgStore {
    async fn put_certificate(
        &self,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        self.run(async |c| put_doc(c, &Docs::certificates(key), key, None, &doc, &cond).await)
            .await
    }

    async fn get_certificate(&self, key: &str) -> Result<Option<StoredDoc>, StoreError> {
        self.run(async |c| {
            sqlx::query("SELECT etag, doc FROM certificates WHERE name_key = $1")
                .bind(key)
                .fetch_optional(c)
                .await
                .map_err(backend("reading a certificate"))
        })
        .await?
        .as_ref()
        .map(doc_of)
        .transpose()
    }

    async fn list_certificates(&self) -> Result<Vec<StoredDoc>, StoreError> {
        let rows = self
            .run(async |c| {
                sqlx::query("SELECT etag, doc FROM certificates ORDER BY name_key")
                    .fetch_all(c)
                    .await
                    .map_err(backend("listing certificates"))
            })
            .await?;
        rows.iter().map(doc_of).collect()
    }

    async fn delete_certificate(&self, key: &str, cond: Precondition) -> Result<(), StoreError> {
        self.run(async |c| Docs::certificates(key).delete(c, key, &cond).await)
            .await
    }
}

#[async_trait]
impl IdentityStore for PgStore {
    async fn init_identity(
        &self,
        candidate: &ServiceIdentity,
    ) -> Result<ServiceIdentity, StoreError> {
        let doc = to_json(candidate)?;
        let stored: String = self
            .run(async |c| {
                sqlx::query(
                    "INSERT INTO service_identity (id, doc) VALUES (1, $1)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(doc)
                .execute(&mut *c)
                .await
                .map_err(backend("writing the service identity"))?;
                sqlx::query_scalar("SELECT doc FROM service_identity WHERE id = 1")
                    .fetch_one(c)
                    .await
                    .map_err(backend("reading the service identity"))
            })
            .await?;
        from_json(&stored)
    }

    async fn identity(&self) -> Result<Option<ServiceIdentity>, StoreError> {
        let doc: Option<String> = self
            .run(async |c| {
                sqlx::query_scalar("SELECT doc FROM service_identity WHERE id = 1")
                    .fetch_optional(c)
                    .await
                    .map_err(backend("reading the service identity"))
            })
            .await?;
        doc.map(|d| from_json(&d)).transpose()
    }
}

#[async_trait]
impl OperationStore for PgStore {
    async fn put_operation(&self, op: &StoredOperation) -> Result<(), StoreError> {
        let sql = format!(
            "WITH written AS (SELECT 1), {} SELECT count(*) FROM op",
            operation_write_sql(1)
        );
        let now = self.clock.now().as_millisecond();
        self.run(async |c| {
            bind_operation(sqlx::query(AssertSqlSafe(sql)), op, now)
                .execute(c)
                .await
                .map_err(backend("writing an operation"))
        })
        .await?;
        self.own.written(op, now);
        if op.pending {
            self.announcer.announce();
        }
        Ok(())
    }

    async fn put_leased_operation(
        &self,
        op: &StoredOperation,
        owner: &LeaseOwner,
        until_ms: i64,
        durability: Durability,
    ) -> Result<Option<StoredDoc>, StoreError> {
        // No announcement: the work is this node's, and others see it when the lease runs out.
        // One round trip: the insert, and the registration read from the statement's snapshot
        // (the insert runs whether or not its output is read). A deferred insert turns off
        // `synchronous_commit` for its own transaction only: it commits without waiting for its
        // flush, which the next durable commit of any session does (the log is flushed in order).
        let now = self.clock.now().as_millisecond();
        let sql = match durability {
            Durability::Now => INSERT_LEASED,
            Durability::Deferred => INSERT_LEASED_UNFLUSHED,
        };
        let registration = self
            .run(async |c| {
                sqlx::query(sql)
                    .bind(&op.operation_id)
                    .bind(&op.registration_key)
                    .bind(op.pending)
                    .bind(op.next_attempt_ms)
                    .bind(&owner.node)
                    .bind(&owner.incarnation)
                    .bind(until_ms)
                    .bind(now)
                    .bind(&op.doc)
                    .fetch_optional(c)
                    .await
                    .map_err(backend("writing an operation"))
            })
            .await?;
        self.own.leased(op, now, until_ms);
        registration.as_ref().map(doc_of).transpose()
    }

    async fn make_durable(&self, operation_id: &str) -> Result<(), StoreError> {
        // A durable commit waits until the log is flushed up to it, which covers every commit
        // before it; only a transaction that wrote something commits durably (an id alone is not
        // enough), so the operation's row is written again as it is. A row already gone was
        // finished, by a durable commit.
        self.run(async |c| {
            sqlx::query("UPDATE operations SET updated_ms = updated_ms WHERE operation_id = $1")
                .bind(operation_id)
                .execute(c)
                .await
                .map_err(backend("flushing an operation"))
        })
        .await?;
        Ok(())
    }

    async fn put_registration_and_operation(
        &self,
        key: &str,
        group_key: Option<&str>,
        doc: StoredDoc,
        cond: Precondition,
        op: &StoredOperation,
    ) -> Result<(), StoreError> {
        // One statement, so one transaction and one round trip: the registration under its
        // condition, then the operation only if the registration was written.
        let now = self.clock.now().as_millisecond();
        let docs = Docs::registrations(key);
        let (registration, params) = doc_write_sql(&docs, Some("group_key"), &cond);
        let sql = format!(
            "WITH written AS ({registration} RETURNING 1), {}
             SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM op WHERE pending)",
            operation_write_sql(params + 1)
        );
        let query = bind_doc(
            sqlx::query(AssertSqlSafe(sql)),
            &docs,
            key,
            Some(group_key),
            &doc,
            &cond,
        );
        self.run(async |c| {
            let (written, pending): (i64, i64) = bind_operation(query, op, now)
                .try_map(|row: PgRow| Ok((row.try_get(0)?, row.try_get(1)?)))
                .fetch_one(&mut *c)
                .await
                .map_err(backend("writing a registration and its operation"))?;
            if pending > 0 {
                self.announcer.announce();
            }
            if written > 0 {
                self.own.written(op, now);
                return Ok(());
            }
            Err(why_not_written(c, &docs, key, &cond).await)
        })
        .await
    }

    async fn get_operation(
        &self,
        operation_id: &str,
    ) -> Result<Option<StoredOperation>, StoreError> {
        if let Some(op) = self
            .own
            .get(operation_id, self.clock.now().as_millisecond())
        {
            return Ok(Some(op));
        }
        self.run(async |c| {
            sqlx::query(
                "SELECT operation_id, registration_key, pending, next_attempt_ms, doc
                 FROM operations WHERE operation_id = $1",
            )
            .bind(operation_id)
            .fetch_optional(c)
            .await
            .map_err(backend("reading an operation"))
        })
        .await?
        .as_ref()
        .map(operation_of)
        .transpose()
    }

    async fn claim_operations(
        &self,
        owner: &LeaseOwner,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredOperation>, StoreError> {
        // Rows another node is claiming right now are skipped, not waited for: each due
        // operation goes to exactly one claimer.
        let rows = self
            .run(async |c| {
                sqlx::query(
                    "UPDATE operations
                     SET lease_owner = $1, lease_incarnation = $5, lease_until_ms = $2
                     WHERE operation_id IN (
                         SELECT operation_id FROM operations
                         WHERE pending AND next_attempt_ms <= $3
                           AND (lease_until_ms IS NULL OR lease_until_ms < $3
                                OR (lease_owner = $1 AND lease_incarnation IS DISTINCT FROM $5))
                         ORDER BY next_attempt_ms LIMIT $4
                         FOR UPDATE SKIP LOCKED)
                     RETURNING operation_id, registration_key, pending, next_attempt_ms, doc",
                )
                .bind(&owner.node)
                .bind(now.saturating_add(lease_ms))
                .bind(now)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind(&owner.incarnation)
                .fetch_all(c)
                .await
                .map_err(backend("claiming operations"))
            })
            .await?;
        let mut claimed = rows
            .iter()
            .map(operation_of)
            .collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|op| op.next_attempt_ms);
        Ok(claimed)
    }

    async fn renew_lease(
        &self,
        owner: &LeaseOwner,
        operation_id: &str,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let renewed = self
            .run(async |c| {
                sqlx::query(
                    "UPDATE operations SET lease_until_ms = $1
                     WHERE operation_id = $2 AND pending AND lease_owner = $3 AND lease_incarnation = $4",
                )
                .bind(until_ms)
                .bind(operation_id)
                .bind(&owner.node)
                .bind(&owner.incarnation)
                .execute(c)
                .await
                .map_err(backend("renewing a lease"))
            })
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn prune_operations(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        self.own.prune(before_ms);
        let deleted = self
            .run(async |c| {
                sqlx::query(
                    "DELETE FROM operations WHERE operation_id IN (
                     SELECT operation_id FROM operations WHERE NOT pending AND updated_ms < $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
                )
                .bind(before_ms)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .execute(c)
                .await
                .map_err(backend("pruning operations"))
            })
            .await?;
        Ok(usize::try_from(deleted.rows_affected()).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use pg_schema::testing::TestSchema as Schema;

    async fn fresh() -> (Schema, Arc<dyn dps_core::store::Store>) {
        let schema = Schema::create("contract").await;
        let store = PgStore::connect(schema.options()).await.expect("connect");
        (schema, Arc::new(store))
    }

    crate::contract_tests!(fresh().await);

    #[test]
    fn a_location_is_described_without_its_password_and_with_its_socket() {
        let at = |url: &str| {
            PgLocation {
                url: url.to_owned(),
                password: None,
            }
            .describe()
        };
        assert_eq!(
            at("postgres://opendps:s3cret@db.example.net:5433/fleet?sslmode=require"),
            "opendps@db.example.net:5433/fleet"
        );
        assert_eq!(
            at("postgres://opendps@localhost/fleet?host=/var/run/postgresql"),
            "opendps@/var/run/postgresql:5432/fleet"
        );
    }

    fn op(id: usize) -> StoredOperation {
        StoredOperation {
            operation_id: format!("op-{id:04}"),
            registration_key: format!("dev-{id:04}"),
            pending: true,
            next_attempt_ms: 0,
            doc: "{}".into(),
        }
    }

    /// Two nodes on one database claiming the same due operations at once: each goes to exactly
    /// one of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_never_claim_the_same_operation() {
        let schema = Schema::create("contract").await;
        let a = PgStore::connect(schema.options()).await.expect("node a");
        let b = PgStore::connect(schema.options()).await.expect("node b");
        for id in 0..300 {
            a.put_operation(&op(id)).await.expect("put");
        }
        let claim_all = |store: PgStore, node: &'static str| async move {
            let owner = LeaseOwner::new(node);
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim_operations(&owner, 1_000, 60_000, 7)
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    break mine;
                }
                mine.extend(batch.into_iter().map(|o| o.operation_id));
            }
        };
        let (from_a, from_b) = tokio::join!(
            tokio::spawn(claim_all(a.clone(), "a")),
            tokio::spawn(claim_all(b.clone(), "b"))
        );
        let (from_a, from_b) = (from_a.expect("a"), from_b.expect("b"));
        let mut all: Vec<_> = from_a.iter().chain(&from_b).cloned().collect();
        all.sort();
        let total = all.len();
        all.dedup();
        assert_eq!(total, 300, "claimed {total} for 300 operations");
        assert_eq!(all.len(), 300, "an operation was claimed by both nodes");
        assert!(
            !from_a.is_empty() && !from_b.is_empty(),
            "one node got nothing: the test shows nothing"
        );
    }

    /// `node` watching the other nodes, once it listens (the first wake says so): what wakes it,
    /// and the watcher.
    async fn watching(node: &PgStore) -> (Arc<tokio::sync::Notify>, tokio::task::JoinHandle<()>) {
        let wake = Arc::new(tokio::sync::Notify::new());
        let watcher = node.watch_work(Arc::clone(&wake));
        tokio::time::timeout(Duration::from_secs(10), wake.notified())
            .await
            .expect("listening");
        (wake, watcher)
    }

    /// Closes `node` and checks that its watcher ends with it.
    async fn closed(node: &PgStore, watcher: tokio::task::JoinHandle<()>) {
        node.close().await;
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends with its store")
            .expect("join");
    }

    /// Work recorded by one node wakes the others' workers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_work_wakes_every_node() {
        let schema = Schema::create("contract").await;
        let a = PgStore::connect(schema.options()).await.expect("node a");
        let b = PgStore::connect(schema.options()).await.expect("node b");
        let (wake, watcher) = watching(&b).await;
        a.put_operation(&op(1)).await.expect("put");
        tokio::time::timeout(Duration::from_secs(10), wake.notified())
            .await
            .expect("node b is woken by node a's work");
        // Finished work wakes nobody.
        a.put_operation(&StoredOperation {
            pending: false,
            ..op(1)
        })
        .await
        .expect("finish");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), wake.notified())
                .await
                .is_err(),
            "a finished operation woke a node"
        );
        closed(&b, watcher).await;
    }

    /// Lookups of individual enrollments answer alike whether the kind's enrollments are few
    /// enough to list (absences told from the list) or too many (each lookup reads the row).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_answer_alike_listed_or_not() {
        use dps_core::store::EnrollmentKind::Individual;
        let schema = Schema::create("contract").await;
        let store = PgStore::connect(schema.options()).await.expect("open");
        let node = PgStore {
            cache: Arc::new(ReadCache::listing_at_most(2)),
            ..store.clone()
        };
        let (_, watcher) = watching(&node).await;
        let v = crate::contract::doc(r#"{"v":1}"#);
        for (count, id) in ["a", "b", "c"].into_iter().enumerate() {
            // The node lists the enrollments (or finds them too many) ...
            assert_eq!(
                node.get_enrollment(Individual, "missing")
                    .await
                    .expect("read"),
                None
            );
            assert!(
                node.cache.listed("individual").is_ok(),
                "listed or too many"
            );
            store
                .put_enrollment(Individual, id, v.clone(), Precondition::MustNotExist)
                .await
                .expect("create");
            // ... and forgets that when it hears of the change.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while node.cache.listed("individual").is_ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the change was not heard"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for (seen, present) in [
                (id, true),
                ("a", true),
                ("b", count >= 1),
                ("missing", false),
            ] {
                assert_eq!(
                    node.get_enrollment(Individual, seen).await.expect("read"),
                    present.then(|| v.clone()),
                    "{seen} with {} enrollments",
                    count + 1
                );
            }
        }
        assert_eq!(
            node.cache.listed("individual").ok(),
            Some(true),
            "three are too many to list"
        );
        closed(&node, watcher).await;
    }

    /// A node keeps the enrollments and linked hubs it read while it hears changes, and follows
    /// every change: made through another node soon after it commits, made through itself at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_enrollments_follow_changes_made_anywhere() {
        use dps_core::store::EnrollmentKind::{Group, Individual};
        let schema = Schema::create("contract").await;
        let a = PgStore::connect(schema.options()).await.expect("node a");
        let b = PgStore::connect(schema.options()).await.expect("node b");
        let (wake, watcher) = watching(&b).await;
        // Announcements reach node b in commit order: once it is woken for work recorded after a
        // change, it has heard the change.
        let settled = |n: usize| {
            let (a, wake) = (a.clone(), Arc::clone(&wake));
            async move {
                a.put_operation(&op(n)).await.expect("work");
                tokio::time::timeout(Duration::from_secs(10), wake.notified())
                    .await
                    .expect("node b hears node a");
            }
        };
        let v1 = crate::contract::doc(r#"{"v":1}"#);
        a.put_enrollment(Group, "g", v1.clone(), Precondition::MustNotExist)
            .await
            .expect("create");
        settled(1).await;
        assert_eq!(
            b.get_enrollment(Group, "g").await.expect("read"),
            Some(v1.clone())
        );
        assert_eq!(
            b.get_enrollment(Individual, "dev").await.expect("read"),
            None
        );
        // Kept: a row removed behind the store's back (no announcement) is still answered.
        sqlx::query("DELETE FROM enrollments WHERE id_key = 'g'")
            .execute(a.pool())
            .await
            .expect("delete behind its back");
        assert_eq!(
            b.get_enrollment(Group, "g").await.expect("read"),
            Some(v1.clone())
        );

        // Changes through node a reach node b.
        let v2 = crate::contract::doc(r#"{"v":2}"#);
        a.put_enrollment(Group, "g", v2.clone(), Precondition::None)
            .await
            .expect("update");
        a.put_enrollment(Individual, "dev", v2.clone(), Precondition::MustNotExist)
            .await
            .expect("individual");
        a.put_linked_hub(&crate::contract::sample_hub("h.example", 1))
            .await
            .expect("link");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = (
                b.get_enrollment(Group, "g").await.expect("read"),
                b.get_enrollment(Individual, "dev").await.expect("read"),
                b.list_linked_hubs().await.expect("hubs").len(),
            );
            if seen == (Some(v2.clone()), Some(v2.clone()), 1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node b still answers {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            b.enrollment_versions(Group).await.expect("versions"),
            vec![("g".to_owned(), v2.etag.clone())]
        );
        // Its own changes at once.
        b.delete_enrollment(Individual, "dev", Precondition::None)
            .await
            .expect("delete");
        assert_eq!(
            b.get_enrollment(Individual, "dev").await.expect("read"),
            None
        );
        b.delete_linked_hub("h.example").await.expect("unlink");
        assert!(b.list_linked_hubs().await.expect("hubs").is_empty());
        closed(&b, watcher).await;
    }

    /// Nodes starting at once on an empty database: one migrates, the others wait and find it done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_migrate_once() {
        let schema = Schema::create("contract").await;
        let starts = (0..4).map(|_| PgStore::connect(schema.options()));
        for started in futures_join_all(starts).await {
            started.expect("every node starts");
        }
    }

    /// A database migrated by a newer opendps is refused, and left as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_schema_is_refused() {
        let schema = Schema::create("contract").await;
        let store = PgStore::connect(schema.options()).await.expect("connect");
        sqlx::query("UPDATE opendps_schema SET version = 99 WHERE name = 'opendps'")
            .execute(store.pool())
            .await
            .expect("pretend a newer version");
        let refused = PgStore::connect(schema.options())
            .await
            .err()
            .expect("a newer schema is refused");
        assert!(refused.to_string().contains("storage backend"), "{refused}");
        let StoreError::Backend(cause) = refused else {
            panic!("not a backend error");
        };
        assert!(
            cause.chain().contains("upgrade opendps"),
            "{}",
            cause.chain()
        );
        let version: i32 = sqlx::query_scalar("SELECT version FROM opendps_schema")
            .fetch_one(store.pool())
            .await
            .expect("version");
        assert_eq!(version, 99);
    }

    /// Runs `futures` concurrently, each in its own task; their outputs in order.
    async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = futures.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for handle in handles {
            out.push(handle.await.expect("join"));
        }
        out
    }
}
