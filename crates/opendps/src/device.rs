//! `opendps device register`: a simulated device that provisions itself exactly as an SDK does
//! (register, then poll the operation, honouring `Retry-After`) and prints its progress the way the
//! Azure IoT C SDK's `prov_dev_client_sample` does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dps_core::model::EnrollmentStatus;
use dps_device::{Attestation, ClientIdentity, Device, failure_line};
use dps_tools::Transport;

/// `opendps device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device (symmetric key or X.509 certificate) and wait for its assignment.
    Register(RegisterArgs),
}

/// `opendps device register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Provisioning endpoint, `host[:port]` [default: the local service's, from --data-dir].
    #[arg(long)]
    provisioning_host: Option<String>,
    /// ID scope [default: the local service's, from --data-dir].
    #[arg(long)]
    id_scope: Option<String>,
    /// The device's registration id.
    #[arg(long, visible_alias = "rid")]
    registration_id: String,
    /// The device's symmetric key (for a group device: its derived key, see `compute-device-key`).
    #[arg(long, required_unless_present = "cert", conflicts_with_all = ["cert", "key"])]
    symmetric_key: Option<String>,
    /// The device's X.509 certificate (PEM; its subject CN is the registration id), followed by
    /// any intermediates up to the enrolled CA. Presented in the TLS handshake.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Custom JSON payload for the allocation webhook.
    #[arg(long)]
    payload: Option<String>,
    /// Transport.
    #[arg(long, value_enum, default_value_t = Transport::Https)]
    transport: Transport,
    /// MQTT port at the provisioning host, for --transport mqtt and --connect [default: the local
    /// service's MQTT listener, from --data-dir; else 8883, the port Azure's devices dial].
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// AMQP port at the provisioning host, for --transport amqp [default: the local service's
    /// AMQP listener, from --data-dir; else 5671, the port Azure's devices dial].
    #[arg(long)]
    amqp_port: Option<u16>,
    /// After assignment, connect to the hub over MQTT (at the provisioning host, as a gateway) and
    /// print the device's twin.
    #[arg(long)]
    connect: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// Registers the device; succeeds only when it is assigned.
pub async fn register(
    args: RegisterArgs,
    data_dir: PathBuf,
    ca_file: Option<PathBuf>,
    json_output: bool,
) -> anyhow::Result<()> {
    let local = if args.provisioning_host.is_none()
        || args.id_scope.is_none()
        || ca_file.is_none()
        || args.mqtt_port.is_none()
        || args.amqp_port.is_none()
    {
        match dps_server::config::Config::for_data_dir(&data_dir) {
            Ok(config) => dps_server::info::collect(&config).await.ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    // The local service's MQTT port only when the device talks to the local service.
    let local_mqtt_port = local
        .as_ref()
        .filter(|_| args.provisioning_host.is_none())
        .and_then(|i| i.listen.mqtt)
        .map(|a| a.port());
    let local_amqp_port = local
        .as_ref()
        .filter(|_| args.provisioning_host.is_none())
        .and_then(|i| i.listen.amqp)
        .map(|a| a.port());
    let device = Device {
        host: args
            .provisioning_host
            .or_else(|| local.as_ref().map(|i| i.service_host.clone()))
            .context("give --provisioning-host (no local service found)")?,
        mqtt_port: args.mqtt_port.or(local_mqtt_port).unwrap_or(8883),
        amqp_port: args.amqp_port.or(local_amqp_port).unwrap_or(5671),
        scope: args
            .id_scope
            .or_else(|| local.as_ref().map(|i| i.id_scope.clone()))
            .context("give --id-scope (no local service found)")?,
        ca: ca_file.or_else(|| local.as_ref().and_then(|i| i.ca_file.clone())),
        registration_id: args.registration_id,
        attestation: match (args.symmetric_key, args.cert, args.key) {
            (Some(key), _, _) => Attestation::SymmetricKey(key),
            (None, Some(cert), Some(key)) => {
                Attestation::X509(ClientIdentity::from_files(&cert, &key)?)
            }
            _ => bail!("give --symmetric-key, or --cert and --key"),
        },
        payload: args
            .payload
            .as_deref()
            .map(|p| serde_json::from_str(p).context("--payload is not valid JSON"))
            .transpose()?,
        transport: args.transport.into(),
        timeout: Duration::from_secs(args.timeout),
    };
    let say = |line: &str| {
        if !json_output {
            println!("{line}");
        }
    };
    let done = device.provision(&say).await?;
    if done.status != EnrollmentStatus::Assigned {
        if json_output {
            println!("{}", serde_json::to_string_pretty(&done)?);
        }
        bail!(failure_line(&done));
    }
    let state = done.registration_state.as_ref();
    let hub = state
        .and_then(|s| s.assigned_hub.clone())
        .unwrap_or_default();
    let device_id = state.and_then(|s| s.device_id.clone()).unwrap_or_default();
    let mut reply = serde_json::to_value(&done)?;
    let twin = match args.connect {
        true => Some(device.read_twin(&hub, &device_id).await?),
        false => None,
    };
    if json_output {
        if let Some(twin) = twin {
            reply["twin"] = twin;
        }
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("\nRegistration Information received from service: {hub}, deviceId: {device_id}");
    if let Some(payload) = reply["registrationState"].get("payload") {
        println!("Payload from the allocation webhook: {payload}");
    }
    if let Some(twin) = twin {
        println!(
            "\nConnected to {hub} as {device_id}. Twin:\n{}",
            serde_json::to_string_pretty(&twin)?
        );
    }
    Ok(())
}
