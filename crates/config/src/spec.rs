use std::collections::BTreeMap;
use std::time::Duration;

/// A validated deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    /// The deployment's name: a URL path segment, topic and directory name.
    pub name: String,
    /// The service that takes tasks that name none; always one of `services`.
    pub default_service: String,
    /// The services, in the order of the file.
    pub services: Vec<ServiceSpec>,
    /// The message queue the file names; `None` means deployd's embedded queue.
    pub message_queue: Option<MessageQueueSpec>,
    /// Where the deployment's tasks and sessions are stored; `None` means the server's store.
    pub state_store: Option<StateStoreSpec>,
    /// llama_deploy's UI service, parsed but not served.
    pub ui: Option<UiSpec>,
}

impl DeploymentSpec {
    /// The service with id `id`.
    pub fn service(&self, id: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.id == id)
    }
}

/// One service of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The key of the service under `services`: a URL path segment, topic and directory name.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Where the service's code comes from; without one the service runs in an empty folder.
    pub source: Option<SourceSpec>,
    /// `module/path:attribute` of a Python workflow (llama_deploy's `path` / `import-path`).
    pub import_path: Option<String>,
    /// How to start the service. Always set for [`Runtime::Process`]; for [`Runtime::Python`]
    /// it replaces the adapter's default command line when set.
    pub command: Option<Command>,
    /// The port the service listens on; allocated by deployd when absent.
    pub port: Option<u16>,
    /// Environment variables given to the service's process.
    pub env: BTreeMap<String, String>,
    /// How the process is started: the Python adapter or the service's own command.
    pub runtime: Runtime,
    /// Commands run in the source folder before the service starts, in order.
    pub build: Vec<Command>,
    /// How many processes of the service run (at least 1).
    pub replicas: u32,
    /// How readiness is probed.
    pub health: HealthSpec,
    /// What happens when the process exits.
    pub restart: RestartSpec,
    /// The most tasks one process runs at once; `None` means deployd's default (32).
    pub max_concurrency: Option<u32>,
    /// How long one task may run; `None` means no limit.
    pub timeout: Option<Duration>,
    /// Dotenv files, relative to the deployment's folder and inside it, in order; later files
    /// override earlier ones, and files override `env`.
    pub env_files: Vec<String>,
    /// Python requirements: requirement specs, `requirements.txt` files, or local folders
    /// (relative to the deployment's folder and inside it).
    pub python_dependencies: Vec<String>,
}

/// How to start a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A command line run by `/bin/sh -c`.
    Shell(String),
    /// A program and its arguments, run directly.
    Argv(Vec<String>),
}

/// Where a service's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// Git or local.
    pub kind: SourceKind,
    /// For a local source, a folder relative to the deployment file, never escaping it;
    /// for git, the repository URL, without the `@ref` suffix (see `reference`).
    pub location: String,
    /// For git, the branch, tag or commit to check out (from `url@ref` or `ref:`); `None`
    /// means the repository's default branch. Always `None` for a local source.
    pub reference: Option<String>,
    /// What a sync does with a folder that exists already.
    pub sync_policy: SyncPolicy,
}

/// The kinds of source deployd syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceKind {
    /// A folder next to the deployment file, copied into the deployment's directory.
    Local,
    /// A git repository.
    Git,
}

/// What a sync does with a destination folder that exists already (llama_deploy's
/// `sync_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// Replace it with the new tree (the default).
    #[default]
    Replace,
    /// Copy the new tree over it, keeping files the new tree does not have.
    Merge,
    /// Keep it as it is.
    Skip,
    /// Fail the sync.
    Fail,
}

/// How a service's process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Runtime {
    /// A llama-index workflow (`import_path`) served by deployd's Python adapter.
    Python,
    /// The service's `command`, which speaks the service protocol itself.
    Process,
}

/// How deployd knows a service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthSpec {
    /// The HTTP path probed with `GET` (starts with `/`); ready on a 2xx answer.
    pub path: String,
    /// How long the service has to become ready after it starts.
    pub timeout: Duration,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            path: "/healthz".to_owned(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What happens when a service's process exits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartSpec {
    /// When to restart.
    pub policy: RestartPolicy,
    /// The first wait before a restart; it doubles up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    /// The longest wait before a restart (at least `backoff_initial`).
    pub backoff_max: Duration,
    /// The most restarts within `window`; one more marks the service failed.
    pub max_restarts: u32,
    /// The window `max_restarts` counts in.
    pub window: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::Always,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_restarts: 10,
            window: Duration::from_secs(120),
        }
    }
}

/// When a service's process is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestartPolicy {
    /// Whenever it exits (the default).
    #[default]
    Always,
    /// When it exits with a non-zero status or by a signal.
    OnFailure,
    /// Never.
    Never,
}

/// The message queue a deployment names, with llama_deploy's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageQueueSpec {
    /// deployd's embedded queue (llama_deploy's `simple`; its host and port are ignored).
    Simple,
    /// Redis.
    #[non_exhaustive]
    Redis {
        /// The connection URL (`redis://…` or `rediss://…`), built from `host`, `port`,
        /// `db`, the credentials and `ssl` when the file gives `host`.
        url: String,
        /// llama_deploy's exclusive consumer mode.
        exclusive_mode: bool,
    },
    /// RabbitMQ.
    #[non_exhaustive]
    RabbitMq {
        /// The AMQP URL (`amqp://…` or `amqps://…`).
        url: String,
        /// The exchange name.
        exchange: String,
    },
    /// Kafka.
    #[non_exhaustive]
    Kafka {
        /// The bootstrap server(s), `host:port`.
        url: String,
    },
    /// NATS JetStream.
    #[non_exhaustive]
    Nats {
        /// The server URL (`nats://…`).
        url: String,
    },
    /// AWS SNS/SQS.
    #[non_exhaustive]
    Aws {
        /// The region.
        region: String,
        /// The access key id; `None` (or an empty value in the file) means the default
        /// credential chain.
        access_key_id: Option<String>,
        /// The secret access key; `None` when not given or empty.
        secret_access_key: Option<String>,
    },
}

/// Where a deployment's tasks and sessions are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateStoreSpec {
    /// A SQLite file, relative to the deployment's data directory and inside it.
    Sqlite {
        /// The file's path.
        path: String,
    },
    /// A Postgres database.
    Postgres {
        /// The connection URL (`postgres://…` or `postgresql://…`).
        url: String,
    },
}

/// llama_deploy's UI service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UiSpec {
    /// Display name.
    pub name: Option<String>,
    /// The port the UI listens on.
    pub port: u16,
    /// Where the UI's code comes from.
    pub source: Option<SourceSpec>,
    /// deployd's extension: what installs the UI (`pnpm install` when empty, as llama_deploy).
    pub build: Vec<Command>,
    /// deployd's extension: what serves it (`pnpm run dev` when absent, as llama_deploy).
    pub command: Option<Command>,
}
