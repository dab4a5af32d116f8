//! The `deployd` command: the server (`deployd serve`) and a CLI for it.
//!
//! This crate only composes the others: it parses arguments, starts the Manager and the HTTP
//! server, waits for a signal and drains with a deadline; or it calls a running server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod telemetry;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use deployd_manager::{FileOrigin, Manager, Options};
use deployd_server::auth::Token;
use deployd_server::client::Client;
use deployd_server::{AllowedHost, ApiOptions, CorsOrigin};
use serde_json::Value;

/// mimalloc instead of glibc's allocator: the task path allocates and frees many small buffers
/// on every request, where glibc's malloc spent about a quarter of the async thread's time
/// (see "The task-path benchmark" in docs/ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "deployd",
    version,
    about = "A deployment server for agentic workflows"
)]
struct Cli {
    /// The deployd server the client commands talk to.
    #[arg(
        long,
        global = true,
        env = "DEPLOYD_SERVER",
        default_value = "http://127.0.0.1:4501"
    )]
    server: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Deploys a deployment file to the server.
    Deploy {
        /// The deployment file.
        file: PathBuf,
        /// Replace a deployment of the same name.
        #[arg(long)]
        reload: bool,
        /// Return once the deployment is created, without waiting for its services.
        #[arg(long)]
        no_wait: bool,
    },
    /// Runs a task and prints its result.
    Run {
        /// The deployment.
        #[arg(short, long)]
        deployment: String,
        /// The service; the deployment's default service when absent.
        #[arg(short, long)]
        service: Option<String>,
        /// The task's input as a JSON object.
        #[arg(short, long, conflicts_with = "arg")]
        input: Option<String>,
        /// One input argument: `-a KEY VALUE` (VALUE is parsed as JSON when it is JSON).
        #[arg(short, long, num_args = 2, value_names = ["KEY", "VALUE"], action = clap::ArgAction::Append)]
        arg: Vec<String>,
    },
    /// Shows the server's status, or a deployment's.
    Status {
        /// A deployment.
        name: Option<String>,
    },
    /// Prints a service's output (its log): the last lines, and with `-f` what comes after.
    Logs {
        /// The deployment.
        deployment: String,
        /// The service; the deployment's default service when absent.
        service: Option<String>,
        /// Go on printing lines as the service writes them (Ctrl-C stops).
        #[arg(short, long)]
        follow: bool,
        /// How many lines from the end [default: 100].
        #[arg(short = 'n', long)]
        tail: Option<usize>,
    },
    /// Stops and deletes a deployment.
    Delete {
        /// The deployment.
        name: String,
    },
    /// Checks deployment files without deploying them.
    Validate {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The address to listen on [default: 127.0.0.1:4501]; a non-loopback one needs a token
    /// (`--token`) or `--insecure-no-auth`.
    #[arg(long, env = "DEPLOYD_LISTEN")]
    listen: Option<SocketAddr>,
    /// The host to listen on, as llama_deploy's `LLAMA_DEPLOY_APISERVER_HOST` (replaces the
    /// host of `--listen`).
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_HOST")]
    host: Option<String>,
    /// The port to listen on, as llama_deploy's `LLAMA_DEPLOY_APISERVER_PORT` (replaces the
    /// port of `--listen`).
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_PORT")]
    port: Option<u16>,
    /// Where deployd keeps its state, the synced sources and the logs [default: .deployd, or
    /// llama_deploy's `LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH` when that is set].
    #[arg(long, env = "DEPLOYD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A folder whose `.yml` and `.yaml` files are deployed at start, relative to it, as
    /// llama_deploy's API server does with its rc folder; nothing happens when it does not
    /// exist.
    #[arg(
        long,
        env = "LLAMA_DEPLOY_APISERVER_RC_PATH",
        default_value = ".llama_deploy_rc"
    )]
    rc_path: PathBuf,
    /// The one file of the rc folder to deploy at start (relative to it), instead of all;
    /// `DEPLOYMENT_FILE_PATH` is read too.
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_DEPLOYMENT_FILE_PATH")]
    deployment_file_path: Option<PathBuf>,
    /// The most deployments that may exist at once.
    #[arg(long, default_value_t = 10)]
    max_deployments: usize,
    /// Another name requests may be addressed to (their `Host`), and whose web pages may
    /// change things; without a port, on any port. The listen address (and, for a loopback
    /// one, `localhost`, `127.0.0.1` and `[::1]`) with its port is always allowed. Repeatable.
    #[arg(
        long = "allow-host",
        value_name = "NAME[:PORT]",
        env = "DEPLOYD_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    allow_hosts: Vec<AllowedHost>,
    /// The origin of web pages that may call the API from a browser (`https://app.example`,
    /// `http://localhost:5173`): deployd answers their CORS requests, and their pages may
    /// change things. None by default; `*` is refused. Repeatable.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        env = "DEPLOYD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<CorsOrigin>,
    /// A folder (with the folders below it) that clients on other machines may deploy from
    /// (`base_path`); clients on this machine may deploy from any folder. Repeatable.
    #[arg(long = "allow-base-path", value_name = "DIR")]
    allow_base_paths: Vec<PathBuf>,
    /// How long `POST .../tasks/run` waits for a task before answering 504 (the task goes on).
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_RUN_TIMEOUT",
        default_value = "120",
        value_parser = parse_seconds
    )]
    run_timeout: Duration,
    /// On shutdown, reload or delete, how long the tasks in flight on a service may take to
    /// finish before they are cut off (and queued again).
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_DRAIN_TIMEOUT",
        default_value = "30",
        value_parser = parse_seconds
    )]
    drain_timeout: Duration,
    /// How long a task may wait for a service that is not ready (starting, restarting, never
    /// healthy) before it fails; a task of a service that has failed fails at once.
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_UNREADY_TIMEOUT",
        default_value = "120",
        value_parser = parse_seconds
    )]
    unready_timeout: Duration,
    /// How long a service may take to start answering a task (its response head) before the
    /// attempt counts as broken off.
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_HEAD_TIMEOUT",
        default_value = "60",
        value_parser = parse_seconds
    )]
    head_timeout: Duration,
    /// A prefix of the names of deployd's environment variables that deployment files sent by
    /// clients may read with `${VAR}` (none by default; `DEPLOYD_*` never). Files given on
    /// the command line read every variable. Repeatable.
    #[arg(
        long = "allow-env-prefix",
        value_name = "PREFIX",
        env = "DEPLOYD_ALLOW_ENV_PREFIXES",
        value_delimiter = ','
    )]
    allow_env_prefixes: Vec<String>,
    /// The size in bytes at which a service's log file (`logs/<service>.log`) is rotated to
    /// `<service>.log.1`, replacing the one before.
    #[arg(
        long,
        value_name = "BYTES",
        env = "DEPLOYD_SERVICE_LOG_MAX",
        default_value_t = 10 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1024..)
    )]
    service_log_max: u64,
    /// The largest request body deployd reads, in bytes (larger: 413). Deployment files are
    /// limited to 4 MiB whatever this says.
    #[arg(
        long,
        value_name = "BYTES",
        env = "DEPLOYD_MAX_BODY_BYTES",
        default_value_t = deployd_server::DEFAULT_MAX_BODY_BYTES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..)
    )]
    max_body_bytes: usize,
    /// The most event streams (a task's events, a followed log) open at once; one more is
    /// answered 429.
    #[arg(
        long,
        value_name = "N",
        env = "DEPLOYD_MAX_EVENT_STREAMS",
        default_value_t = deployd_server::DEFAULT_MAX_STREAMS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_event_streams: usize,
    /// How long an ended task, with its events, is kept after it ended; `0` keeps every task.
    /// Unfinished tasks and sessions are never pruned [default: 604800, 7 days].
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_RETENTION",
        value_parser = parse_retention
    )]
    retention: Option<Retention>,
    /// The token every request must carry (`Authorization: Bearer <token>`), with full
    /// access; at least 16 characters. Prefer the variable: an option shows in `ps`.
    #[arg(long, env = "DEPLOYD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A token that may only run tasks (create, run, events, results, sessions) and read
    /// deployments, not create, reload or delete them; needs `--token`.
    #[arg(long, env = "DEPLOYD_TASK_TOKEN", hide_env_values = true)]
    task_token: Option<String>,
    /// Listen on a non-loopback address without a token: anyone who reaches the port can run
    /// code on this machine. Only behind something that authenticates for deployd.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Export traces (one per task: its request, its time in the queue, its service call)
    /// with OTLP over HTTP to this collector (`http://127.0.0.1:4318`); services get the
    /// W3C `traceparent` of their call.
    #[arg(long, value_name = "URL", env = "DEPLOYD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Deployment files to deploy at start.
    files: Vec<PathBuf>,
}

/// `deployd` with no command: `deployd serve` with its defaults and environment.
#[derive(Debug, Parser)]
#[command(name = "deployd")]
struct DefaultServe {
    #[command(flatten)]
    args: ServeArgs,
}

/// A positive number of seconds (`120`, `0.5`).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(format!("`{text}`: the timeout must be more than 0 seconds"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{text}`: {err}"))
}

/// How long ended tasks are kept: `None` keeps every task.
#[derive(Debug, Clone, Copy)]
struct Retention(Option<Duration>);

/// A retention in seconds; `0` keeps every task.
fn parse_retention(text: &str) -> Result<Retention, String> {
    if text.trim() == "0" {
        return Ok(Retention(None));
    }
    parse_seconds(text).map(|d| Retention(Some(d)))
}

/// The async runtime's worker threads: one fewer than the cores (at least one), since the
/// control store's writer runs on a thread of its own; `TOKIO_WORKER_THREADS` overrides it. On
/// two cores one worker served as many tasks as two, with a fifth less CPU per task (the
/// second worker mostly woke up to steal work).
fn worker_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None; // tokio reads it
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Some(cores.saturating_sub(1).max(1))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let mut client = Client::new(&cli.server);
    // The token comes from the environment only (an option would show it in `ps`).
    if let Some(token) = std::env::var("DEPLOYD_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        client = client.with_token(token);
    }
    match cli.command {
        None => {
            let DefaultServe { args } = DefaultServe::try_parse_from(["deployd"])?;
            Box::pin(serve(args))
                .await
                .map(|()| std::process::ExitCode::SUCCESS)
        }
        Some(Command::Serve(args)) => Box::pin(serve(*args))
            .await
            .map(|()| std::process::ExitCode::SUCCESS),
        Some(Command::Deploy {
            file,
            reload,
            no_wait,
        }) => {
            let (name, warnings) = client.deploy(&file, reload).await?;
            for warning in warnings {
                eprintln!("{warning}");
            }
            println!("deployment `{name}` created");
            if !no_wait {
                wait_ready(&client, &name).await?;
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Run {
            deployment,
            service,
            input,
            arg,
        }) => {
            let input = task_input(input.as_deref(), &arg)?;
            let result = client.run(&deployment, service.as_deref(), &input).await?;
            match result {
                Value::String(text) => println!("{text}"),
                other => println!("{}", serde_json::to_string_pretty(&other)?),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Status { name: None }) => {
            let status = client.status().await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Status { name: Some(name) }) => {
            let status = client.deployment(&name).await?;
            println!(
                "deployment {} (default service: {})",
                status.name, status.default_service
            );
            for service in status.services {
                println!(
                    "  {:<20} {:<10} port {:<5} pid {:<8} restarts {}{}",
                    service.id,
                    format!("{:?}", service.phase).to_lowercase(),
                    service.port,
                    service
                        .pid
                        .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    service.restarts,
                    service
                        .last_exit
                        .map(|e| format!(" (last exit: {e})"))
                        .unwrap_or_default(),
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Delete { name }) => {
            client.delete(&name).await?;
            println!("deployment `{name}` deleted");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Logs {
            deployment,
            service,
            follow,
            tail,
        }) => {
            let service = match service {
                Some(service) => service,
                None => client.deployment(&deployment).await?.default_service,
            };
            let mut stdout = std::io::stdout();
            client
                .logs(&deployment, &service, tail, follow, |chunk| {
                    use std::io::Write;
                    let _ = stdout.write_all(chunk);
                    let _ = stdout.flush();
                })
                .await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Some(Command::Validate { files }) => Ok(validate(&files)),
    }
}

fn task_input(input: Option<&str>, args: &[String]) -> anyhow::Result<Value> {
    if let Some(input) = input {
        let value: Value = serde_json::from_str(input).context("--input is not valid JSON")?;
        if !value.is_object() {
            bail!("--input must be a JSON object of keyword arguments");
        }
        return Ok(value);
    }
    let mut object = serde_json::Map::new();
    for pair in args.chunks(2) {
        if let [key, value] = pair {
            let value =
                serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone()));
            object.insert(key.clone(), value);
        }
    }
    Ok(Value::Object(object))
}

/// The stages of a deploy, in order.
const STAGES: [&str; 5] = ["sync", "prepare", "launch", "ready", "switch"];

/// Follows a deploy until it ends, with a progress bar per service; fails naming the stage and
/// the error of every service that failed.
async fn wait_ready(client: &Client, name: &str) -> anyhow::Result<()> {
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>16} [{bar:25}] {msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let mut service_bars: Vec<(String, indicatif::ProgressBar)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        let status = client.deployment(name).await?;
        for service in &status.services {
            let bar = match service_bars.iter().find(|(id, _)| *id == service.id) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = bars.add(indicatif::ProgressBar::new(STAGES.len() as u64));
                    bar.set_style(style.clone());
                    bar.set_prefix(service.id.clone());
                    service_bars.push((service.id.clone(), bar.clone()));
                    bar
                }
            };
            if let Some(stage) = &service.stage {
                let index = STAGES.iter().position(|s| *s == stage.stage).unwrap_or(0);
                let passed = if stage.state == "done" {
                    index + 1
                } else {
                    index
                };
                bar.set_position(passed as u64);
                bar.set_message(format!("{} {}", stage.stage, stage.state));
            }
        }
        if !status.deploying {
            for (_, bar) in &service_bars {
                bar.finish();
            }
            let failed: Vec<String> = status
                .services
                .iter()
                .filter_map(|service| {
                    let stage = service.stage.as_ref()?;
                    (stage.state == "failed").then(|| {
                        format!(
                            "service `{}` failed in stage {}: {}",
                            service.id,
                            stage.stage,
                            stage.error.as_deref().unwrap_or("unknown error")
                        )
                    })
                })
                .collect();
            if !failed.is_empty() {
                bail!("{}", failed.join("\n"));
            }
            for service in &status.services {
                println!("  {} ready on port {}", service.id, service.port);
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the deploy of `{name}` has not ended after 30 minutes; see `deployd status {name}`"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn validate(files: &[PathBuf]) -> std::process::ExitCode {
    let mut failed = false;
    for file in files {
        let origin = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("{origin}: error: cannot read: {err}");
                failed = true;
                continue;
            }
        };
        match deployd_config::parse(&text, &origin) {
            Ok(loaded) => {
                if !loaded.warnings.is_empty() {
                    eprint!("{}", deployd_config::render_all(&loaded.warnings, &text));
                }
                println!("{origin}: ok ({} warnings)", loaded.warnings.len());
            }
            Err(diagnostics) => {
                eprint!("{}", diagnostics.render(&text));
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listen = listen_address(&args).await?;
    let token = |value: &Option<String>, option: &str| {
        value
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Token::new)
            .transpose()
            .with_context(|| format!("{option} is refused"))
    };
    let full_token = token(&args.token, "--token (DEPLOYD_TOKEN)")?;
    let task_token = token(&args.task_token, "--task-token (DEPLOYD_TASK_TOKEN)")?;
    if task_token.is_some() && full_token.is_none() {
        bail!(
            "--task-token (DEPLOYD_TASK_TOKEN) is set without --token (DEPLOYD_TOKEN): nobody \
             could deploy; set both"
        );
    }
    if !listen.ip().is_loopback() && full_token.is_none() && !args.insecure_no_auth {
        bail!(
            "refusing to listen on {listen} without a token: deployments run code, so anyone \
             who reaches this port could run code on this machine. Set DEPLOYD_TOKEN (or \
             --token; at least 16 characters, e.g. `openssl rand -hex 32`), or listen on a \
             loopback address, or pass --insecure-no-auth when something in front \
             authenticates for deployd"
        );
    }
    let guarded = full_token.is_some();
    let telemetry = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(telemetry::start(endpoint)?),
        None => None,
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".deployd"));
    let manager_options = Options::new(&data_dir)
        .max_deployments(args.max_deployments)
        .drain_timeout(args.drain_timeout)
        .unready_timeout(args.unready_timeout)
        .head_timeout(args.head_timeout)
        .log_max_bytes(args.service_log_max)
        .retention(
            args.retention
                .map_or(Some(deployd_manager::DEFAULT_RETENTION), |r| r.0),
        )
        .variable_prefixes(args.allow_env_prefixes.clone());
    // Draining, then stopping the services, then a margin: the whole shutdown's deadline.
    let shutdown_deadline =
        manager_options.drain_timeout + manager_options.stop_timeout + Duration::from_secs(5);
    let manager = Manager::start(manager_options)
        .await
        .with_context(|| format!("cannot start on data directory {}", data_dir.display()))?;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            manager.shutdown().await;
            return Err(err).with_context(|| format!("cannot listen on {listen}"));
        }
    };
    // llama_deploy's rc folder first (its files are relative to it), then the files named.
    let mut files: Vec<(PathBuf, Option<PathBuf>)> = rc_files(&args)
        .into_iter()
        .map(|file| (file, Some(args.rc_path.clone())))
        .collect();
    files.extend(args.files.iter().map(|file| (file.clone(), None)));
    for (file, base) in &files {
        if let Err(err) = deploy_file(&manager, file, base.as_deref()).await {
            tracing::error!(file = %file.display(), error = %format!("{err:#}"), "cannot deploy");
        }
    }
    let address = listener.local_addr().unwrap_or(listen);
    let mut options = ApiOptions::new(address)
        .run_timeout(args.run_timeout)
        .tokens(full_token, task_token)
        .max_body_bytes(args.max_body_bytes)
        .max_streams(args.max_event_streams);
    for host in args.allow_hosts {
        options = options.allow_host(host);
    }
    for origin in args.cors_origins {
        options = options.allow_cors_origin(origin);
    }
    for dir in args.allow_base_paths {
        options = options.allow_base_path(dir);
    }
    tracing::info!(
        address = %address,
        data_dir = %manager.options().data_dir.display(),
        hosts = %options.allowed_hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "deployd listening on http://{address} ({})",
        if guarded {
            "requests need a token"
        } else if address.ip().is_loopback() {
            "loopback only, no token"
        } else {
            "NO TOKEN: anyone who reaches this address can run code"
        },
    );

    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(deployd_server::serve(
        listener,
        manager.clone(),
        options,
        async move {
            let _ = server_stopped.await;
        },
    ));
    shutdown_signal().await;
    tracing::info!("shutting down");
    // The server stops taking connections first, so that a wait the Manager's shutdown cuts
    // answers "shutting down"; stopping the Manager stops the services and ends open streams,
    // so that the server can drain. The whole shutdown has a deadline.
    let drained = tokio::time::timeout(shutdown_deadline, async {
        let _ = stop_server.send(());
        manager.shutdown().await;
        let _ = server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown deadline passed; exiting");
    }
    if let Some(telemetry) = telemetry {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    Ok(())
}

/// The address to listen on: `--listen`, with the host and port of llama_deploy's settings
/// when they are given.
async fn listen_address(args: &ServeArgs) -> anyhow::Result<SocketAddr> {
    let mut listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4501)));
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    if let Some(host) = &args.host {
        let found = tokio::net::lookup_host((host.as_str(), listen.port()))
            .await
            .with_context(|| format!("cannot resolve the host `{host}`"))?
            .next()
            .with_context(|| format!("the host `{host}` has no address"))?;
        listen = found;
    }
    Ok(listen)
}

/// The deployment files of llama_deploy's rc folder: the one its deployment file path names,
/// or every `.yml` and `.yaml` file in it, by name; none when the folder does not exist.
fn rc_files(args: &ServeArgs) -> Vec<PathBuf> {
    let one = args
        .deployment_file_path
        .clone()
        .or_else(|| std::env::var_os("DEPLOYMENT_FILE_PATH").map(PathBuf::from));
    if !args.rc_path.is_dir() {
        if let Some(one) = one {
            tracing::warn!(rc_path = %args.rc_path.display(), file = %one.display(), "the rc folder does not exist; nothing deployed from it");
        }
        return Vec::new();
    }
    if let Some(one) = one {
        return vec![args.rc_path.join(one)];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.rc_path)
        .map(|dir| {
            dir.flatten()
                .map(|entry| entry.path())
                .filter(|path| {
                    path.is_file()
                        && path
                            .extension()
                            .is_some_and(|ext| ext == "yml" || ext == "yaml")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Deploys a file from the server's disk, its local sources relative to `base` (the file's
/// folder when `None`).
async fn deploy_file(manager: &Manager, file: &Path, base: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let absolute = std::path::absolute(file)?;
    let base = match base {
        Some(base) => std::path::absolute(base)?,
        None => absolute.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    let base = base.as_path();
    let deployed = manager
        .deploy_from(
            &text,
            &file.display().to_string(),
            base,
            true,
            FileOrigin::Operator,
        )
        .await?;
    for warning in &deployed.warnings {
        tracing::warn!(deployment = %deployed.status.name, "{warning}");
    }
    tracing::info!(deployment = %deployed.status.name, "deployed {}", file.display());
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
