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

/// A PostgreSQL server of a test's own, for tests that stop and start the database: a cluster made
/// with the installed `initdb` in a temporary directory, served by `pg_ctl` on a free loopback
/// port, trust authentication. Run as the `postgres` user when the test runs as root (PostgreSQL
/// refuses root). Stopped at once when this goes.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
    /// `name=value` server settings given at every start.
    settings: Vec<String>,
}

impl PgCluster {
    /// Creates the cluster and starts it.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Creates the cluster and starts it with `settings` (`name=value`, as `postgres -c` takes).
    pub fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        let bin = server_bin_dir()?;
        let dir = tempfile::tempdir()?;
        if is_root() {
            let owned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !owned.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cluster = Self {
            dir,
            bin,
            port,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` in its `postgres` database; what `psql` printed (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        psql(&self.url(), sql)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// Stops the server as a crash would (immediate shutdown): what its log buffers held and had not
    /// written is lost; it recovers from its log at the next start.
    pub fn crash(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// Starts the server (again) on the same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let log = format!("{}/server.log", self.dir.path().display());
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        )
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command
            .args(args)
            .output()
            .with_context(|| format!("while running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The installed server's programs: the newest `/usr/lib/postgresql/N/bin` (Debian), else the
/// directory of `initdb` on the PATH.
fn server_bin_dir() -> anyhow::Result<std::path::PathBuf> {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match std::path::Path::new(&path).parent() {
        Some(dir) if !path.is_empty() => Ok(dir.to_path_buf()),
        _ => bail!(
            "no PostgreSQL server programs (initdb, pg_ctl) found; install the postgresql package"
        ),
    }
}
