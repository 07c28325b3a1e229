//! `opendps hub`: minihub on its own, without the provisioning service, for a hub that runs on
//! another machine than DPS. It prints each hub's connection string (to link it with
//! `opendps linked-hub create`) and serves until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use minihub::Minihub;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::datadir::DataDir;
use crate::pki;
use crate::serve::{service_host, stop_signal};

/// Settings of `opendps hub`.
pub struct HubSettings {
    /// Data directory (minihub.db, development CA).
    pub data_dir: std::path::PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Hub host names to serve.
    pub hubs: Vec<String>,
    /// Extra certificate names.
    pub tls: TlsConfig,
}

/// Serves the hubs until a stop signal.
pub async fn run(settings: HubSettings) -> anyhow::Result<()> {
    if settings.hubs.is_empty() {
        bail!(
            "name at least one hub with --hub, e.g. --hub contoso-toasters-hub-1.azure-devices.net"
        );
    }
    let data = DataDir::new(&settings.data_dir);
    data.create()?;
    let _lock = data.lock("hub")?;
    crate::process::raise_open_files(dps_http::HttpLimits::default().max_connections as u64);
    let path = data.root().join("minihub.db");
    let hub = Arc::new(
        Minihub::open(&path).with_context(|| format!("while opening {}", path.display()))?,
    );
    let mut tls = settings.tls.clone();
    tls.names.extend(settings.hubs.iter().cloned());
    let (identity, _) = pki::server_identity(&tls, &data)?;
    let acceptor = TlsAcceptor::from(pki::server_config(identity)?);
    let listener = tls_accept::bind(settings.listen).with_context(|| {
        format!(
            "while binding {}; choose another address with --listen",
            settings.listen
        )
    })?;
    let port = listener.local_addr()?.port();
    for name in &settings.hubs {
        let info = hub
            .ensure_hub(name)
            .await
            .with_context(|| format!("while creating hub {name}"))?;
        let cs = info.connection_string().replacen(
            &format!("HostName={name};"),
            &format!("HostName={};", service_host(name, port)),
            1,
        );
        println!("{name}: {cs}");
    }
    println!("CA certificate: {}", data.ca_file().display());
    tracing::info!(listen = %listener.local_addr()?, hubs = settings.hubs.len(), "minihub is serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(dps_http::serve(
        listener,
        acceptor,
        minihub::router(hub),
        dps_http::HttpLimits::default(),
        stop_rx,
    ));
    stop_signal().await;
    let _ = stop_tx.send(true);
    server.await.context("the HTTPS server task failed")?;
    Ok(())
}
