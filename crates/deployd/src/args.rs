//! The command line: `deployd [serve] [OPTIONS] [FILES]` and the client commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use deployd_server::{AllowedHost, CorsOrigin};

#[derive(Debug, Parser)]
#[command(
    name = "deployd",
    version,
    about = "A deployment server for agentic workflows"
)]
pub(crate) struct Cli {
    /// The deployd server the client commands talk to.
    #[arg(
        long,
        global = true,
        env = "DEPLOYD_SERVER",
        default_value = "http://127.0.0.1:4501"
    )]
    pub(crate) server: String,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
        /// Which replica's output, from 0 (a service with `replicas` runs several).
        #[arg(short, long, default_value_t = 0)]
        replica: usize,
    },
    /// Lists a deployment's revisions (every deploy, reload and rollback), newest first.
    History {
        /// The deployment.
        deployment: String,
    },
    /// Deploys an earlier revision of a deployment again (see `history`); returns once it
    /// serves.
    Rollback {
        /// The deployment.
        deployment: String,
        /// The revision to go back to; the last one that deployed before the current one when
        /// absent.
        revision: Option<u64>,
    },
    /// Cancels a queued or running task.
    Cancel {
        /// The deployment.
        #[arg(short, long)]
        deployment: String,
        /// The task.
        task_id: String,
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
pub(crate) struct ServeArgs {
    /// The address to listen on [default: 127.0.0.1:4501]; a non-loopback one needs a token
    /// (`--token`) or `--insecure-no-auth`.
    #[arg(long, env = "DEPLOYD_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// The host to listen on, as llama_deploy's `LLAMA_DEPLOY_APISERVER_HOST` (replaces the
    /// host of `--listen`).
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_HOST")]
    pub(crate) host: Option<String>,
    /// The port to listen on, as llama_deploy's `LLAMA_DEPLOY_APISERVER_PORT` (replaces the
    /// port of `--listen`).
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_PORT")]
    pub(crate) port: Option<u16>,
    /// Where deployd keeps its state, the synced sources and the logs [default: .deployd, or
    /// llama_deploy's `LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH` when that is set].
    #[arg(long, env = "DEPLOYD_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// A folder whose `.yml` and `.yaml` files are deployed at start, relative to it, as
    /// llama_deploy's API server does with its rc folder; nothing happens when it does not
    /// exist.
    #[arg(
        long,
        env = "LLAMA_DEPLOY_APISERVER_RC_PATH",
        default_value = ".llama_deploy_rc"
    )]
    pub(crate) rc_path: PathBuf,
    /// The one file of the rc folder to deploy at start (relative to it), instead of all;
    /// `DEPLOYMENT_FILE_PATH` is read too.
    #[arg(long, env = "LLAMA_DEPLOY_APISERVER_DEPLOYMENT_FILE_PATH")]
    pub(crate) deployment_file_path: Option<PathBuf>,
    /// The most deployments that may exist at once.
    #[arg(long, default_value_t = 10)]
    pub(crate) max_deployments: usize,
    /// Another name requests may be addressed to (their `Host`), and whose web pages may
    /// change things; without a port, on any port. The listen address (and, for a loopback
    /// one, `localhost`, `127.0.0.1` and `[::1]`) with its port is always allowed. Repeatable.
    #[arg(
        long = "allow-host",
        value_name = "NAME[:PORT]",
        env = "DEPLOYD_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub(crate) allow_hosts: Vec<AllowedHost>,
    /// The origin of web pages that may call the API from a browser (`https://app.example`,
    /// `http://localhost:5173`): deployd answers their CORS requests, and their pages may
    /// change things. None by default; `*` is refused. Repeatable.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        env = "DEPLOYD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub(crate) cors_origins: Vec<CorsOrigin>,
    /// A folder (with the folders below it) that clients on other machines may deploy from
    /// (`base_path`); clients on this machine may deploy from any folder. Repeatable.
    #[arg(long = "allow-base-path", value_name = "DIR")]
    pub(crate) allow_base_paths: Vec<PathBuf>,
    /// How long `POST .../tasks/run` waits for a task before answering 504 (the task goes on).
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_RUN_TIMEOUT",
        default_value = "120",
        value_parser = parse_seconds
    )]
    pub(crate) run_timeout: Duration,
    /// On shutdown, reload or delete, how long the tasks in flight on a service may take to
    /// finish before they are cut off (and queued again).
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_DRAIN_TIMEOUT",
        default_value = "30",
        value_parser = parse_seconds
    )]
    pub(crate) drain_timeout: Duration,
    /// How long a task may wait for a service that is not ready (starting, restarting, never
    /// healthy) before it fails; a task of a service that has failed fails at once.
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_UNREADY_TIMEOUT",
        default_value = "120",
        value_parser = parse_seconds
    )]
    pub(crate) unready_timeout: Duration,
    /// How long a service may take to start answering a task (its response head) before the
    /// attempt counts as broken off.
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_HEAD_TIMEOUT",
        default_value = "60",
        value_parser = parse_seconds
    )]
    pub(crate) head_timeout: Duration,
    /// A prefix of the names of deployd's environment variables that deployment files sent by
    /// clients may read with `${VAR}` (none by default; `DEPLOYD_*` never). Files given on
    /// the command line read every variable. Repeatable.
    #[arg(
        long = "allow-env-prefix",
        value_name = "PREFIX",
        env = "DEPLOYD_ALLOW_ENV_PREFIXES",
        value_delimiter = ','
    )]
    pub(crate) allow_env_prefixes: Vec<String>,
    /// The size in bytes at which a service's log file (`logs/<service>.log`) is rotated to
    /// `<service>.log.1`, replacing the one before.
    #[arg(
        long,
        value_name = "BYTES",
        env = "DEPLOYD_SERVICE_LOG_MAX",
        default_value_t = 10 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1024..)
    )]
    pub(crate) service_log_max: u64,
    /// The largest request body deployd reads, in bytes (larger: 413). Deployment files have
    /// their own limit (`--max-deployment-file-bytes`).
    #[arg(
        long,
        value_name = "BYTES",
        env = "DEPLOYD_MAX_BODY_BYTES",
        default_value_t = deployd_server::DEFAULT_MAX_BODY_BYTES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..)
    )]
    pub(crate) max_body_bytes: usize,
    /// The largest deployment file a client may send, in bytes (larger: 413); at most 4 MiB.
    #[arg(
        long,
        value_name = "BYTES",
        env = "DEPLOYD_MAX_DEPLOYMENT_FILE_BYTES",
        default_value_t = deployd_config::MAX_FILE_SIZE,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(1024..=deployd_config::MAX_FILE_SIZE as u64)
    )]
    pub(crate) max_deployment_file_bytes: usize,
    /// The most event streams (a task's events, a followed log) open at once; one more is
    /// answered 429.
    #[arg(
        long,
        value_name = "N",
        env = "DEPLOYD_MAX_EVENT_STREAMS",
        default_value_t = deployd_server::DEFAULT_MAX_STREAMS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub(crate) max_event_streams: usize,
    /// How long an ended task, with its events, is kept after it ended; `0` keeps every task.
    /// Unfinished tasks and sessions are never pruned [default: 604800, 7 days].
    #[arg(
        long,
        value_name = "SECS",
        env = "DEPLOYD_RETENTION",
        value_parser = parse_retention
    )]
    pub(crate) retention: Option<Retention>,
    /// The token every request must carry (`Authorization: Bearer <token>`), with full
    /// access; at least 16 characters. Prefer the variable: an option shows in `ps`.
    #[arg(long, env = "DEPLOYD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// A token that may only run tasks (create, run, events, results, sessions) and read
    /// deployments, not create, reload or delete them; needs `--token`.
    #[arg(long, env = "DEPLOYD_TASK_TOKEN", hide_env_values = true)]
    pub(crate) task_token: Option<String>,
    /// Listen on a non-loopback address without a token: anyone who reaches the port can run
    /// code on this machine. Only behind something that authenticates for deployd.
    #[arg(long)]
    pub(crate) insecure_no_auth: bool,
    /// Export traces (one per task: its request, its time in the queue, its service call)
    /// with OTLP over HTTP to this collector (`http://127.0.0.1:4318`); services get the
    /// W3C `traceparent` of their call.
    #[arg(long, value_name = "URL", env = "DEPLOYD_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
    /// Where deployments, tasks, their events and sessions are kept: `sqlite` (a file in the
    /// data directory, the default) or a PostgreSQL URL (`postgres://user:pw@host/db`, with
    /// `?schema=NAME` for the schema; default `deployd_<cluster>`, or `deployd`).
    #[arg(long, value_name = "URL", env = "DEPLOYD_STORE", hide_env_values = true,
          value_parser = parse_store)]
    pub(crate) store: Option<deployd_manager::StoreLocation>,
    /// Make this node part of the cluster NAME: every node of it shares the PostgreSQL
    /// `--store` and a broker, runs every deployment and takes any task.
    #[arg(long, value_name = "NAME", env = "DEPLOYD_CLUSTER")]
    pub(crate) cluster: Option<String>,
    /// The message queue of deployments whose file names none (or `simple`): `redis://…`,
    /// `amqp://…`, `nats://…`, `kafka://host:port` or `sqs://region`. A cluster needs one
    /// of these (here or in every file).
    #[arg(
        long,
        value_name = "URL",
        env = "DEPLOYD_QUEUE",
        hide_env_values = true
    )]
    pub(crate) queue: Option<String>,
    /// The URL the other nodes of the cluster and its operators reach this node at, shown on
    /// `/status/` [default: http://<listen address>].
    #[arg(long, value_name = "URL", env = "DEPLOYD_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// How long a node of a cluster that stops renewing its lease (dead, or cut off from the
    /// store) keeps its tasks before the other nodes run them again [default: 10].
    #[arg(long, value_name = "SECS", env = "DEPLOYD_LEASE", value_parser = parse_seconds)]
    pub(crate) lease: Option<Duration>,
    /// Where graph services (`deployd_graph::service`) keep their runs: every service gets it
    /// as `DEPLOYD_GRAPH_STORE` (`sqlite:///path` or `postgres://…?schema=NAME`). By default
    /// each keeps them in a SQLite file of its own data folder; a cluster needs a shared one.
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub(crate) graph_store: Option<String>,
    /// Deployment files to deploy at start.
    pub(crate) files: Vec<PathBuf>,
}

/// `--store`: `sqlite` or a PostgreSQL URL.
pub(crate) fn parse_store(text: &str) -> Result<deployd_manager::StoreLocation, String> {
    deployd_manager::StoreLocation::parse(text)
}

/// `deployd` with no command: `deployd serve` with its defaults and environment.
#[derive(Debug, Parser)]
#[command(name = "deployd")]
pub(crate) struct DefaultServe {
    #[command(flatten)]
    pub(crate) args: ServeArgs,
}

/// A positive number of seconds (`120`, `0.5`).
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
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
pub(crate) struct Retention(pub(crate) Option<Duration>);

/// A retention in seconds; `0` keeps every task.
pub(crate) fn parse_retention(text: &str) -> Result<Retention, String> {
    if text.trim() == "0" {
        return Ok(Retention(None));
    }
    parse_seconds(text).map(|d| Retention(Some(d)))
}
