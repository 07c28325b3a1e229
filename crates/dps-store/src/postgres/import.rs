//! `opendps migrate-store`: an installation's SQLite database copied into PostgreSQL, row for row
//! (etags, registration states and operations as they are). Operations keep no lease: the node that
//! held one is gone, and the first node to start on PostgreSQL takes them at once.

use std::path::Path;

use dps_core::access::ServiceIdentity;
use dps_core::error::Internal;
use dps_core::store::StoreError;
use pg_schema::import::{Column, ImportError, Table};
use sqlx::PgConnection;

use Column::{Bool, ClearInt, ClearText, Int, OptText, Text};

/// opendps' tables, in the order they are copied.
const TABLES: &[Table] = &[
    Table {
        source: "service_identity",
        name: "service_identity",
        columns: &[("id", Int), ("doc", Text)],
        key_columns: 1,
    },
    Table {
        source: "enrollments",
        name: "enrollments",
        columns: &[
            ("kind", Text),
            ("id_key", Text),
            ("etag", Text),
            ("doc", Text),
        ],
        key_columns: 2,
    },
    Table {
        source: "registrations",
        name: "registrations",
        columns: &[
            ("id_key", Text),
            ("group_key", OptText),
            ("etag", Text),
            ("doc", Text),
        ],
        key_columns: 1,
    },
    Table {
        source: "linked_hubs",
        name: "linked_hubs",
        columns: &[("host_name", Text), ("doc", Text)],
        key_columns: 1,
    },
    Table {
        source: "certificates",
        name: "certificates",
        columns: &[("name_key", Text), ("etag", Text), ("doc", Text)],
        key_columns: 1,
    },
    Table {
        source: "operations",
        name: "operations",
        columns: &[
            ("operation_id", Text),
            ("registration_key", Text),
            ("pending", Bool),
            ("next_attempt_ms", Int),
            ("lease_owner", ClearText),
            ("lease_incarnation", ClearText),
            ("lease_until_ms", ClearInt),
            ("updated_ms", Int),
            ("doc", Text),
        ],
        key_columns: 1,
    },
];

fn failed(err: ImportError) -> StoreError {
    match &err {
        ImportError::Write { source, .. } if pg_schema::is_unavailable(source) => {
            StoreError::Unavailable(Internal::caused("copying the database", err))
        }
        _ => StoreError::Backend(Internal::caused("copying the database", err)),
    }
}

/// Copies the opendps SQLite database at `path` into `target`, a transaction on a PostgreSQL
/// database whose schema is up to date ([`crate::PgStore::open`]) and which holds no service yet.
/// `progress` is told each table's running count. Returns the rows copied per table.
pub async fn import_sqlite(
    path: &Path,
    target: &mut PgConnection,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Vec<(&'static str, u64)>, StoreError> {
    let source = crate::sqlite::open_for_copy(path)?;
    match pg_schema::import::copy_tables(&source, TABLES, target, progress).await {
        Err(ImportError::NotEmpty { table }) => Err(in_use(target, table).await),
        copied => copied.map_err(failed),
    }
}

/// Why the target is refused: the service it already holds, or the table that has rows.
async fn in_use(target: &mut PgConnection, table: &str) -> StoreError {
    let identity: Option<String> = sqlx::query_scalar("SELECT doc FROM service_identity")
        .fetch_optional(target)
        .await
        .ok()
        .flatten();
    let scope = identity
        .and_then(|doc| serde_json::from_str::<ServiceIdentity>(&doc).ok())
        .map(|identity| identity.id_scope);
    StoreError::Backend(Internal::new(match scope {
        Some(scope) => format!(
            "the PostgreSQL database already holds an opendps service (ID scope {scope}); migrate-store copies into a database (or schema) without one"
        ),
        None => format!(
            "the PostgreSQL database already has rows in {table}; migrate-store copies into a database (or schema) without an opendps service"
        ),
    }))
}
