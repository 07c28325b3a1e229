//! `opendps bench`: simulated devices against a running service, and the baseline that says how
//! close it gets to what the machine allows.
//!
//! Each simulated device does what a real one does: a new TCP and TLS connection, the register
//! request with its group-derived SAS token, polls until the operation ends, and a close. The
//! baseline phase opens and closes as many TLS connections against the same port and does nothing
//! else, so the report can state registrations/s ÷ connections/s measured in the same run.
//!
//! With `--attestation x509` each device has its own certificate, signed by an intermediate under a
//! test root that the run uploads as a verified CA certificate; symmetric-key devices register
//! in the same run (half before the X.509 devices, half after), so the report can state the X.509
//! rate next to theirs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::Transport;
use crate::client::{ClientSettings, ServiceClient};
use crate::pki::TestChain;
use dps_core::device::RegistrationOperationStatus;
use dps_core::model::EnrollmentStatus;
use dps_device::amqp::DpsAmqp;
use dps_device::https::{API_VERSION, retry_after_header};
use dps_device::mqtt::{Carrier, DpsMqtt, tls_client_config};
use dps_device::{DeviceExchange, Ended, Reply, register_and_poll};

/// `opendps bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of simulated devices (each registers once).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Devices registering at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Device transport.
    #[arg(long, value_enum, default_value_t = Transport::Https)]
    transport: Transport,
    /// Keep one connection per concurrent client across devices instead of a new TLS connection
    /// per device (HTTPS only; an MQTT connection belongs to one device).
    #[arg(long)]
    reuse_connections: bool,
    /// Poll every N milliseconds instead of waiting the `Retry-After` the service sends (as SDKs do).
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Use this existing enrollment group instead of creating one (give --group-key too).
    #[arg(long, requires = "group_key")]
    group_id: Option<String>,
    /// The primary key of --group-id.
    #[arg(long)]
    group_key: Option<String>,
    /// Create the group with custom allocation through this webhook (for example the Contoso
    /// allocator) instead of hashed allocation over all linked hubs.
    #[arg(long)]
    webhook_url: Option<String>,
    /// Registration id suffixes, used in turn (for example `-contoso-tstrsd-007,-contoso-hpsd-088`
    /// for the Contoso allocator).
    #[arg(long, value_delimiter = ',')]
    id_suffix: Vec<String>,
    /// Connections of the baseline phase [default: --devices].
    #[arg(long)]
    baseline_connections: Option<usize>,
    /// Skip the baseline phase.
    #[arg(long, conflicts_with = "baseline_only")]
    no_baseline: bool,
    /// Run only the baseline phase.
    #[arg(long)]
    baseline_only: bool,
    /// Another node of the same service, found by its data directory (repeatable): the concurrent
    /// clients are spread over all the nodes in turn, as a load balancer in front of them would,
    /// and the server CPU reported is the sum of every node's.
    #[arg(long = "also-data-dir", value_name = "DATA_DIR")]
    pub also_data_dirs: Vec<std::path::PathBuf>,
    /// Give a device up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Keep the enrollment group the bench created.
    #[arg(long)]
    keep_group: bool,
    /// Instead of registering: open this many MQTT device connections (TLS, CONNECT with the
    /// device's SAS, SUBSCRIBE), hold them idle, and report the service's resident memory.
    #[arg(long, conflicts_with_all = ["baseline_only", "reuse_connections"])]
    idle_connections: Option<usize>,
    /// How long to hold the idle connections before measuring.
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
    /// How the devices attest: a key derived from the group's (symmetric-key), or a certificate
    /// each under a test root the run uploads as a verified CA certificate (x509). An x509 run
    /// registers as many symmetric-key devices too (half before, half after) and reports both rates.
    #[arg(long, value_enum, default_value_t = BenchAttestation::SymmetricKey,
        conflicts_with_all = ["group_id", "idle_connections", "reuse_connections"])]
    attestation: BenchAttestation,
}

/// How the bench's devices attest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchAttestation {
    /// A SAS token signed with the device's key, derived from the group's.
    SymmetricKey,
    /// The device's own certificate in the TLS handshake.
    X509,
}

/// Where the service is.
struct Target {
    addr: SocketAddr,
    host_header: String,
    server_name: ServerName<'static>,
    scope: String,
    tls: TlsConnector,
    /// The CA file the TLS connector trusts, for the X.509 devices' own connectors.
    ca: Option<std::path::PathBuf>,
    /// For MQTT: over TLS, or over WebSockets on the HTTPS port.
    carrier: Carrier,
}

/// One simulated device: its registration id and what it proves itself with.
struct SimDevice {
    rid: String,
    proof: Proof,
}

enum Proof {
    /// The device key (derived from the group's), to sign SAS tokens with.
    Key(String),
    /// A TLS connector that presents the device's certificate.
    Certificate(TlsConnector),
}

/// What one device saw.
struct DeviceResult {
    /// From the first byte (TCP connect) to the terminal answer.
    total: Duration,
    /// `total` less the time the device chose to wait before polling.
    service: Duration,
    /// `assigned`, or why not.
    outcome: Result<(), Failure>,
}

/// What a bench run measured: printed for people, or serialized once as `--output json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    transport: &'static str,
    devices: usize,
    concurrency: usize,
    new_connection_per_device: bool,
    target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<BaselineReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<IdleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    registrations: Option<RegistrationsReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    /// `symmetricKey` or `x509`: how the devices of `registrations` attested.
    attestation: &'static str,
    /// In an X.509 run, the symmetric-key devices registered first for comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    symmetric_key_registrations: Option<RegistrationsReport>,
    /// In an X.509 run, X.509 registrations/s ÷ symmetric-key registrations/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_to_symmetric_key: Option<f64>,
}

/// Bare TLS connections: connect, handshake, close.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct BaselineReport {
    connections: usize,
    connections_per_sec: f64,
    failures: usize,
    /// The server's CPU per connection, from its own counter (summed over the nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_ms_per_connection: Option<f64>,
    /// This load generator's own CPU per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    bench_cpu_ms_per_connection: Option<f64>,
}

/// Idle MQTT sessions held, and what they cost the service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct IdleReport {
    connections: usize,
    failures: usize,
    held_secs: u64,
    #[serde(rename = "serviceRssMiBBefore")]
    service_rss_mib_before: f64,
    #[serde(rename = "serviceRssMiB")]
    service_rss_mib: f64,
    #[serde(rename = "kibPerConnection")]
    kib_per_connection: f64,
}

/// The registrations: how many were assigned, how fast, and why the others were not.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationsReport {
    assigned: usize,
    errors: BTreeMap<String, usize>,
    seconds: f64,
    per_sec: f64,
    latency_ms: Option<Percentiles>,
    service_latency_ms: Option<Percentiles>,
    /// The server's CPU per registration, from its own counter (summed over the nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_ms_per_registration: Option<f64>,
    /// This load generator's own CPU per registration.
    #[serde(skip_serializing_if = "Option::is_none")]
    bench_cpu_ms_per_registration: Option<f64>,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// Why a device was not assigned; shown (and counted in the report) by its [`std::fmt::Display`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The registration ended `failed` or `disabled`, with its DPS error code.
    Ended { status: String, code: Option<u32> },
    /// A request was refused (401, 400, …), with its DPS error code.
    Refused { status: u16, code: Option<u32> },
    /// Connecting or talking to the service failed.
    Transport(String),
    /// No terminal answer in time.
    Timeout,
}

impl Failure {
    /// The DPS error code, if the service gave one.
    fn code(&self) -> Option<u32> {
        match self {
            Self::Ended { code, .. } | Self::Refused { code, .. } => *code,
            Self::Transport(_) | Self::Timeout => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ended {
                status,
                code: Some(code),
            } => write!(f, "{status} {code}"),
            Self::Ended { status, code: None } => write!(f, "{status}"),
            Self::Refused {
                code: Some(code), ..
            } => write!(f, "{code}"),
            Self::Refused { status, code: None } => write!(f, "HTTP {status}"),
            Self::Transport(why) => write!(f, "{why}"),
            Self::Timeout => write!(f, "timeout"),
        }
    }
}

/// The running service of `data_dir`, as a target of the bench's transport, and its process.
async fn target_of(
    data_dir: &std::path::Path,
    args: &BenchArgs,
) -> anyhow::Result<(Target, dps_server::info::RunningInfo)> {
    let info = dps_server::info::collect(&dps_server::config::Config::for_data_dir(data_dir)?)
        .await
        .context("no local service found; start `opendps serve` or give --data-dir")?;
    let Some(running) = info.running else {
        bail!(
            "the service of {} is not running; start it with `opendps serve`",
            data_dir.display()
        );
    };
    let ca = info.ca_file.clone();
    let tls = TlsConnector::from(bench_tls(tls_client_config(ca.as_deref(), None)?));
    let port = match args.transport {
        Transport::Https | Transport::MqttWs | Transport::AmqpWs => Some(info.listen.https),
        Transport::Mqtt => info.listen.mqtt,
        Transport::Amqp => info.listen.amqp,
    }
    .map(|a| a.port())
    .context("the service does not listen on that transport")?;
    let host = info.service_host.as_str();
    let name = host.rsplit_once(':').map_or(host, |(n, _)| n).to_owned();
    let addr = tokio::net::lookup_host((name.as_str(), port))
        .await?
        .next()
        .with_context(|| format!("{name} does not resolve"))?;
    let target = Target {
        addr,
        host_header: host.to_owned(),
        server_name: ServerName::try_from(name.clone())?,
        scope: info.id_scope.clone(),
        tls,
        ca,
        carrier: match args.transport {
            Transport::MqttWs | Transport::AmqpWs => Carrier::WebSocket,
            Transport::Https | Transport::Mqtt | Transport::Amqp => Carrier::Tls,
        },
    };
    Ok((target, running))
}

/// Runs the bench against the service of `data_dir` (or the one `--login` names).
pub async fn run(
    args: BenchArgs,
    settings: ClientSettings,
    json_output: bool,
) -> anyhow::Result<()> {
    if args.reuse_connections && args.transport != Transport::Https {
        bail!("--reuse-connections is for HTTPS; an MQTT connection is one device's session");
    }
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--devices and --concurrency must be at least 1");
    }
    let (target, running) = target_of(&settings.data_dir, &args).await?;
    let target = Arc::new(target);
    let mut targets = vec![Arc::clone(&target)];
    for dir in &args.also_data_dirs {
        let (node, _) = target_of(dir, &args).await?;
        if node.scope != target.scope {
            bail!(
                "the service of {} has ID scope {}, not {}: --also-data-dir takes nodes of the same service",
                dir.display(),
                node.scope,
                target.scope
            );
        }
        targets.push(Arc::new(node));
    }
    let addr = targets
        .iter()
        .map(|t| t.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");

    let mut report = Report {
        transport: match args.transport {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqtt-ws",
            Transport::Amqp => "amqp",
            Transport::AmqpWs => "amqp-ws",
        },
        devices: args.devices,
        concurrency: args.concurrency,
        new_connection_per_device: !args.reuse_connections,
        target: addr,
        baseline: None,
        idle: None,
        registrations: None,
        ratio_to_baseline: None,
        group: None,
        attestation: match args.attestation {
            BenchAttestation::SymmetricKey => "symmetricKey",
            BenchAttestation::X509 => "x509",
        },
        symmetric_key_registrations: None,
        ratio_to_symmetric_key: None,
    };
    // Each further node's CPU is read from its own /metrics, through its own data directory.
    let mut nodes = Vec::with_capacity(args.also_data_dirs.len());
    for dir in &args.also_data_dirs {
        nodes.push(
            ServiceClient::connect(ClientSettings {
                login: None,
                ca_file: None,
                data_dir: dir.clone(),
            })
            .await?,
        );
    }
    let client = ServiceClient::connect(settings).await?;
    let cpu = CpuMeter {
        nodes: std::iter::once(&client).chain(&nodes).collect(),
    };
    let baseline = match args.no_baseline {
        true => None,
        false => {
            let n = args.baseline_connections.unwrap_or(args.devices);
            let ((rate, failures), spent) = cpu
                .spent(baseline(&target, n, args.concurrency, json_output))
                .await;
            report.baseline = Some(BaselineReport {
                connections: n,
                connections_per_sec: round(rate),
                failures,
                server_cpu_ms_per_connection: per_item(spent.server, n),
                bench_cpu_ms_per_connection: per_item(spent.bench, n),
            });
            Some(rate)
        }
    };
    if args.baseline_only {
        return print(&report, json_output);
    }

    let (group_id, group_key, created) = match (&args.group_id, &args.group_key) {
        (Some(id), Some(key)) => (id.clone(), key.clone(), false),
        _ => {
            let id = format!("bench-{}", random_hex(4));
            let key = dps_core::sas::generate_key();
            let attestation = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}});
            create_group(&client, &id, attestation, args.webhook_url.as_deref()).await?;
            (id, key, true)
        }
    };
    if let Some(n) = args.idle_connections {
        let pid = u64::from(running.pid);
        let idle = idle(&target, &args, n, pid, &group_key, json_output).await;
        if created && !args.keep_group {
            delete(&client, "enrollmentGroups", &group_id).await;
        }
        report.idle = Some(idle?);
        return print(&report, json_output);
    }
    let run_id = random_hex(4);
    let devices: Vec<SimDevice> = registration_ids(&args, &format!("bench-{run_id}-"))
        .into_iter()
        .map(|rid| {
            let key = dps_core::sas::derive_device_key(&group_key, &rid).unwrap_or_default();
            SimDevice {
                rid,
                proof: Proof::Key(key),
            }
        })
        .collect();
    let x509_name = format!("bench-x509-{run_id}");
    let x509_devices = match args.attestation {
        BenchAttestation::SymmetricKey => None,
        BenchAttestation::X509 => {
            match x509_setup(&client, &target, &args, &x509_name, json_output).await {
                Ok(devices) => Some(devices),
                Err(err) => {
                    if created && !args.keep_group {
                        delete(&client, "enrollmentGroups", &group_id).await;
                    }
                    return Err(err);
                }
            }
        }
    };
    let (results, registrations) = match x509_devices {
        None => {
            let n = devices.len();
            let ((done, wall), spent) = cpu
                .spent(register_all(
                    &targets,
                    &args,
                    devices,
                    "registering",
                    json_output,
                ))
                .await;
            report.group = Some(group_id.clone());
            let mut registrations = summarize(&done, wall);
            spent.charge(&mut registrations, n);
            (done, registrations)
        }
        Some(x509_devices) => {
            // Half the symmetric-key devices, all the X.509 ones in two halves, then the other
            // half of the symmetric-key ones: the service slows as its databases grow, and this
            // order gives both kinds the same share of early and late registrations.
            let mut sym = devices;
            let sym_late = sym.split_off(sym.len() / 2);
            let mut x509 = x509_devices;
            let x509_late = x509.split_off(x509.len() / 2);
            let mut passes = Vec::new();
            for (devices, what) in [
                (sym, "symmetric-key devices (1/2)"),
                (x509, "X.509 devices (1/2)"),
                (x509_late, "X.509 devices (2/2)"),
                (sym_late, "symmetric-key devices (2/2)"),
            ] {
                let pass = register_all(&targets, &args, devices, what, json_output);
                passes.push(cpu.spent(pass).await);
            }
            let mut joined = |first: usize, second: usize| {
                let ((mut done, wall), cpu) = std::mem::take(&mut passes[first]);
                let ((more, more_wall), more_cpu) = std::mem::take(&mut passes[second]);
                done.extend(more);
                (done, wall + more_wall, cpu.plus(more_cpu))
            };
            let (sym_done, sym_wall, sym_cpu) = joined(0, 3);
            let (x509_done, x509_wall, x509_cpu) = joined(1, 2);
            let mut sym = summarize(&sym_done, sym_wall);
            sym_cpu.charge(&mut sym, sym_done.len());
            let mut registrations = summarize(&x509_done, x509_wall);
            x509_cpu.charge(&mut registrations, x509_done.len());
            if sym.per_sec > 0.0 {
                report.ratio_to_symmetric_key =
                    Some((registrations.per_sec / sym.per_sec * 1000.0).round() / 1000.0);
            }
            report.symmetric_key_registrations = Some(sym);
            report.group = Some(x509_name.clone());
            if !args.keep_group {
                delete(&client, "enrollmentGroups", &x509_name).await;
                delete(&client, "certificates", &x509_name).await;
            }
            let mut results = sym_done;
            results.extend(x509_done);
            (results, registrations)
        }
    };
    if created && !args.keep_group {
        delete(&client, "enrollmentGroups", &group_id).await;
    }
    if let Some(base) = baseline.filter(|b| *b > 0.0) {
        report.ratio_to_baseline = Some((registrations.per_sec / base * 1000.0).round() / 1000.0);
    }
    report.registrations = Some(registrations);
    print(&report, json_output)?;
    let failed = results.iter().filter(|r| r.outcome.is_err()).count();
    if failed > 0 {
        let hint = if results
            .iter()
            .any(|r| r.outcome.as_ref().err().and_then(Failure::code) == Some(400_211))
        {
            " 400211 means no hub could be chosen: link one (`opendps linked-hub create`) or serve one in-process (`opendps serve --hub NAME`)."
        } else {
            ""
        };
        bail!(
            "{failed} of {} devices were not assigned.{hint}",
            results.len()
        );
    }
    Ok(())
}

/// The bench's TLS client settings: no session resumption, so that every device makes a full
/// handshake as a device that registers once does (with one client configuration shared by every
/// simulated device, rustls would resume sessions the previous devices were given).
fn bench_tls(config: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// `--devices` registration ids: `{prefix}{i}` and the `--id-suffix` values in turn.
fn registration_ids(args: &BenchArgs, prefix: &str) -> Vec<String> {
    let suffixes = match args.id_suffix.is_empty() {
        true => vec![String::new()],
        false => args.id_suffix.clone(),
    };
    (0..args.devices)
        .map(|i| format!("{prefix}{i}{}", suffixes[i % suffixes.len()]))
        .collect()
}

/// Creates the bench's enrollment group: hashed over every linked hub, or custom through
/// `webhook_url`.
async fn create_group(
    client: &ServiceClient,
    id: &str,
    attestation: Value,
    webhook_url: Option<&str>,
) -> anyhow::Result<()> {
    let mut group = json!({
        "enrollmentGroupId": id,
        "attestation": attestation,
        "allocationPolicy": "hashed",
    });
    if let Some(url) = webhook_url {
        group["allocationPolicy"] = json!("custom");
        group["customAllocationDefinition"] =
            json!({"webhookUrl": url, "apiVersion": "2021-10-01"});
    }
    client
        .send(
            Method::PUT,
            &format!("/enrollmentGroups/{id}"),
            None,
            &[],
            Some(&group),
        )
        .await
        .context("while creating the bench's enrollment group")?;
    Ok(())
}

/// The X.509 devices: a test root uploaded as a verified CA certificate named `name`, a group of
/// that name referencing it, and a certificate per device signed by an intermediate (made before
/// the clock starts). What was made is deleted again if a step fails.
async fn x509_setup(
    client: &ServiceClient,
    target: &Arc<Target>,
    args: &BenchArgs,
    name: &str,
    quiet: bool,
) -> anyhow::Result<Vec<SimDevice>> {
    let chain = TestChain::generate()?;
    client
        .send(
            Method::PUT,
            &format!("/certificates/{name}"),
            None,
            &[],
            Some(&json!({"certificate": chain.root_pem, "isVerified": true})),
        )
        .await
        .context("while uploading the bench's test root certificate")?;
    let attestation = json!({"type": "x509", "x509": {"caReferences": {"primary": name}}});
    let devices = match create_group(client, name, attestation, args.webhook_url.as_deref()).await {
        Ok(()) => x509_devices(&chain, target, args, name, quiet),
        Err(err) => Err(err),
    };
    if devices.is_err() {
        delete(client, "enrollmentGroups", name).await;
        delete(client, "certificates", name).await;
    }
    devices
}

/// A certificate and a TLS connector presenting it for each device, with progress.
fn x509_devices(
    chain: &TestChain,
    target: &Target,
    args: &BenchArgs,
    name: &str,
    quiet: bool,
) -> anyhow::Result<Vec<SimDevice>> {
    let ids = registration_ids(args, &format!("{name}-"));
    let bar = progress(ids.len(), "making device certificates", quiet);
    let devices = ids
        .into_iter()
        .map(|rid| {
            let identity = chain.device(&rid)?;
            let config = tls_client_config(target.ca.as_deref(), Some(&identity))?;
            bar.inc(1);
            Ok(SimDevice {
                rid,
                proof: Proof::Certificate(TlsConnector::from(bench_tls(config))),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>();
    bar.finish_and_clear();
    devices
}

/// Deletes what the bench made (`kind` is `enrollmentGroups` or `certificates`); a failure is a
/// warning.
async fn delete(client: &ServiceClient, kind: &str, name: &str) {
    let deleted = client
        .send(
            Method::DELETE,
            &format!("/{kind}/{name}"),
            Some("*"),
            &[],
            None,
        )
        .await;
    if let Err(err) = deleted {
        eprintln!("warning: could not delete the bench's {kind}/{name}: {err:#}");
    }
}

/// Opens `n` MQTT device sessions, `concurrency` at a time, holds them, and reads the service's
/// resident memory before and after (from /proc, so the service must run on this machine).
async fn idle(
    target: &Arc<Target>,
    args: &BenchArgs,
    n: usize,
    pid: u64,
    group_key: &str,
    quiet: bool,
) -> anyhow::Result<IdleReport> {
    if !matches!(args.transport, Transport::Mqtt | Transport::MqttWs) {
        bail!("--idle-connections holds MQTT sessions; add --transport mqtt (or mqtt-ws)");
    }
    let rss = move || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .context("cannot read the service's memory from /proc; run the bench on its machine")
    };
    let before_kib = rss()?;
    let key = group_key.to_owned();
    let run_id = random_hex(4);
    let bar = progress(n, "opening idle MQTT connections", quiet);
    let next = Arc::new(AtomicUsize::new(0));
    let tls = tls_config_of(target);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(n) {
        let (target, next, bar, key, run_id, tls) = (
            Arc::clone(target),
            Arc::clone(&next),
            bar.clone(),
            key.clone(),
            run_id.clone(),
            Arc::clone(&tls),
        );
        tasks.spawn(async move {
            let mut held = Vec::new();
            let mut failures = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let rid = format!("idle-{run_id}-{i}");
                let device_key = dps_core::sas::derive_device_key(&key, &rid).unwrap_or_default();
                let token = device_token(&target.scope, &rid, &device_key);
                let name = server_name_text(&target.server_name);
                match DpsMqtt::connect_with(
                    &tls,
                    &name,
                    target.addr.port(),
                    target.carrier,
                    &target.scope,
                    &rid,
                    &token,
                )
                .await
                {
                    Ok(link) => held.push(link),
                    Err(_) => failures += 1,
                }
                bar.inc(1);
            }
            (held, failures)
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        let (links, failed) = done.unwrap_or_default();
        held.extend(links);
        failures += failed;
    }
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let after_kib = rss()?;
    let open = held.len();
    drop(held);
    #[allow(clippy::cast_precision_loss)]
    let per_connection = (after_kib.saturating_sub(before_kib)) as f64 / open.max(1) as f64;
    #[allow(clippy::cast_precision_loss)]
    Ok(IdleReport {
        connections: open,
        failures,
        held_secs: args.hold_secs,
        service_rss_mib_before: round(before_kib as f64 / 1024.0),
        service_rss_mib: round(after_kib as f64 / 1024.0),
        kib_per_connection: round(per_connection),
    })
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// Opens and closes `n` TLS connections, `concurrency` at a time; returns connections/s and
/// failures.
async fn baseline(target: &Arc<Target>, n: usize, concurrency: usize, quiet: bool) -> (f64, usize) {
    let bar = progress(n, "baseline: TLS connections", quiet);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (target, next, bar) = (Arc::clone(target), Arc::clone(&next), bar.clone());
        tasks.spawn(async move {
            let mut failures = 0;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match tls_connect(&target, &target.tls).await {
                    Ok(mut stream) => {
                        let _ = stream.shutdown().await;
                    }
                    Err(_) => failures += 1,
                }
                bar.inc(1);
            }
            failures
        });
    }
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        failures += done.unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    #[allow(clippy::cast_precision_loss)]
    let rate = (n - failures.min(n)) as f64 / elapsed;
    (rate, failures)
}

async fn tls_connect(
    target: &Target,
    tls: &TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tls.connect(target.server_name.clone(), tcp).await?)
}

/// Registers every device, `concurrency` at a time; returns each device's result and the wall time.
async fn register_all(
    targets: &[Arc<Target>],
    args: &BenchArgs,
    devices: Vec<SimDevice>,
    what: &str,
    quiet: bool,
) -> (Vec<DeviceResult>, Duration) {
    let devices = Arc::new(devices);
    let bar = progress(devices.len(), what, quiet);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let settings = Arc::new(DeviceSettings {
        transport: args.transport,
        reuse: args.reuse_connections,
        poll_interval: args.poll_interval_ms.map(Duration::from_millis),
        timeout: Duration::from_secs(args.timeout),
    });
    for client in 0..args.concurrency.min(devices.len()) {
        let (target, next, bar, devices, settings) = (
            Arc::clone(&targets[client % targets.len()]),
            Arc::clone(&next),
            bar.clone(),
            Arc::clone(&devices),
            Arc::clone(&settings),
        );
        tasks.spawn(async move {
            let mut results = Vec::new();
            let mut kept: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(device) = devices.get(i) else {
                    break;
                };
                let result = match settings.transport {
                    Transport::Https => https_device(&target, &settings, device, &mut kept).await,
                    _ => session_device(&target, &settings, device).await,
                };
                if let Err(err) = &result.outcome {
                    bar.set_message(format!("last error: {err}"));
                }
                results.push(result);
                bar.inc(1);
            }
            results
        });
    }
    let mut results = Vec::with_capacity(devices.len());
    while let Some(done) = tasks.join_next().await {
        results.extend(done.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    (results, elapsed)
}

struct DeviceSettings {
    transport: Transport,
    reuse: bool,
    poll_interval: Option<Duration>,
    timeout: Duration,
}

fn device_token(scope: &str, rid: &str, key: &str) -> String {
    let expiry = dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second() + 3600;
    dps_core::sas::generate_token(
        &format!("{scope}/registrations/{rid}"),
        key,
        Some("registration"),
        expiry,
    )
    .unwrap_or_default()
}

impl SimDevice {
    /// The SAS token of a symmetric-key device, none for an X.509 one.
    fn token(&self, scope: &str) -> Option<String> {
        match &self.proof {
            Proof::Key(key) => Some(device_token(scope, &self.rid, key)),
            Proof::Certificate(_) => None,
        }
    }

    /// The TLS connector: the bench's, or one that presents the device's certificate.
    fn tls<'a>(&'a self, target: &'a Target) -> &'a TlsConnector {
        match &self.proof {
            Proof::Key(_) => &target.tls,
            Proof::Certificate(tls) => tls,
        }
    }
}

/// Runs one device's exchange within the timeout: its outcome, the time from its first byte to
/// the end, and that time less what it chose to wait before polling.
async fn timed(
    settings: &DeviceSettings,
    exchange: impl AsyncFnOnce(&mut Duration) -> Result<(), Failure>,
) -> DeviceResult {
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let outcome = tokio::time::timeout(settings.timeout, exchange(&mut waited))
        .await
        .unwrap_or(Err(Failure::Timeout));
    let total = started.elapsed();
    DeviceResult {
        total,
        service: total.saturating_sub(waited),
        outcome,
    }
}

/// One device over HTTPS: register, poll until the end.
async fn https_device(
    target: &Target,
    settings: &DeviceSettings,
    device: &SimDevice,
    kept: &mut Option<SendRequest<Full<Bytes>>>,
) -> DeviceResult {
    let rid = device.rid.as_str();
    timed(settings, async |waited: &mut Duration| {
        let sender = match kept.take().filter(|s| !s.is_closed()) {
            Some(sender) => sender,
            None => http_connect(target, device.tls(target)).await?,
        };
        let mut link = HttpsLink {
            sender,
            target,
            base: format!("/{}/registrations/{rid}", target.scope),
            token: device.token(&target.scope),
        };
        let ended = provision(&mut link, settings, rid, waited).await;
        if settings.reuse {
            *kept = Some(link.sender);
        }
        ended
    })
    .await
}

/// One device over MQTT (its SAS as password, or its certificate) or AMQP (SASL PLAIN with its
/// token, or its certificate), on TLS or a WebSocket: connect, register, poll until the end, leave.
async fn session_device(
    target: &Target,
    settings: &DeviceSettings,
    device: &SimDevice,
) -> DeviceResult {
    let rid = device.rid.as_str();
    let config = device.tls(target).config();
    let name = server_name_text(&target.server_name);
    let token = device.token(&target.scope);
    let (port, scope) = (target.addr.port(), target.scope.as_str());
    let refused = |e: anyhow::Error| Failure::Transport(format!("connect: {e:#}"));
    timed(settings, async |waited: &mut Duration| {
        match settings.transport {
            Transport::Amqp | Transport::AmqpWs => {
                let mut link = DpsAmqp::connect(
                    config,
                    &name,
                    port,
                    target.carrier,
                    scope,
                    rid,
                    token.as_deref(),
                )
                .await
                .map_err(refused)?;
                let ended = provision(&mut link, settings, rid, waited).await;
                link.close().await;
                ended
            }
            _ => {
                let sas = token.as_deref().unwrap_or_default();
                let mut link =
                    DpsMqtt::connect_with(config, &name, port, target.carrier, scope, rid, sas)
                        .await
                        .map_err(refused)?;
                let ended = provision(&mut link, settings, rid, waited).await;
                link.disconnect().await;
                ended
            }
        }
    })
    .await
}

/// Registers and polls as the device simulator does; `assigned`, or the error by its code.
async fn provision(
    link: &mut impl DeviceExchange,
    settings: &DeviceSettings,
    rid: &str,
    waited: &mut Duration,
) -> Result<(), Failure> {
    let body = json!({"registrationId": rid});
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let (ended, wait) = register_and_poll(link, &body, settings.poll_interval, deadline, &|_| {})
        .await
        .map_err(|e| Failure::Transport(format!("transport: {e}")))?;
    *waited = wait;
    match ended {
        Ended::Finished(reply) => terminal(&reply),
        Ended::Refused { status, reply } => Err(Failure::Refused {
            status,
            code: reply["errorCode"]
                .as_u64()
                .and_then(|c| u32::try_from(c).ok()),
        }),
        Ended::TimedOut => Err(Failure::Timeout),
    }
}

async fn http_connect(
    target: &Target,
    tls: &TlsConnector,
) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let tls = tls_connect(target, tls)
        .await
        .map_err(|e| Failure::Transport(format!("connect: {e}")))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Failure::Transport(format!("http: {e}")))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The device REST API over one kept HTTP/1.1 connection.
struct HttpsLink<'a> {
    sender: SendRequest<Full<Bytes>>,
    target: &'a Target,
    base: String,
    /// A symmetric-key device's SAS token; an X.509 device has none.
    token: Option<String>,
}

impl HttpsLink<'_> {
    /// One request.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Reply> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", &self.target.host_header)
            .header("Content-Type", "application/json; charset=utf-8")
            .header("Accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", token);
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let wait = retry_after_header(response.headers());
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            retry_after: wait,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }
}

impl DeviceExchange for HttpsLink<'_> {
    async fn register(&mut self, body: &Value) -> anyhow::Result<Reply> {
        let path = format!("{}/register?api-version={API_VERSION}", self.base);
        self.call("PUT", &path, Some(body.to_string())).await
    }

    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
        let path = format!(
            "{}/operations/{operation_id}?api-version={API_VERSION}",
            self.base
        );
        self.call("GET", &path, None).await
    }
}

fn tls_config_of(target: &Target) -> Arc<rustls::ClientConfig> {
    Arc::clone(target.tls.config())
}

/// `assigned`, or the registration's status and error code.
fn terminal(done: &RegistrationOperationStatus) -> Result<(), Failure> {
    if done.status == EnrollmentStatus::Assigned {
        return Ok(());
    }
    let status = serde_json::to_value(done.status)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_default();
    let code = done.registration_state.as_ref().and_then(|s| s.error_code);
    Err(Failure::Ended { status, code })
}

/// The CPU time spent over a phase of the run: the server's, from the counter each node reports in
/// `/metrics` (summed over the nodes when the load is spread over several), and this load
/// generator's own.
struct CpuMeter<'a> {
    nodes: Vec<&'a ServiceClient>,
}

/// CPU seconds a phase cost; `None` where a counter could not be read.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSpent {
    server: Option<f64>,
    bench: Option<f64>,
}

impl CpuSpent {
    /// Two phases together.
    fn plus(self, other: Self) -> Self {
        let add = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a + b);
        Self {
            server: add(self.server, other.server),
            bench: add(self.bench, other.bench),
        }
    }

    /// Enters the cost per registration of `n` in `report`.
    fn charge(self, report: &mut RegistrationsReport, n: usize) {
        report.server_cpu_ms_per_registration = per_item(self.server, n);
        report.bench_cpu_ms_per_registration = per_item(self.bench, n);
    }
}

impl CpuMeter<'_> {
    /// The CPU seconds every node has used so far; `None` unless each reports them.
    async fn total(&self) -> Option<f64> {
        let mut total = 0.0;
        for node in &self.nodes {
            total += node.server_cpu_seconds().await?;
        }
        Some(total)
    }

    /// Runs `phase`; with its output, the CPU seconds the nodes and this process spent meanwhile.
    async fn spent<T>(&self, phase: impl Future<Output = T>) -> (T, CpuSpent) {
        let before = self.total().await;
        let own_before = dps_server::process::cpu_seconds();
        let out = phase.await;
        let own_after = dps_server::process::cpu_seconds();
        let after = match before {
            Some(_) => self.total().await,
            None => None,
        };
        let spent = CpuSpent {
            server: before.zip(after).map(|(before, after)| after - before),
            bench: own_before
                .zip(own_after)
                .map(|(before, after)| after - before),
        };
        (out, spent)
    }
}

/// CPU `seconds` as milliseconds per one of `n` items, to the hundredth.
fn per_item(seconds: Option<f64>, n: usize) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    seconds
        .filter(|_| n > 0)
        .map(|seconds| (seconds * 1e5 / n as f64).round() / 100.0)
}

fn summarize(results: &[DeviceResult], wall: Duration) -> RegistrationsReport {
    let assigned: Vec<&DeviceResult> = results.iter().filter(|r| r.outcome.is_ok()).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        if let Err(e) = &r.outcome {
            *errors.entry(e.to_string()).or_default() += 1;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = assigned.len() as f64 / wall.as_secs_f64();
    RegistrationsReport {
        assigned: assigned.len(),
        errors,
        seconds: round(wall.as_secs_f64()),
        per_sec: round(rate),
        latency_ms: percentiles(assigned.iter().map(|r| r.total)),
        service_latency_ms: percentiles(assigned.iter().map(|r| r.service)),
        server_cpu_ms_per_registration: None,
        bench_cpu_ms_per_registration: None,
    }
}

fn percentiles(latencies: impl Iterator<Item = Duration>) -> Option<Percentiles> {
    let mut all: Vec<Duration> = latencies.collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1;
        round(all[i].as_secs_f64() * 1000.0)
    };
    Some(Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: at(1.0),
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    dps_core::sas::fill_random(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn progress(n: usize, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{per_sec}} {{elapsed}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn print(report: &Report, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if report.idle.is_none() {
        println!(
            "transport {}, {} devices, {} at a time, {}",
            report.transport,
            report.devices,
            report.concurrency,
            if report.new_connection_per_device {
                "a new TLS connection per device"
            } else {
                "connections reused"
            }
        );
    }
    if let Some(b) = &report.baseline {
        println!(
            "baseline:      {} TLS connections/s (connect, handshake, close; {} failed)",
            b.connections_per_sec, b.failures
        );
        if let Some(ms) = b.server_cpu_ms_per_connection {
            println!("server CPU:    {ms} ms per connection");
        }
        if let Some(ms) = b.bench_cpu_ms_per_connection {
            println!("bench CPU:     {ms} ms per connection (this load generator)");
        }
    }
    if let Some(idle) = &report.idle {
        println!(
            "idle MQTT:     {} connections held {} s ({} failed); service resident memory {} MiB (was {} MiB), {} KiB per connection",
            idle.connections,
            idle.held_secs,
            idle.failures,
            idle.service_rss_mib,
            idle.service_rss_mib_before,
            idle.kib_per_connection
        );
    }
    if let Some(r) = &report.symmetric_key_registrations {
        println!("symmetric-key devices (for comparison):");
        print_registrations(r);
        println!("X.509 devices:");
    }
    if let Some(r) = &report.registrations {
        print_registrations(r);
        if let Some(ms) = r.server_cpu_ms_per_registration {
            println!("server CPU:    {ms} ms per registration");
        }
        if let Some(ms) = r.bench_cpu_ms_per_registration {
            println!("bench CPU:     {ms} ms per registration (this load generator)");
        }
        if let Some(ratio) = report.ratio_to_baseline {
            println!("ratio:         {ratio} of the baseline connection rate");
        }
        if let Some(ratio) = report.ratio_to_symmetric_key {
            println!("ratio:         {ratio} of the symmetric-key registration rate");
        }
    }
    Ok(())
}

fn print_registrations(r: &RegistrationsReport) {
    println!(
        "registrations: {} assigned in {} s = {}/s",
        r.assigned, r.seconds, r.per_sec
    );
    for (name, latency) in [
        ("latency", r.latency_ms),
        ("service time", r.service_latency_ms),
    ] {
        let Some(l) = latency else {
            continue;
        };
        println!(
            "{:<14} p50 {} ms, p95 {} ms, p99 {} ms, max {} ms",
            format!("{name}:"),
            l.p50,
            l.p95,
            l.p99,
            l.max
        );
    }
    if !r.errors.is_empty() {
        println!("errors:");
        for (code, n) in &r.errors {
            println!("  {code}: {n}");
        }
    }
}
