//! `opendps info`: everything a script needs to reach a service, read from its data directory.

use anyhow::{Context, bail};
use dps_core::access::OWNER_POLICY;
use dps_core::linked_hub::LinkedHub;
use dps_core::store::{IdentityStore as _, LinkedHubStore as _};
use dps_store::SqliteStore;
use serde_json::{Value, json};

use crate::config::Config;
use crate::datadir::DataDir;
use crate::serve::service_host;

/// Collects the service's details as JSON.
pub async fn collect(config: &Config) -> anyhow::Result<Value> {
    let data = DataDir::new(&config.data_dir);
    let db = config.database_path();
    if !db.exists() {
        bail!(
            "there is no opendps database at {}; start the service once with `opendps serve --data-dir {}`",
            db.display(),
            config.data_dir.display()
        );
    }
    // Read only: `info` (and every CLI command that finds its service through it) must never take
    // the write lock or migrate the file of a service that may be running.
    let store = SqliteStore::open_read_only(&db)
        .with_context(|| format!("while opening {}", db.display()))?;
    let identity = store
        .identity()
        .await?
        .context("the database has no service identity yet; start `opendps serve` once")?;
    let hubs = store.list_linked_hubs().await?;
    let runtime = data.read_runtime();
    let minihub_db = data.root().join("minihub.db");
    let minihubs: Vec<Value> = if let Some(running) = &runtime {
        running.minihubs.clone()
    } else if minihub_db.exists() {
        minihub::Minihub::read_hubs(&minihub_db)
            .with_context(|| format!("while opening {}", minihub_db.display()))?
            .iter()
            .map(|h| json!({"hostName": h.host_name, "connectionString": h.connection_string()}))
            .collect()
    } else {
        Vec::new()
    };
    let host = match &runtime {
        Some(rt) => rt.service_host.clone(),
        None => service_host(&config.http.public_host, config.http.listen.port()),
    };
    let policies: Vec<Value> = identity
        .policies
        .iter()
        .map(|p| json!({"name": p.name, "rights": p.rights, "connectionString": p.connection_string(&host)}))
        .collect();
    let owner = identity
        .policy(OWNER_POLICY)
        .map(|p| p.connection_string(&host));
    let ca = config.tls.cert_file.is_none().then(|| data.ca_file());
    Ok(json!({
        "idScope": identity.id_scope,
        "serviceHost": host,
        "serviceConnectionString": owner,
        "policies": policies,
        "caFile": ca.map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
        "listen": {
            "https": runtime.as_ref().map(|r| r.https).unwrap_or(config.http.listen),
            "mqtt": runtime.as_ref().map_or(config.mqtt.enabled.then_some(config.mqtt.listen), |r| r.mqtt),
        },
        "linkedHubs": hubs.iter().map(LinkedHub::describe).collect::<Vec<_>>(),
        "minihubs": minihubs,
        "running": runtime.map(|r| json!({"pid": r.pid})),
        "dataDir": std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone()),
    }))
}

/// Prints the details for people.
pub fn print_human(info: &Value) {
    let s = |k: &str| info[k].as_str().unwrap_or("-").to_owned();
    println!("ID scope:            {}", s("idScope"));
    println!("Service host:        {}", s("serviceHost"));
    println!("Connection string:   {}", s("serviceConnectionString"));
    println!("CA certificate:      {}", s("caFile"));
    println!(
        "HTTPS listener:      {}",
        info["listen"]["https"].as_str().unwrap_or("-")
    );
    println!(
        "MQTT listener:       {}",
        info["listen"]["mqtt"].as_str().unwrap_or("off")
    );
    match info["running"]["pid"].as_u64() {
        Some(pid) => println!("Running:             yes (pid {pid})"),
        None => println!("Running:             no"),
    }
    println!("Policies:");
    for p in info["policies"].as_array().into_iter().flatten() {
        let rights: Vec<&str> = p["rights"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  {:<26} {}",
            p["name"].as_str().unwrap_or("-"),
            rights.join(", ")
        );
    }
    for hub in info["minihubs"].as_array().into_iter().flatten() {
        println!(
            "In-process hub:      {}",
            hub["hostName"].as_str().unwrap_or("-")
        );
        println!(
            "  connection string: {}",
            hub["connectionString"].as_str().unwrap_or("-")
        );
    }
    let hubs = info["linkedHubs"].as_array().cloned().unwrap_or_default();
    println!(
        "Linked hubs:         {}",
        if hubs.is_empty() { "none" } else { "" }
    );
    for hub in hubs {
        println!(
            "  {:<50} weight {:<4} allocation {}",
            hub["name"].as_str().unwrap_or("-"),
            hub["allocationWeight"],
            if hub["applyAllocationPolicy"].as_bool().unwrap_or(true) {
                "on"
            } else {
                "off"
            }
        );
    }
}
