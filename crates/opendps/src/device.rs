//! `opendps device register`: a simulated device that provisions itself exactly as an SDK does
//! (register, then poll the operation, honouring `Retry-After`) and prints its progress the way the
//! Azure IoT C SDK's `prov_dev_client_sample` does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use crate::mqtt_client::DpsMqtt;

/// Device API version sent, as the C SDK sends it.
const API_VERSION: &str = "2021-06-01";
/// Lifetime of the device's SAS token.
const TOKEN_TTL_SECS: i64 = 3600;

/// `opendps device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device with symmetric-key attestation and wait for its assignment.
    Register(RegisterArgs),
}

/// How the simulated device talks to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// The DPS device REST API over HTTPS.
    Https,
    /// MQTT 3.1.1 over TLS, as the Python, C, C# and Node SDKs can.
    Mqtt,
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
    #[arg(long)]
    symmetric_key: String,
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
    /// After assignment, connect to the hub over MQTT (at the provisioning host, as a gateway) and
    /// print the device's twin.
    #[arg(long)]
    connect: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// Where and how one simulated device provisions itself.
pub struct Device {
    /// Provisioning endpoint, `host[:port]` (HTTPS).
    pub host: String,
    /// MQTT port at the same host.
    pub mqtt_port: u16,
    /// ID scope.
    pub scope: String,
    /// CA to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Registration id.
    pub registration_id: String,
    /// Its symmetric key (derived, for a group device).
    pub symmetric_key: String,
    /// The custom payload for the allocation webhook.
    pub payload: Option<Value>,
    /// Transport.
    pub transport: Transport,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Device {
    /// The host name alone, for MQTT (DPS and the hub gateway).
    fn host_name(&self) -> &str {
        self.host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(name, _)| name)
    }

    /// Registers and polls, honouring `Retry-After`, until the operation ends, reporting progress
    /// through `say` in the C sample's words. Returns the final operation status (assigned, failed or
    /// disabled); a refused request (401, 400, …) or a timeout is an error.
    pub async fn provision(&self, say: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Value> {
        let resource = format!("{}/registrations/{}", self.scope, self.registration_id);
        let expiry = jiff::Timestamp::now().as_second() + TOKEN_TTL_SECS;
        let token = dps_core::sas::generate_token(
            &resource,
            &self.symmetric_key,
            Some("registration"),
            expiry,
        )
        .map_err(|_| anyhow::anyhow!("the symmetric key is not base64"))?;
        say(&format!(
            "Provisioning API Version: {API_VERSION}\n\nRegistering Device\n"
        ));
        let mut channel = match self.transport {
            Transport::Https => Channel::https(
                &self.host,
                &self.scope,
                &self.registration_id,
                self.ca.as_deref(),
                token,
            )?,
            Transport::Mqtt => Channel::Mqtt(Box::new(
                DpsMqtt::connect(
                    self.host_name(),
                    self.mqtt_port,
                    self.ca.as_deref(),
                    &self.scope,
                    &self.registration_id,
                    &token,
                )
                .await?,
            )),
        };
        let outcome = self.poll_to_end(&mut channel, say).await;
        channel.close().await;
        outcome
    }

    async fn poll_to_end(
        &self,
        channel: &mut Channel,
        say: &(dyn Fn(&str) + Sync),
    ) -> anyhow::Result<Value> {
        let body =
            serde_json::json!({"registrationId": self.registration_id, "payload": self.payload});
        let deadline = tokio::time::Instant::now() + self.timeout;
        match register_and_poll(channel, &body, None, deadline, say)
            .await?
            .0
        {
            Ended::Finished(reply) => Ok(reply),
            Ended::Refused { status, reply } => bail!(failure(status, &reply)),
            Ended::TimedOut => bail!(
                "Failure registering device: PROV_DEVICE_RESULT_TIMEOUT after {} s",
                self.timeout.as_secs()
            ),
        }
    }

    /// Connects to the assigned hub over MQTT (through this host, as a gateway) and reads the
    /// device's twin.
    pub async fn read_twin(&self, hub: &str, device_id: &str) -> anyhow::Result<Value> {
        crate::mqtt_client::read_twin(
            self.host_name(),
            self.mqtt_port,
            self.ca.as_deref(),
            hub,
            device_id,
            &self.symmetric_key,
        )
        .await
        .with_context(|| format!("while connecting to {hub} as {device_id}"))
    }
}

/// The C SDK's result for a finished registration that is not `assigned`, and its error.
pub fn failure_line(reply: &Value) -> String {
    let state = &reply["registrationState"];
    let status = reply["status"].as_str().unwrap_or_default();
    let result = match (status, state["errorCode"].as_i64()) {
        ("disabled", _) => "PROV_DEVICE_RESULT_DISABLED",
        (_, Some(400_208)) => "PROV_DEVICE_RESULT_HUB_NOT_SPECIFIED",
        (_, Some(400_209)) => "PROV_DEVICE_RESULT_UNAUTHORIZED",
        _ => "PROV_DEVICE_RESULT_DEV_AUTH_ERROR",
    };
    format!(
        "Failure registering device: {result} (status {status}, error {}: {})",
        state["errorCode"]
            .as_i64()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
        state["errorMessage"].as_str().unwrap_or("no message")
    )
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
    {
        let config = crate::config::Config {
            data_dir,
            ..Default::default()
        };
        crate::info::collect(&config).await.ok()
    } else {
        None
    };
    // The local service's MQTT port only when the device talks to the local service.
    let local_mqtt_port = local
        .as_ref()
        .filter(|_| args.provisioning_host.is_none())
        .and_then(|i| i["listen"]["mqtt"].as_str())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port());
    let from_local = |field: &str| {
        local
            .as_ref()
            .and_then(|i| i[field].as_str().map(str::to_owned))
    };
    let device = Device {
        host: args
            .provisioning_host
            .or_else(|| from_local("serviceHost"))
            .context("give --provisioning-host (no local service found)")?,
        mqtt_port: args.mqtt_port.or(local_mqtt_port).unwrap_or(8883),
        scope: args
            .id_scope
            .or_else(|| from_local("idScope"))
            .context("give --id-scope (no local service found)")?,
        ca: ca_file.or_else(|| from_local("caFile").map(PathBuf::from)),
        registration_id: args.registration_id,
        symmetric_key: args.symmetric_key,
        payload: args
            .payload
            .as_deref()
            .map(|p| serde_json::from_str(p).context("--payload is not valid JSON"))
            .transpose()?,
        transport: args.transport,
        timeout: Duration::from_secs(args.timeout),
    };
    let say = |line: &str| {
        if !json_output {
            println!("{line}");
        }
    };
    let mut reply = device.provision(&say).await?;
    if reply["status"] != "assigned" {
        if json_output {
            println!("{}", serde_json::to_string_pretty(&reply)?);
        }
        bail!(failure_line(&reply));
    }
    let state = &reply["registrationState"];
    let hub = state["assignedHub"].as_str().unwrap_or_default().to_owned();
    let device_id = state["deviceId"].as_str().unwrap_or_default().to_owned();
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

/// A device's two requests to DPS over one transport, each answered with its status, its
/// `Retry-After` in seconds, and its JSON body.
pub(crate) trait DeviceExchange {
    /// The register request.
    async fn register(&mut self, body: &Value) -> anyhow::Result<(u16, u64, Value)>;
    /// A poll of the operation.
    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<(u16, u64, Value)>;
}

/// How a registration ended for the device.
pub(crate) enum Ended {
    /// The operation finished (assigned, failed or disabled): its final status.
    Finished(Value),
    /// A request was refused (401, 400, …): its status and body.
    Refused { status: u16, reply: Value },
    /// Waiting for the next poll would pass the deadline.
    TimedOut,
}

/// Registers and polls until the operation ends, as the SDKs do: between polls it waits
/// `poll_every`, or else the `Retry-After` the service sent. Reports progress through `say` in
/// the C sample's words. Returns how it ended and how long the device waited between polls.
pub(crate) async fn register_and_poll(
    link: &mut impl DeviceExchange,
    body: &Value,
    poll_every: Option<Duration>,
    deadline: tokio::time::Instant,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<(Ended, Duration)> {
    let mut waited = Duration::ZERO;
    let (status, mut retry_after, mut reply) = link.register(body).await?;
    say("Provisioning Status: PROV_DEVICE_REG_STATUS_CONNECTED");
    if status != 202 {
        return Ok((Ended::Refused { status, reply }, waited));
    }
    let operation_id = reply["operationId"]
        .as_str()
        .context("the service sent no operationId")?
        .to_owned();
    while reply["status"] == "assigning" {
        say("Provisioning Status: PROV_DEVICE_REG_STATUS_ASSIGNING");
        let wait = poll_every.unwrap_or(Duration::from_secs(retry_after));
        if tokio::time::Instant::now() + wait > deadline {
            return Ok((Ended::TimedOut, waited));
        }
        tokio::time::sleep(wait).await;
        waited += wait;
        let status;
        (status, retry_after, reply) = link.poll(&operation_id).await?;
        if !(status == 200 || status == 202) {
            return Ok((Ended::Refused { status, reply }, waited));
        }
    }
    Ok((Ended::Finished(reply), waited))
}

/// The way requests reach the service.
enum Channel {
    Https {
        http: reqwest::Client,
        base: String,
        token: String,
    },
    Mqtt(Box<DpsMqtt>),
}

impl Channel {
    fn https(
        host: &str,
        scope: &str,
        registration_id: &str,
        ca: Option<&std::path::Path>,
        token: String,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("while reading {}", ca.display()))?;
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem)?);
        }
        Ok(Self::Https {
            http: builder.build()?,
            base: format!("https://{host}/{scope}/registrations/{registration_id}"),
            token,
        })
    }

    async fn close(self) {
        if let Self::Mqtt(mqtt) = self {
            mqtt.disconnect().await;
        }
    }
}

impl DeviceExchange for Channel {
    async fn register(&mut self, body: &Value) -> anyhow::Result<(u16, u64, Value)> {
        match self {
            Self::Https { http, base, token } => {
                let response = http
                    .put(format!("{base}/register?api-version={API_VERSION}"))
                    .header("Authorization", token.as_str())
                    .json(body)
                    .send()
                    .await
                    .with_context(|| {
                        format!("could not reach {base}; check --provisioning-host and the CA")
                    })?;
                read(response).await
            }
            Self::Mqtt(mqtt) => mqtt.register(body).await,
        }
    }

    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<(u16, u64, Value)> {
        match self {
            Self::Https { http, base, token } => {
                let response = http
                    .get(format!(
                        "{base}/operations/{operation_id}?api-version={API_VERSION}"
                    ))
                    .header("Authorization", token.as_str())
                    .send()
                    .await?;
                read(response).await
            }
            Self::Mqtt(mqtt) => mqtt.poll(operation_id).await,
        }
    }
}

/// Status, `Retry-After` (1 to 300 s, default 1, as the C SDK reads it) and JSON body.
async fn read(response: reqwest::Response) -> anyhow::Result<(u16, u64, Value)> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| (1..=300).contains(s))
        .unwrap_or(1);
    let text = response.text().await?;
    Ok((
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn failure(status: u16, reply: &Value) -> String {
    format!(
        "Failure registering device: status {status}, error {}: {}",
        reply["errorCode"]
            .as_i64()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
        reply["message"].as_str().unwrap_or("no message")
    )
}
