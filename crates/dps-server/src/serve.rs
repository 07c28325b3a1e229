//! `opendps serve`: open the store, make sure the service identity and TLS material exist, bind the
//! listeners, and serve until SIGTERM or SIGINT.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::Request;
use axum::http::header;
use axum::routing::get;
use dps_amqp::AmqpLimits;
use dps_core::access::{Authorizer, ServiceIdentity};
use dps_core::clock::{Clock, SystemClock};
use dps_core::hub::{
    HubClient, HubDevice, HubError, HubTwin, IdentityWrite, ProbeAnswer, ProbeCall, TwinWrite,
};
use dps_core::linked_hub::{LinkedHub, LinkedHubRequest};
use dps_core::management::Management;
use dps_core::provisioning::{Provisioning, ProvisioningSettings, Transport};
use dps_core::store::Store;
use dps_http::AppState;
use dps_mqtt::{DpsConnector, MqttLimits};
use dps_outbound::{HubEndpoints, ReqwestWebhookClient, RestHubClient, RestHubSettings};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use minihub::{DirectHubClient, HubMqtt, Minihub};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::Config;
use crate::datadir::{DataDir, DataDirLock, Runtime};
use crate::storage::ServiceStore;
use crate::websocket::{WebSockets, with_websockets};
use crate::{pki, process, worker};

/// Binds the configured listeners and runs the service until a stop signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut signals = StopSignals::listen().context("while listening for SIGTERM and SIGINT")?;
    process::raise_open_files(config.max_connections());
    let listeners = Listeners::bind(&config).await?;
    let service = start(config, listeners).await?;
    let mqtt = service
        .mqtt
        .map_or_else(|| "MQTT off".to_owned(), |addr| format!("MQTT on {addr}"));
    tracing::info!(
        https = %service.https,
        mqtt = %service.mqtt.map_or_else(|| "off".to_owned(), |addr| addr.to_string()),
        id_scope = %service.id_scope,
        data_dir = %service.data.root().display(),
        "opendps is serving https://{} ({mqtt}); run `opendps info --data-dir {}` for connection strings",
        service.service_host,
        service.data.root().display()
    );
    signals.recv().await;
    tracing::info!("stopping: finishing requests in flight");
    service.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// The sockets a service serves on. The caller binds them (ports 0 in tests and the demo), so the
/// service itself never decides where it listens.
pub struct Listeners {
    /// HTTPS: the device and service APIs, and in-process hubs.
    pub https: TcpListener,
    /// MQTT over TLS, when MQTT is served.
    pub mqtt: Option<TcpListener>,
    /// AMQP over TLS, when AMQP is served.
    pub amqp: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses `config` names (`[http] listen`, and `[mqtt] listen` and
    /// `[amqp] listen` when enabled).
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let https = tls_accept::bind(config.http.listen).with_context(|| {
            format!("while binding {}; is another service using it? Choose another address with --listen", config.http.listen)
        })?;
        let mqtt = match config.mqtt.enabled {
            true => Some(tls_accept::bind(config.mqtt.listen).with_context(|| {
                format!("while binding MQTT on {}; is another MQTT server using it? Choose another address with --mqtt-listen", config.mqtt.listen)
            })?),
            false => None,
        };
        let amqp = match config.amqp.enabled {
            true => Some(tls_accept::bind(config.amqp.listen).with_context(|| {
                format!("while binding AMQP on {}; is another AMQP server using it? Choose another address with --amqp-listen, or turn AMQP off with [amqp] enabled = false", config.amqp.listen)
            })?),
            false => None,
        };
        Ok(Self { https, mqtt, amqp })
    }
}

/// A running service: its listeners, its in-process hubs and the tasks that serve them.
pub struct Service {
    /// The bound HTTPS address (DPS device and service APIs, in-process hubs).
    pub https: SocketAddr,
    /// The bound MQTT address, when MQTT is enabled.
    pub mqtt: Option<SocketAddr>,
    /// The bound AMQP address, when AMQP is enabled.
    pub amqp: Option<SocketAddr>,
    /// `host[:port]` clients use.
    pub service_host: String,
    /// The ID scope.
    pub id_scope: String,
    /// The in-process hubs, when any are configured.
    pub minihub: Option<Arc<Minihub>>,
    data: DataDir,
    /// Held while the service runs: no second server on the same data directory.
    _lock: DataDirLock,
    store: ServiceStore,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Service {
    /// The CA file clients must trust.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.data.ca_file()
    }

    /// Stops accepting, finishes the requests in flight, and closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            if let Err(err) = task.await {
                tracing::error!(%err, "the {name} task failed");
            }
        }
        self.store.close().await;
        self.data.remove_runtime();
    }
}

/// Opens the store and starts serving on `listeners`; returns once everything serves.
/// [`Service::shutdown`] stops it.
pub async fn start(config: Config, listeners: Listeners) -> anyhow::Result<Service> {
    let data = DataDir::new(&config.data_dir);
    data.create()?;
    let lock = data.lock("service")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = ServiceStore::open(&config, Arc::clone(&clock)).await?;
    store.check_belongs_to(&config, &data).await?;
    let shared: Arc<dyn Store> = store.shared();
    let identity = shared
        .init_identity(&ServiceIdentity::generate())
        .await
        .context("while reading the service identity")?;
    data.record_scope(identity.id_scope.as_str())?;
    let minihub = open_minihub(&config, &data, &store, Arc::clone(&clock)).await?;
    let mut tls_config = config.tls.clone();
    // Clients reach the service by its public host: the development certificate must name it.
    tls_config.names.push(config.http.public_host.clone());
    tls_config.names.extend(config.minihub.hubs.iter().cloned());
    let (server_identity, ca_created) = pki::server_identity(&tls_config, &data)?;
    if ca_created {
        tracing::info!(ca = %data.ca_file().display(), "created a development CA; clients must trust this file");
    }
    let mqtt_tls = TlsAcceptor::from(pki::device_server_config(server_identity.clone())?);
    let amqp_tls = mqtt_tls.clone();
    let tls = TlsAcceptor::from(pki::server_config(server_identity)?);
    let Listeners {
        https: listener,
        mqtt: mqtt_listener,
        amqp: amqp_listener,
    } = listeners;
    let https = listener.local_addr()?;
    let service_host = service_host(&config.http.public_host, https.port());

    let authorizer = Authorizer::new(
        identity.clone(),
        Arc::clone(&clock),
        config.service_api.sas_clock_skew_secs,
    );
    // Hubs and webhooks may use certificates from the development CA as well as public ones.
    let dev_ca: Vec<Vec<u8>> = std::fs::read(data.ca_file()).into_iter().collect();
    let hub_client = RestHubClient::new(RestHubSettings {
        timeout: Duration::from_secs(config.provisioning.hub_timeout_secs),
        extra_roots_pem: dev_ca.clone(),
        endpoints: hub_endpoints(&config, https),
        clock: Arc::clone(&clock),
    })
    .context("while setting up the IoT hub client")?;
    let wake = Arc::new(Notify::new());
    let waker = Arc::clone(&wake);
    let lease_ms = millis(config.provisioning.operation_lease_secs);
    let handoff = worker::Handoff::new(data.node_id()?, Arc::clone(&clock), lease_ms);
    store.watch_work(Arc::clone(&wake));
    let webhooks =
        ReqwestWebhookClient::new(&dev_ca, config.provisioning.webhook_max_response_bytes)
            .context("while setting up the webhook client")?;
    let hub_client: Arc<dyn HubClient> = Arc::new(RoutedHubClient {
        direct: minihub
            .as_ref()
            .filter(|_| config.minihub.direct)
            .map(|hub| DirectHubClient::new(Arc::clone(hub))),
        rest: hub_client,
    });
    let management = Arc::new(Management::new(
        Arc::clone(&shared),
        Arc::clone(&clock),
        authorizer,
        Arc::clone(&hub_client),
    ));
    let provisioning = Arc::new(
        Provisioning::new(
            Arc::clone(&shared),
            hub_client,
            Arc::new(webhooks),
            Arc::clone(&clock),
            identity.id_scope.clone(),
            provisioning_settings(&config),
            Box::new(move || waker.notify_one()),
        )
        .with_intake(Arc::clone(&handoff) as Arc<dyn dps_core::provisioning::Intake>)
        .answering_inline(Arc::new(|wait| Box::pin(tokio::time::sleep(wait)))),
    );
    if let Some(hub) = &minihub
        && config.minihub.link
    {
        link_minihubs(hub, &config.minihub.hubs, shared.as_ref()).await?;
    }
    warn_about_unserved_hubs(&config, &data, &store).await;
    let app = dps_http::router(Arc::new(AppState {
        management,
        provisioning: Arc::clone(&provisioning),
        clock: Arc::clone(&clock),
        max_body_bytes: config.http.max_body_bytes,
    }));

    let minihub_for_mqtt = minihub.clone();
    let minihub_handle = minihub.clone();
    let minihubs = match &minihub {
        Some(hub) => hub
            .hubs()
            .await?
            .iter()
            .map(|h| crate::info::MinihubInfo {
                host_name: h.host_name.clone(),
                connection_string: h.connection_string(),
            })
            .collect(),
        None => Vec::new(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // Devices of in-process hubs share the MQTT listener and the WebSockets, told apart by their
    // CONNECT username.
    let hubs =
        minihub_for_mqtt.map(|hub| Arc::new(HubMqtt::new(hub)) as Arc<dyn dps_mqtt::Connector>);
    let mqtt_limits = MqttLimits {
        max_connections: config.mqtt.max_connections,
        max_keep_alive: Duration::from_secs(config.mqtt.max_keep_alive_secs),
        ..MqttLimits::default()
    };
    let amqp_limits = AmqpLimits {
        max_connections: config.amqp.max_connections,
        ..AmqpLimits::default()
    };
    let sockets = Arc::new(WebSockets {
        connector: Arc::new(
            DpsConnector::new(Arc::clone(&provisioning), hubs.clone()).over(Transport::MqttWs),
        ),
        mqtt_limits,
        provisioning: Arc::clone(&provisioning),
        amqp_limits,
        stop: stop_rx.clone(),
    });
    let app = with_websockets(with_metrics(with_minihub(app, minihub)), sockets);
    let mqtt = match mqtt_listener {
        Some(mqtt_listener) => {
            let bound = mqtt_listener.local_addr()?;
            let connector = Arc::new(DpsConnector::new(Arc::clone(&provisioning), hubs));
            let task = tokio::spawn(dps_mqtt::serve(
                mqtt_listener,
                mqtt_tls,
                connector,
                mqtt_limits,
                stop_rx.clone(),
            ));
            Some((bound, task))
        }
        None => None,
    };
    let amqp = match amqp_listener {
        Some(amqp_listener) => {
            let bound = amqp_listener.local_addr()?;
            let task = tokio::spawn(dps_amqp::serve(
                amqp_listener,
                amqp_tls,
                Arc::clone(&provisioning),
                amqp_limits,
                stop_rx.clone(),
            ));
            Some((bound, task))
        }
        None => None,
    };
    let limits = dps_http::HttpLimits {
        max_connections: config.http.max_connections,
        idle_timeout: Duration::from_secs(config.http.idle_timeout_secs),
    };
    let server = tokio::spawn(dps_http::serve(listener, tls, app, limits, stop_rx.clone()));
    let worker = tokio::spawn(worker::run(
        provisioning,
        shared,
        clock,
        wake,
        handoff,
        millis(config.provisioning.operation_retention_secs),
        stop_rx,
    ));
    data.write_runtime(&Runtime {
        pid: std::process::id(),
        https,
        mqtt: mqtt.as_ref().map(|(addr, _)| *addr),
        amqp: amqp.as_ref().map(|(addr, _)| *addr),
        service_host: service_host.clone(),
        minihubs,
        storage: config.storage.url.is_some().then(|| config.storage.clone()),
    })?;
    let mut tasks = vec![("HTTPS server", server)];
    let mqtt = mqtt.map(|(addr, task)| {
        tasks.push(("MQTT server", task));
        addr
    });
    let amqp = amqp.map(|(addr, task)| {
        tasks.push(("AMQP server", task));
        addr
    });
    tasks.push(("registration worker", worker));
    Ok(Service {
        https,
        mqtt,
        amqp,
        service_host,
        id_scope: identity.id_scope.to_string(),
        minihub: minihub_handle,
        data,
        _lock: lock,
        store,
        stop: stop_tx,
        tasks,
    })
}

/// Linked hubs that an earlier `serve --hub` served in-process and this one does not: every device
/// allocated to them would fail, so say so at startup, with the two ways out.
async fn warn_about_unserved_hubs(config: &Config, data: &DataDir, store: &ServiceStore) {
    let (Ok(in_process), Ok(linked)) = (
        store.read_minihubs(data.root()).await,
        store.shared().list_linked_hubs().await,
    ) else {
        return;
    };
    for hub in linked.iter().filter(|linked| {
        in_process
            .iter()
            .any(|h| h.host_name.eq_ignore_ascii_case(&linked.host_name))
            && !config
                .minihub
                .hubs
                .iter()
                .any(|served| served.eq_ignore_ascii_case(&linked.host_name))
    }) {
        tracing::warn!(
            hub = %hub.host_name,
            "linked hub {0} was served in-process by an earlier `opendps serve --hub {0}` and is not served now, so registrations allocated to it will fail; start with `--hub {0}`, or unlink it with `opendps linked-hub delete --linked-hub {0}`",
            hub.host_name
        );
    }
}

/// Opens the in-process hubs, if any are configured, creating each one (and its keys) once.
async fn open_minihub(
    config: &Config,
    data: &DataDir,
    store: &ServiceStore,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Option<Arc<Minihub>>> {
    if config.minihub.hubs.is_empty() {
        return Ok(None);
    }
    let hub = store.open_minihub(data.root(), clock).await?;
    for name in &config.minihub.hubs {
        hub.ensure_hub(name)
            .await
            .with_context(|| format!("while creating the in-process hub {name}"))?;
        tracing::info!(hub = %name, "serving an in-process IoT hub (minihub)");
    }
    Ok(Some(Arc::new(hub)))
}

/// Devices assigned to an in-process hub are written into it directly (unless `minihub.direct` is
/// off); every other hub is written through its REST API.
struct RoutedHubClient {
    direct: Option<DirectHubClient>,
    rest: RestHubClient,
}

impl RoutedHubClient {
    fn route(&self, hub: &LinkedHub) -> &dyn HubClient {
        match &self.direct {
            Some(direct) if direct.serves(&hub.host_name) => direct,
            _ => &self.rest,
        }
    }
}

#[async_trait::async_trait]
impl HubClient for RoutedHubClient {
    async fn upsert_device(
        &self,
        hub: &LinkedHub,
        device: &HubDevice,
    ) -> Result<IdentityWrite, HubError> {
        self.route(hub).upsert_device(hub, device).await
    }

    async fn write_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
        mode: TwinWrite,
    ) -> Result<(), HubError> {
        self.route(hub).write_twin(hub, device_id, twin, mode).await
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        self.route(hub).get_twin(hub, device_id).await
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        self.route(hub).delete_device(hub, device_id).await
    }

    async fn probe_call(
        &self,
        hub: &LinkedHub,
        call: ProbeCall,
        device_id: &str,
    ) -> Result<ProbeAnswer, HubError> {
        self.route(hub).probe_call(hub, call, device_id).await
    }
}

/// Links each in-process hub that is not linked yet, with weight 1.
async fn link_minihubs(hub: &Minihub, names: &[String], store: &dyn Store) -> anyhow::Result<()> {
    let linked = store.list_linked_hubs().await?;
    for info in hub.hubs().await? {
        let wanted = names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&info.host_name));
        if !wanted
            || linked
                .iter()
                .any(|l| l.host_name.eq_ignore_ascii_case(&info.host_name))
        {
            continue;
        }
        let request = LinkedHubRequest {
            connection_string: info.connection_string(),
            allocation_weight: None,
            apply_allocation_policy: None,
            location: None,
        };
        let link = LinkedHub::from_request(request)
            .map_err(|e| anyhow::anyhow!("linking {}: {e}", info.host_name))?;
        store.put_linked_hub(&link).await?;
        tracing::info!(hub = %info.host_name, "linked the in-process hub");
    }
    Ok(())
}

/// In-process hubs are reached at this service's own listener, whatever their names resolve to.
fn hub_endpoints(config: &Config, https: SocketAddr) -> HubEndpoints {
    let ip = if https.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        https.ip()
    };
    config
        .minihub
        .hubs
        .iter()
        .map(|name| (name.to_ascii_lowercase(), SocketAddr::new(ip, https.port())))
        .collect()
}

/// Sends requests addressed (by Host) to an in-process hub to minihub, everything else to DPS.
fn with_minihub(dps: Router, hub: Option<Arc<Minihub>>) -> Router {
    let Some(hub) = hub else { return dps };
    let hub_router = minihub::router(Arc::clone(&hub));
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default();
        let target = if hub.hub_for_host(host).is_some() {
            hub_router.clone()
        } else {
            dps.clone()
        };
        async move { target.oneshot(request).await }
    }))
}

/// The process's Prometheus recorder, installed on first use.
fn prometheus() -> &'static Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE.get_or_init(|| {
        const BUCKETS: &[f64] = &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .ok()?
            .set_buckets_for_metric(
                Matcher::Full("opendps_store_commit_writes".into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )
            .ok()?
            .build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => Some(handle),
            Err(err) => {
                tracing::warn!(%err, "metrics are not recorded");
                None
            }
        }
    })
}

/// [`process::cpu_seconds`] as the Prometheus sample that process collectors name
/// `process_cpu_seconds_total`; empty where it is not known.
fn process_cpu_sample() -> String {
    process::cpu_seconds()
        .map(|secs| {
            format!(
                "# HELP process_cpu_seconds_total User and system CPU time spent, in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {secs}\n"
            )
        })
        .unwrap_or_default()
}

/// `GET /metrics`: the Prometheus text format (no secrets; served without a token, like /healthz).
fn with_metrics(app: Router) -> Router {
    let Some(handle) = prometheus().clone() else {
        return app;
    };
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let mut body = handle.render();
                body.push_str(&process_cpu_sample());
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .fallback_service(app)
}

fn provisioning_settings(config: &Config) -> ProvisioningSettings {
    let p = &config.provisioning;
    ProvisioningSettings {
        retry_after_secs: p.retry_after_secs,
        sas_clock_skew_secs: p.device_sas_clock_skew_secs,
        max_payload_bytes: p.max_payload_bytes,
        default_allocation_policy: p.default_allocation_policy,
        region: p.region.clone(),
        hub_retry_for_ms: i64::try_from(p.hub_retry_for_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000),
        hub_retry_ms: i64::try_from(p.hub_retry_ms).unwrap_or(i64::MAX),
        hub_retry_max_ms: i64::try_from(p.hub_retry_max_ms).unwrap_or(i64::MAX),
        webhook_timeout: Duration::from_millis(p.webhook_timeout_ms),
        webhook_retries: p.webhook_retries,
        webhook_first_retry_ms: i64::try_from(p.webhook_first_retry_ms).unwrap_or(i64::MAX),
        webhook_retry_increment_ms: i64::try_from(p.webhook_retry_increment_ms).unwrap_or(i64::MAX),
        answer_within: Duration::from_millis(p.answer_within_ms),
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

/// SIGINT and SIGTERM, listened for from the moment this is made: a signal that arrives before
/// anyone waits for it is kept, not lost to the default action (which would end the process).
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening.
    pub fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves on the next SIGINT or SIGTERM (Ctrl-C elsewhere).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn stop_signal() {
    match StopSignals::listen() {
        Ok(mut signals) => signals.recv().await,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for stop signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// `secs` in milliseconds, saturating.
fn millis(secs: u64) -> i64 {
    i64::try_from(secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_time_is_a_metrics_sample() {
        assert!(process_cpu_sample().contains("\nprocess_cpu_seconds_total "));
    }
}
