//! The admin commands, modelled on `az iot dps`: enrollment groups, individual enrollments,
//! registration states, linked hubs, and device key derivation.

pub mod certificate;
mod enrollment;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::json;

use dps_tools::client::{ClientSettings, ServiceClient};
pub use dps_tools::output::Output;
pub use enrollment::EnrollmentSettings;
use enrollment::Kind;

/// How the admin commands reach the service.
#[derive(Debug, Args, Clone)]
pub struct ConnectionArgs {
    /// Service connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`). Defaults to
    /// the owner policy of the service whose data directory is --data-dir.
    #[arg(
        long,
        env = "OPENDPS_CONNECTION_STRING",
        global = true,
        hide_env_values = true
    )]
    pub login: Option<String>,
    /// PEM file of the CA that issued the service's certificate. Defaults to the data directory's
    /// development CA when --login is not given.
    #[arg(long, env = "OPENDPS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

/// `opendps enrollment-group …`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create an enrollment group (symmetric keys are generated unless given).
    Create {
        /// Enrollment group id.
        #[arg(long, short = 'g', visible_alias = "enrollment-id")]
        group_id: String,
        #[command(flatten)]
        settings: EnrollmentSettings,
    },
    /// Show an enrollment group.
    Show {
        /// Enrollment group id.
        #[arg(long, short = 'g', visible_alias = "enrollment-id")]
        group_id: String,
        /// Include the attestation's keys and certificates.
        #[arg(long)]
        show_keys: bool,
    },
    /// List enrollment groups.
    List {
        /// Most items to list.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Change an enrollment group; settings not given stay as they are.
    Update {
        /// Enrollment group id.
        #[arg(long, short = 'g', visible_alias = "enrollment-id")]
        group_id: String,
        /// Only update if the group still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
        #[command(flatten)]
        settings: EnrollmentSettings,
    },
    /// Delete an enrollment group.
    Delete {
        /// Enrollment group id.
        #[arg(long, short = 'g', visible_alias = "enrollment-id")]
        group_id: String,
        /// Only delete if the group still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
    },
}

/// `opendps enrollment …`.
#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    /// Create an individual enrollment.
    Create {
        /// Registration id of the device.
        #[arg(long, visible_alias = "registration-id")]
        enrollment_id: String,
        #[command(flatten)]
        settings: EnrollmentSettings,
    },
    /// Show an individual enrollment.
    Show {
        /// Registration id of the device.
        #[arg(long, visible_alias = "registration-id")]
        enrollment_id: String,
        /// Include the attestation's keys and certificates.
        #[arg(long)]
        show_keys: bool,
    },
    /// List individual enrollments.
    List {
        /// Most items to list.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Change an individual enrollment; settings not given stay as they are.
    Update {
        /// Registration id of the device.
        #[arg(long, visible_alias = "registration-id")]
        enrollment_id: String,
        /// Only update if the enrollment still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
        #[command(flatten)]
        settings: EnrollmentSettings,
    },
    /// Delete an individual enrollment.
    Delete {
        /// Registration id of the device.
        #[arg(long, visible_alias = "registration-id")]
        enrollment_id: String,
        /// Only delete if the enrollment still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
    },
}

/// `opendps registration …`.
#[derive(Debug, Subcommand)]
pub enum RegistrationCommand {
    /// Show a device's registration state.
    Show {
        /// Registration id.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
        /// Show the custom allocation trace instead: what the webhook was asked and answered.
        #[arg(long)]
        trace: bool,
    },
    /// List the registration states of an enrollment group.
    List {
        /// Enrollment group id.
        #[arg(long, short = 'g')]
        group_id: String,
    },
    /// Delete a device's registration state.
    Delete {
        /// Registration id.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
        /// Only delete if the state still has this etag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
    },
}

/// `opendps linked-hub …`.
#[derive(Debug, Subcommand)]
pub enum LinkedHubCommand {
    /// Link an IoT hub by its connection string: a policy that grants RegistryWrite and
    /// ServiceConnect, such as iothubowner. The hub is checked first (see docs/linked-hubs.md).
    Create {
        /// The hub's connection string.
        #[arg(long)]
        connection_string: String,
        /// Weight in hashed allocation, 1 to 1000.
        #[arg(long, default_value_t = 1)]
        allocation_weight: u32,
        /// Whether allocation policies may pick this hub.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        apply_allocation_policy: bool,
        /// Region label, used by geoLatency allocation.
        #[arg(long)]
        location: Option<String>,
    },
    /// List linked hubs (their keys are never shown).
    List,
    /// Unlink a hub.
    Delete {
        /// The hub's host name.
        #[arg(long, visible_alias = "hub-name")]
        linked_hub: String,
    },
}

/// `opendps compute-device-key`.
#[derive(Debug, Args)]
pub struct ComputeDeviceKeyArgs {
    /// The enrollment group's symmetric key.
    #[arg(
        long,
        required_unless_present = "group_id",
        conflicts_with = "group_id"
    )]
    pub key: Option<String>,
    /// Fetch the key of this enrollment group from the service instead.
    #[arg(long, short = 'g')]
    pub group_id: Option<String>,
    /// The device's registration id.
    #[arg(long, visible_alias = "rid")]
    pub registration_id: String,
    /// With --group-id: derive from the secondary key.
    #[arg(long)]
    pub secondary: bool,
}

/// The environment every admin command runs in.
pub struct CommandContext {
    /// Connection flags.
    pub connection: ConnectionArgs,
    /// Data directory of a local service.
    pub data_dir: PathBuf,
    /// Output format.
    pub output: Output,
}

impl CommandContext {
    async fn client(&self) -> anyhow::Result<ServiceClient> {
        ServiceClient::connect(ClientSettings {
            login: self.connection.login.clone(),
            ca_file: self.connection.ca_file.clone(),
            data_dir: self.data_dir.clone(),
        })
        .await
    }
}

fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs an `enrollment-group` command.
pub async fn group(ctx: &CommandContext, cmd: GroupCommand) -> anyhow::Result<()> {
    let kind = Kind::Group;
    match cmd {
        GroupCommand::Create { group_id, settings } => {
            create(ctx, kind, &group_id, &settings).await
        }
        GroupCommand::Show {
            group_id,
            show_keys,
        } => show(ctx, kind, &group_id, show_keys).await,
        GroupCommand::List { top } => list(ctx, kind, top).await,
        GroupCommand::Update {
            group_id,
            etag,
            settings,
        } => update(ctx, kind, &group_id, etag, &settings).await,
        GroupCommand::Delete { group_id, etag } => delete(ctx, kind, &group_id, etag).await,
    }
}

/// Runs an `enrollment` command.
pub async fn enrollment(ctx: &CommandContext, cmd: EnrollmentCommand) -> anyhow::Result<()> {
    let kind = Kind::Individual;
    match cmd {
        EnrollmentCommand::Create {
            enrollment_id,
            settings,
        } => create(ctx, kind, &enrollment_id, &settings).await,
        EnrollmentCommand::Show {
            enrollment_id,
            show_keys,
        } => show(ctx, kind, &enrollment_id, show_keys).await,
        EnrollmentCommand::List { top } => list(ctx, kind, top).await,
        EnrollmentCommand::Update {
            enrollment_id,
            etag,
            settings,
        } => update(ctx, kind, &enrollment_id, etag, &settings).await,
        EnrollmentCommand::Delete {
            enrollment_id,
            etag,
        } => delete(ctx, kind, &enrollment_id, etag).await,
    }
}

async fn create(
    ctx: &CommandContext,
    kind: Kind,
    id: &str,
    settings: &EnrollmentSettings,
) -> anyhow::Result<()> {
    let mut doc = json!({ kind.id_field(): id });
    settings.apply(kind, &mut doc, true)?;
    let client = ctx.client().await?;
    let (created, _) = client
        .send(
            Method::PUT,
            &format!("/{}/{}", kind.path(), encode(id)),
            None,
            &[],
            Some(&doc),
        )
        .await?;
    ctx.output.print_item(&created);
    Ok(())
}

async fn show(ctx: &CommandContext, kind: Kind, id: &str, show_keys: bool) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let path = format!("/{}/{}", kind.path(), encode(id));
    let (mut item, _) = client.send(Method::GET, &path, None, &[], None).await?;
    if show_keys {
        let (attestation, _) = client
            .send(
                Method::POST,
                &format!("{path}/attestationmechanism"),
                None,
                &[],
                None,
            )
            .await?;
        item["attestation"] = attestation;
    }
    ctx.output.print_item(&item);
    Ok(())
}

async fn list(ctx: &CommandContext, kind: Kind, top: Option<usize>) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let items = client
        .query_all(&format!("/{}/query", kind.path()), top)
        .await?;
    ctx.output.print_list(&items, kind.columns());
    Ok(())
}

async fn update(
    ctx: &CommandContext,
    kind: Kind,
    id: &str,
    etag: Option<String>,
    settings: &EnrollmentSettings,
) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let path = format!("/{}/{}", kind.path(), encode(id));
    let (mut doc, _) = client.send(Method::GET, &path, None, &[], None).await?;
    let current = doc["etag"].as_str().map(str::to_owned);
    settings.apply(kind, &mut doc, false)?;
    let if_match = etag.or(current).context("the service returned no etag")?;
    let (updated, _) = client
        .send(Method::PUT, &path, Some(&if_match), &[], Some(&doc))
        .await?;
    ctx.output.print_item(&updated);
    Ok(())
}

async fn delete(
    ctx: &CommandContext,
    kind: Kind,
    id: &str,
    etag: Option<String>,
) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    client
        .send(
            Method::DELETE,
            &format!("/{}/{}", kind.path(), encode(id)),
            etag.as_deref(),
            &[],
            None,
        )
        .await?;
    ctx.output
        .done(&format!("Deleted {} '{id}'.", kind.label()));
    Ok(())
}

/// Runs a `registration` command.
pub async fn registration(ctx: &CommandContext, cmd: RegistrationCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match cmd {
        RegistrationCommand::Show {
            registration_id,
            trace,
        } => {
            let path = format!("/registrations/{}", encode(&registration_id));
            if !trace {
                let (state, _) = client.send(Method::GET, &path, None, &[], None).await?;
                ctx.output.print_item(&state);
                return Ok(());
            }
            // The trace exists only when a webhook was asked or a previous identity could not be
            // deleted; the registration is shown either way.
            let allocation_trace = client.get_if_found(&format!("{path}/trace")).await?;
            let (state, _) = client.send(Method::GET, &path, None, &[], None).await?;
            match (allocation_trace, ctx.output) {
                (Some(found), Output::Human) => {
                    ctx.output.print_item(&state);
                    if found.get("staleIdentity").is_some() {
                        println!(
                            "A previous identity of this device could not be deleted (staleIdentity below): it still accepts the device's earlier credentials; delete it on its hub."
                        );
                    }
                    println!("Trace:");
                    println!("{}", serde_json::to_string_pretty(&found)?);
                }
                (None, Output::Human) => {
                    ctx.output.print_item(&state);
                    println!(
                        "No trace: its last registration was allocated without custom allocation and left no identity behind on a hub."
                    );
                }
                (found, Output::Json) => ctx.output.print_item(&serde_json::json!({
                    "registration": state,
                    "allocationTrace": found,
                })),
            }
        }
        RegistrationCommand::List { group_id } => {
            let items = client
                .query_all(&format!("/registrations/{}/query", encode(&group_id)), None)
                .await?;
            ctx.output.print_list(
                &items,
                &[
                    ("REGISTRATION ID", "registrationId"),
                    ("STATUS", "status"),
                    ("HUB", "assignedHub"),
                    ("DEVICE ID", "deviceId"),
                    ("UPDATED", "lastUpdatedDateTimeUtc"),
                ],
            );
        }
        RegistrationCommand::Delete {
            registration_id,
            etag,
        } => {
            client
                .send(
                    Method::DELETE,
                    &format!("/registrations/{}", encode(&registration_id)),
                    etag.as_deref(),
                    &[],
                    None,
                )
                .await?;
            ctx.output.done(&format!(
                "Deleted the registration state of '{registration_id}'."
            ));
        }
    }
    Ok(())
}

/// Runs a `linked-hub` command.
pub async fn linked_hub(ctx: &CommandContext, cmd: LinkedHubCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match cmd {
        LinkedHubCommand::Create {
            connection_string,
            allocation_weight,
            apply_allocation_policy,
            location,
        } => {
            let body = json!({
                "connectionString": connection_string,
                "allocationWeight": allocation_weight,
                "applyAllocationPolicy": apply_allocation_policy,
                "location": location,
            });
            let (hub, _) = client
                .send(Method::POST, "/linkedHubs", None, &[], Some(&body))
                .await?;
            ctx.output.print_item(&hub);
        }
        LinkedHubCommand::List => {
            let (hubs, _) = client
                .send(Method::GET, "/linkedHubs", None, &[], None)
                .await?;
            let hubs = hubs.as_array().cloned().unwrap_or_default();
            ctx.output.print_list(
                &hubs,
                &[
                    ("NAME", "name"),
                    ("WEIGHT", "allocationWeight"),
                    ("APPLY POLICY", "applyAllocationPolicy"),
                    ("LOCATION", "location"),
                ],
            );
        }
        LinkedHubCommand::Delete { linked_hub } => {
            client
                .send(
                    Method::DELETE,
                    &format!("/linkedHubs/{}", encode(&linked_hub)),
                    None,
                    &[],
                    None,
                )
                .await?;
            ctx.output.done(&format!("Unlinked '{linked_hub}'."));
        }
    }
    Ok(())
}

/// Runs `compute-device-key`.
pub async fn compute_device_key(
    ctx: &CommandContext,
    args: ComputeDeviceKeyArgs,
) -> anyhow::Result<()> {
    let key = match (args.key, args.group_id) {
        (Some(key), _) => key,
        (None, Some(group)) => {
            let client = ctx.client().await?;
            let (attestation, _) = client
                .send(
                    Method::POST,
                    &format!("/enrollmentGroups/{}/attestationmechanism", encode(&group)),
                    None,
                    &[],
                    None,
                )
                .await?;
            let field = if args.secondary {
                "secondaryKey"
            } else {
                "primaryKey"
            };
            match attestation["symmetricKey"][field].as_str() {
                Some(key) => key.to_owned(),
                None => bail!(
                    "the enrollment group '{group}' has no symmetric key; it uses {} attestation",
                    attestation["type"]
                ),
            }
        }
        (None, None) => bail!("give --key or --group-id"),
    };
    let derived = dps_core::sas::derive_device_key(&key, &args.registration_id)
        .map_err(|_| anyhow::anyhow!("--key is not base64"))?;
    match ctx.output {
        Output::Json => println!(
            "{}",
            json!({"registrationId": args.registration_id, "derivedKey": derived})
        ),
        Output::Human => println!("{derived}"),
    }
    Ok(())
}

/// `--provisioning-status`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProvisioningStatusArg {
    /// Devices may register.
    Enabled,
    /// Devices are refused with `disabled`.
    Disabled,
}

impl ProvisioningStatusArg {
    fn wire(self) -> dps_core::model::ProvisioningStatus {
        match self {
            Self::Enabled => dps_core::model::ProvisioningStatus::Enabled,
            Self::Disabled => dps_core::model::ProvisioningStatus::Disabled,
        }
    }
}
