//! Copying tables from a SQLite file into PostgreSQL, row for row, for an installation that moves
//! from one node on SQLite to several on PostgreSQL (`opendps migrate-store`). The caller gives the
//! target transaction, so that everything it copies lands together or not at all.

use rusqlite::types::Value as SqliteValue;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, QueryBuilder};

/// A column's type on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// `TEXT NOT NULL`.
    Text,
    /// `TEXT`, null allowed.
    OptText,
    /// `INTEGER` in SQLite, `BIGINT` or `INTEGER` in PostgreSQL.
    Int,
    /// An integer, null allowed.
    OptInt,
    /// `INTEGER` 0/1 in SQLite, `BOOLEAN` in PostgreSQL.
    Bool,
    /// A text column that is not copied: the target gets null.
    ClearText,
    /// An integer column that is not copied: the target gets null.
    ClearInt,
}

/// A table with the same columns on both sides.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Its name in the SQLite file.
    pub source: &'static str,
    /// Its name in PostgreSQL.
    pub name: &'static str,
    /// Its columns, in order.
    pub columns: &'static [(&'static str, Column)],
    /// How many of the first columns form the primary key (rows are read in its order).
    pub key_columns: usize,
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the SQLite file failed.
    #[error("reading {table} from the SQLite file")]
    Read {
        /// The table.
        table: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Writing to PostgreSQL failed.
    #[error("writing {table} to PostgreSQL")]
    Write {
        /// The table.
        table: &'static str,
        /// PostgreSQL's error.
        #[source]
        source: sqlx::Error,
    },
    /// The target already has rows in this table: copies go into empty tables only.
    #[error("{table} already has rows")]
    NotEmpty {
        /// The table.
        table: &'static str,
    },
    /// A value has a type the table does not allow.
    #[error("{table}.{column} holds a value of an unexpected type")]
    Type {
        /// The table.
        table: &'static str,
        /// The column.
        column: &'static str,
    },
}

/// Rows read and written per statement.
const CHUNK: usize = 500;

#[derive(Debug, Clone)]
enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
}

/// A row as read: its key (to read on after it) and its cells.
type ReadRow = (Vec<SqliteValue>, Vec<Cell>);

/// How many rows `table` has in the target.
async fn count(target: &mut PgConnection, table: &Table) -> Result<i64, ImportError> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        table.name
    )))
    .fetch_one(target)
    .await
    .map_err(|source| ImportError::Write {
        table: table.name,
        source,
    })
}

/// Copies every row of `table` from `source` into `target`, in key order; calls `copied` with the
/// running count after each chunk. Returns the number of rows copied.
async fn copy_table(
    source: &rusqlite::Connection,
    table: &Table,
    target: &mut PgConnection,
    copied: &mut dyn FnMut(u64),
) -> Result<u64, ImportError> {
    let mut after: Option<Vec<SqliteValue>> = None;
    let mut total = 0u64;
    loop {
        let rows = read_chunk(source, table, after.as_deref())?;
        if rows.is_empty() {
            return Ok(total);
        }
        after = rows.last().map(|(key, _)| key.clone());
        total += rows.len() as u64;
        write_chunk(target, table, rows.into_iter().map(|(_, cells)| cells)).await?;
        copied(total);
    }
}

/// Copies `tables` in order, each in key order, into `target`, where every one of them must be empty
/// (else [`ImportError::NotEmpty`], before anything is copied); `progress` is told each table's
/// running count. Returns the rows copied per table.
pub async fn copy_tables(
    source: &rusqlite::Connection,
    tables: &[Table],
    target: &mut PgConnection,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Vec<(&'static str, u64)>, ImportError> {
    for table in tables {
        if count(target, table).await? > 0 {
            return Err(ImportError::NotEmpty { table: table.name });
        }
    }
    let mut copied = Vec::new();
    for table in tables {
        let rows = copy_table(source, table, target, &mut |n| progress(table.name, n)).await?;
        copied.push((table.name, rows));
    }
    Ok(copied)
}

/// Up to [`CHUNK`] rows after the key `after`, each with its key (as read) and its cells.
fn read_chunk(
    source: &rusqlite::Connection,
    table: &Table,
    after: Option<&[SqliteValue]>,
) -> Result<Vec<ReadRow>, ImportError> {
    let failed = |source| ImportError::Read {
        table: table.name,
        source,
    };
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let key = names[..table.key_columns].join(", ");
    let marks = vec!["?"; table.key_columns].join(", ");
    let filter = match after {
        Some(_) => format!("WHERE ({key}) > ({marks})"),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {} {filter} ORDER BY {key} LIMIT {CHUNK}",
        names.join(", "),
        table.source
    );
    let mut stmt = source.prepare(&sql).map_err(failed)?;
    let params = rusqlite::params_from_iter(after.unwrap_or_default().iter());
    let mut rows = stmt.query(params).map_err(failed)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(failed)? {
        let mut key = Vec::with_capacity(table.key_columns);
        let mut cells = Vec::with_capacity(table.columns.len());
        for (index, (column, kind)) in table.columns.iter().enumerate() {
            let value: SqliteValue = row.get(index).map_err(failed)?;
            if index < table.key_columns {
                key.push(value.clone());
            }
            let mistyped = || ImportError::Type {
                table: table.name,
                column,
            };
            cells.push(match (kind, value) {
                (Column::Text | Column::OptText, SqliteValue::Text(text)) => Cell::Text(Some(text)),
                (Column::OptText, SqliteValue::Null) | (Column::ClearText, _) => Cell::Text(None),
                (Column::Int | Column::OptInt, SqliteValue::Integer(n)) => Cell::Int(Some(n)),
                (Column::OptInt, SqliteValue::Null) | (Column::ClearInt, _) => Cell::Int(None),
                (Column::Bool, SqliteValue::Integer(n)) => Cell::Bool(n != 0),
                _ => return Err(mistyped()),
            });
        }
        out.push((key, cells));
    }
    Ok(out)
}

async fn write_chunk(
    target: &mut PgConnection,
    table: &Table,
    rows: impl Iterator<Item = Vec<Cell>>,
) -> Result<(), ImportError> {
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let mut insert: QueryBuilder<Postgres> = QueryBuilder::new(format!(
        "INSERT INTO {} ({}) ",
        table.name,
        names.join(", ")
    ));
    insert.push_values(rows, |mut values, cells| {
        for cell in cells {
            match cell {
                Cell::Text(text) => values.push_bind(text),
                Cell::Int(n) => values.push_bind(n),
                Cell::Bool(b) => values.push_bind(b),
            };
        }
    });
    insert
        .build()
        .execute(target)
        .await
        .map_err(|source| ImportError::Write {
            table: table.name,
            source,
        })?;
    Ok(())
}
