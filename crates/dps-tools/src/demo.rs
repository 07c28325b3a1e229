//! `opendps demo`: the Azure DPS custom allocation tutorial, run on this machine in seconds.
//!
//! It starts the service with two in-process hubs and the Contoso allocation function, creates the
//! tutorial's enrollment group through the service API, provisions the tutorial's two devices with
//! their derived keys and custom payload (as the C SDK's sample does), connects each to its hub, and
//! shows an unrecognized device being refused. Every result is checked against the tutorial; any
//! difference makes the command fail. Everything it started is stopped and removed at the end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use crate::Transport;
use crate::client::{ClientSettings, ServiceClient};
use dps_core::device::RegistrationOperationStatus;
use dps_core::model::EnrollmentStatus;
use dps_device::{Device, failure_line};
use dps_server::config::Config;
use dps_server::serve::{self, Service};

/// The tutorial's enrollment group.
const GROUP_ID: &str = "contoso-custom-allocated-devices";
/// The payload the tutorial adds to `prov_dev_client_sample.c`.
const PAYLOAD: &str =
    r#"{"MyDeviceFirmwareVersion":"12.0.2.5","MyDeviceProvisioningVersion":"1.0.0.0"}"#;
/// A device the Contoso function does not know.
const UNRECOGNIZED: &str = "elevator1-contoso-elvtr-001";

/// `opendps demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Suffix of the hub names (`contoso-toasters-hub-<SUFFIX>`) [default: a random number].
    #[arg(long)]
    suffix: Option<u16>,
    /// How the simulated devices reach the service (the C sample uses MQTT).
    #[arg(long, value_enum, default_value_t = Transport::Mqtt)]
    transport: Transport,
    /// Keep the demo's data directory (database, CA) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// One device of the tutorial and what the tutorial says happens to it.
struct Expected {
    registration_id: &'static str,
    title: &'static str,
    hub_marker: &'static str,
    device_type: &'static str,
    desired: Value,
}

/// Runs the tutorial; fails if anything differs from it.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Listen for Ctrl-C from the start, so an interrupt at any point still reaches the cleanup
    // below: the data directory holds keys.
    let mut signals = serve::StopSignals::listen().context("while listening for Ctrl-C")?;
    let suffix = args.suffix.unwrap_or_else(|| {
        let mut bytes = [0u8; 2];
        dps_core::sas::fill_random(&mut bytes);
        1000 + u16::from_le_bytes(bytes) % 9000
    });
    let data_dir =
        std::env::temp_dir().join(format!("opendps-demo-{}-{suffix}", std::process::id()));
    let hubs = [
        format!("contoso-toasters-hub-{suffix}.azure-devices.net"),
        format!("contoso-heatpumps-hub-{suffix}.azure-devices.net"),
    ];
    println!("opendps demo: the Azure DPS custom allocation tutorial, on this machine\n");
    let mut config = Config {
        data_dir: data_dir.clone(),
        ..Config::default()
    };
    config.http.listen = ([127, 0, 0, 1], 0).into();
    config.mqtt.listen = ([127, 0, 0, 1], 0).into();
    config.amqp.listen = ([127, 0, 0, 1], 0).into();
    config.minihub.hubs = hubs.to_vec();
    config.minihub.link = true;
    config.provisioning.retry_after_secs = 1;

    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (webhook_url, allocator) = start_allocator(Arc::clone(&log)).await?;
    let started_service = async {
        let listeners = serve::Listeners::bind(&config).await?;
        serve::start(config, listeners).await
    };
    let service = match started_service.await {
        Ok(service) => service,
        Err(err) => {
            allocator.abort();
            let _ = std::fs::remove_dir_all(&data_dir);
            return Err(err.context("while starting the service"));
        }
    };
    let tutorial = Tutorial {
        service: &service,
        data_dir: &data_dir,
        hubs: &hubs,
        webhook_url,
        log,
        transport: args.transport,
    };
    // Ctrl-C (or SIGTERM) stops the tutorial, but not the cleanup: the data directory holds keys.
    let outcome = tokio::select! {
        outcome = tutorial.run() => outcome.context("the demo did not go as the tutorial says"),
        () = signals.recv() => {
            println!("\nInterrupted: stopping the service and removing what the demo created.");
            Err(anyhow::anyhow!("interrupted before the demo finished"))
        }
    };
    allocator.abort();
    service.shutdown().await;
    if args.keep {
        println!(
            "\nThe data directory is kept: {dir}\nServe it again and read the allocation trace of the refused device:\n  opendps serve --data-dir {dir} --hub {} --hub {}\n  opendps registration show --registration-id {UNRECOGNIZED} --trace --data-dir {dir}",
            hubs[0],
            hubs[1],
            dir = data_dir.display(),
        );
    } else if let Err(err) = std::fs::remove_dir_all(&data_dir) {
        eprintln!("warning: could not remove {}: {err}", data_dir.display());
    }
    outcome?;
    println!(
        "\nEverything happened as the tutorial says, in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Serves the Contoso allocation function on a free loopback port, its log lines going to `log`.
async fn start_allocator(
    log: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("while binding the allocation function's port")?;
    let addr = listener.local_addr()?;
    let sink: contoso_allocator::Log = Arc::new(move |line: &str| {
        if let Ok(mut lines) = log.lock() {
            lines.push(line.to_owned());
        }
    });
    let router = contoso_allocator::router_with_log(sink);
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("warning: the allocation function stopped: {err}");
        }
    });
    // A function key, as Azure Functions URLs carry; opendps never logs it.
    let mut code = [0u8; 16];
    dps_core::sas::fill_random(&mut code);
    let code: String = code.iter().map(|b| format!("{b:02x}")).collect();
    Ok((format!("http://{addr}/api/HttpTrigger1?code={code}"), task))
}

struct Tutorial<'a> {
    service: &'a Service,
    data_dir: &'a PathBuf,
    hubs: &'a [String; 2],
    webhook_url: String,
    log: Arc<Mutex<Vec<String>>>,
    transport: Transport,
}

impl Tutorial<'_> {
    async fn run(&self) -> anyhow::Result<()> {
        let service = self.service;
        println!(
            "Started opendps: https://{} (ID scope {}), MQTT on port {}",
            service.service_host,
            service.id_scope,
            self.mqtt_port()?
        );
        println!("Started two IoT hubs (minihub) and linked them:");
        for hub in self.hubs {
            println!("  {hub}");
        }
        let shown_url = self
            .webhook_url
            .split_once('?')
            .map_or(self.webhook_url.as_str(), |(url, _)| url);
        println!("Started the Contoso allocation function: {shown_url}");
        println!(
            "  It routes each device by the end of its registration id: -contoso-tstrsd-007 to the\n  toasters hub, -contoso-hpsd-088 to the heat pumps hub; any other device is refused."
        );

        let client = ServiceClient::connect(ClientSettings {
            login: None,
            ca_file: None,
            data_dir: self.data_dir.clone(),
        })
        .await?;
        let group = json!({
            "enrollmentGroupId": GROUP_ID,
            "attestation": {"type": "symmetricKey"},
            "provisioningStatus": "enabled",
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
            "allocationPolicy": "custom",
            "iotHubs": self.hubs,
            "customAllocationDefinition": {"webhookUrl": self.webhook_url, "apiVersion": "2021-10-01"},
        });
        client
            .send(
                Method::PUT,
                &format!("/enrollmentGroups/{GROUP_ID}"),
                None,
                &[],
                Some(&group),
            )
            .await?;
        println!(
            "Created the enrollment group {GROUP_ID}: symmetric key, custom allocation, both hubs"
        );
        let (attestation, _) = client
            .send(
                Method::POST,
                &format!("/enrollmentGroups/{GROUP_ID}/attestationmechanism"),
                None,
                &[],
                None,
            )
            .await?;
        let group_key = attestation["symmetricKey"]["primaryKey"]
            .as_str()
            .context("the group has no primary key")?
            .to_owned();

        let toaster = Expected {
            registration_id: "breakroom499-contoso-tstrsd-007",
            title: "the Contoso toaster device",
            hub_marker: "-toasters-",
            device_type: "toaster",
            desired: json!({"state": "ready", "darknessSetting": "medium"}),
        };
        let heatpump = Expected {
            registration_id: "mainbuilding167-contoso-hpsd-088",
            title: "the Contoso heat pump device",
            hub_marker: "-heatpumps-",
            device_type: "heatpump",
            desired: json!({"state": "on", "temperatureSetting": "65"}),
        };
        println!("Derived the device keys (az iot dps enrollment-group compute-device-key):");
        let mut keys = Vec::new();
        for id in [
            toaster.registration_id,
            heatpump.registration_id,
            UNRECOGNIZED,
        ] {
            let key = dps_core::sas::derive_device_key(&group_key, id)
                .map_err(|_| anyhow::anyhow!("the group key is not base64"))?;
            if id != UNRECOGNIZED {
                println!("  {id:<34} {key}");
            }
            keys.push(key);
        }

        let mut summary = Vec::new();
        for (expected, key) in [&toaster, &heatpump].into_iter().zip(&keys) {
            summary.push(self.assigned_device(expected, key).await?);
        }
        summary.push(self.unrecognized_device(&keys[2]).await?);

        println!("\nSummary");
        for line in &summary {
            println!("  {line}");
        }
        Ok(())
    }

    fn mqtt_port(&self) -> anyhow::Result<u16> {
        self.service
            .mqtt
            .map(|a| a.port())
            .context("MQTT is not enabled")
    }

    fn device(&self, registration_id: &str, key: &str) -> anyhow::Result<Device> {
        Ok(Device {
            host: self.service.service_host.clone(),
            mqtt_port: self.mqtt_port()?,
            amqp_port: self.service.amqp.map_or(5671, |a| a.port()),
            scope: self.service.id_scope.clone(),
            ca: Some(self.service.ca_file()),
            registration_id: registration_id.to_owned(),
            attestation: dps_device::Attestation::SymmetricKey(key.to_owned()),
            payload: Some(serde_json::from_str(PAYLOAD)?),
            transport: self.transport.into(),
            timeout: Duration::from_secs(30),
        })
    }

    /// Prints the allocation function's log since the last call, indented, and returns it.
    fn print_function_log(&self) -> Vec<String> {
        let lines = match self.log.lock() {
            Ok(mut lines) => std::mem::take(&mut *lines),
            Err(_) => Vec::new(),
        };
        println!("\nThe allocation function's log:");
        for line in &lines {
            println!("  {line}");
        }
        lines
    }

    /// Provisions one of the tutorial's devices and checks hub, twin and payload against it.
    async fn assigned_device(&self, expected: &Expected, key: &str) -> anyhow::Result<String> {
        let id = expected.registration_id;
        println!("\n── Simulate {}: {id}\n", expected.title);
        let device = self.device(id, key)?;
        let done = device.provision(&|line| println!("{line}")).await?;
        if done.status != EnrollmentStatus::Assigned {
            self.print_function_log();
            bail!("{id}: {}", failure_line(&done));
        }
        let state = done.registration_state.as_ref();
        let hub = state
            .and_then(|s| s.assigned_hub.as_deref())
            .unwrap_or_default();
        let device_id = state
            .and_then(|s| s.device_id.as_deref())
            .unwrap_or_default();
        println!("\nRegistration Information received from service: {hub}, deviceId: {device_id}");
        let log = self.print_function_log();
        let payload = format!("\"payload\":{PAYLOAD}");
        if !log.iter().any(|line| line.contains(&payload)) {
            bail!("the allocation function did not receive {id}'s payload {PAYLOAD}");
        }

        let wanted_hub = self
            .hubs
            .iter()
            .find(|h| h.contains(expected.hub_marker))
            .context("no hub for the device")?;
        if hub != wanted_hub || device_id != id {
            bail!(
                "{id} was assigned to {hub} as {device_id}; the tutorial assigns it to {wanted_hub} as {id}"
            );
        }
        let twin = device.read_twin(hub, device_id).await?;
        println!(
            "\nConnected to {hub} as {device_id}; the device's twin:\n{}",
            indent(&serde_json::to_string_pretty(&twin)?)
        );
        let desired_matches = expected
            .desired
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| twin["desired"].get(k) == Some(v));
        if !desired_matches {
            bail!(
                "{id}'s desired properties are {}; the tutorial's function sets {}",
                twin["desired"],
                expected.desired
            );
        }
        let tags = self.tags(hub, device_id).await?;
        println!("The hub's registry shows its tags: {tags}");
        if tags["deviceType"] != expected.device_type {
            bail!(
                "{id}'s tags are {tags}; the tutorial's function sets deviceType {}",
                expected.device_type
            );
        }
        Ok(format!(
            "{id:<34} assigned to {hub}, deviceType {}, desired {}",
            expected.device_type, expected.desired
        ))
    }

    /// The back end's view of the device's tags, from the in-process hub.
    async fn tags(&self, hub: &str, device_id: &str) -> anyhow::Result<Value> {
        let minihub = self.service.minihub.as_ref().context("no in-process hub")?;
        let twin = minihub
            .get_twin(hub, device_id)
            .await
            .map_err(|e| anyhow::anyhow!("while reading the twin from {hub}: {e}"))?
            .with_context(|| format!("{device_id} does not exist on {hub}"))?;
        Ok(Value::Object(twin.tags))
    }

    /// A device the function does not know: the tutorial's last troubleshooting row.
    async fn unrecognized_device(&self, key: &str) -> anyhow::Result<String> {
        println!(
            "\n── An unrecognized device: {UNRECOGNIZED} (expected to fail: its id ends in neither suffix)\n"
        );
        let done = self
            .device(UNRECOGNIZED, key)?
            .provision(&|line| println!("{line}"))
            .await?;
        println!("\n{}", failure_line(&done));
        self.print_function_log();
        if !refused_as_the_tutorial_says(&done) {
            bail!(
                "{UNRECOGNIZED} ended {}; the tutorial's table says failed, 400207 (CustomAllocationFailed)",
                serde_json::to_string(&done)?
            );
        }
        Ok(format!(
            "{UNRECOGNIZED:<34} failed as expected: 400207 CustomAllocationFailed, \"Unrecognized device registration.\""
        ))
    }
}

/// Failed with 400207 and the function's "Unrecognized device registration.".
fn refused_as_the_tutorial_says(done: &RegistrationOperationStatus) -> bool {
    let state = done.registration_state.as_ref();
    done.status == EnrollmentStatus::Failed
        && state.and_then(|s| s.error_code) == Some(400_207)
        && state
            .and_then(|s| s.error_message.as_deref())
            .is_some_and(|m| m.contains("Unrecognized device registration."))
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
