//! A PostgreSQL schema of a test's own, on the server the machine runs.

use std::process::Command;

use anyhow::{Context as _, bail};

/// A fresh schema in the test database (`OPENDPS_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/test`), dropped with everything in it when this goes.
/// Made and dropped with `psql`, which comes with the server.
pub struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    /// Creates a schema named after `tag` and a random suffix.
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        let base = std::env::var("OPENDPS_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let mut bytes = [0u8; 5];
        dps_core::sas::fill_random(&mut bytes);
        let suffix: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("e2e_{tag}_{suffix}");
        psql(&base, &format!("CREATE SCHEMA {name}"))?;
        Ok(Self { base, name })
    }

    /// The URL of the test database with this schema as the search path: what `storage.url` takes.
    pub fn url(&self) -> String {
        let join = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{join}options=-c%20search_path%3D{}",
            self.base, self.name
        )
    }

    /// Runs `sql` in this schema; what `psql` printed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        psql(
            &self.base,
            &format!("SET search_path TO {}; {sql}", self.name),
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = psql(
            &self.base,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .output()
        .context("while running psql (the PostgreSQL client) for a test schema")?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
