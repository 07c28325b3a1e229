//! `opendps serve`: open the store, make sure the service identity and TLS material exist, bind the
//! listeners, and serve until SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dps_core::access::{Authorizer, ServiceIdentity};
use dps_core::clock::{Clock, SystemClock};
use dps_core::management::Management;
use dps_core::provisioning::{Provisioning, ProvisioningSettings};
use dps_core::store::{IdentityStore as _, Store};
use dps_http::AppState;
use dps_outbound::{HubEndpoints, RestHubClient, RestHubSettings};
use dps_store::SqliteStore;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::datadir::{DataDir, Runtime};
use crate::{pki, worker};

/// Runs the service until a stop signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let data = DataDir::new(&config.data_dir);
    data.create()?;
    let store = SqliteStore::open(config.database_path()).with_context(|| {
        format!(
            "while opening the database {}",
            config.database_path().display()
        )
    })?;
    let identity = store
        .init_identity(&ServiceIdentity::generate())
        .await
        .context("while reading the service identity")?;
    let (server_identity, ca_created) = pki::server_identity(&config.tls, &data)?;
    if ca_created {
        tracing::info!(ca = %data.ca_file().display(), "created a development CA; clients must trust this file");
    }
    let tls = TlsAcceptor::from(pki::server_config(server_identity)?);
    let listener = TcpListener::bind(config.http.listen).await.with_context(|| {
        format!("while binding {}; is another service using it? Choose another address with --listen", config.http.listen)
    })?;
    let https = listener.local_addr()?;
    let service_host = service_host(&config.http.public_host, https.port());

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let authorizer = Authorizer::new(
        identity.clone(),
        Arc::clone(&clock),
        config.service_api.sas_clock_skew_secs,
    );
    let management = Arc::new(Management::new(
        Arc::clone(&shared),
        Arc::clone(&clock),
        authorizer,
    ));

    let hub_client = RestHubClient::new(RestHubSettings {
        timeout: Duration::from_secs(config.provisioning.hub_timeout_secs),
        extra_roots_pem: std::fs::read(data.ca_file()).into_iter().collect(),
        endpoints: HubEndpoints::new(),
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    let wake = Arc::new(Notify::new());
    let waker = Arc::clone(&wake);
    let provisioning = Arc::new(Provisioning::new(
        Arc::clone(&shared),
        Arc::new(hub_client),
        Arc::clone(&clock),
        identity.id_scope.clone(),
        provisioning_settings(&config),
        Box::new(move || waker.notify_one()),
    ));
    let app = dps_http::router(Arc::new(AppState {
        management,
        provisioning: Arc::clone(&provisioning),
        clock: Arc::clone(&clock),
        max_body_bytes: config.http.max_body_bytes,
    }));

    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(dps_http::serve(listener, tls, app, stop_rx.clone()));
    let node = format!(
        "node-{}-{}",
        std::process::id(),
        clock.now().as_millisecond()
    );
    let worker = tokio::spawn(worker::run(
        provisioning,
        shared,
        clock,
        wake,
        node,
        stop_rx,
    ));
    data.write_runtime(&Runtime {
        pid: std::process::id(),
        https,
        service_host: service_host.clone(),
    })?;
    tracing::info!(
        %https,
        id_scope = %identity.id_scope,
        data_dir = %data.root().display(),
        "opendps is serving https://{service_host}; run `opendps info --data-dir {}` for connection strings",
        data.root().display()
    );

    stop_signal().await;
    tracing::info!("stopping: finishing requests in flight");
    let _ = stop_tx.send(true);
    if let Err(err) = server.await {
        tracing::error!(%err, "the HTTPS server task failed");
    }
    if let Err(err) = worker.await {
        tracing::error!(%err, "the registration worker failed");
    }
    store.close();
    data.remove_runtime();
    tracing::info!("stopped");
    Ok(())
}

fn provisioning_settings(config: &Config) -> ProvisioningSettings {
    let p = &config.provisioning;
    ProvisioningSettings {
        retry_after_secs: p.retry_after_secs,
        sas_clock_skew_secs: config.service_api.sas_clock_skew_secs,
        default_allocation_policy: p.default_allocation_policy,
        region: p.region.clone(),
        hub_attempts: p.hub_attempts,
        hub_retry_ms: i64::try_from(p.hub_retry_ms).unwrap_or(i64::MAX),
    }
}

/// `host:port`, or just `host` on 443.
pub fn service_host(public_host: &str, port: u16) -> String {
    if port == 443 {
        public_host.to_owned()
    } else {
        format!("{public_host}:{port}")
    }
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
