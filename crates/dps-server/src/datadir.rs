//! The data directory: where the database, the development PKI and the runtime file live.

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// The exclusive hold of a data directory ([`DataDir::lock`]); released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// Written once the listeners are bound, removed on a clean stop: how scripts find a running service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runtime {
    /// Process id.
    pub pid: u32,
    /// The bound HTTPS address.
    pub https: SocketAddr,
    /// The bound MQTT address, if MQTT is served.
    #[serde(default)]
    pub mqtt: Option<SocketAddr>,
    /// The bound AMQP address, if AMQP is served.
    #[serde(default)]
    pub amqp: Option<SocketAddr>,
    /// The host clients should use (public host and port).
    pub service_host: String,
    /// In-process hubs and their `iothubowner` connection strings (secrets: the file is owner-only).
    #[serde(default)]
    pub minihubs: Vec<crate::info::MinihubInfo>,
    /// The storage the service runs on when it is not the SQLite file (`storage.url` and
    /// `storage.password_file`, never a password), so that commands given only the data directory
    /// find the same database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::config::StorageConfig>,
}

impl DataDir {
    /// A data directory at `root` (not created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Creates the directory (owner-only) if needed.
    pub fn create(&self) -> anyhow::Result<()> {
        fs::create_dir_all(self.tls_dir()).with_context(|| {
            format!("while creating the data directory {}", self.root.display())
        })?;
        restrict(&self.root)?;
        restrict(&self.tls_dir())
    }

    /// Takes the directory for this process: an exclusive OS lock on `lock`, held until the
    /// returned guard is dropped or the process ends (even by `kill -9`). A second server on the
    /// same directory is refused with the pid of the one that holds it.
    pub fn lock(&self, what: &str) -> anyhow::Result<DataDirLock> {
        let path = self.root.join("lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("while opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another opendps process".to_owned()
                } else {
                    format!("another opendps process (pid {holder})")
                };
                anyhow::bail!(
                    "{who} is using the data directory {}; stop it first, or give this {what} its own --data-dir",
                    self.root.display()
                );
            }
            Err(fs::TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("while locking {}", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
            .with_context(|| format!("while writing {}", path.display()))?;
        Ok(DataDirLock { _file: file })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `tls/`.
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// The development CA certificate clients must trust.
    pub fn ca_file(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    fn runtime_file(&self) -> PathBuf {
        self.root.join("runtime.json")
    }

    /// This node's stable name (created once): the owner of its operation leases, so that after a
    /// crash the restarted node resumes its operations without waiting for the leases to expire.
    pub fn node_id(&self) -> anyhow::Result<String> {
        let path = self.root.join("node-id");
        if let Ok(id) = fs::read_to_string(&path) {
            let id = id.trim();
            if !id.is_empty() {
                return Ok(id.to_owned());
            }
        }
        let mut bytes = [0u8; 8];
        dps_core::sas::fill_random(&mut bytes);
        let id = format!(
            "node-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        fs::write(&path, &id).context("while writing node-id")?;
        Ok(id)
    }

    /// The ID scope of the service this data directory last served (`id-scope`), if any.
    pub fn served_scope(&self) -> Option<String> {
        let scope = fs::read_to_string(self.root.join(SCOPE_FILE)).ok()?;
        let scope = scope.trim();
        (!scope.is_empty()).then(|| scope.to_owned())
    }

    /// Records the ID scope of the service this data directory serves, so that it is never started
    /// on another service's database by mistake.
    pub fn record_scope(&self, scope: &str) -> anyhow::Result<()> {
        if self.served_scope().as_deref() == Some(scope) {
            return Ok(());
        }
        fs::write(self.root.join(SCOPE_FILE), scope).context("while writing id-scope")
    }

    /// Records the running service.
    pub fn write_runtime(&self, runtime: &Runtime) -> anyhow::Result<()> {
        let tmp = self.root.join("runtime.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(runtime)?)
            .context("while writing runtime.json")?;
        fs::rename(&tmp, self.runtime_file()).context("while writing runtime.json")
    }

    /// The running service, if its process is alive.
    pub fn read_runtime(&self) -> Option<Runtime> {
        let text = fs::read_to_string(self.runtime_file()).ok()?;
        let runtime: Runtime = serde_json::from_str(&text).ok()?;
        Path::new(&format!("/proc/{}", runtime.pid))
            .exists()
            .then_some(runtime)
    }

    /// Forgets the running service.
    pub fn remove_runtime(&self) {
        let _ = fs::remove_file(self.runtime_file());
    }
}

/// The file naming the service a data directory belongs to.
pub const SCOPE_FILE: &str = "id-scope";

/// Writes a file readable by its owner only (keys).
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("while writing {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("while writing {}", path.display()))
}

fn restrict(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("while securing {}", dir.display()))?;
    }
    Ok(())
}
