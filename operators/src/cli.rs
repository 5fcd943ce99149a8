//! The `iotpipe` command line: parses arguments, sets up logging and signals, runs a command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, TEMPLATE};
use crate::distributed::Role;

/// iotpipe: event-driven stream processing for IoT telemetry.
#[derive(Debug, Parser)]
#[command(
    name = "iotpipe",
    version,
    about = "iotpipe: event-driven stream processing for IoT telemetry"
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `iotpipe_pipeline=debug,info`); RUST_LOG overrides.
    /// The embedded broker's own log (rumqttd) is off unless RUST_LOG names it: it reports every
    /// ordinary disconnect as an error.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline in one process: embedded MQTT broker, log and stores, HTTP + WebSocket.
    Dev(DevArgs),
    /// Distributed mode: read device messages from the MQTT broker (`ingest.broker`) into Kafka.
    Ingest(ProcessArgs),
    /// Distributed mode: merge telemetry into latest state in Redis and emit changes.
    Materialize(ProcessArgs),
    /// Distributed mode: write telemetry history to DynamoDB (`history init` creates the table).
    History(HistoryArgs),
    /// Distributed mode: evaluate subscription rules and emit alerts; `check|test|backtest` help
    /// rule authors.
    Rules(RulesArgs),
    /// Distributed mode: HTTP API, WebSocket push and dashboard.
    Fanout(ProcessArgs),
    /// Distributed mode: every operator in one process.
    All(ProcessArgs),
    /// Manage the device registry (device -> owner, groups) through a running instance's API.
    Devices(DevicesArgs),
    /// Show or generate the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// MQTT listen address [default: 127.0.0.1:1883, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// HTTP listen address [default: 127.0.0.1:8080, or a free port when taken].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Data directory [default: ./iotpipe-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Simulate N devices publishing telemetry over MQTT.
    #[arg(long, value_name = "N")]
    simulate: Option<u32>,
    /// Directory of `NAME.rhai` subscription rules, reloaded while running (docs/RULES.md).
    #[arg(long, value_name = "DIR")]
    rules_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ProcessArgs {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP listen address (health, readiness, metrics; API on fanout) [default: server.http_listen].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct HistoryArgs {
    #[command(flatten)]
    process: ProcessArgs,
    #[command(subcommand)]
    action: Option<HistoryAction>,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct RulesArgs {
    #[command(flatten)]
    process: ProcessArgs,
    #[command(subcommand)]
    action: Option<RulesAction>,
}

#[derive(Debug, Subcommand)]
enum RulesAction {
    /// Compile every `.rhai` file of PATH (a file or directory); list errors as file:line:col.
    Check {
        /// A rule file or a directory of them.
        path: PathBuf,
    },
    /// Run a rule over records (JSON lines `{"device","ts","metrics"}`); print each raise and clear.
    Test {
        /// The rule file.
        rule: PathBuf,
        /// The records.
        #[arg(long, value_name = "FILE.jsonl")]
        input: PathBuf,
    },
    /// Run a rule over a device's stored history, sending nothing; print what it would have raised.
    Backtest {
        /// The rule file.
        rule: PathBuf,
        /// The device.
        #[arg(long)]
        device: String,
        /// Start, epoch ms or RFC 3339.
        #[arg(long)]
        from: String,
        /// End, epoch ms or RFC 3339.
        #[arg(long)]
        to: String,
        /// A running instance's HTTP address (iotpipe dev or fanout).
        #[arg(long, value_name = "ADDR", conflicts_with = "data_dir")]
        api: Option<SocketAddr>,
        /// The data directory of a stopped `iotpipe dev`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum HistoryAction {
    /// Create the DynamoDB table, its TTL and the by-owner index (idempotent).
    Init {
        /// Configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct DevicesArgs {
    /// Base URL of the API (`iotpipe dev` or a fanout instance).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    #[command(subcommand)]
    action: DevicesAction,
}

#[derive(Debug, Subcommand)]
enum DevicesAction {
    /// Register a device (or change its owner and groups).
    Register {
        /// Device id.
        device: String,
        /// The user who owns it.
        #[arg(long)]
        owner: String,
        /// A group it belongs to (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// List registered devices.
    List {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Remove a device from the registry.
    Remove {
        /// Device id.
        device: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, then the file, then IOTPIPE_ variables).
    Print {
        /// Configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write the default configuration, with a comment on every setting.
    Generate {
        /// Write to this file instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},rumqttd=off,rumqttc=warn")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels the returned token on the first SIGINT/SIGTERM; exits the process on the second.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_signal().await;
        warn!("Signal received; draining (send another to exit at once).");
        t.cancel();
        wait_signal().await;
        eprintln!("Second signal: exiting now.");
        std::process::exit(130);
    });
    token
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn load(config: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(config, std::env::vars())?)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            command: ConfigCommand::Print { config },
        } => {
            print!("{}", load(config.as_deref())?.to_toml());
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Generate { output, force },
        } => match output {
            None => {
                print!("{TEMPLATE}");
                Ok(())
            }
            Some(path) => {
                if path.exists() && !force {
                    anyhow::bail!("{} exists; pass --force to overwrite", path.display());
                }
                std::fs::write(&path, TEMPLATE)?;
                eprintln!("Wrote {}", path.display());
                Ok(())
            }
        },
        Command::History(HistoryArgs {
            action: Some(HistoryAction::Init { config }),
            ..
        }) => {
            let cfg = load(config.as_deref())?;
            init_logging(cli.log_format, &cli.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(crate::distributed::history_init(&cfg))
        }
        Command::Ingest(a) => run_process(Role::Ingest, a, cli.log_format, &cli.log_level),
        Command::Materialize(a) => {
            run_process(Role::Materialize, a, cli.log_format, &cli.log_level)
        }
        Command::History(HistoryArgs {
            process,
            action: None,
        }) => run_process(Role::History, process, cli.log_format, &cli.log_level),
        Command::Rules(RulesArgs {
            process,
            action: None,
        }) => run_process(Role::Rules, process, cli.log_format, &cli.log_level),
        Command::Rules(RulesArgs {
            action: Some(action),
            ..
        }) => rules_tool(action),
        Command::Devices(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(devices_tool(args)),
        Command::Fanout(a) => run_process(Role::Fanout, a, cli.log_format, &cli.log_level),
        Command::All(a) => run_process(Role::All, a, cli.log_format, &cli.log_level),
        Command::Dev(args) => {
            let mut cfg = load(args.config.as_deref())?;
            if let Some(a) = args.mqtt_listen {
                cfg.dev.mqtt_listen = Some(a);
            }
            if let Some(a) = args.http_listen {
                cfg.dev.http_listen = Some(a);
            }
            if let Some(d) = args.data_dir {
                cfg.dev.data_dir = d;
            }
            if let Some(n) = args.simulate {
                cfg.dev.simulate = n;
            }
            if let Some(d) = args.rules_dir {
                cfg.rules.dir = Some(d);
            }
            cfg.validate()?;
            init_logging(cli.log_format, &cli.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let shutdown = shutdown_on_signals();
                crate::dev::run(cfg, shutdown).await
            })
        }
    }
}

fn run_process(
    role: Role,
    args: ProcessArgs,
    format: LogFormat,
    level: &str,
) -> anyhow::Result<()> {
    let cfg = load(args.config.as_deref())?;
    init_logging(format, level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = shutdown_on_signals();
        crate::distributed::run(role, cfg, args.http_listen, shutdown).await
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn devices_tool(args: DevicesArgs) -> anyhow::Result<()> {
    let client = crate::http_client::HttpClient::new().map_err(|e| anyhow::anyhow!(e))?;
    let base = args.api.trim_end_matches('/');
    let timeout = std::time::Duration::from_secs(10);
    let json = [("content-type", "application/json".to_owned())];
    let (method, url, body) = match &args.action {
        DevicesAction::Register {
            device,
            owner,
            groups,
        } => (
            "PUT",
            format!("{base}/v1/admin/devices/{}", percent_encode(device)),
            serde_json::json!({"owner": owner, "groups": groups}).to_string(),
        ),
        DevicesAction::List { owner } => (
            "GET",
            match owner {
                Some(o) => format!("{base}/v1/admin/devices?owner={}", percent_encode(o)),
                None => format!("{base}/v1/admin/devices"),
            },
            String::new(),
        ),
        DevicesAction::Remove { device } => (
            "DELETE",
            format!("{base}/v1/admin/devices/{}", percent_encode(device)),
            String::new(),
        ),
    };
    let res = client
        .send(method, &url, &json, body.into(), timeout)
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    if !(200..300).contains(&res.status) {
        anyhow::bail!(
            "{url}: HTTP {}: {}",
            res.status,
            String::from_utf8_lossy(&res.body)
        );
    }
    match &args.action {
        DevicesAction::Register { device, owner, .. } => {
            println!("Registered {device} (owner {owner}).");
        }
        DevicesAction::Remove { device } => println!("Removed {device}."),
        DevicesAction::List { .. } => {
            let v: serde_json::Value = serde_json::from_slice(&res.body)?;
            let devices = v["devices"].as_array().cloned().unwrap_or_default();
            for d in &devices {
                let groups: Vec<&str> = d["groups"]
                    .as_array()
                    .map(|g| g.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                println!(
                    "{}\t{}\t{}",
                    d["device"].as_str().unwrap_or_default(),
                    d["owner"].as_str().unwrap_or_default(),
                    groups.join(",")
                );
            }
            eprintln!("{} devices.", devices.len());
        }
    }
    Ok(())
}

fn rules_tool(action: RulesAction) -> anyhow::Result<()> {
    use crate::rules::tools;
    match action {
        RulesAction::Check { path } => {
            if tools::check(&path)? {
                Ok(())
            } else {
                anyhow::bail!("some rules do not compile")
            }
        }
        RulesAction::Test { rule, input } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tools::test(&rule, &input)),
        RulesAction::Backtest {
            rule,
            device,
            from,
            to,
            api,
            data_dir,
        } => {
            let source = match (api, data_dir) {
                (_, Some(dir)) => tools::HistorySource::DataDir(dir),
                (Some(addr), None) => tools::HistorySource::Api(addr),
                (None, None) => tools::HistorySource::Api(SocketAddr::from(([127, 0, 0, 1], 8080))),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(tools::backtest(&rule, &device, &from, &to, source))
        }
    }
}
