//! The Manager of deployd: deployments, their service processes, task workers and the control
//! plane.
//!
//! A [`Manager`] is started on a data directory. It keeps the desired state of every deployment
//! and every task in a SQLite store there, syncs each service's source, runs each service as a
//! supervised process in its own process group, and routes tasks to services through a message
//! queue: one worker per service forwards each task over the service protocol (`POST /tasks`,
//! NDJSON events, then one result) and acknowledges the message only once the outcome is
//! committed. A restarted Manager brings its deployments back, kills processes a crashed
//! predecessor left behind, and queues again the tasks that had not finished.
//!
//! This crate knows neither HTTP routes nor the wire JSON of the API (that is `deployd-server`),
//! nor the YAML (that is `deployd-config`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deployd_config::{DeploymentSpec, Diagnostics};
use deployd_queue::{Message, MessageQueue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

mod cluster;
mod control;
mod deployment;
mod notifier;
mod orphans;
mod prepare;
mod protocol;
mod queues;
mod runtime;
mod store;
mod supervisor;
pub mod trace;
mod worker;
mod writer;

pub use cluster::NodeStatus;
use control::Control;
use deployment::Deployment;
use store::StoredDeployment;
pub use store::{StoreLocation, redact as redact_url};

/// What can go wrong in the Manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No such deployment, service, task or session.
    #[error("{what} `{name}` not found")]
    NotFound { what: &'static str, name: String },
    /// A deployment with this name exists already.
    #[error("deployment `{0}` already exists")]
    AlreadyExists(String),
    /// The deployment file does not load.
    #[error("invalid deployment file:\n{0}")]
    Invalid(Diagnostics),
    /// A request that cannot be carried out as given.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with the current state of what it names.
    #[error("{0}")]
    Conflict(String),
    /// The configured maximum number of deployments is reached.
    #[error("at most {0} deployments can run at once; delete one first")]
    TooManyDeployments(usize),
    /// A service's source could not be synced.
    #[error("service `{service}`: {source}")]
    Source {
        service: String,
        #[source]
        source: deployd_sources::Error,
    },
    /// A service did not become ready.
    #[error("service `{service}` is not ready: {reason}")]
    NotReady { service: String, reason: String },
    /// A service's build command failed.
    #[error("service `{service}`: build command `{command}` failed: {output}")]
    Build {
        service: String,
        command: String,
        output: String,
    },
    /// The data directory is used by another deployd.
    #[error("data directory {0} is in use by another deployd")]
    DataDirLocked(PathBuf),
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state store failed.
    #[error("state store: {0}")]
    Store(String),
    /// The message queue failed.
    #[error("message queue: {0}")]
    Queue(#[from] deployd_queue::Error),
    /// A service could not be reached or refused what was sent.
    #[error("{0}")]
    Unavailable(String),
    /// The Manager is shutting down.
    #[error("deployd is shutting down")]
    ShuttingDown,
}

impl Error {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    fn not_found(what: &'static str, name: &str) -> Self {
        Self::NotFound {
            what,
            name: name.to_owned(),
        }
    }
}

/// How a Manager runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Where the store, the synced sources, the logs and the services' data live.
    pub data_dir: PathBuf,
    /// The most deployments that may exist at once.
    pub max_deployments: usize,
    /// How long a service may take to exit after SIGTERM before it gets SIGKILL.
    pub stop_timeout: Duration,
    /// How long the tasks in flight on an instance may take to finish when it stops (on
    /// shutdown, reload or delete) before they are cut off and queued again.
    pub drain_timeout: Duration,
    /// How long a service may take to start answering a task (its response head).
    pub head_timeout: Duration,
    /// How long a task may wait for a service that is not ready (starting, restarting, never
    /// healthy) before it fails; a task of a service that has failed fails at once.
    pub unready_timeout: Duration,
    /// Prefixes of the names of deployd's environment variables that a file sent by a client
    /// may read with `${VAR}` (none by default; `DEPLOYD_*` never).
    pub variable_prefixes: Vec<String>,
    /// The Python interpreter the virtualenvs of python services are made from (`python3`).
    pub python: String,
    /// The size at which a service's log file (`logs/<service>.log`) is rotated to
    /// `<service>.log.1` (10 MiB).
    pub log_max_bytes: u64,
    /// How long an ended task (with its events) is kept after it ended; `None` keeps every
    /// task (7 days).
    pub retention: Option<Duration>,
    /// Where the control store is: SQLite in the data directory (the default) or PostgreSQL.
    pub store: StoreLocation,
    /// The cluster this node is part of; `None`: the node is alone.
    pub cluster: Option<ClusterOptions>,
    /// The message queue of the deployments whose file names none (or the embedded
    /// `simple` one), as a URL (see [`Options::queue`]); `None`: the embedded queue.
    pub queue: Option<String>,
    /// Where graph services keep their runs (`DEPLOYD_GRAPH_STORE` of every service:
    /// `sqlite:///path` or a `postgres://` URL). `None`: on a PostgreSQL control store, the
    /// same database in the schema `<control schema>_graphs` (services then hold the store's
    /// credentials: give them a role of their own with this option); on SQLite, each service's
    /// own SQLite file in its data folder.
    pub graph_store: Option<String>,
}

/// How a node takes part in a cluster (see `cluster.rs`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// The cluster's name: lowercase letters, digits, `-` and `_`, at most 32.
    pub name: String,
    /// Where the other nodes and operators reach this node's HTTP API, shown on `/status/`.
    pub address: Option<String>,
    /// How long a node's lease lasts without renewal: a node silent that long is taken for
    /// dead, and the tasks it was running are queued again (10 s).
    pub lease: Duration,
}

impl ClusterOptions {
    /// A node of cluster `name`; fails when the name is not lowercase letters, digits, `-`
    /// and `_` (at most 32).
    pub fn new(name: &str) -> Result<Self, String> {
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
        if !valid {
            return Err(format!(
                "cluster name {name:?}: use 1 to 32 lowercase letters, digits, `-` and `_`"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            address: None,
            lease: Duration::from_secs(10),
        })
    }

    /// Sets the address shown to others.
    pub fn address(mut self, address: Option<String>) -> Self {
        self.address = address;
        self
    }

    /// Sets how long a lease lasts (at least 1 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }
}

impl Options {
    /// Defaults for a data directory: 10 deployments, 5 s for a service to stop, 30 s to
    /// drain, 60 s for a service to start answering, 120 s for a task to wait for a service
    /// that is not ready.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_deployments: 10,
            stop_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            head_timeout: Duration::from_secs(60),
            unready_timeout: Duration::from_secs(120),
            variable_prefixes: Vec::new(),
            python: "python3".to_owned(),
            log_max_bytes: supervisor::DEFAULT_LOG_MAX_BYTES,
            retention: Some(DEFAULT_RETENTION),
            store: StoreLocation::DataDir,
            cluster: None,
            queue: None,
            graph_store: None,
        }
    }

    /// Sets where graph services keep their runs (see [`Options::graph_store`]); fails on
    /// another kind of URL.
    pub fn graph_store(mut self, url: Option<String>) -> Result<Self, String> {
        if let Some(url) = &url
            && !(url.starts_with("sqlite://")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            return Err(format!(
                "graph store {}: expected sqlite:///path or a postgres:// URL",
                redact_url(url)
            ));
        }
        self.graph_store = url;
        Ok(self)
    }

    /// Makes the node part of a cluster.
    pub fn cluster(mut self, cluster: Option<ClusterOptions>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Sets the message queue of the deployments whose file names none: a `redis://`,
    /// `rediss://`, `amqp://`, `amqps://`, `nats://`, `kafka://host:port` or `sqs://region`
    /// URL. Fails, naming it without its password, when it is none of those.
    pub fn queue(mut self, url: Option<String>) -> Result<Self, String> {
        if let Some(url) = &url {
            queues::config_from_url(url)?;
        }
        self.queue = url;
        Ok(self)
    }

    /// Sets where the control store is.
    pub fn store(mut self, store: StoreLocation) -> Self {
        self.store = store;
        self
    }

    /// Sets how long an ended task is kept; `None` keeps every task.
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the size at which a service's log file is rotated (at least 1 KiB).
    pub fn log_max_bytes(mut self, bytes: u64) -> Self {
        self.log_max_bytes = bytes;
        self
    }

    /// Sets the Python interpreter the virtualenvs of python services are made from.
    pub fn python(mut self, interpreter: impl Into<String>) -> Self {
        self.python = interpreter.into();
        self
    }

    /// Lets files sent by clients read deployd's environment variables whose name starts
    /// with one of `prefixes` (see [`FileOrigin::Client`]).
    pub fn variable_prefixes(mut self, prefixes: Vec<String>) -> Self {
        self.variable_prefixes = prefixes;
        self
    }

    /// Sets how long tasks in flight may take to finish when an instance stops.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets how long a service may take to start answering a task.
    pub fn head_timeout(mut self, timeout: Duration) -> Self {
        self.head_timeout = timeout;
        self
    }

    /// Sets how long a task may wait for a service that is not ready.
    pub fn unready_timeout(mut self, timeout: Duration) -> Self {
        self.unready_timeout = timeout;
        self
    }

    /// Sets the maximum number of deployments.
    pub fn max_deployments(mut self, max: usize) -> Self {
        self.max_deployments = max;
        self
    }

    /// Sets the time a service may take to exit after SIGTERM.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Started, not yet answering its health check.
    Starting,
    /// Healthy: taking tasks.
    Ready,
    /// Exited or unhealthy; waiting before the next start.
    Restarting,
    /// Restarted too often, or ended and not to be restarted after a failure; given up on.
    Failed,
    /// Ended successfully and not restarted (restart policy `on-failure` or `never`).
    Exited,
    /// Stopped by deployd.
    Stopped,
    /// Not started yet: its deploy is under way.
    Pending,
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Ready => "ready",
        Phase::Restarting => "restarting",
        Phase::Failed => "failed",
        Phase::Exited => "exited",
        Phase::Stopped => "stopped",
        Phase::Pending => "pending",
    }
}

/// The state of one service of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service id.
    pub id: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// The process id of its current process, if one runs.
    pub pid: Option<u32>,
    /// The port it listens on (on 127.0.0.1).
    pub port: u16,
    /// How many times it has been restarted.
    pub restarts: u32,
    /// Why its last process ended, if one did.
    pub last_exit: Option<String>,
    /// Where the service is in its latest deploy.
    #[serde(default)]
    pub stage: Option<StageStatus>,
    /// With `replicas` above 1, each replica's process (the fields above are then the first
    /// replica's, but `phase`, which is `ready` while any replica is, and `restarts`, which
    /// adds them up); empty for a single process.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

impl ServiceStatus {
    /// A service with no process yet.
    pub(crate) fn pending(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            phase: Phase::Pending,
            pid: None,
            port: 0,
            restarts: 0,
            last_exit: None,
            stage: None,
            replicas: Vec::new(),
        }
    }
}

/// One replica of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Where it is in its life.
    pub phase: Phase,
    /// Its process id, if one runs.
    pub pid: Option<u32>,
    /// The port it listens on.
    pub port: u16,
    /// How many times it has been restarted.
    pub restarts: u32,
    /// Why its last process ended, if one did.
    pub last_exit: Option<String>,
}

/// Where a service is in the deploy pipeline (sync → prepare → launch → ready → switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStatus {
    /// The stage it is in, waits for, failed in, or (when done) went through last.
    pub stage: String,
    /// `waiting`, `running`, `done` or `failed`.
    pub state: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// The state of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// The deployment's name.
    pub name: String,
    /// The service that takes tasks naming none.
    pub default_service: String,
    /// Whether a deploy of it is under way.
    #[serde(default)]
    pub deploying: bool,
    /// The message queue its tasks go through (`in-memory`, `Redis at redis://…`), without
    /// credentials.
    #[serde(default)]
    pub message_queue: String,
    /// Its services, in the order of the file.
    pub services: Vec<ServiceStatus>,
    /// Its UI's process (the file's `ui:` section), when it has one; its id is [`UI_ID`].
    #[serde(default)]
    pub ui: Option<ServiceStatus>,
}

/// The id under which a deployment's UI is supervised, logged (`logs/@ui.log`) and shown: not
/// a valid service id, so it never clashes with one.
pub const UI_ID: &str = "@ui";

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for its service.
    Queued,
    /// Handed to its service.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by a client before it ended.
    Cancelled,
}

impl TaskStatus {
    /// Its name on the wire (`queued`, `running`, `succeeded`, `failed`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status named `text` (as [`TaskStatus::as_str`] writes it).
    pub fn from_name(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub(crate) fn parse(text: &str) -> Self {
        Self::from_name(text).unwrap_or(Self::Queued)
    }

    /// Whether the task has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// How many tasks of one service are in one status, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCount {
    /// The deployment.
    pub deployment: String,
    /// The service.
    pub service: String,
    /// The status.
    pub status: TaskStatus,
    /// How many tasks.
    pub count: u64,
    /// When the oldest of them was created (ms since the epoch).
    pub oldest_ms: i64,
}

/// How long the ended tasks of one service took, from creation to their end, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDurations {
    /// The deployment.
    pub deployment: String,
    /// The service.
    pub service: String,
    /// For each bound asked for (seconds), how many took at most that long (cumulative).
    pub at_most: Vec<u64>,
    /// How many tasks.
    pub count: u64,
    /// Their durations added up, in seconds.
    pub sum_seconds: f64,
}

/// Where a service's log file goes when it is rotated: `<service>.log.1` beside it.
pub fn rotated_log(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// How long a worker waits for a cancelled task's service to end its answer before it
/// abandons the call (and the task's place in the instance's concurrency).
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long an ended task is kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Tasks deleted in one transaction when old tasks are pruned.
const PRUNE_BATCH: usize = 1_000;

/// A task and, once it has ended, its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Unique id.
    pub id: String,
    /// The deployment it belongs to.
    pub deployment: String,
    /// The service that runs it.
    pub service: String,
    /// The session whose state it reads and updates.
    pub session_id: String,
    /// Its input, as given.
    pub input: Value,
    /// Where it is.
    pub status: TaskStatus,
    /// How many times it has been handed to its service.
    pub attempt: u32,
    /// The result, once it succeeded.
    pub result: Option<Value>,
    /// The error, once it failed.
    pub error: Option<String>,
}

/// A task with when it was created and when it last changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    #[serde(flatten)]
    pub task: TaskInfo,
    /// When it was created (ms since the epoch).
    pub created_ms: i64,
    /// When its status last changed (ms since the epoch).
    pub updated_ms: i64,
}

/// Which tasks a search returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// Only tasks of this service.
    pub service: Option<String>,
}

/// What a revision's service ran: the digest of its synced source, and for a git source the
/// commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSource {
    /// The digest of the synced tree (`sha256:…`).
    pub digest: String,
    /// The commit checked out, for a git source.
    #[serde(default)]
    pub commit: Option<String>,
}

/// One deploy, reload or rollback of a deployment: its file, what its sources were, who asked,
/// when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The deployment.
    pub deployment: String,
    /// Its number, from 1, in the order the deployment's revisions were made.
    pub revision: u64,
    /// When it was made (ms since the epoch).
    pub created_ms: i64,
    /// Who asked for it (`operator` for a file given to `serve`, else the client's address).
    pub by: String,
    /// `deploy` (a new deployment), `reload` or `rollback`.
    pub kind: String,
    /// Of a rollback: the revision it went back to.
    pub rollback_of: Option<u64>,
    /// `deploying` while it runs, then `deployed` or `failed`.
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Each service's source, by service id, once synced.
    pub sources: std::collections::BTreeMap<String, RevisionSource>,
    /// The deployment file.
    pub spec: String,
    /// The file's name, as sent.
    pub origin: String,
    /// The folder its relative paths were read from.
    pub base_path: String,
    /// Where the file came from (`client` or `operator`).
    pub from: String,
}

/// A session: state carried from one task to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Unique id.
    pub id: String,
    /// The tasks run in it, oldest first.
    pub task_ids: Vec<String>,
    /// The state the last task left, if any.
    pub state: Option<Value>,
}

/// A task just created, with its log followed from before it was stored.
#[derive(Debug)]
pub struct Created {
    /// The task as it was stored.
    pub task: TaskInfo,
    watch: control::NewWatch,
}

/// A task to create.
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    /// The service to run it; the deployment's default service when `None`.
    pub service: Option<String>,
    /// The session to run it in; a new session when `None`.
    pub session_id: Option<String>,
    /// The input handed to the service.
    pub input: Value,
}

/// What an entry of a task's event log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An event the service streamed while running the task.
    Event,
    /// The task's result; the last entry.
    Result,
    /// The task's error; the last entry.
    Error,
    /// The task was cancelled (the data says by whom); the last entry.
    Cancelled,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Result => "result",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "result" => Self::Result,
            "error" => Self::Error,
            "cancelled" => Self::Cancelled,
            _ => Self::Event,
        }
    }

    /// Whether this entry ends the task's log.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Event)
    }
}

/// One entry of a task's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task.
    pub task_id: String,
    /// Position in the task's log, from 1.
    pub seq: u64,
    /// Event, result or error.
    pub kind: EventKind,
    /// The attempt that wrote it (from 1; 0 for an entry written without running the task,
    /// such as the error of a task that never started). Events of an attempt that broke off
    /// stay in the log, marked with their attempt.
    #[serde(default)]
    pub attempt: u32,
    /// The payload: the event's data, the result, or the error message.
    pub data: Value,
}

/// A page's `before` that names no `what` of the deployment.
fn no_cursor(what: &str, before: Option<&str>, deployment: &str) -> Error {
    Error::BadRequest(format!(
        "`before`: no {what} `{}` in deployment `{deployment}`",
        before.unwrap_or_default()
    ))
}

/// Who asked for a deploy, and of a rollback, what it goes back to.
#[derive(Debug, Default)]
struct DeployMeta {
    by: String,
    rollback_of: Option<u64>,
    pins: std::collections::BTreeMap<String, String>,
}

/// A deployment that was deployed, with what the user should know about its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// Its state.
    pub status: DeploymentStatus,
    /// Warnings: keys accepted and ignored, settings not acted on yet.
    pub warnings: Vec<String>,
}

/// Where a deployment file comes from, which decides what its `${VAR}` may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileOrigin {
    /// Sent by a client (over HTTP): `${VAR}` is replaced only for variables whose name starts
    /// with one of [`Options::variable_prefixes`]; every other `${...}` stays as written (as
    /// llama_deploy, which expands nothing, would load it). deployd's environment never leaks
    /// into a file a client sent.
    Client,
    /// Read from the server's own disk by its operator (`deployd serve FILE`): every `${VAR}`
    /// is replaced from deployd's environment.
    Operator,
}

impl FileOrigin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Operator => "operator",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "operator" => Self::Operator,
            _ => Self::Client,
        }
    }
}

/// Parses a deployment file. `${VAR}` reads deployd's environment as `from` allows, and never
/// a `DEPLOYD_*` variable: those are deployd's own settings and secrets (its token, its git
/// credentials), which a deployment file must not be able to copy into a service.
fn load(
    text: &str,
    origin: &str,
    from: FileOrigin,
    prefixes: &[String],
) -> Result<deployd_config::Loaded, Diagnostics> {
    use deployd_config::{Interpolation, ParseOptions};
    let lookup = |name: &str| {
        if name.starts_with("DEPLOYD_") {
            return None;
        }
        match from {
            FileOrigin::Operator => std::env::var(name).ok(),
            _ => prefixes
                .iter()
                .any(|prefix| !prefix.is_empty() && name.starts_with(prefix.as_str()))
                .then(|| std::env::var(name).ok())
                .flatten(),
        }
    };
    let interpolation = match from {
        FileOrigin::Operator => Interpolation::All(&lookup),
        _ => Interpolation::Known(&lookup),
    };
    deployd_config::parse_with_options(text, origin, &ParseOptions::new(interpolation))
}

/// Refuses what cannot run yet and warns about settings that are not acted on yet.
fn unsupported(loaded: &deployd_config::Loaded) -> Result<Vec<String>, Error> {
    let spec = &loaded.spec;
    let mut warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    for service in &spec.services {
        let id = &service.id;
        if service.port.is_some() && service.runtime == deployd_config::Runtime::Python {
            warnings.push(format!(
                "services.{id}.port: ignored for a python service, as llama_deploy 0.9 ignores \
                 it; deployd picks a free port"
            ));
        }
        if !service.python_dependencies.is_empty()
            && service.runtime != deployd_config::Runtime::Python
        {
            warnings.push(format!(
                "services.{id}.python-dependencies: installed only for the python runtime (a \
                 service with an `import-path`); install them in a `build` command"
            ));
        }
    }
    if spec.state_store.is_some() {
        warnings.push(
            "state-store: not supported yet; deployd's SQLite store in its data directory is used"
                .to_owned(),
        );
    }
    Ok(warnings)
}

/// The Manager: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    options: Options,
    control: Arc<Control>,
    node_id: String,
    /// What this node's topics are named after (see `queues::topic_scope`).
    topic_scope: String,
    /// The cluster's state as this node sees it, when it is part of one.
    cluster: Option<cluster::State>,
    deployments: RwLock<BTreeMap<String, Arc<Deployment>>>,
    /// Serializes deploy, delete and shutdown.
    ops: tokio::sync::Mutex<bool>,
    /// Set when shutdown starts: no new task is taken from then on.
    closing: std::sync::atomic::AtomicBool,
    /// Where `uv` is, once the python runtime has looked for it.
    uv: runtime::python::UvCell,
    /// Deployments an API deploy of this node is deploying now (a cluster's reconcile leaves
    /// them to it).
    deploying: std::sync::Mutex<std::collections::HashSet<String>>,
    _lock: nix::fcntl::Flock<File>,
}

/// Takes a deployment's name out of [`Inner::deploying`] when its deploy ends.
struct DeployingHere<'a> {
    inner: &'a Inner,
    name: String,
}

impl Drop for DeployingHere<'_> {
    fn drop(&mut self) {
        self.inner
            .deploying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.name);
    }
}

impl Manager {
    /// Opens the data directory, stops what a crashed predecessor left running, and brings the
    /// persisted deployments back with their unfinished tasks.
    pub async fn start(options: Options) -> Result<Self, Error> {
        let data_dir = &options.data_dir;
        std::fs::create_dir_all(data_dir.join("deployments"))
            .map_err(|err| Error::io("cannot create", data_dir, err))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|err| Error::io("cannot open", data_dir, err))?;
        // The store holds literal secrets of deployment files, the logs what services print:
        // only deployd's user may look inside.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|err| Error::io("cannot restrict", &data_dir, err))?;
        }
        let options = Options {
            data_dir: data_dir.clone(),
            ..options
        };
        let lock = orphans::lock_data_dir(&data_dir)?;
        let node_id = orphans::node_id(&data_dir)?;
        orphans::stop_leftovers(&node_id, options.stop_timeout).await;

        if options.cluster.is_some() && options.store == StoreLocation::DataDir {
            return Err(Error::BadRequest(
                "a cluster needs a store its nodes share: start every node with \
                 --store postgres://..."
                    .to_owned(),
            ));
        }
        let cluster_name = options.cluster.as_ref().map(|c| c.name.as_str());
        let topic_scope = queues::topic_scope(cluster_name, &node_id);
        // On PostgreSQL, graph services keep their runs there too (unless told otherwise), so
        // that a task sent again to another node goes on with its run.
        let graph_store = options
            .graph_store
            .clone()
            .or_else(|| store::default_graph_store(&options.store, cluster_name));
        let (store, notifier) =
            store::open(&options.store, &data_dir, &node_id, cluster_name).await?;
        let control = Arc::new(Control::new(store, &node_id, Arc::new(notifier)));
        let cluster = options.cluster.as_ref().map(cluster::State::new);
        let options = Options {
            graph_store,
            ..options
        };
        let manager = Self {
            inner: Arc::new(Inner {
                options,
                control,
                node_id,
                topic_scope,
                cluster,
                deployments: RwLock::new(BTreeMap::new()),
                ops: tokio::sync::Mutex::new(false),
                closing: std::sync::atomic::AtomicBool::new(false),
                uv: runtime::python::UvCell::default(),
                deploying: std::sync::Mutex::default(),
                _lock: lock,
            }),
        };
        let orphans = manager.join_cluster().await?;
        manager.restore().await?;
        manager.run_cluster(orphans);
        manager.watch_unready();
        manager.prune_ended_tasks();
        Ok(manager)
    }

    /// Deletes the tasks that ended longer than [`Options::retention`] ago, with their events,
    /// a batch at a time: at start, then every tenth of the retention (at least every second,
    /// at most every hour), until the Manager shuts down or is dropped.
    fn prune_ended_tasks(&self) {
        let Some(retention) = self.inner.options.retention else {
            return;
        };
        let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                if inner.closing.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let before =
                    store::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                loop {
                    match inner.control.store().prune_ended(before, PRUNE_BATCH).await {
                        Ok(0) => break,
                        Ok(pruned) => {
                            tracing::info!(tasks = pruned, "pruned tasks past their retention");
                            if pruned < PRUNE_BATCH {
                                break;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot prune old tasks; will retry");
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Fails the tasks that wait for a service that cannot take them: at once when the
    /// service has failed, after [`Options::unready_timeout`] when it has not been ready for
    /// that long (starting, restarting, never healthy). Runs every second until the Manager
    /// shuts down or is dropped.
    fn watch_unready(&self) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            // Since when each (deployment, service) has not been ready.
            let mut unready: std::collections::HashMap<(String, String), std::time::Instant> =
                std::collections::HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                let manager = Manager { inner };
                if manager
                    .inner
                    .closing
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    return;
                }
                manager.fail_unready(&mut unready).await;
            }
        });
    }

    async fn fail_unready(
        &self,
        unready: &mut std::collections::HashMap<(String, String), std::time::Instant>,
    ) {
        let now = std::time::Instant::now();
        let bound = self.inner.options.unready_timeout;
        let deployments: Vec<Arc<Deployment>> = self.read_deployments().values().cloned().collect();
        let mut seen = std::collections::HashSet::new();
        for deployment in deployments {
            for service in deployment.status().services {
                let key = (deployment.name().to_owned(), service.id.clone());
                seen.insert(key.clone());
                if service.phase == Phase::Ready {
                    unready.remove(&key);
                    continue;
                }
                let since = *unready.entry(key).or_insert(now);
                let reason = service.last_exit.as_deref().unwrap_or("no exit reason yet");
                let (wait, message) = match service.phase {
                    // In a cluster another node may run the task: only a wait that long
                    // fails it.
                    Phase::Failed | Phase::Exited | Phase::Stopped
                        if self.inner.cluster.is_none() =>
                    {
                        (
                            Duration::ZERO,
                            format!(
                                "service `{}` cannot run tasks: it is {} ({reason}); the task was \
                             not run",
                                service.id,
                                phase_name(service.phase)
                            ),
                        )
                    }
                    _ => (
                        bound,
                        format!(
                            "service `{}` was not ready within {bound:?} (it is {}; last exit: \
                             {reason}); the task was not run",
                            service.id,
                            phase_name(service.phase)
                        ),
                    ),
                };
                if now.duration_since(since) < wait {
                    continue;
                }
                let waited_since =
                    store::now_ms() - i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                self.fail_waiting(deployment.name(), &service.id, waited_since, &message)
                    .await;
            }
        }
        unready.retain(|key, _| seen.contains(key));
    }

    /// Fails the tasks of a service that have been `queued` since before `before`.
    async fn fail_waiting(&self, deployment: &str, service: &str, before: i64, message: &str) {
        let control = &self.inner.control;
        let waiting = match control
            .store()
            .waiting_tasks(deployment, service, before, 1000)
            .await
        {
            Ok(waiting) => waiting,
            Err(err) => {
                tracing::warn!(deployment, service, error = %err, "cannot read waiting tasks");
                return;
            }
        };
        for task in waiting {
            // A worker that holds the task decides its fate.
            let Some(_claim) = control.claim(&task.id) else {
                continue;
            };
            // Failed here, it is no worker's to run.
            control.take_fresh(&task.id);
            match control.fail_queued(&task, message.to_owned()).await {
                Ok(true) => {
                    tracing::warn!(deployment, service, task = %task.id, "{message}");
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(task = %task.id, error = %err, "cannot fail a waiting task");
                }
            }
        }
    }

    async fn restore(&self) -> Result<(), Error> {
        let _ops = self.inner.ops.lock().await;
        for stored in self.inner.control.store().deployments().await? {
            match self.restore_one(&stored).await {
                Ok(()) => {}
                Err(Error::Unavailable(reason)) => {
                    // Its broker does not answer yet: keep trying in the background.
                    tracing::warn!(deployment = %stored.name, %reason, "cannot restore deployment yet; retrying");
                    self.retry_restore(stored);
                }
                Err(err) => {
                    tracing::error!(deployment = %stored.name, error = %err, "cannot restore deployment");
                }
            }
        }
        Ok(())
    }

    /// Brings one stored deployment back (the caller holds `ops`).
    async fn restore_one(&self, stored: &StoredDeployment) -> Result<(), Error> {
        let spec = load(
            &stored.spec,
            &stored.origin,
            FileOrigin::parse(&stored.from),
            &self.inner.options.variable_prefixes,
        )
        .map_err(Error::Invalid)?
        .spec;
        let base = PathBuf::from(&stored.base_path);
        let queue_config = self.queue_config(spec.message_queue.as_ref())?;
        let queue = queues::connect(&queue_config).await?;
        let context = self.context(spec, &stored.spec, &base, false, queue_config, queue);
        let deployment = Deployment::new(&context);
        drop(deployment.deploy(context).await?);
        // Every service's topic is subscribed now: nothing requeued is lost. In a cluster the
        // broker holds the queued tasks, and the running ones of dead nodes are taken back
        // with their lease (see `cluster.rs`).
        if self.inner.cluster.is_none()
            && let Err(err) = self.requeue_unfinished(&deployment).await
        {
            // The tasks stay `queued` in the store; the next start publishes them again.
            tracing::error!(deployment = %stored.name, error = %err, "cannot queue the unfinished tasks again");
        }
        tracing::info!(deployment = %stored.name, "restored deployment");
        self.write_deployments()
            .insert(stored.name.clone(), deployment);
        Ok(())
    }

    /// Retries [`Manager::restore_one`] with backoff (1 s doubling to 30 s) until it succeeds,
    /// fails for another reason than an unreachable broker, the deployment is deployed again
    /// meanwhile, or the Manager shuts down or is dropped.
    fn retry_restore(&self, stored: StoredDeployment) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                let Some(inner) = inner.upgrade() else { return };
                let manager = Manager { inner };
                let ops = manager.inner.ops.lock().await;
                if *ops || manager.read_deployments().contains_key(&stored.name) {
                    return;
                }
                match manager.restore_one(&stored).await {
                    Ok(()) => return,
                    Err(Error::Unavailable(reason)) => {
                        tracing::warn!(deployment = %stored.name, %reason, "cannot restore deployment yet; retrying");
                    }
                    Err(err) => {
                        tracing::error!(deployment = %stored.name, error = %err, "cannot restore deployment");
                        return;
                    }
                }
                drop(ops);
            }
        });
    }

    /// Publishes again every task of `deployment` that has not finished. A task whose message
    /// is still held by a broker is then delivered twice; the worker skips a delivery of a task
    /// that has finished or is running.
    async fn requeue_unfinished(&self, deployment: &Deployment) -> Result<(), Error> {
        let queue = deployment.queue();
        for task in self
            .inner
            .control
            .store()
            .unfinished_tasks(deployment.name())
            .await?
        {
            let mut message = Message::new(task.id.clone());
            message.attempt = task.attempt + 1;
            let topic =
                queues::task_topic(&self.inner.topic_scope, deployment.name(), &task.service);
            queue.publish(&topic, message).await?;
        }
        Ok(())
    }

    fn read_deployments(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Deployment>>> {
        self.inner
            .deployments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_deployments(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Deployment>>> {
        self.inner
            .deployments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The options the Manager runs with (its data directory made absolute).
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Deploys the deployment file `text` (reported as `origin`), whose local sources are
    /// relative to `base`. With `reload`, an existing deployment of the same name is replaced
    /// (and left alone when the file and base are the same); without, it is an
    /// [`Error::AlreadyExists`].
    ///
    /// A new deployment returns once every service's source is synced (a sync that fails is an
    /// error, and changes nothing); building, starting and switching to the new instances go
    /// on in the background, each service's stage shown by [`Manager::status`]. A reload
    /// returns once every service of the new version serves, or with the error of the first
    /// service that failed (which keeps serving its previous version).
    ///
    /// The file is taken as a client's ([`FileOrigin::Client`]); see
    /// [`Manager::deploy_from`].
    pub async fn deploy(
        &self,
        text: &str,
        origin: &str,
        base: &Path,
        reload: bool,
    ) -> Result<Deployed, Error> {
        self.deploy_inner(text, origin, base, reload, FileOrigin::Client, false, true)
            .await
    }

    /// [`Manager::deploy`] of a file that comes from `from`, which decides what its `${VAR}`
    /// may read. The choice is stored with the deployment, so a restart reads the file the
    /// same way.
    pub async fn deploy_from(
        &self,
        text: &str,
        origin: &str,
        base: &Path,
        reload: bool,
        from: FileOrigin,
    ) -> Result<Deployed, Error> {
        self.deploy_inner(text, origin, base, reload, from, false, true)
            .await
    }

    /// [`Manager::deploy_from`] asked for by `by` (a client's address), which its revision
    /// records, that, with `wait`, also answers a new deployment only once every service
    /// serves, or with the error of the first that failed (as llama_deploy's server, whose
    /// deploy runs the services before it answers); the deployment stays, with that service
    /// failed.
    #[allow(clippy::too_many_arguments)]
    pub async fn deploy_as(
        &self,
        text: &str,
        origin: &str,
        base: &Path,
        reload: bool,
        from: FileOrigin,
        wait: bool,
        by: &str,
    ) -> Result<Deployed, Error> {
        let meta = DeployMeta {
            by: by.to_owned(),
            ..DeployMeta::default()
        };
        self.deploy_meta(text, origin, base, reload, from, wait, true, &meta)
            .await
    }

    /// Deploys revision `revision` of a deployment again: its file, with its git sources at
    /// the commits it ran (local sources are read from their folder as it is now), through a
    /// reload; answers once that version serves, or with the error of the first service that
    /// failed (which keeps serving what it ran). The rollback is a revision of its own.
    pub async fn rollback(
        &self,
        deployment: &str,
        revision: u64,
        by: &str,
    ) -> Result<Deployed, Error> {
        self.deployment(deployment)?;
        let Some(old) = self
            .inner
            .control
            .store()
            .revision(deployment, revision)
            .await?
        else {
            return Err(Error::not_found("revision", &revision.to_string()));
        };
        let meta = DeployMeta {
            by: by.to_owned(),
            rollback_of: Some(revision),
            pins: old
                .sources
                .iter()
                .filter_map(|(service, source)| Some((service.clone(), source.commit.clone()?)))
                .collect(),
        };
        self.deploy_meta(
            &old.spec,
            &old.origin,
            Path::new(&old.base_path),
            true,
            FileOrigin::parse(&old.from),
            true,
            true,
            &meta,
        )
        .await
    }

    /// A deployment's revisions, newest first, at most `limit`.
    pub async fn revisions(&self, deployment: &str, limit: usize) -> Result<Vec<Revision>, Error> {
        self.deployment(deployment)?;
        self.inner
            .control
            .store()
            .revisions(deployment, limit)
            .await
    }

    /// One revision of a deployment.
    pub async fn revision(&self, deployment: &str, revision: u64) -> Result<Revision, Error> {
        self.deployment(deployment)?;
        self.inner
            .control
            .store()
            .revision(deployment, revision)
            .await?
            .ok_or_else(|| Error::not_found("revision", &revision.to_string()))
    }

    /// Runs the stored deployment `file` here as it is, without storing it (a cluster's
    /// reconcile: the node that took the deploy stored it).
    pub(crate) async fn deploy_here(&self, file: &StoredDeployment) -> Result<(), Error> {
        self.deploy_inner(
            &file.spec,
            &file.origin,
            Path::new(&file.base_path),
            true,
            FileOrigin::parse(&file.from),
            false,
            false,
        )
        .await
        .map(drop)
    }

    /// A deploy; `api` when it comes through the API (it is stored and told to the cluster),
    /// not from a cluster's reconcile.
    #[allow(clippy::too_many_arguments)]
    async fn deploy_inner(
        &self,
        text: &str,
        origin: &str,
        base: &Path,
        reload: bool,
        from: FileOrigin,
        wait: bool,
        api: bool,
    ) -> Result<Deployed, Error> {
        let meta = DeployMeta {
            by: match from {
                FileOrigin::Operator => "operator".to_owned(),
                FileOrigin::Client => "api".to_owned(),
            },
            ..DeployMeta::default()
        };
        self.deploy_meta(text, origin, base, reload, from, wait, api, &meta)
            .await
    }

    /// [`Manager::deploy_inner`] with who asked, and of a rollback, what it goes back to. A
    /// deploy through the API records a revision once its sources are synced (and, of a
    /// deployment that exists, also when they cannot be).
    #[allow(clippy::too_many_arguments)]
    async fn deploy_meta(
        &self,
        text: &str,
        origin: &str,
        base: &Path,
        reload: bool,
        from: FileOrigin,
        wait: bool,
        api: bool,
        meta: &DeployMeta,
    ) -> Result<Deployed, Error> {
        // Parsing a large file takes CPU time: not on the async runtime's threads.
        let loaded = {
            let (text, origin) = (text.to_owned(), origin.to_owned());
            let prefixes = self.inner.options.variable_prefixes.clone();
            tokio::task::spawn_blocking(move || load(&text, &origin, from, &prefixes))
                .await
                .map_err(|err| Error::BadRequest(format!("cannot parse the file: {err}")))?
                .map_err(Error::Invalid)?
        };
        let warnings = unsupported(&loaded)?;
        let spec = loaded.spec;
        let base = base
            .canonicalize()
            .map_err(|err| Error::io("cannot open the deployment's folder", base, err))?;
        let ops = self.inner.ops.lock().await;
        if *ops {
            return Err(Error::ShuttingDown);
        }
        let name = spec.name.clone();
        let existing = self.read_deployments().get(&name).cloned();
        let stored = StoredDeployment {
            name: name.clone(),
            spec: text.to_owned(),
            origin: origin.to_owned(),
            base_path: base.to_string_lossy().into_owned(),
            from: from.as_str().to_owned(),
        };
        // A node of a cluster marks the deploy as its own (the reconcile leaves it alone), and
        // a new deployment is stored first: of two nodes creating one name at once, one wins.
        let _deploying = self.inner.cluster.as_ref().map(|_| {
            self.inner
                .deploying
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.clone());
            DeployingHere {
                inner: &self.inner,
                name: name.clone(),
            }
        });
        let mut inserted = false;
        if api && self.inner.cluster.is_some() && existing.is_none() {
            inserted = self
                .inner
                .control
                .store()
                .insert_deployment(&stored)
                .await?;
            if !inserted && !reload {
                return Err(Error::AlreadyExists(name));
            }
        }
        match &existing {
            Some(_) if !reload => return Err(Error::AlreadyExists(name)),
            // A file the operator gives `serve` that runs already (deployd restarted) is left
            // as it is; a client's reload always syncs again, so changed code is deployed.
            Some(current) if from == FileOrigin::Operator && current.is_same(text, &base) => {
                return Ok(Deployed {
                    status: current.status(),
                    warnings,
                });
            }
            None if self.read_deployments().len() >= self.inner.options.max_deployments => {
                return Err(Error::TooManyDeployments(
                    self.inner.options.max_deployments,
                ));
            }
            _ => {}
        }
        // Each deployment has its own connection to its queue, kept across reloads that leave
        // `message-queue` as it is.
        let queue_config = self.queue_config(spec.message_queue.as_ref())?;
        let (queue, queue_changed) = match &existing {
            Some(current) if current.queue_config() == queue_config => (current.queue(), false),
            _ => (queues::connect(&queue_config).await?, existing.is_some()),
        };
        // The pipeline returns once every source is synced: a sync that fails leaves what runs
        // as it is (and a new deployment is not created).
        let mut context = self.context(spec, text, &base, true, queue_config, queue);
        context.pins.clone_from(&meta.pins);
        let service_ids: Vec<String> = context.spec.services.iter().map(|s| s.id.clone()).collect();
        let dir = context.dir.clone();
        let kind = match (meta.rollback_of, &existing) {
            (Some(_), _) => "rollback",
            (None, Some(_)) => "reload",
            (None, None) => "deploy",
        };
        let revision = |outcome: &str, error: Option<String>| Revision {
            deployment: name.clone(),
            revision: 0,
            created_ms: store::now_ms(),
            by: meta.by.clone(),
            kind: kind.to_owned(),
            rollback_of: meta.rollback_of,
            outcome: outcome.to_owned(),
            error,
            sources: service_ids
                .iter()
                .filter_map(|id| {
                    let marks = prepare::BuildMarks::new(&dir, id);
                    Some((
                        id.clone(),
                        RevisionSource {
                            digest: marks.synced()?,
                            commit: marks.synced_commit(),
                        },
                    ))
                })
                .collect(),
            spec: text.to_owned(),
            origin: origin.to_owned(),
            base_path: base.to_string_lossy().into_owned(),
            from: from.as_str().to_owned(),
        };
        let (deployment, is_new) = match existing {
            Some(current) => (current, false),
            None => {
                let deployment = Deployment::new(&context);
                self.write_deployments()
                    .insert(name.clone(), Arc::clone(&deployment));
                (deployment, true)
            }
        };
        let deploying = match deployment.deploy(context).await {
            Ok(deploying) => deploying,
            Err(err) => {
                if api && !is_new {
                    // A reload whose sources cannot be synced: the deployment runs on as it
                    // was, and its history shows the attempt.
                    let failed = revision("failed", Some(err.to_string()));
                    if let Err(store_err) = self.inner.control.store().add_revision(&failed).await {
                        tracing::warn!(deployment = %name, error = %store_err, "cannot record a revision");
                    }
                }
                if is_new {
                    self.write_deployments().remove(&name);
                    deployment.stop().await;
                }
                if inserted {
                    self.inner.control.store().delete_deployment(&name).await?;
                    self.note_deployment(&name).await;
                }
                return Err(err);
            }
        };
        if queue_changed && self.inner.cluster.is_none() {
            // Tasks waiting in the previous queue move to the new one.
            self.requeue_unfinished(&deployment).await?;
        }
        let number = if api {
            self.inner.control.store().put_deployment(&stored).await?;
            self.note_deployment(&name).await;
            Some(
                self.inner
                    .control
                    .store()
                    .add_revision(&revision("deploying", None))
                    .await?,
            )
        } else {
            None
        };
        // How the revision's deploy ended, once it has.
        let end = {
            let control = Arc::clone(&self.inner.control);
            let name = name.clone();
            move |ended: &Result<(), Error>| {
                let (outcome, error) = match ended {
                    Ok(()) => ("deployed", None),
                    Err(err) => ("failed", Some(err.to_string())),
                };
                let (control, name) = (Arc::clone(&control), name.clone());
                async move {
                    if let Some(number) = number
                        && let Err(err) = control
                            .store()
                            .end_revision(&name, number, outcome, error.as_deref())
                            .await
                    {
                        tracing::warn!(deployment = %name, error = %err, "cannot record how a revision ended");
                    }
                }
            }
        };
        if wait || !is_new {
            // A reload answers once the new version serves (as llama_deploy's does), so that a
            // task sent right after the answer runs the new code; a service whose new
            // instance fails keeps its old one, and the answer names it.
            drop(ops);
            let ended = deploying.finished(&deployment).await;
            end(&ended).await;
            ended?;
        } else {
            let deployment = Arc::clone(&deployment);
            tokio::spawn(async move {
                let ended = deploying.finished(&deployment).await;
                end(&ended).await;
            });
        }
        Ok(Deployed {
            status: deployment.status(),
            warnings,
        })
    }

    /// The queue of a deployment whose file names `spec`: the node's `--queue` when it names
    /// none (or the embedded one). In a cluster the embedded queue is refused: the nodes share
    /// tasks through a broker.
    fn queue_config(
        &self,
        spec: Option<&deployd_config::MessageQueueSpec>,
    ) -> Result<deployd_queue::QueueConfig, Error> {
        let config = match (spec, &self.inner.options.queue) {
            (None | Some(deployd_config::MessageQueueSpec::Simple), Some(url)) => {
                queues::config_from_url(url).map_err(Error::BadRequest)?
            }
            _ => queues::config_of(spec),
        };
        if self.inner.cluster.is_some() && config == deployd_queue::QueueConfig::Memory {
            return Err(Error::BadRequest(
                "message-queue: the nodes of a cluster share tasks through a broker; name one \
                 in the file's `message-queue`, or start the nodes with --queue URL"
                    .to_owned(),
            ));
        }
        Ok(config)
    }

    fn context(
        &self,
        spec: DeploymentSpec,
        text: &str,
        base: &Path,
        sync: bool,
        queue_config: deployd_queue::QueueConfig,
        queue: Arc<dyn MessageQueue>,
    ) -> deployment::Context {
        let dir = self
            .inner
            .options
            .data_dir
            .join("deployments")
            .join(&spec.name);
        deployment::Context {
            spec,
            text: text.to_owned(),
            base: base.to_owned(),
            dir,
            sync,
            pins: std::collections::BTreeMap::new(),
            node_id: self.inner.node_id.clone(),
            topic_scope: self.inner.topic_scope.clone(),
            graph_store: self.inner.options.graph_store.clone(),
            cluster_ack_deadline: self
                .inner
                .options
                .cluster
                .as_ref()
                .map(|c| (c.lease * 3).max(Duration::from_secs(30))),
            control: Arc::clone(&self.inner.control),
            queue_config,
            queue,
            stop_timeout: self.inner.options.stop_timeout,
            head_timeout: self.inner.options.head_timeout,
            drain_timeout: self.inner.options.drain_timeout,
            log_max_bytes: self.inner.options.log_max_bytes,
            runtime: runtime::Settings {
                data_dir: self.inner.options.data_dir.clone(),
                python: self.inner.options.python.clone(),
                uv: std::sync::Arc::clone(&self.inner.uv),
            },
        }
    }

    /// Stops a deployment's services and forgets it with its tasks and sessions (in a
    /// cluster: on every node).
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let _ops = self.inner.ops.lock().await;
        let deployment = self.write_deployments().remove(name);
        let deployment = match deployment {
            Some(deployment) => deployment,
            // In a cluster, a deployment stored and not running here yet is deleted all the
            // same.
            None if self.inner.cluster.is_some()
                && self.inner.control.store().deployment(name).await?.is_some() =>
            {
                self.inner.control.store().delete_deployment(name).await?;
                self.note_deployment(name).await;
                return Ok(());
            }
            None => return Err(Error::not_found("deployment", name)),
        };
        deployment.stop().await;
        // Its topics go from the broker with it (its consumers are closed now); a broker that
        // refuses leaves them, which is logged and does not keep the deployment.
        let queue = deployment.queue();
        for service in deployment.spec().services {
            let topic = queues::task_topic(&self.inner.topic_scope, name, &service.id);
            if let Err(err) = queue.delete_topic(&topic).await {
                tracing::warn!(deployment = %name, topic = %topic, error = %err, "cannot remove the topic from the broker");
            }
        }
        self.inner.control.store().delete_deployment(name).await?;
        self.note_deployment(name).await;
        // Whoever waits for a task of it (a `tasks/run` caller, an event stream) is answered
        // now: the task is gone.
        self.inner.control.deleted(name);
        self.inner.control.forget_fresh(name);
        let dir = deployment.dir().to_owned();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .ok()
            .and_then(Result::err)
            .inspect(|err| tracing::warn!(deployment = %name, error = %err, "cannot remove files"));
        Ok(())
    }

    /// Stops and forgets a deployment that another node of the cluster deleted (it deleted
    /// the stored file, the tasks and the topics).
    pub(crate) async fn forget_here(&self, name: &str) {
        let _ops = self.inner.ops.lock().await;
        let Some(deployment) = self.write_deployments().remove(name) else {
            return;
        };
        tracing::info!(
            deployment = name,
            "stopping a deployment deleted on another node"
        );
        deployment.stop().await;
        self.inner.control.deleted(name);
        self.inner.control.forget_fresh(name);
        let dir = deployment.dir().to_owned();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
    }

    /// The names of the deployments.
    pub fn list(&self) -> Vec<String> {
        self.read_deployments().keys().cloned().collect()
    }

    /// The state of a deployment and its services.
    pub fn status(&self, name: &str) -> Result<DeploymentStatus, Error> {
        self.deployment(name).map(|d| d.status())
    }

    /// The log file of a service's instances (`<service>.log`; the rotated one before it is
    /// `<service>.log.1`), once the service is known to exist.
    pub fn service_log(
        &self,
        deployment: &str,
        service: &str,
        replica: usize,
    ) -> Result<PathBuf, Error> {
        let status = self.status(deployment)?;
        let replicas = if service == UI_ID && status.ui.is_some() {
            1
        } else {
            let found = status
                .services
                .iter()
                .find(|s| s.id == service)
                .ok_or_else(|| Error::not_found("service", service))?;
            found.replicas.len().max(1)
        };
        if replica >= replicas {
            return Err(Error::BadRequest(format!(
                "service `{service}` has {replicas} replica(s), numbered from 0; there is no \
                 replica {replica}"
            )));
        }
        Ok(self
            .inner
            .options
            .data_dir
            .join("deployments")
            .join(deployment)
            .join("logs")
            .join(deployment::log_name(service, replica)))
    }

    /// The port the UI of deployment `name` listens on (on 127.0.0.1), when its file has a
    /// `ui:` section.
    pub fn ui_port(&self, name: &str) -> Result<Option<u16>, Error> {
        Ok(self.deployment(name)?.spec().ui.map(|ui| ui.port))
    }

    fn deployment(&self, name: &str) -> Result<Arc<Deployment>, Error> {
        self.read_deployments()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found("deployment", name))
    }

    /// Records a task and queues it for its service.
    pub async fn create_task(&self, deployment: &str, task: NewTask) -> Result<TaskInfo, Error> {
        self.create(deployment, task, |_, _| ())
            .await
            .map(|(task, ())| task)
    }

    /// Creates a task as [`Manager::create_task`] does, following its log from before it is
    /// stored; [`Manager::wait_created`] then waits for its outcome without reading the store.
    pub async fn create_followed_task(
        &self,
        deployment: &str,
        task: NewTask,
    ) -> Result<Created, Error> {
        let (task, watch) = self
            .create(deployment, task, |control, task| {
                control.watch_new(task.deployment.clone(), task.id.clone())
            })
            .await?;
        Ok(Created { task, watch })
    }

    /// Creates a task; `before` runs once the task has its id and before it is queued for the
    /// store (a watch taken there sees all of the task's log).
    async fn create<W>(
        &self,
        deployment: &str,
        task: NewTask,
        before: impl FnOnce(&Control, &TaskInfo) -> W,
    ) -> Result<(TaskInfo, W), Error> {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Error::ShuttingDown);
        }
        if !task.input.is_object() {
            return Err(Error::BadRequest(
                "`input` must be a JSON object of keyword arguments".to_owned(),
            ));
        }
        let running = self.deployment(deployment)?;
        let service = match running.ready_service(task.service.as_deref()) {
            Some(service) => service,
            None => {
                let service = task
                    .service
                    .unwrap_or_else(|| running.spec().default_service);
                let Some(status) = running
                    .status()
                    .services
                    .into_iter()
                    .find(|s| s.id == service)
                else {
                    return Err(Error::not_found("service", &service));
                };
                if status.phase == Phase::Failed {
                    return Err(Error::Unavailable(format!(
                        "service `{service}` has failed ({}) and takes no tasks; redeploy it",
                        status.last_exit.as_deref().unwrap_or("unknown reason")
                    )));
                }
                service
            }
        };
        let store = self.inner.control.store();
        // Ids are UUIDv7 (time-ordered): a new task's or session's index entries land at the
        // end of the store's B-trees instead of at a random page each.
        let (session_id, new_session) = match task.session_id {
            Some(id) => match store.session(&id).await? {
                Some((owner, _)) if owner == deployment => (id, false),
                _ => return Err(Error::not_found("session", &id)),
            },
            None => (uuid::Uuid::now_v7().to_string(), true),
        };
        let info = TaskInfo {
            id: uuid::Uuid::now_v7().to_string(),
            deployment: deployment.to_owned(),
            service,
            session_id,
            input: task.input,
            status: TaskStatus::Queued,
            attempt: 0,
            result: None,
            error: None,
        };
        // One group commit of the control plane's writer holds the session and the task. The
        // message is published while it commits: a worker's start of the task is queued to the
        // same writer after it, so it finds the task stored.
        // Before the task is queued for the store: what it has to see of the task from then on.
        let before = before(&self.inner.control, &info);
        if new_session {
            self.inner.control.remember_fresh(&info);
        }
        let stored = match self.inner.control.create(&info, new_session).await {
            Ok(stored) => stored,
            Err(err) => {
                self.inner.control.take_fresh(&info.id);
                return Err(err);
            }
        };
        let topic = queues::task_topic(&self.inner.topic_scope, deployment, &info.service);
        let mut message = Message::new(info.id.clone());
        // The request's trace goes with the task (see `trace.rs`).
        for (key, value) in trace::message_headers().into_iter().flatten() {
            message = message.with_header(key, value);
        }
        // In a cluster the task may run on another node, which must find it stored: the
        // message goes once the task is committed.
        let published = if self.inner.cluster.is_some() {
            if let Err(err) = stored.done().await {
                self.inner.control.take_fresh(&info.id);
                return Err(err);
            }
            running.queue().publish(&topic, message).await
        } else {
            let published = running.queue().publish(&topic, message).await;
            if let Err(err) = stored.done().await {
                self.inner.control.take_fresh(&info.id);
                return Err(err);
            }
            published
        };
        published?;
        Ok((info, before))
    }

    /// Creates an empty session in a deployment.
    pub async fn create_session(&self, deployment: &str) -> Result<SessionInfo, Error> {
        self.deployment(deployment)?;
        let id = uuid::Uuid::now_v7().to_string();
        self.inner
            .control
            .store()
            .create_session(&id, deployment)
            .await?;
        Ok(SessionInfo {
            id,
            task_ids: Vec::new(),
            state: None,
        })
    }

    /// The sessions of a deployment, oldest first.
    pub async fn sessions(&self, deployment: &str) -> Result<Vec<SessionInfo>, Error> {
        self.deployment(deployment)?;
        self.inner.control.store().sessions(deployment).await
    }

    /// A session of a deployment.
    pub async fn session(&self, deployment: &str, id: &str) -> Result<SessionInfo, Error> {
        self.sessions(deployment)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| Error::not_found("session", id))
    }

    /// Deletes a session; the tasks run in it stay readable.
    pub async fn delete_session(&self, deployment: &str, id: &str) -> Result<(), Error> {
        self.deployment(deployment)?;
        if self
            .inner
            .control
            .store()
            .delete_session(deployment, id)
            .await?
        {
            Ok(())
        } else {
            Err(Error::not_found("session", id))
        }
    }

    /// Delivers a human-in-the-loop event to a running task: `POST /tasks/{id}/events` to the
    /// service running it.
    pub async fn send_event(
        &self,
        deployment: &str,
        task_id: &str,
        data: Value,
    ) -> Result<(), Error> {
        let task = self.task(deployment, task_id).await?;
        if task.status != TaskStatus::Running {
            return Err(Error::Conflict(format!(
                "task `{task_id}` is not running (it is {}); events go to running tasks",
                task.status.as_str()
            )));
        }
        // The replica whose worker runs the task takes it.
        if let Some(port) = self.inner.control.running_port(task_id) {
            return protocol::send_event(port, task_id, data).await;
        }
        if self.inner.cluster.is_some() {
            // Another node runs it: the note goes to that node, which hands it to its service.
            return match self.inner.control.store().owner(task_id).await? {
                Some(owner) if owner != self.inner.node_id => {
                    self.inner
                        .control
                        .notifier()
                        .publish(&notifier::Note::TaskEvent {
                            to: owner,
                            deployment: deployment.to_owned(),
                            task: task_id.to_owned(),
                            data,
                        })
                        .await
                }
                _ => Err(Error::Conflict(format!(
                    "task `{task_id}` is between two attempts; send the event again"
                ))),
            };
        }
        let status = self.status(deployment)?;
        let port = status
            .services
            .iter()
            .find(|s| s.id == task.service)
            .map(|s| s.port)
            .ok_or_else(|| Error::not_found("service", &task.service))?;
        protocol::send_event(port, task_id, data).await
    }

    /// Cancels a task that has not ended: it ends `cancelled` (its log's last entry says so,
    /// with `by`), a queued task never runs, and the worker running a running one asks its
    /// service to stop it (`POST /tasks/{id}/cancel`), then abandons the call after
    /// [`CANCEL_GRACE`]. A task that has ended is a conflict.
    pub async fn cancel_task(
        &self,
        deployment: &str,
        task_id: &str,
        by: &str,
    ) -> Result<TaskRecord, Error> {
        let task = self.task(deployment, task_id).await?;
        let ended = |status: TaskStatus| {
            Error::Conflict(format!(
                "task `{task_id}` has ended (it is {}); only a queued or running task can be \
                 cancelled",
                status.as_str()
            ))
        };
        if task.status.is_finished() {
            return Err(ended(task.status));
        }
        // The node that runs it, read before the cancel (which clears it).
        let owner = match self.inner.cluster {
            Some(_) if task.status == TaskStatus::Running => {
                self.inner.control.store().owner(task_id).await?
            }
            _ => None,
        };
        let message = format!("cancelled by {by}");
        if !self.inner.control.cancel(&task, message).await? {
            let now = self.task(deployment, task_id).await?;
            if now.status != TaskStatus::Cancelled {
                return Err(ended(now.status));
            }
        }
        // A task created here a moment ago is handed to its worker without a read of the
        // store: it must not be, now.
        self.inner.control.take_fresh(task_id);
        tracing::info!(deployment, task = task_id, by, "task cancelled");
        // Stop whatever runs it: a worker here, or (in a cluster) the owner's.
        if !self.stop_cancelled(task_id)
            && let Some(owner) = owner.filter(|owner| *owner != self.inner.node_id)
        {
            let note = notifier::Note::Cancel {
                to: owner,
                task: task_id.to_owned(),
            };
            if let Err(err) = self.inner.control.notifier().publish(&note).await {
                tracing::warn!(task = task_id, error = %err, "cannot tell the task's node it was cancelled");
            }
        }
        self.task_record(deployment, task_id).await
    }

    /// Stops this node's worker of a cancelled task, asking its service to stop it first;
    /// whether a worker here ran it.
    pub(crate) fn stop_cancelled(&self, task_id: &str) -> bool {
        let Some(port) = self.inner.control.running_port(task_id) else {
            return self.inner.control.cancel_running(task_id).is_some();
        };
        let task = task_id.to_owned();
        let control = Arc::clone(&self.inner.control);
        tokio::spawn(async move {
            // The service is asked first; the worker waits out the grace from its signal.
            if let Err(err) = protocol::cancel(port, &task).await {
                tracing::debug!(task = %task, error = %err, "the service did not take the cancel");
            }
            control.cancel_running(&task);
        });
        true
    }

    /// At most `limit` sessions of a deployment, newest first, starting after (older than)
    /// the session `before`.
    pub async fn search_sessions(
        &self,
        deployment: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, Error> {
        self.deployment(deployment)?;
        self.inner
            .control
            .store()
            .search_sessions(deployment, before, limit)
            .await?
            .ok_or_else(|| no_cursor("session", before, deployment))
    }

    /// A task of a deployment with when it was created and last changed.
    pub async fn task_record(&self, deployment: &str, task_id: &str) -> Result<TaskRecord, Error> {
        match self.inner.control.store().task_record(task_id).await? {
            Some(record) if record.task.deployment == deployment => Ok(record),
            _ => Err(Error::not_found("task", task_id)),
        }
    }

    /// At most `limit` tasks of a deployment that match `filter`, newest first, starting
    /// after (older than) the task `before`.
    pub async fn search_tasks(
        &self,
        deployment: &str,
        filter: &TaskFilter,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, Error> {
        self.deployment(deployment)?;
        self.inner
            .control
            .store()
            .search_tasks(deployment, filter, before, limit)
            .await?
            .ok_or_else(|| no_cursor("task", before, deployment))
    }

    /// The graph a graph service serves, in Mermaid (`GET /graph` of the service), with the
    /// run of `task_id` drawn over it when given (a task of this deployment).
    pub async fn service_graph(
        &self,
        deployment: &str,
        service: &str,
        task_id: Option<&str>,
    ) -> Result<String, Error> {
        if let Some(task) = task_id {
            self.task(deployment, task).await?;
        }
        let status = self.status(deployment)?;
        let found = status
            .services
            .iter()
            .find(|s| s.id == service)
            .ok_or_else(|| Error::not_found("service", service))?;
        if found.phase != Phase::Ready {
            return Err(Error::Conflict(format!(
                "service `{service}` is not ready (it is {}); its graph is asked of the running \
                 service",
                phase_name(found.phase)
            )));
        }
        protocol::graph(found.port, service, task_id).await
    }

    /// A task of a deployment.
    pub async fn task(&self, deployment: &str, task_id: &str) -> Result<TaskInfo, Error> {
        match self.inner.control.store().task(task_id).await? {
            Some(task) if task.deployment == deployment => Ok(task),
            _ => Err(Error::not_found("task", task_id)),
        }
    }

    /// The tasks of a deployment, oldest first.
    pub async fn tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error> {
        self.deployment(deployment)?;
        self.inner.control.store().tasks(deployment).await
    }

    /// The tasks of every deployment counted by service and status (a scan of the task
    /// table), for metrics.
    pub async fn task_counts(&self) -> Result<Vec<TaskCount>, Error> {
        self.inner.control.store().task_counts().await
    }

    /// The durations of every service's ended tasks, counted at most each of `bounds` (in
    /// seconds, ascending): a histogram (a scan of the task table), for metrics.
    pub async fn task_durations(&self, bounds: &[f64]) -> Result<Vec<TaskDurations>, Error> {
        self.inner.control.store().task_durations(bounds).await
    }

    /// A page of a deployment's tasks, oldest first: at most `limit`, starting after the task
    /// `after` (a cursor: the last id of the previous page). An `after` that names no task of
    /// the deployment is an [`Error::NotFound`].
    pub async fn tasks_page(
        &self,
        deployment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskInfo>, Error> {
        self.deployment(deployment)?;
        self.inner
            .control
            .store()
            .tasks_page(deployment, after, limit)
            .await?
            .ok_or_else(|| Error::not_found("task", after.unwrap_or_default()))
    }

    /// Waits until a task [`Manager::create_followed_task`] made has ended and returns it. The
    /// outcome comes from the task's final log entry, not from a read of the store.
    pub async fn wait_created(&self, created: Created) -> Result<TaskInfo, Error> {
        let Created { task, watch } = created;
        let mut done = task.clone();
        match self.inner.control.outcome(watch).await {
            Some(event) if event.kind == EventKind::Result => {
                done.attempt = event.attempt;
                done.status = TaskStatus::Succeeded;
                done.result = Some(event.data);
                return Ok(done);
            }
            Some(event) if matches!(event.kind, EventKind::Error | EventKind::Cancelled) => {
                done.attempt = event.attempt;
                done.status = if event.kind == EventKind::Cancelled {
                    TaskStatus::Cancelled
                } else {
                    TaskStatus::Failed
                };
                done.error = Some(match event.data {
                    Value::String(message) => message,
                    other => other.to_string(),
                });
                return Ok(done);
            }
            _ => {}
        }
        // The log ended without an outcome (deployd stops, or the deployment was deleted).
        self.task(&task.deployment, &task.id).await
    }

    /// Waits until a task has ended and returns it.
    pub async fn wait_task(&self, deployment: &str, task_id: &str) -> Result<TaskInfo, Error> {
        let mut events = self.task_events(deployment, task_id, 0).await?;
        while let Some(event) = events.recv().await {
            if event.kind.is_terminal() {
                break;
            }
        }
        self.task(deployment, task_id).await
    }

    /// Streams a task's event log from the entry after `after`: what is stored first, then what
    /// comes, until the task's result or error. The stream also ends when deployd shuts down.
    pub async fn task_events(
        &self,
        deployment: &str,
        task_id: &str,
        after: u64,
    ) -> Result<mpsc::Receiver<TaskEvent>, Error> {
        self.task(deployment, task_id).await?;
        Ok(self
            .inner
            .control
            .follow(deployment.to_owned(), task_id.to_owned(), after))
    }

    /// Subscribes to every entry appended to any task's log; for live views.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.inner.control.subscribe()
    }

    /// Stops every deployment (in reverse order of creation) and closes the store. Requests
    /// made afterwards fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ops = self.inner.ops.lock().await;
        if *ops {
            return;
        }
        *ops = true;
        let mut deployments: Vec<_> = std::mem::take(&mut *self.write_deployments())
            .into_values()
            .collect();
        deployments.sort_by_key(|d| std::cmp::Reverse(d.started()));
        futures::future::join_all(deployments.iter().map(|d| d.stop())).await;
        // A process launched by a deploy that was cancelled half-way is not in any deployment
        // any more; whatever carries this node's mark still is stopped here.
        orphans::stop_leftovers(&self.inner.node_id, self.inner.options.stop_timeout).await;
        // The tasks cut off by the drain went back to `queued`; the others ended. The lease
        // goes, so nothing waits for it to expire.
        if self.inner.cluster.is_some()
            && let Err(err) = self
                .inner
                .control
                .store()
                .release_lease(&self.inner.node_id)
                .await
        {
            tracing::warn!(error = %err, "cannot give up the node's lease; it expires");
        }
        self.inner.control.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(loaded: &deployd_config::Loaded) -> BTreeMap<String, String> {
        loaded.spec.services[0].env.clone()
    }

    const FILE: &str = "name: vars\nservices:\n  svc:\n    command: x\n    env:\n      \
                        A: \"${HOME}\"\n      B: \"${DEPLOYD_SECRET_TEST:-none}\"\n      \
                        C: \"${DEPLOYD_TEST_PUBLIC_VAR:-unset}\"\n";

    #[test]
    fn a_clients_file_reads_only_allowed_variables() {
        let home = std::env::var("HOME").expect("HOME is set");
        let client = load(FILE, "f.yaml", FileOrigin::Client, &[]).unwrap();
        let env = env_of(&client);
        assert_eq!(env["A"], "${HOME}");
        assert_eq!(env["B"], "${DEPLOYD_SECRET_TEST:-none}");
        let operator = load(FILE, "f.yaml", FileOrigin::Operator, &[]).unwrap();
        let env = env_of(&operator);
        assert_eq!(env["A"], home);
        assert_eq!(env["B"], "none", "DEPLOYD_* is never read");
        let allowed = load(FILE, "f.yaml", FileOrigin::Client, &["HOM".to_owned()]).unwrap();
        assert_eq!(env_of(&allowed)["A"], home);
        let deployd = load(FILE, "f.yaml", FileOrigin::Client, &["DEPLOYD_".to_owned()]).unwrap();
        assert_eq!(env_of(&deployd)["C"], "${DEPLOYD_TEST_PUBLIC_VAR:-unset}");
    }
}
