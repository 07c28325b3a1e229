//! `opendps info`: everything a script needs to reach a service, read from its data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use dps_core::access::{OWNER_POLICY, Right};
use dps_core::linked_hub::{LinkedHub, LinkedHubDescription};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::datadir::DataDir;
use crate::serve::service_host;
use crate::storage::ServiceStore;

/// What a data directory says about its service: everything a script or a client needs to reach
/// it. `opendps info --json` prints it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    /// The ID scope devices register in.
    pub id_scope: String,
    /// `host[:port]` that clients use and tokens are signed for.
    pub service_host: String,
    /// The owner policy's connection string.
    pub service_connection_string: Option<String>,
    /// Every shared access policy.
    pub policies: Vec<PolicyInfo>,
    /// The development CA clients must trust (none when the service serves its own certificate).
    pub ca_file: Option<PathBuf>,
    /// Where the service listens (bound addresses while it runs, else the configured ones).
    pub listen: ListenInfo,
    /// The linked IoT hubs, without their keys.
    pub linked_hubs: Vec<LinkedHubDescription>,
    /// The in-process hubs.
    pub minihubs: Vec<MinihubInfo>,
    /// The running process, if any.
    pub running: Option<RunningInfo>,
    /// The data directory.
    pub data_dir: PathBuf,
}

/// A shared access policy and its connection string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInfo {
    /// Its name (`skn`).
    pub name: String,
    /// What it may do.
    pub rights: Vec<Right>,
    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
    pub connection_string: String,
}

/// The listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenInfo {
    /// HTTPS.
    pub https: SocketAddr,
    /// MQTT over TLS, when served.
    pub mqtt: Option<SocketAddr>,
    /// AMQP over TLS, when served.
    #[serde(default)]
    pub amqp: Option<SocketAddr>,
}

/// An in-process hub (minihub) and its owner connection string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MinihubInfo {
    /// Its host name.
    pub host_name: String,
    /// Its `iothubowner` connection string.
    pub connection_string: String,
}

/// The running service process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningInfo {
    /// Its process id.
    pub pid: u32,
}

/// Reads the service's details from its data directory, without taking any lock.
pub async fn collect(config: &Config) -> anyhow::Result<ServiceInfo> {
    let data = DataDir::new(&config.data_dir);
    let runtime = data.read_runtime();
    // A running node on PostgreSQL says where its database is, for commands given only its data
    // directory; a configured storage.url wins.
    let found;
    let config = match runtime.as_ref().and_then(|r| r.storage.as_ref()) {
        Some(storage) if config.storage.url.is_none() => {
            found = Config {
                storage: storage.clone(),
                ..config.clone()
            };
            &found
        }
        _ => config,
    };
    // Read only: `info` (and every CLI command that finds its service through it) must never take
    // the write lock or migrate the store of a service that may be running.
    let opened = ServiceStore::open_existing(config).await?;
    let store = opened.shared();
    let identity = store
        .identity()
        .await?
        .context("the database has no service identity yet; start `opendps serve` once")?;
    let hubs = store.list_linked_hubs().await?;
    let minihubs: Vec<MinihubInfo> = match &runtime {
        Some(running) => running.minihubs.clone(),
        None => opened
            .read_minihubs(data.root())
            .await?
            .iter()
            .map(|h| MinihubInfo {
                host_name: h.host_name.clone(),
                connection_string: h.connection_string(),
            })
            .collect(),
    };
    let host = match &runtime {
        Some(rt) => rt.service_host.clone(),
        None => service_host(&config.http.public_host, config.http.listen.port()),
    };
    let policies = identity
        .policies
        .iter()
        .map(|p| PolicyInfo {
            name: p.name.clone(),
            rights: p.rights.clone(),
            connection_string: p.connection_string(&host),
        })
        .collect();
    let owner = identity
        .policy(OWNER_POLICY)
        .map(|p| p.connection_string(&host));
    let ca = config.tls.cert_file.is_none().then(|| data.ca_file());
    Ok(ServiceInfo {
        id_scope: identity.id_scope.to_string(),
        service_host: host,
        service_connection_string: owner,
        policies,
        ca_file: ca.map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
        listen: ListenInfo {
            https: runtime.as_ref().map_or(config.http.listen, |r| r.https),
            mqtt: runtime
                .as_ref()
                .map_or(config.mqtt.enabled.then_some(config.mqtt.listen), |r| {
                    r.mqtt
                }),
            amqp: runtime
                .as_ref()
                .map_or(config.amqp.enabled.then_some(config.amqp.listen), |r| {
                    r.amqp
                }),
        },
        linked_hubs: hubs.iter().map(LinkedHub::describe).collect(),
        minihubs,
        running: runtime.map(|r| RunningInfo { pid: r.pid }),
        data_dir: std::fs::canonicalize(&config.data_dir)
            .unwrap_or_else(|_| config.data_dir.clone()),
    })
}

/// Prints the details for people.
pub fn print_human(info: &ServiceInfo) {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    println!("ID scope:            {}", info.id_scope);
    println!("Service host:        {}", info.service_host);
    println!(
        "Connection string:   {}",
        or_dash(info.service_connection_string.as_deref())
    );
    println!(
        "CA certificate:      {}",
        info.ca_file
            .as_ref()
            .map_or_else(|| "-".to_owned(), |p| p.display().to_string())
    );
    println!("HTTPS listener:      {}", info.listen.https);
    println!(
        "MQTT listener:       {}",
        info.listen
            .mqtt
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
    );
    println!(
        "AMQP listener:       {}",
        info.listen
            .amqp
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
    );
    match info.running {
        Some(RunningInfo { pid }) => println!("Running:             yes (pid {pid})"),
        None => println!("Running:             no"),
    }
    println!("Policies:");
    for policy in &info.policies {
        let rights: Vec<String> = policy
            .rights
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        println!("  {:<26} {}", policy.name, rights.join(", "));
    }
    for hub in &info.minihubs {
        println!("In-process hub:      {}", hub.host_name);
        println!("  connection string: {}", hub.connection_string);
    }
    println!(
        "Linked hubs:         {}",
        if info.linked_hubs.is_empty() {
            "none"
        } else {
            ""
        }
    );
    for hub in &info.linked_hubs {
        println!(
            "  {:<50} weight {:<4} allocation {}",
            hub.name,
            hub.allocation_weight,
            if hub.apply_allocation_policy {
                "on"
            } else {
                "off"
            }
        );
    }
}
