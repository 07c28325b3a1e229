//! The SQLite backend: one file in WAL mode, one writer thread that commits queued writes in groups,
//! and a small pool of reader connections.
//!
//! Group commit (`sqlite_commit::GroupCommit`): async callers send closures to the writer; it drains
//! its queue, runs each closure inside its own savepoint (so one failed write never spoils the
//! batch), commits once with a full fsync, and only then answers every caller. A reply therefore
//! always means "durable".
//!
//! The serving process is the file's only writer (it holds the data directory's lock; other
//! commands open the file read-only), so a writable store keeps the enrollments and linked hubs it
//! reads in memory (`read_cache`) and forgets them after each change it commits.

mod migrations;

use std::path::Path;
use std::sync::Arc;

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
use rusqlite::{Connection, OptionalExtension, params};
use sqlite_commit::{
    CachedStatements, CommitError, GroupCommit, ReaderPool, open_connection,
    open_read_only_connection,
};

use migrations::{SCHEMA, open_failed};

/// A SQLite-backed store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Option<GroupCommit>,
    readers: ReaderPool,
    /// Enrollments and linked hubs as last read; kept only by a writable store.
    cache: ReadCache,
    /// When writes happen (operations record when they were last written, for pruning).
    clock: Arc<dyn Clock>,
}

trait SqlResultExt<T> {
    fn backend(self) -> Result<T, StoreError>;
}

impl<T> SqlResultExt<T> for rusqlite::Result<T> {
    fn backend(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Backend(Internal::caused("SQLite", e)))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// Opens as [`SqliteStore::open`] does, with `clock` telling the time of writes.
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = SCHEMA
            .open(&path)
            .map_err(|e| open_failed(e, "migrating the schema"))?;
        let writer = GroupCommit::start(conn, "sqlite-writer")
            .map_err(|e| StoreError::Backend(Internal::caused("starting the writer thread", e)))?;
        let cache = ReadCache::default();
        cache.set_listening(true);
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Some(writer),
                readers: ReaderPool::new(&path, open_connection, None),
                cache,
                clock,
            }),
        })
    }

    /// Opens an existing database for reading only: no writer, no migration, no lock that could
    /// get in the way of the service that owns the file. Fails unless the schema is complete and
    /// no newer than this build's.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = SCHEMA
            .open_read_only(&path)
            .map_err(|e| open_failed(e, "opening the database"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: None,
                readers: ReaderPool::new(&path, open_read_only_connection, Some(conn)),
                // The serving process changes the file: nothing read here may be kept.
                cache: ReadCache::default(),
                clock: Arc::new(SystemClock),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.inner.readers.path()
    }

    /// Stops the writer after it has committed everything queued. Later writes fail.
    pub fn close(&self) {
        if let Some(writer) = &self.inner.writer {
            writer.close();
        }
    }

    /// Runs `f` in the writer's transaction; resolves once the batch holding it is committed.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let writer = self
            .inner
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::Backend(Internal::new("the store is read-only")))?;
        let started = std::time::Instant::now();
        let result = writer
            .write(move |conn| f(conn).map_err(WriteError))
            .await
            .map_err(|WriteError(err)| err);
        metrics::histogram!("opendps_store_duration_seconds", "kind" => "write")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// As [`SqliteStore::write`], for a change of enrollments or linked hubs: what was kept of
    /// them is forgotten once it is committed (or failed).
    async fn write_change<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let result = self.write(f).await;
        self.inner.cache.clear();
        result
    }

    /// The key and etag of each enrollment of `kind`, in key order; at most `limit` (and one
    /// more, to tell that there are more).
    async fn versions(
        &self,
        kind: &'static str,
        limit: Option<usize>,
    ) -> Result<Vec<(String, Etag)>, StoreError> {
        // A negative LIMIT is none.
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX - 1) + 1);
        self.read(move |conn| {
            let rows = conn
                .query_all_cached(
                    "SELECT id_key, etag FROM enrollments WHERE kind = ?1 ORDER BY id_key LIMIT ?2",
                    params![kind, limit],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .backend()?;
            Ok(rows
                .into_iter()
                .map(|(key, etag)| (key, Etag::new(etag)))
                .collect())
        })
        .await
    }

    /// Runs `f` on a reader connection, on the calling thread: reads are point lookups and short
    /// scans of a WAL database whose pages are cached, cheaper than a hop to the blocking pool.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let started = std::time::Instant::now();
        let result = self.inner.readers.read(f, |e| {
            StoreError::Backend(Internal::caused("opening a reader connection", e))
        });
        metrics::histogram!("opendps_store_duration_seconds", "kind" => "read")
            .record(started.elapsed().as_secs_f64());
        result
    }
}

/// The current etag of an enrollment, if it exists.
fn enrollment_etag(
    conn: &Connection,
    kind: EnrollmentKind,
    key: &str,
) -> Result<Option<String>, StoreError> {
    conn.query_row_cached(
        "SELECT etag FROM enrollments WHERE kind = ?1 AND id_key = ?2",
        params![kind_tag(kind), key],
        |r| r.get(0),
    )
    .optional()
    .backend()
}

/// The current etag of a registration state, if it exists.
fn registration_etag(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    conn.query_row_cached(
        "SELECT etag FROM registrations WHERE id_key = ?1",
        params![key],
        |r| r.get(0),
    )
    .optional()
    .backend()
}

/// Inserts or replaces a registration state if `cond` holds.
fn write_registration(
    conn: &Connection,
    key: &str,
    group_key: Option<&str>,
    doc: &StoredDoc,
    cond: &Precondition,
) -> Result<(), StoreError> {
    let current = registration_etag(conn, key)?;
    check(cond, current, &format!("registration '{key}'"))?;
    conn.execute_cached(
        "INSERT INTO registrations (id_key, group_key, etag, doc) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id_key) DO UPDATE SET group_key = excluded.group_key, etag = excluded.etag, doc = excluded.doc",
        params![key, group_key, doc.etag.as_str(), doc.doc],
    )
    .backend()?;
    Ok(())
}

/// Inserts a new operation leased to `owner` until `until_ms`.
fn insert_leased_operation(
    conn: &Connection,
    op: &StoredOperation,
    owner: &LeaseOwner,
    until_ms: i64,
    now_ms: i64,
) -> Result<(), StoreError> {
    conn.execute_cached(
        "INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms, lease_owner, lease_incarnation, lease_until_ms, updated_ms, doc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![op.operation_id, op.registration_key, op.pending, op.next_attempt_ms, owner.node, owner.incarnation, until_ms, now_ms, op.doc],
    )
    .backend()?;
    Ok(())
}

/// Inserts or replaces an operation, releasing any lease on it.
fn write_operation(conn: &Connection, op: &StoredOperation, now_ms: i64) -> Result<(), StoreError> {
    conn.execute_cached(
        "INSERT INTO operations (operation_id, registration_key, pending, next_attempt_ms, lease_owner, lease_until_ms, updated_ms, doc)
         VALUES (?1, ?2, ?3, ?4, NULL, NULL, ?5, ?6)
         ON CONFLICT (operation_id) DO UPDATE SET pending = excluded.pending, next_attempt_ms = excluded.next_attempt_ms,
             lease_owner = NULL, lease_incarnation = NULL, lease_until_ms = NULL, updated_ms = excluded.updated_ms, doc = excluded.doc",
        params![op.operation_id, op.registration_key, op.pending, op.next_attempt_ms, now_ms, op.doc],
    )
    .backend()?;
    Ok(())
}

/// A write's error as the writer thread carries it: `StoreError` lives in `dps-core`, so a failed
/// commit becomes one through this wrapper.
struct WriteError(StoreError);

impl From<CommitError> for WriteError {
    fn from(err: CommitError) -> Self {
        Self(StoreError::Backend(Internal::caused("committing", err)))
    }
}

/// Checks `cond` against the current etag (if any) of a document called `what`.
fn check(cond: &Precondition, current: Option<String>, what: &str) -> Result<(), StoreError> {
    match (cond, current) {
        (Precondition::None, _) | (Precondition::MustNotExist, None) => Ok(()),
        (Precondition::MustNotExist, Some(_)) => Err(StoreError::AlreadyExists(what.to_owned())),
        (Precondition::EtagIs(_), None) => Err(StoreError::NotFound(what.to_owned())),
        (Precondition::EtagIs(want), Some(have)) if want.as_str() == have => Ok(()),
        (Precondition::EtagIs(_), Some(_)) => Err(StoreError::EtagMismatch(what.to_owned())),
    }
}

fn page_of(rows: Vec<(String, StoredDoc)>, limit: usize) -> Page<StoredDoc> {
    let more = rows.len() > limit;
    let mut items: Vec<_> = rows.into_iter().take(limit).collect();
    let next = if more {
        items.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    Page {
        items: items.drain(..).map(|(_, d)| d).collect(),
        next,
    }
}

fn doc_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, StoredDoc)> {
    Ok((
        row.get(0)?,
        StoredDoc {
            etag: Etag::new(row.get::<_, String>(1)?),
            doc: row.get(2)?,
        },
    ))
}

#[async_trait]
impl EnrollmentStore for SqliteStore {
    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write_change(move |conn| {
            let current = enrollment_etag(conn, kind, &key)?;
            check(&cond, current, &format!("{} '{key}'", kind.label()))?;
            conn.execute_cached(
                "INSERT INTO enrollments (kind, id_key, etag, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, id_key) DO UPDATE SET etag = excluded.etag, doc = excluded.doc",
                params![kind_tag(kind), key, doc.etag.as_str(), doc.doc],
            )
            .backend()?;
            Ok(())
        })
        .await
    }

    async fn get_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
    ) -> Result<Option<StoredDoc>, StoreError> {
        let kind = kind_tag(kind);
        let list = |limit| self.versions(kind, limit);
        let fetch = || {
            let key = key.to_owned();
            self.read(move |conn| {
                conn.query_row_cached(
                    "SELECT id_key, etag, doc FROM enrollments WHERE kind = ?1 AND id_key = ?2",
                    params![kind, key],
                    doc_row,
                )
                .optional()
                .backend()
                .map(|r| r.map(|(_, d)| d))
            })
        };
        self.inner.cache.enrollment_or(kind, key, list, fetch).await
    }

    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        key: &str,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write_change(move |conn| {
            let what = format!("{} '{key}'", kind.label());
            let current: Option<String> = enrollment_etag(conn, kind, &key)?;
            if current.is_none() {
                return Err(StoreError::NotFound(what));
            }
            check(&cond, current, &what)?;
            conn.execute_cached(
                "DELETE FROM enrollments WHERE kind = ?1 AND id_key = ?2",
                params![kind_tag(kind), key],
            )
            .backend()?;
            Ok(())
        })
        .await
    }

    async fn list_enrollments(
        &self,
        kind: EnrollmentKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError> {
        let after = after.unwrap_or("").to_owned();
        self.read(move |conn| {
            let rows = conn
                .query_all_cached(
                    "SELECT id_key, etag, doc FROM enrollments WHERE kind = ?1 AND id_key > ?2 ORDER BY id_key LIMIT ?3",
                    params![kind_tag(kind), after, limit as i64 + 1],
                    doc_row,
                )
                .backend()?;
            Ok(page_of(rows, limit))
        })
        .await
    }

    async fn enrollment_versions(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<(String, Etag)>, StoreError> {
        let kind = kind_tag(kind);
        self.inner
            .cache
            .versions_or(kind, |limit| self.versions(kind, limit))
            .await
    }
}

#[async_trait]
impl RegistrationStore for SqliteStore {
    async fn put_registration(
        &self,
        key: &str,
        group_key: Option<&str>,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let (key, group_key) = (key.to_owned(), group_key.map(str::to_owned));
        self.write(move |conn| write_registration(conn, &key, group_key.as_deref(), &doc, &cond))
            .await
    }

    async fn get_registration(&self, key: &str) -> Result<Option<StoredDoc>, StoreError> {
        let key = key.to_owned();
        self.read(move |conn| {
            conn.query_row_cached(
                "SELECT id_key, etag, doc FROM registrations WHERE id_key = ?1",
                params![key],
                doc_row,
            )
            .optional()
            .backend()
            .map(|r| r.map(|(_, d)| d))
        })
        .await
    }

    async fn delete_registration(&self, key: &str, cond: Precondition) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |conn| {
            let what = format!("registration '{key}'");
            let current: Option<String> = registration_etag(conn, &key)?;
            if current.is_none() {
                return Err(StoreError::NotFound(what));
            }
            check(&cond, current, &what)?;
            conn.execute_cached("DELETE FROM registrations WHERE id_key = ?1", params![key])
                .backend()?;
            Ok(())
        })
        .await
    }

    async fn list_registrations_by_group(
        &self,
        group_key: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<StoredDoc>, StoreError> {
        let (group_key, after) = (group_key.to_owned(), after.unwrap_or("").to_owned());
        self.read(move |conn| {
            let rows = conn
                .query_all_cached(
                    "SELECT id_key, etag, doc FROM registrations WHERE group_key = ?1 AND id_key > ?2 ORDER BY id_key LIMIT ?3",
                    params![group_key, after, limit as i64 + 1],
                    doc_row,
                )
                .backend()?;
            Ok(page_of(rows, limit))
        })
        .await
    }
}

#[async_trait]
impl LinkedHubStore for SqliteStore {
    async fn put_linked_hub(&self, hub: &LinkedHub) -> Result<(), StoreError> {
        let (host, doc) = (hub.host_name.clone(), to_json(hub)?);
        self.write_change(move |conn| {
            conn.execute_cached(
                "INSERT INTO linked_hubs (host_name, doc) VALUES (?1, ?2)
                 ON CONFLICT (host_name) DO UPDATE SET doc = excluded.doc",
                params![host, doc],
            )
            .backend()?;
            Ok(())
        })
        .await
    }

    async fn list_linked_hubs(&self) -> Result<Vec<LinkedHub>, StoreError> {
        let fetch = || {
            self.read(|conn| {
                let docs = conn
                    .query_all_cached("SELECT doc FROM linked_hubs ORDER BY host_name", [], |r| {
                        r.get::<_, String>(0)
                    })
                    .backend()?;
                docs.iter().map(|d| from_json(d)).collect()
            })
        };
        self.inner.cache.linked_hubs_or(fetch).await
    }

    async fn delete_linked_hub(&self, host_name: &str) -> Result<(), StoreError> {
        let host = host_name.to_owned();
        self.write_change(move |conn| {
            match conn
                .execute_cached(
                    "DELETE FROM linked_hubs WHERE host_name = ?1",
                    params![host],
                )
                .backend()?
            {
                0 => Err(StoreError::NotFound(format!("linked hub '{host}'"))),
                _ => Ok(()),
            }
        })
        .await
    }
}

fn certificate_etag(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    conn.query_row_cached(
        "SELECT etag FROM certificates WHERE name_key = ?1",
        params![key],
        |r| r.get(0),
    )
    .optional()
    .backend()
}

#[async_trait]
impl CertificateStore for SqliteStore {
    async fn put_certificate(
        &self,
        key: &str,
        doc: StoredDoc,
        cond: Precondition,
    ) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |conn| {
            check(
                &cond,
                certificate_etag(conn, &key)?,
                &format!("certificate '{key}'"),
            )?;
            conn.execute_cached(
                "INSERT INTO certificates (name_key, etag, doc) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name_key) DO UPDATE SET etag = excluded.etag, doc = excluded.doc",
                params![key, doc.etag.as_str(), doc.doc],
            )
            .backend()?;
            Ok(())
        })
        .await
    }

    async fn get_certificate(&self, key: &str) -> Result<Option<StoredDoc>, StoreError> {
        let key = key.to_owned();
        self.read(move |conn| {
            conn.query_row_cached(
                "SELECT name_key, etag, doc FROM certificates WHERE name_key = ?1",
                params![key],
                doc_row,
            )
            .optional()
            .backend()
            .map(|r| r.map(|(_, d)| d))
        })
        .await
    }

    async fn list_certificates(&self) -> Result<Vec<StoredDoc>, StoreError> {
        self.read(|conn| {
            let rows = conn
                .query_all_cached(
                    "SELECT name_key, etag, doc FROM certificates ORDER BY name_key",
                    [],
                    doc_row,
                )
                .backend()?;
            Ok(rows.into_iter().map(|(_, d)| d).collect())
        })
        .await
    }

    async fn delete_certificate(&self, key: &str, cond: Precondition) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |conn| {
            let what = format!("certificate '{key}'");
            let current = certificate_etag(conn, &key)?;
            if current.is_none() {
                return Err(StoreError::NotFound(what));
            }
            check(&cond, current, &what)?;
            conn.execute_cached("DELETE FROM certificates WHERE name_key = ?1", params![key])
                .backend()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl IdentityStore for SqliteStore {
    async fn init_identity(
        &self,
        candidate: &ServiceIdentity,
    ) -> Result<ServiceIdentity, StoreError> {
        let doc = to_json(candidate)?;
        let stored: String = self
            .write(move |conn| {
                conn.execute_cached("INSERT INTO service_identity (id, doc) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING", params![doc])
                    .backend()?;
                conn.query_row_cached("SELECT doc FROM service_identity WHERE id = 1", [], |r| r.get(0)).backend()
            })
            .await?;
        from_json(&stored)
    }

    async fn identity(&self) -> Result<Option<ServiceIdentity>, StoreError> {
        let doc: Option<String> = self
            .read(|conn| {
                conn.query_row_cached("SELECT doc FROM service_identity WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()
                .backend()
            })
            .await?;
        doc.map(|d| from_json(&d)).transpose()
    }
}

fn operation_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredOperation> {
    Ok(StoredOperation {
        operation_id: row.get(0)?,
        registration_key: row.get(1)?,
        pending: row.get(2)?,
        next_attempt_ms: row.get(3)?,
        doc: row.get(4)?,
    })
}

#[async_trait]
impl OperationStore for SqliteStore {
    async fn put_operation(&self, op: &StoredOperation) -> Result<(), StoreError> {
        let (op, now) = (op.clone(), self.inner.clock.now().as_millisecond());
        self.write(move |conn| write_operation(conn, &op, now))
            .await
    }

    async fn put_leased_operation(
        &self,
        op: &StoredOperation,
        owner: &LeaseOwner,
        until_ms: i64,
        _durability: Durability,
    ) -> Result<Option<StoredDoc>, StoreError> {
        // Every commit here is durable: the group commit shares one fsync among many writes.
        let (op, owner, now) = (
            op.clone(),
            owner.clone(),
            self.inner.clock.now().as_millisecond(),
        );
        let key = op.registration_key.clone();
        self.write(move |conn| insert_leased_operation(conn, &op, &owner, until_ms, now))
            .await?;
        // On the calling thread, off the writer's: read after the insert, so never older than it.
        self.get_registration(&key).await
    }

    async fn make_durable(&self, _operation_id: &str) -> Result<(), StoreError> {
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
        let (key, group_key, op) = (key.to_owned(), group_key.map(str::to_owned), op.clone());
        let now = self.inner.clock.now().as_millisecond();
        self.write(move |conn| {
            write_registration(conn, &key, group_key.as_deref(), &doc, &cond)?;
            write_operation(conn, &op, now)
        })
        .await
    }

    async fn get_operation(
        &self,
        operation_id: &str,
    ) -> Result<Option<StoredOperation>, StoreError> {
        let id = operation_id.to_owned();
        self.read(move |conn| {
            conn.query_row_cached(
                "SELECT operation_id, registration_key, pending, next_attempt_ms, doc FROM operations WHERE operation_id = ?1",
                params![id],
                operation_row,
            )
            .optional()
            .backend()
        })
        .await
    }

    async fn claim_operations(
        &self,
        owner: &LeaseOwner,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredOperation>, StoreError> {
        let owner = owner.clone();
        self.write(move |conn| {
            conn.query_all_cached(
                    "UPDATE operations SET lease_owner = ?1, lease_incarnation = ?5, lease_until_ms = ?2
                     WHERE operation_id IN (
                         SELECT operation_id FROM operations
                         WHERE pending = 1 AND next_attempt_ms <= ?3
                           AND (lease_until_ms IS NULL OR lease_until_ms < ?3
                                OR (lease_owner = ?1 AND lease_incarnation IS NOT ?5))
                         ORDER BY next_attempt_ms LIMIT ?4)
                     RETURNING operation_id, registration_key, pending, next_attempt_ms, doc",
                params![owner.node, now + lease_ms, now, limit as i64, owner.incarnation],
                operation_row,
            )
            .backend()
        })
        .await
    }

    async fn renew_lease(
        &self,
        owner: &LeaseOwner,
        operation_id: &str,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let (owner, id) = (owner.clone(), operation_id.to_owned());
        self.write(move |conn| {
            conn.execute_cached(
                "UPDATE operations SET lease_until_ms = ?1
                 WHERE operation_id = ?2 AND pending = 1 AND lease_owner = ?3 AND lease_incarnation = ?4",
                params![until_ms, id, owner.node, owner.incarnation],
            )
            .backend()
        })
        .await
        .map(|updated| updated == 1)
    }

    async fn prune_operations(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write(move |conn| {
            conn.execute_cached(
                "DELETE FROM operations WHERE operation_id IN (
                     SELECT operation_id FROM operations WHERE pending = 0 AND updated_ms < ?1 LIMIT ?2
                 )",
                params![before_ms, limit],
            )
            .backend()
        })
        .await
    }
}

/// The file at `path` opened read only for copying elsewhere: its schema must be this build's.
pub(crate) fn open_for_copy(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    SCHEMA
        .open_read_only(path)
        .map_err(|e| open_failed(e, "opening the SQLite database to copy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("opendps.db")).expect("open");
        (dir, store)
    }

    crate::contract_tests!({
        let (dir, store) = open_temp();
        (dir, std::sync::Arc::new(store))
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("opendps.db");
        let identity = ServiceIdentity::generate();
        {
            let store = SqliteStore::open(&path).expect("open");
            store.init_identity(&identity).await.expect("init");
            store.close();
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.identity().await.expect("read"), Some(identity));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_only_store_reads_and_refuses_writes() {
        let (dir, store) = open_temp();
        let identity = ServiceIdentity::generate();
        store.init_identity(&identity).await.expect("init");
        let reader = SqliteStore::open_read_only(dir.path().join("opendps.db")).expect("read-only");
        assert_eq!(reader.identity().await.expect("read"), Some(identity));
        assert!(
            reader
                .put_linked_hub(&crate::contract::sample_hub("h.example", 1))
                .await
                .is_err()
        );
        assert!(SqliteStore::open_read_only(dir.path().join("missing.db")).is_err());

        // The serving process changes the file: a read-only store keeps nothing it read.
        let hub = crate::contract::sample_hub("h.example", 1);
        assert_eq!(reader.list_linked_hubs().await.expect("none yet"), []);
        store.put_linked_hub(&hub).await.expect("linked");
        assert_eq!(reader.list_linked_hubs().await.expect("read"), [hub]);
    }

    #[test]
    fn two_processes_creating_one_database_both_succeed() {
        // What `opendps serve` and an `opendps info` started at the same moment do: both open (and
        // the first creates and migrates) the same new file. Neither may fail with "locked".
        for round in 0..40 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("opendps.db");
            let openers: Vec<_> = (0..3)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || SqliteStore::open(path).map(|s| s.close()))
                })
                .collect();
            for opener in openers {
                assert!(
                    opener.join().expect("join").is_ok(),
                    "round {round}: an opener failed"
                );
            }
        }
    }

    #[tokio::test]
    async fn closed_store_refuses_writes() {
        let (_dir, store) = open_temp();
        store.close();
        let err = store
            .put_linked_hub(&crate::contract::sample_hub("h.example", 1))
            .await;
        assert!(matches!(err, Err(StoreError::Backend(_))));
    }
}
