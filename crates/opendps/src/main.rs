//! `opendps`: a self-hosted, wire-compatible Azure IoT Hub Device Provisioning Service.
//!
//! The binary wires the pieces together: configuration, TLS, the store, the HTTPS front end, and the
//! admin commands that talk to a running service.

mod cli;
mod device;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::cli::{ConnectionArgs, Output};
use dps_server::config::{self, Config, FlagOverrides, LogFormat};
use dps_server::{hub, info, serve};
use dps_tools::{bench, client, demo};

#[derive(Debug, Parser)]
#[command(
    name = "opendps",
    version,
    about = "A self-hosted device provisioning service, wire-compatible with Azure IoT Hub DPS.",
    after_help = "Start with `opendps serve`, then `opendps info` for the ID scope and connection strings."
)]
struct Cli {
    /// Data directory of the service (database, development CA, runtime file).
    #[arg(long, global = true, env = "OPENDPS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Output format of the admin commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Human)]
    output: Output,
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the provisioning service.
    Serve(ServeArgs),
    /// Run IoT hubs (minihub) without the provisioning service.
    Hub(HubArgs),
    /// Print the ID scope, connection strings, CA file and listeners of a service.
    Info(InfoArgs),
    /// Print or check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Copy a stopped service's SQLite database, with its in-process hubs, into a PostgreSQL
    /// database, to run the service on several nodes.
    MigrateStore(MigrateStoreArgs),
    /// Manage enrollment groups.
    #[command(subcommand)]
    EnrollmentGroup(cli::GroupCommand),
    /// Manage individual enrollments.
    #[command(subcommand)]
    Enrollment(cli::EnrollmentCommand),
    /// Show, list and delete device registration states.
    #[command(subcommand)]
    Registration(cli::RegistrationCommand),
    /// Manage the IoT hubs devices are assigned to.
    #[command(subcommand)]
    LinkedHub(cli::LinkedHubCommand),
    /// Manage CA certificates for X.509 enrollment groups (upload, verify, list, delete), and make
    /// a test PKI.
    #[command(subcommand)]
    Certificate(cli::certificate::CertificateCommand),
    /// Derive a device's symmetric key from its enrollment group's key.
    ComputeDeviceKey(cli::ComputeDeviceKeyArgs),
    /// Run the Azure DPS custom allocation tutorial on this machine: two hubs, the Contoso
    /// allocation function, two devices, in about ten seconds.
    Demo(demo::DemoArgs),
    /// Measure registrations per second and latency against a running service, next to the rate of
    /// bare TLS connections the machine allows.
    Bench(bench::BenchArgs),
    /// Simulate a device: register it and print the assignment.
    #[command(subcommand)]
    Device(device::DeviceCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on for HTTPS, e.g. 0.0.0.0:443 (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Host name clients use; goes into connection strings.
    #[arg(long)]
    public_host: Option<String>,
    /// Address to listen on for MQTT over TLS (port 0 picks a free port).
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// Address to listen on for AMQP over TLS (port 0 picks a free port).
    #[arg(long)]
    amqp_listen: Option<String>,
    /// Keep the state in this PostgreSQL database, which several nodes may share
    /// (postgres://user@host:5432/database); the password goes in storage.password_file or
    /// PGPASSWORD, not here. Without it, SQLite in the data directory.
    #[arg(long, value_name = "URL")]
    storage_url: Option<String>,
    /// Extra DNS name or IP address for the development certificate (repeatable).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Serve an IoT hub with this host name in-process (minihub; repeatable). Replaces
    /// `minihub.hubs` from the configuration.
    #[arg(long = "hub")]
    hubs: Vec<String>,
}

#[derive(Debug, Args)]
struct HubArgs {
    /// Host name of a hub to serve (repeatable), e.g. contoso-toasters-hub-1.azure-devices.net.
    #[arg(long = "hub", required = true)]
    hubs: Vec<String>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: std::net::SocketAddr,
    /// Extra DNS name or IP address for the development certificate (repeatable).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
}

#[derive(Debug, Args)]
struct InfoArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON (same as --output json).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct MigrateStoreArgs {
    /// Data directory of the service to copy; the service must be stopped. Its opendps.db (and
    /// minihub.db, if any) are read, never changed.
    #[arg(long, value_name = "DATA_DIR")]
    from: PathBuf,
    /// PostgreSQL database to copy into (postgres://user@host:5432/database); it must hold no
    /// opendps service yet. The password goes in --password-file or PGPASSWORD, not here.
    #[arg(long, value_name = "URL")]
    to: String,
    /// File holding the PostgreSQL password (its first line).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "OPENDPS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the default configuration, with comments.
    Default,
    /// Load the configuration layers, validate them, and print the result.
    Check(ConfigArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(
    cli_data_dir: &Option<PathBuf>,
    args: &ConfigArgs,
    flags: FlagOverrides,
    names: &[String],
) -> anyhow::Result<Config> {
    let flags = FlagOverrides {
        data_dir: cli_data_dir.clone(),
        ..flags
    };
    Config::load(args.config.as_deref(), flags, names)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./opendps-data"));
    let ctx = cli::CommandContext {
        connection: cli.connection.clone(),
        data_dir,
        output: cli.output,
    };
    match cli.command {
        Command::Serve(args) => {
            let mut flags = FlagOverrides::default();
            if let Some(listen) = args.listen {
                flags.http.insert("listen".into(), listen.into());
            }
            if let Some(host) = args.public_host {
                flags.http.insert("public_host".into(), host.into());
            }
            if let Some(listen) = args.mqtt_listen {
                flags.mqtt.insert("listen".into(), listen.into());
            }
            if let Some(listen) = args.amqp_listen {
                flags.amqp.insert("listen".into(), listen.into());
            }
            if let Some(url) = args.storage_url {
                flags.storage.insert("url".into(), url.into());
            }
            if !args.hubs.is_empty() {
                flags
                    .minihub
                    .insert("hubs".into(), args.hubs.clone().into());
            }
            let config = load_config(&cli.data_dir, &args.config, flags, &args.tls_names)?;
            init_tracing(&config);
            serve::run(config).await
        }
        Command::Hub(args) => {
            let config = load_config(
                &cli.data_dir,
                &ConfigArgs { config: None },
                FlagOverrides::default(),
                &[],
            )?;
            init_tracing(&config);
            let mut tls = config.tls.clone();
            tls.names.extend(args.tls_names);
            hub::run(hub::HubSettings {
                data_dir: config.data_dir,
                listen: args.listen,
                hubs: args.hubs,
                tls,
            })
            .await
        }
        Command::Info(args) => {
            let config = load_config(&cli.data_dir, &args.config, FlagOverrides::default(), &[])?;
            let info = info::collect(&config).await?;
            if args.json || cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                info::print_human(&info);
            }
            Ok(())
        }
        Command::MigrateStore(args) => migrate_store(args, cli.output).await,
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Command::Config(ConfigCommand::Check(args)) => {
            let config = load_config(&cli.data_dir, &args, FlagOverrides::default(), &[])?;
            print!("{}", toml::to_string_pretty(&config)?);
            eprintln!("The configuration is valid.");
            Ok(())
        }
        Command::Demo(args) => {
            let mut config = Config::default();
            config.log.filter = "warn".into();
            init_tracing(&config);
            demo::run(args).await
        }
        Command::Bench(args) => {
            let settings = client::ClientSettings {
                login: ctx.connection.login.clone(),
                ca_file: ctx.connection.ca_file.clone(),
                data_dir: ctx.data_dir.clone(),
            };
            bench::run(args, settings, ctx.output == Output::Json).await
        }
        Command::EnrollmentGroup(cmd) => cli::group(&ctx, cmd).await,
        Command::Enrollment(cmd) => cli::enrollment(&ctx, cmd).await,
        Command::Registration(cmd) => cli::registration(&ctx, cmd).await,
        Command::LinkedHub(cmd) => cli::linked_hub(&ctx, cmd).await,
        Command::Certificate(cmd) => cli::certificate::run(&ctx, cmd).await,
        Command::ComputeDeviceKey(args) => cli::compute_device_key(&ctx, args).await,
        Command::Device(device::DeviceCommand::Register(args)) => {
            device::register(
                args,
                ctx.data_dir.clone(),
                ctx.connection.ca_file.clone(),
                ctx.output == Output::Json,
            )
            .await
        }
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // Colour codes only for a person at a terminal, never in files, pipes or journald.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// `opendps migrate-store`: copies, showing each table's progress on stderr, then says what was
/// copied and how to go on.
async fn migrate_store(args: MigrateStoreArgs, output: Output) -> anyhow::Result<()> {
    let mut last = (String::new(), 0u64);
    let mut progress = |table: &str, rows: u64| {
        if table != last.0 || rows >= last.1 + 10_000 {
            eprintln!("copying {table}: {rows} rows");
            last = (table.to_owned(), rows);
        }
    };
    let done = dps_server::migrate::migrate_store(
        &args.from,
        &args.to,
        args.password_file.clone(),
        &mut progress,
    )
    .await?;
    if output == Output::Json {
        let tables: serde_json::Map<String, serde_json::Value> = done
            .tables
            .iter()
            .map(|(name, rows)| ((*name).to_owned(), (*rows).into()))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "idScope": done.id_scope,
                "target": done.target,
                "tables": tables,
            }))?
        );
        return Ok(());
    }
    println!("Copied the service {} into {}:", done.id_scope, done.target);
    for (table, rows) in &done.tables {
        println!("  {table:<18} {rows:>10} rows");
    }
    println!(
        "Start each node with storage.url naming this database (and the same --hub names); {} is no longer used.",
        args.from.join("opendps.db").display()
    );
    Ok(())
}
