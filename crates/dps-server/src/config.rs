//! Configuration in layers: built-in defaults, then a TOML file, then `OPENDPS_*` environment
//! variables (`__` separates sections, as in `OPENDPS_HTTP__LISTEN`), then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::bail;
use dps_core::model::AllocationPolicy;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The commented default configuration, printed by `opendps config default`.
pub const DEFAULT_TOML: &str = include_str!("default-config.toml");

/// Environment variables read by the CLI commands, not by the service configuration.
const CLI_ENV: &[&str] = &["CONNECTION_STRING", "CA_FILE", "CONFIG"];
/// Top-level configuration keys that may come from the environment.
const CONFIG_ENV_KEYS: &[&str] = &[
    "DATA_DIR",
    "HTTP",
    "TLS",
    "STORAGE",
    "SERVICE_API",
    "PROVISIONING",
    "MINIHUB",
    "LOG",
];

/// The service configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the database, the development CA and the runtime file.
    pub data_dir: PathBuf,
    /// The HTTPS listener (device and service API).
    pub http: HttpConfig,
    /// The MQTT/TLS listener (device API, and devices of in-process hubs).
    pub mqtt: MqttConfig,
    /// The AMQP/TLS listener (device API).
    pub amqp: AmqpConfig,
    /// Server certificate.
    pub tls: TlsConfig,
    /// Where state is kept.
    pub storage: StorageConfig,
    /// Service API settings.
    pub service_api: ServiceApiConfig,
    /// Device registration.
    pub provisioning: ProvisioningConfig,
    /// IoT hubs served in-process by minihub.
    pub minihub: MinihubConfig,
    /// Logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./opendps-data"),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            amqp: AmqpConfig::default(),
            tls: TlsConfig::default(),
            storage: StorageConfig::default(),
            service_api: ServiceApiConfig::default(),
            provisioning: ProvisioningConfig::default(),
            minihub: MinihubConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port to listen on. Port 0 picks a free port (see `opendps info`).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Host name clients use to reach the service; goes into connection strings (with the port).
    pub public_host: String,
    /// Largest request body accepted, in bytes (DPS allows 96 KB messages).
    pub max_body_bytes: usize,
    /// Most connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// Seconds a connection (HTTP/1.1 or HTTP/2) may go without a request in flight (one whose
    /// head is still being sent included) before it is closed.
    pub idle_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            public_host: "localhost".into(),
            max_body_bytes: 96 * 1024,
            max_connections: dps_http::DEFAULT_MAX_CONNECTIONS,
            idle_timeout_secs: dps_http::DEFAULT_IDLE_TIMEOUT.as_secs(),
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT at all.
    pub enabled: bool,
    /// Address of the MQTT/TLS listener. Devices dial 8883 (the Python SDK cannot be told otherwise).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Most connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// The longest keep-alive honoured, in seconds: a client that asks for none (0) or a longer
    /// one is dropped after one and a half times this of silence.
    pub max_keep_alive_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            max_connections: dps_mqtt::MqttLimits::default().max_connections,
            max_keep_alive_secs: dps_mqtt::DEFAULT_MAX_KEEP_ALIVE.as_secs(),
        }
    }
}

/// `[amqp]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Serve AMQP at all.
    pub enabled: bool,
    /// Address of the AMQP/TLS listener. Devices dial 5671.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Most connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 5671)),
            max_connections: dps_amqp::AmqpLimits::default().max_connections,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain to serve. Unset: a certificate from the development CA in the data dir.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the development certificate (besides localhost,
    /// 127.0.0.1 and ::1).
    pub names: Vec<String>,
}

/// `[storage]`: which backend keeps the state. SQLite in the data directory unless `url` names a
/// PostgreSQL database, which several nodes may share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite` or `postgres`; optional, `url` alone selects PostgreSQL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<StorageBackend>,
    /// The SQLite database file; unset means `<data_dir>/opendps.db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A PostgreSQL URL (`postgres://user@host:5432/db?sslmode=verify-full&sslrootcert=…`). Keep the
    /// password out of it: use `password_file` or the `PGPASSWORD` environment variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (its first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// The storage backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// One SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// Where the state lives, as the configuration decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database: its URL, and the password file if one is configured.
    Postgres {
        /// `storage.url`.
        url: String,
        /// `storage.password_file`.
        password_file: Option<PathBuf>,
    },
}

/// `[service_api]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceApiConfig {
    /// Seconds of clock difference tolerated when checking token expiry.
    pub sas_clock_skew_secs: i64,
}

impl Default for ServiceApiConfig {
    fn default() -> Self {
        Self {
            sas_clock_skew_secs: 300,
        }
    }
}

/// `[provisioning]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// `Retry-After` (seconds) sent to devices while their registration is assigning.
    pub retry_after_secs: u32,
    /// Milliseconds a register request waits for its registration to finish, to answer with the
    /// final status so the device need not poll; 0 answers `assigning` at once.
    pub answer_within_ms: u64,
    /// Seconds of clock difference tolerated when checking a device token's expiry.
    pub device_sas_clock_skew_secs: i64,
    /// Largest custom payload a device may send with its registration, in bytes of JSON.
    pub max_payload_bytes: usize,
    /// Seconds a finished registration operation is kept for devices to poll; then it is deleted.
    pub operation_retention_secs: u64,
    /// Seconds a node holds a registration operation it claimed: if the node dies, another node
    /// (or this one restarted under another data directory) takes it over after this long.
    pub operation_lease_secs: u64,
    /// Allocation policy of enrollments that set none: `hashed`, `geoLatency` or `static`.
    pub default_allocation_policy: AllocationPolicy,
    /// This node's region label; `geoLatency` prefers linked hubs with the same `location`.
    pub region: Option<String>,
    /// Seconds a registration keeps retrying a hub that throttles (429), is busy or fails on its
    /// side (5xx) or does not answer, counted from the first failed call; then it fails (500002).
    pub hub_retry_for_secs: u64,
    /// Delay before the first retry of a hub call, in milliseconds; doubled for each further one.
    pub hub_retry_ms: u64,
    /// Longest delay between two retries of a hub call, in milliseconds (a longer `Retry-After`
    /// from the hub is honoured).
    pub hub_retry_max_ms: u64,
    /// Seconds to wait for a hub to answer one request.
    pub hub_timeout_secs: u64,
    /// Milliseconds a custom allocation webhook may take to answer.
    pub webhook_timeout_ms: u64,
    /// Retries of a webhook that answers 429 or above, 5xx included (Azure: 10).
    pub webhook_retries: u32,
    /// Delay before the first webhook retry, in milliseconds (Azure: 1000).
    pub webhook_first_retry_ms: u64,
    /// Added to the delay for each further retry, in milliseconds (Azure: 9000).
    pub webhook_retry_increment_ms: u64,
    /// Largest webhook answer read, in bytes; a larger one fails the registration (400207).
    pub webhook_max_response_bytes: usize,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            retry_after_secs: 2,
            answer_within_ms: 1000,
            device_sas_clock_skew_secs: 300,
            max_payload_bytes: 64 * 1024,
            operation_retention_secs: 3600,
            operation_lease_secs: 60,
            default_allocation_policy: AllocationPolicy::Hashed,
            region: None,
            hub_retry_for_secs: 900,
            hub_retry_ms: 1000,
            hub_retry_max_ms: 60_000,
            hub_timeout_secs: 10,
            webhook_timeout_ms: 30_000,
            webhook_retries: 10,
            webhook_first_retry_ms: 1000,
            webhook_retry_increment_ms: 9000,
            webhook_max_response_bytes: 64 * 1024,
        }
    }
}

/// `[minihub]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinihubConfig {
    /// Host names of IoT hubs to serve in-process on the HTTPS listener, told apart by the Host
    /// header. Each is added to the development certificate.
    pub hubs: Vec<String>,
    /// Link each of these hubs to the service (weight 1) if it is not linked yet.
    pub link: bool,
    /// Write identities and twins of devices assigned to these hubs directly into minihub
    /// instead of over the IoT Hub REST API.
    pub direct: bool,
}

impl Default for MinihubConfig {
    fn default() -> Self {
        Self {
            hubs: Vec::new(),
            link: true,
            direct: true,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `opendps=debug,info`; `RUST_LOG` overrides it.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Overrides given as flags.
#[derive(Debug, Default, Serialize)]
pub struct FlagOverrides {
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--listen`, `--public-host`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub http: serde_json::Map<String, serde_json::Value>,
    /// `--tls-name`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub tls: serde_json::Map<String, serde_json::Value>,
    /// `--hub`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub minihub: serde_json::Map<String, serde_json::Value>,
    /// `--mqtt-listen`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub mqtt: serde_json::Map<String, serde_json::Value>,
    /// `--amqp-listen`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub amqp: serde_json::Map<String, serde_json::Value>,
    /// `--storage-url`.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub storage: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// The connections the enabled listeners accept at once, in all.
    pub fn max_connections(&self) -> u64 {
        let mqtt = self.mqtt.enabled.then_some(self.mqtt.max_connections);
        let amqp = self.amqp.enabled.then_some(self.amqp.max_connections);
        [Some(self.http.max_connections), mqtt, amqp]
            .into_iter()
            .flatten()
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add)
    }

    /// Loads the layers. `file` is `--config` (or `OPENDPS_CONFIG`); a missing explicit file is an error.
    pub fn load(
        file: Option<&Path>,
        flags: FlagOverrides,
        extra_tls_names: &[String],
    ) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!(
                    "the configuration file {} does not exist (write one with `opendps config default > {}`)",
                    file.display(),
                    file.display()
                );
            }
            figment = figment.merge(Toml::file(file));
        }
        warn_unknown_env();
        figment = figment
            .merge(
                Env::prefixed("OPENDPS_")
                    .filter(|k| {
                        CONFIG_ENV_KEYS.iter().any(|known| {
                            k.as_str().eq_ignore_ascii_case(known)
                                || k.as_str()
                                    .to_ascii_uppercase()
                                    .starts_with(&format!("{known}__"))
                        })
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(flags));
        let mut config: Config = figment.extract().map_err(|err| {
            anyhow::anyhow!(
                "the configuration is not valid: {}",
                describe_config_errors(err)
            )
        })?;
        config.tls.names.extend(extra_tls_names.iter().cloned());
        config.validate()?;
        Ok(config)
    }

    /// The configuration of the service whose data directory is `data_dir`, as a command that
    /// reads its state (the admin CLI, `device`, `bench`) needs it: the file named by
    /// `OPENDPS_CONFIG` and the `OPENDPS_*` variables, so that it finds the same store (a
    /// PostgreSQL `storage.url`) as the service.
    pub fn for_data_dir(data_dir: &Path) -> anyhow::Result<Self> {
        let file = std::env::var_os("OPENDPS_CONFIG").map(PathBuf::from);
        let flags = FlagOverrides {
            data_dir: Some(data_dir.to_path_buf()),
            ..FlagOverrides::default()
        };
        Self::load(file.as_deref(), flags, &[])
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            bail!("tls.cert_file and tls.key_file must be set together");
        }
        if self.http.max_body_bytes < 1024 {
            bail!("http.max_body_bytes must be at least 1024");
        }
        if self.http.public_host.trim().is_empty() {
            bail!("http.public_host must not be empty");
        }
        if self.http.idle_timeout_secs == 0 {
            bail!(
                "http.idle_timeout_secs must be at least 1: it is how long an HTTP connection may wait for its next request"
            );
        }
        if self.mqtt.max_keep_alive_secs == 0 {
            bail!(
                "mqtt.max_keep_alive_secs must be at least 1: it is the longest keep-alive an MQTT client is held to"
            );
        }
        if self.provisioning.default_allocation_policy == AllocationPolicy::Custom {
            bail!(
                "provisioning.default_allocation_policy cannot be custom; set custom allocation on an enrollment"
            );
        }
        if self.provisioning.hub_retry_ms == 0 {
            bail!("provisioning.hub_retry_ms must be at least 1");
        }
        if self.provisioning.hub_retry_max_ms < self.provisioning.hub_retry_ms {
            bail!("provisioning.hub_retry_max_ms must not be less than provisioning.hub_retry_ms");
        }
        if self.service_api.sas_clock_skew_secs < 0 {
            bail!("service_api.sas_clock_skew_secs must not be negative");
        }
        if self.provisioning.operation_retention_secs == 0 {
            bail!(
                "provisioning.operation_retention_secs must be at least 1: devices poll an operation after it finishes"
            );
        }
        let p = &self.provisioning;
        let one_call_ms = p
            .hub_timeout_secs
            .saturating_mul(1000)
            .max(p.webhook_timeout_ms);
        if p.operation_lease_secs.saturating_mul(1000) <= one_call_ms {
            bail!(
                "provisioning.operation_lease_secs must be longer than one hub request (hub_timeout_secs) and one webhook call (webhook_timeout_ms): a node holds its claim while it waits for them"
            );
        }
        if p.answer_within_ms >= 30_000 {
            bail!(
                "provisioning.answer_within_ms must be under 30000: the SDKs give up on a request after 30 s (1000 answers most registrations inline; 0 never waits)"
            );
        }
        if self.provisioning.device_sas_clock_skew_secs < 0 {
            bail!("provisioning.device_sas_clock_skew_secs must not be negative");
        }
        let storage = &self.storage;
        match (storage.backend, &storage.url) {
            (Some(StorageBackend::Postgres), None) => {
                bail!(
                    "storage.backend is postgres but storage.url is not set (--storage-url, OPENDPS_STORAGE__URL)"
                )
            }
            (Some(StorageBackend::Sqlite), Some(_)) => bail!(
                "storage.url names a PostgreSQL database but storage.backend is sqlite; remove one of them"
            ),
            (_, Some(url))
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
            {
                bail!(
                    "storage.url must be a PostgreSQL URL (postgres://user@host:5432/database), not '{url}'"
                )
            }
            (_, Some(_)) if storage.path.is_some() => {
                bail!(
                    "storage.path (a SQLite file) and storage.url (PostgreSQL) cannot both be set"
                )
            }
            (_, None) if storage.password_file.is_some() => {
                bail!("storage.password_file is set but storage.url is not")
            }
            _ => {}
        }
        Ok(())
    }

    /// Where the state lives (checked by [`Config::validate`]).
    pub fn store_location(&self) -> StoreLocation {
        match &self.storage.url {
            Some(url) => StoreLocation::Postgres {
                url: url.clone(),
                password_file: self.storage.password_file.clone(),
            },
            None => StoreLocation::Sqlite(self.sqlite_path()),
        }
    }

    /// The SQLite database file: the store unless `storage.url` is set (then the file an earlier,
    /// single-node installation may have left).
    pub fn sqlite_path(&self) -> PathBuf {
        self.storage
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("opendps.db"))
    }
}

/// `host:port` or `ip:port` (`localhost:8443`, `0.0.0.0:443`, `[::1]:8883`); a host name is
/// resolved once, preferring IPv4.
fn listen_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    use std::net::ToSocketAddrs as _;
    let text = String::deserialize(deserializer)?;
    let expected = || {
        serde::de::Error::custom(format!(
            "'{text}' is not an address to listen on; give host:port, such as 127.0.0.1:8443, 0.0.0.0:443 or localhost:8443"
        ))
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let resolved: Vec<SocketAddr> = text.to_socket_addrs().map_err(|_| expected())?.collect();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| resolved.first())
        .copied()
        .ok_or_else(expected)
}

/// Flags that set configuration keys, for error messages that name what the user typed.
const FLAG_KEYS: &[(&str, &str)] = &[
    ("data_dir", "--data-dir"),
    ("http.listen", "--listen"),
    ("http.public_host", "--public-host"),
    ("mqtt.listen", "--mqtt-listen"),
    ("amqp.listen", "--amqp-listen"),
    ("storage.url", "--storage-url"),
    ("tls.names", "--tls-name"),
    ("minihub.hubs", "--hub"),
];

/// One line per configuration error: where the value came from (the flag, the environment
/// variable, or the file and key, as the user wrote them) and what is wrong with it.
fn describe_config_errors(errors: figment::Error) -> String {
    use figment::Source;
    use figment::error::Kind;
    errors
        .into_iter()
        .map(|err| {
            let key = err.path.join(".");
            let provider = err.metadata.as_ref();
            let origin = match provider.and_then(|m| m.source.as_ref()) {
                Some(Source::File(file)) => format!("{} (key {key})", file.display()),
                _ if provider.is_some_and(|m| m.name.contains("FlagOverrides")) => FLAG_KEYS
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or_else(|| key.clone(), |(_, flag)| format!("the flag {flag}")),
                _ if provider.is_some_and(|m| m.name.contains("environment")) => format!(
                    "the environment variable OPENDPS_{}",
                    err.path.join("__").to_ascii_uppercase()
                ),
                _ => key.clone(),
            };
            let what = match &err.kind {
                Kind::Message(message) => message.clone(),
                Kind::UnknownVariant(found, expected) => {
                    format!("'{found}' is not one of {}", expected.join(", "))
                }
                Kind::UnknownField(found, _) if found == "hub_attempts" => {
                    "hub_attempts was replaced by hub_retry_for_secs (how long a failing hub is retried, default 900) with hub_retry_ms and hub_retry_max_ms; remove it".to_owned()
                }
                Kind::UnknownField(found, expected) => {
                    format!(
                        "unknown key '{found}'; the known keys are {}",
                        expected.join(", ")
                    )
                }
                Kind::InvalidType(found, expected) | Kind::InvalidValue(found, expected) => {
                    format!("expected {expected}, found {found}")
                }
                other => other.to_string(),
            };
            format!("{origin}: {}", what.replace('`', "'"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn warn_unknown_env() {
    for (key, _) in std::env::vars() {
        let Some(rest) = key.strip_prefix("OPENDPS_") else {
            continue;
        };
        let top = rest
            .split("__")
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if !CONFIG_ENV_KEYS.contains(&top.as_str()) && !CLI_ENV.contains(&rest) {
            eprintln!("warning: ignoring unknown environment variable {key}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_matches_defaults() {
        let parsed: Config = Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("the default config parses");
        assert_eq!(parsed, Config::default());
        // Every section and key is documented there, not only defaulted.
        let defaults = serde_json::to_value(Config::default()).expect("json");
        for (section, keys) in defaults.as_object().expect("a table") {
            match keys.as_object() {
                Some(keys) => {
                    assert!(
                        DEFAULT_TOML.contains(&format!("[{section}]")),
                        "[{section}]"
                    );
                    for key in keys.keys() {
                        assert!(
                            DEFAULT_TOML.contains(&format!("\n{key} ="))
                                || DEFAULT_TOML.contains(&format!("# {key} =")),
                            "{section}.{key}"
                        );
                    }
                }
                None => assert!(DEFAULT_TOML.contains(&format!("{section} =")), "{section}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            Figment::from(Toml::string("[http]\nlisten_on = \"1.2.3.4:5\"")).extract::<Config>();
        assert!(err.is_err());
    }

    #[test]
    fn listen_addresses_take_host_names_and_errors_name_the_flag() {
        let mut flags = FlagOverrides::default();
        flags.http.insert("listen".into(), "localhost:19443".into());
        let config = Config::load(None, flags, &[]).expect("a host name is fine");
        assert_eq!(config.http.listen.port(), 19443);
        assert!(config.http.listen.ip().is_loopback());

        let mut flags = FlagOverrides::default();
        flags.mqtt.insert("listen".into(), "nonsense".into());
        let message = format!("{:#}", Config::load(None, flags, &[]).expect_err("refused"));
        assert!(message.contains("the flag --mqtt-listen"), "{message}");
        assert!(message.contains("host:port"), "{message}");
        assert!(
            !message.contains(".rs") && !message.contains('`'),
            "no source locations or nested backticks: {message}"
        );
    }

    #[test]
    fn enum_values_in_any_case_and_file_errors_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        for spelling in ["geoLatency", "geolatency", "GeoLatency"] {
            std::fs::write(
                &file,
                format!("[provisioning]\ndefault_allocation_policy = \"{spelling}\"\n"),
            )
            .expect("write");
            let config = Config::load(Some(&file), FlagOverrides::default(), &[]).expect(spelling);
            assert_eq!(
                config.provisioning.default_allocation_policy,
                AllocationPolicy::GeoLatency
            );
        }
        std::fs::write(
            &file,
            "[provisioning]\ndefault_allocation_policy = \"nearest\"\n",
        )
        .expect("write");
        let message = format!(
            "{:#}",
            Config::load(Some(&file), FlagOverrides::default(), &[]).expect_err("refused")
        );
        assert!(
            message.contains(&file.display().to_string())
                && message.contains("provisioning.default_allocation_policy")
                && message.contains("'nearest' is not one of hashed, geoLatency"),
            "{message}"
        );
        assert!(!message.contains('`'), "{message}");
    }

    #[test]
    fn the_replaced_hub_attempts_says_what_replaced_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[provisioning]\nhub_attempts = 3\n").expect("write");
        let message = format!(
            "{:#}",
            Config::load(Some(&file), FlagOverrides::default(), &[]).expect_err("refused")
        );
        assert!(message.contains("hub_retry_for_secs"), "{message}");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[http]\nlisten = \"127.0.0.1:9000\"\npublic_host = \"dps.example\"\n",
        )
        .expect("write");
        let mut flags = FlagOverrides::default();
        flags.http.insert("listen".into(), "127.0.0.1:9001".into());
        let config = Config::load(Some(&file), flags, &["extra.example".into()]).expect("load");
        assert_eq!(config.http.listen.port(), 9001);
        assert_eq!(config.http.public_host, "dps.example");
        assert_eq!(config.tls.names, ["extra.example"]);
        assert!(
            Config::load(
                Some(&dir.path().join("missing.toml")),
                FlagOverrides::default(),
                &[]
            )
            .is_err()
        );
    }
}
