//! The file as written: every key llama_deploy and deployd accept, before validation.
//!
//! These types are the one description of the file's shape: [`crate::decode`] reads them from
//! the YAML tree, and the JSON Schema ([`crate::json_schema`]) is derived from them, so the
//! field docs here are the schema's descriptions. Keys are matched with `-` and `_` as the same
//! character (llama_deploy has written both); the canonical spelling is the one named here.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::decode::{Any, Cx, Decode, Keyword, Located, MapReader, Named, RawDuration};
use crate::yaml::{Node, Value};

/// An optional key, with where it was written.
pub(crate) type Field<T> = Option<Located<T>>;

/// The pattern names of deployments and services follow (they become URL path segments, topic
/// names and directory names).
pub(crate) const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$";

/// A deployd deployment file (llama_deploy's format, plus deployd's own keys).
///
/// Every key with a `-` may also be written with `_` (`env-files` or `env_files`).
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Deployment", deny_unknown_fields)]
pub(crate) struct RawDeployment {
    /// The deployment's name: a URL path segment, topic and directory name.
    // Read with `${VAR}` only under `Interpolation::All` (see `MapReader::name_field`).
    #[schemars(required, regex(pattern = NAME_PATTERN), example = &"quickstart")]
    pub(crate) name: Field<String>,
    /// llama_deploy's control plane settings: accepted; `state_store_uri` is used when it names
    /// a database deployd supports, the other keys are ignored with a warning.
    #[schemars(rename = "control-plane")]
    pub(crate) control_plane: Field<RawControlPlane>,
    /// The message queue tasks travel through. Default: deployd's embedded queue.
    #[schemars(rename = "message-queue")]
    pub(crate) message_queue: Field<RawMessageQueue>,
    /// The service that takes tasks which name none. Default: the first service.
    #[schemars(rename = "default-service", example = &"echo")]
    pub(crate) default_service: Field<String>,
    /// The services, by id (a URL path segment, topic and directory name).
    #[schemars(required, extend("propertyNames" = {"pattern": NAME_PATTERN}, "minProperties" = 1))]
    pub(crate) services: Field<Named<RawService>>,
    /// Where deployd keeps the state of this deployment's tasks and sessions: `sqlite:PATH`
    /// (relative to the deployment's data directory) or a `postgres://` URL.
    /// Default: the server's own store.
    #[schemars(rename = "state-store", example = &"sqlite:state.db")]
    pub(crate) state_store: Field<String>,
    /// llama_deploy's UI service: `name`, `port` (default 3000) and `source`; deployd runs it
    /// (`pnpm install`, then `pnpm run dev`, or `build` and `command`) and serves it at
    /// `/deployments/<name>/ui`.
    pub(crate) ui: Field<RawService>,
}

impl Decode for RawDeployment {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "deployment")?;
        let raw = Self {
            name: m.name_field(cx, "name"),
            control_plane: m.field(cx, "control-plane"),
            message_queue: m.field(cx, "message-queue"),
            default_service: m.name_field(cx, "default-service"),
            services: m.field(cx, "services"),
            state_store: m.field(cx, "state-store"),
            ui: m.field(cx, "ui"),
        };
        m.finish(cx, true);
        Some(raw)
    }
}

/// One service of the deployment.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Service", deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawService {
    /// Display name.
    #[schemars(example = &"Echo")]
    pub(crate) name: Field<String>,
    /// Where the service's code comes from. Without one, the service runs in an empty folder.
    pub(crate) source: Field<RawSource>,
    /// `module/path:attribute` of a llama-index workflow, for the `python` runtime.
    /// llama_deploy's older spelling `path` is accepted too.
    #[schemars(example = &"src/workflow:echo_workflow")]
    pub(crate) import_path: Field<String>,
    /// How the service's process is started: `python` (a llama-index workflow served by the
    /// Python adapter) or `process` (any command speaking the service protocol).
    /// Default: `python` when `import-path` is given, else `process`.
    pub(crate) runtime: Field<Runtime>,
    /// The command that starts the service: a string run by `/bin/sh -c`, or a list of a
    /// program and its arguments, run directly.
    #[schemars(example = &"python3 echo.py")]
    pub(crate) command: Field<RawCommand>,
    /// Commands run in the source folder before the service starts, in order (skipped when
    /// the source did not change).
    pub(crate) build: Field<RawCommands>,
    /// llama_deploy's bind address of the service: ignored with a warning (services listen
    /// on 127.0.0.1).
    pub(crate) host: Field<String>,
    /// The port the service listens on (1 to 65535). Default: a free port chosen by deployd,
    /// given to the process as `PORT`.
    #[schemars(range(min = 1, max = 65535), example = 8080)]
    pub(crate) port: Field<i64>,
    /// How many processes of the service run. Default: 1.
    #[schemars(range(min = 1, max = 64), extend("default" = 1))]
    pub(crate) replicas: Field<i64>,
    /// How deployd knows the service is ready.
    pub(crate) health: Field<RawHealth>,
    /// What happens when the service's process exits.
    pub(crate) restart: Field<RawRestart>,
    /// The most tasks one process of the service runs at once. Default: 32.
    #[schemars(range(min = 1))]
    pub(crate) max_concurrency: Field<i64>,
    /// How long one task may run before it fails. Default: no limit.
    pub(crate) timeout: Field<RawDuration>,
    /// Environment variables of the service's process.
    #[schemars(schema_with = "env_schema")]
    pub(crate) env: Field<Named<String>>,
    /// Dotenv files read into the process's environment, relative to the deployment's folder
    /// and inside it; later files override earlier ones, and files override `env`.
    pub(crate) env_files: Field<Vec<Located<String>>>,
    /// Python requirements: requirement specs, `requirements.txt` files (installed with `-r`)
    /// or local folders with a `pyproject.toml` (installed editable). Files and folders are
    /// relative to the deployment's folder and stay inside it.
    pub(crate) python_dependencies: Field<Vec<Located<String>>>,
    /// llama_deploy's TypeScript dependencies: parsed and ignored with a warning.
    pub(crate) ts_dependencies: Field<Any>,
}

impl Decode for RawService {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "service")?;
        let raw = Self {
            name: m.field(cx, "name"),
            source: m.field(cx, "source"),
            import_path: m.field_or(cx, "import-path", &["path"]),
            runtime: m.field(cx, "runtime"),
            command: m.field(cx, "command"),
            build: m.field(cx, "build"),
            host: m.field(cx, "host"),
            port: m.field(cx, "port"),
            replicas: m.field(cx, "replicas"),
            health: m.field(cx, "health"),
            restart: m.field(cx, "restart"),
            max_concurrency: m.field(cx, "max-concurrency"),
            timeout: m.field(cx, "timeout"),
            env: m.field(cx, "env"),
            env_files: m.field(cx, "env-files"),
            python_dependencies: m.field(cx, "python-dependencies"),
            ts_dependencies: m.field(cx, "ts-dependencies"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

fn env_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
        "examples": [{"GREETING": "hello", "API_KEY": "${API_KEY}"}]
    })
}

/// Where a service's code comes from.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Source", deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawSource {
    /// `local` (a folder next to the deployment file) or `git` (a repository).
    #[schemars(rename = "type", required)]
    pub(crate) kind: Field<SourceType>,
    /// For `local`, a folder relative to the deployment file, inside it; for `git`, the
    /// repository URL, optionally ending in `@ref` (a branch, tag or commit).
    #[schemars(example = &"src")]
    pub(crate) location: Field<String>,
    /// llama_deploy's older spelling of `location`.
    pub(crate) name: Field<String>,
    /// For `git`: the branch, tag or commit to check out (instead of `url@ref`).
    /// Default: the repository's default branch.
    #[schemars(rename = "ref", example = &"main")]
    pub(crate) reference: Field<String>,
    /// What a sync does with a folder that exists already. Default: `replace`.
    pub(crate) sync_policy: Field<SyncPolicy>,
}

impl Decode for RawSource {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "source")?;
        let raw = Self {
            kind: m.field(cx, "type"),
            location: m.field(cx, "location"),
            name: m.field(cx, "name"),
            reference: m.field(cx, "ref"),
            sync_policy: m.field(cx, "sync-policy"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// How deployd knows a service is ready.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Health", deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawHealth {
    /// The HTTP path probed with `GET`; ready on a 2xx answer. Default: `/healthz`.
    #[schemars(extend("default" = "/healthz"))]
    pub(crate) path: Field<String>,
    /// How long the service has to become ready after it starts. Default: `30s`.
    #[schemars(extend("default" = "30s"))]
    pub(crate) timeout: Field<RawDuration>,
}

impl Decode for RawHealth {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "health check")?;
        let raw = Self {
            path: m.field(cx, "path"),
            timeout: m.field(cx, "timeout"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// What happens when a service's process exits.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Restart", deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawRestart {
    /// When to restart. Default: `always`.
    pub(crate) policy: Field<RestartPolicy>,
    /// The wait before a restart: it grows from `initial` to `max`, with jitter.
    pub(crate) backoff: Field<RawBackoff>,
    /// The most restarts within `window`; one more marks the service failed. Default: 10.
    #[schemars(range(min = 0), extend("default" = 10))]
    pub(crate) max_restarts: Field<i64>,
    /// The window `max-restarts` counts in. Default: `2m`.
    #[schemars(extend("default" = "2m"))]
    pub(crate) window: Field<RawDuration>,
}

impl Decode for RawRestart {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "restart policy")?;
        let raw = Self {
            policy: m.field(cx, "policy"),
            backoff: m.field(cx, "backoff"),
            max_restarts: m.field(cx, "max-restarts"),
            window: m.field(cx, "window"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// The wait before a restart.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "Backoff", deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawBackoff {
    /// The first wait. Default: `100ms`.
    #[schemars(extend("default" = "100ms"))]
    pub(crate) initial: Field<RawDuration>,
    /// The longest wait. Default: `30s`.
    #[schemars(extend("default" = "30s"))]
    pub(crate) max: Field<RawDuration>,
}

impl Decode for RawBackoff {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "backoff")?;
        let raw = Self {
            initial: m.field(cx, "initial"),
            max: m.field(cx, "max"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// llama_deploy's control plane settings.
#[derive(Debug, JsonSchema)]
#[schemars(rename = "ControlPlane", deny_unknown_fields)]
pub(crate) struct RawControlPlane {
    /// llama_deploy's control plane port (8000): ignored.
    pub(crate) port: Field<i64>,
    /// llama_deploy's control plane host (127.0.0.1): ignored.
    pub(crate) host: Field<String>,
    /// Ignored.
    pub(crate) internal_host: Field<String>,
    /// Ignored.
    pub(crate) internal_port: Field<i64>,
    /// Ignored.
    pub(crate) running: Field<bool>,
    /// Ignored.
    pub(crate) cors_origins: Field<Vec<String>>,
    /// Ignored (deployd's topics are `deployd.<deployment>.<service>`).
    pub(crate) topic_namespace: Field<String>,
    /// The state store: a `postgres://` URL is used as the deployment's `state-store` (when
    /// that is not given); other stores (`redis://`, `mongodb://`) are not supported and
    /// ignored with a warning.
    pub(crate) state_store_uri: Field<String>,
    /// Ignored.
    pub(crate) use_tls: Field<bool>,
    /// Ignored.
    pub(crate) step_interval: Field<f64>,
    /// Ignored.
    pub(crate) services_store_key: Field<String>,
    /// Ignored.
    pub(crate) tasks_store_key: Field<String>,
    /// Ignored.
    pub(crate) session_store_key: Field<String>,
}

impl Decode for RawControlPlane {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "control-plane")?;
        let raw = Self {
            port: m.field(cx, "port"),
            host: m.field(cx, "host"),
            internal_host: m.field(cx, "internal_host"),
            internal_port: m.field(cx, "internal_port"),
            running: m.field(cx, "running"),
            cors_origins: m.field(cx, "cors_origins"),
            topic_namespace: m.field(cx, "topic_namespace"),
            state_store_uri: m.field(cx, "state_store_uri"),
            use_tls: m.field(cx, "use_tls"),
            step_interval: m.field(cx, "step_interval"),
            services_store_key: m.field(cx, "services_store_key"),
            tasks_store_key: m.field(cx, "tasks_store_key"),
            session_store_key: m.field(cx, "session_store_key"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// The message queue: `type` and that type's connection keys (llama_deploy's names and
/// defaults).
#[derive(Debug, JsonSchema)]
#[schemars(rename = "MessageQueue", deny_unknown_fields)]
pub(crate) struct RawMessageQueue {
    /// `simple` (deployd's embedded queue), `redis`, `rabbitmq`, `kafka`, `nats` or `aws`.
    #[schemars(rename = "type", required)]
    pub(crate) kind: Field<QueueType>,
    /// The broker's URL. Defaults: redis `redis://localhost:6379`, rabbitmq
    /// `amqp://guest:guest@localhost/`, kafka `localhost:9092`, nats `nats://localhost:4222`.
    /// When `host` is given, the URL is built from `host`, `port` and the credentials instead.
    pub(crate) url: Field<String>,
    /// The broker's host (simple, redis, rabbitmq, kafka, nats, solace).
    pub(crate) host: Field<String>,
    /// The broker's port (simple 8001, redis 6379, rabbitmq 5672, kafka 9092, nats 4222).
    #[schemars(range(min = 1, max = 65535))]
    pub(crate) port: Field<i64>,
    /// redis: the database number.
    #[schemars(range(min = 0))]
    pub(crate) db: Field<i64>,
    /// redis, rabbitmq, nats, solace: the user name.
    pub(crate) username: Field<String>,
    /// redis, rabbitmq, nats, solace: the password (write `${VAR}` to keep it out of the file).
    pub(crate) password: Field<String>,
    /// redis: connect with TLS (`rediss://`).
    pub(crate) ssl: Field<bool>,
    /// redis: llama_deploy's exclusive consumer mode.
    pub(crate) exclusive_mode: Field<bool>,
    /// rabbitmq: the exchange. Default: `llama-deploy`.
    pub(crate) exchange_name: Field<String>,
    /// rabbitmq: the virtual host.
    pub(crate) vhost: Field<String>,
    /// rabbitmq: connect with TLS (`amqps://`).
    pub(crate) secure: Field<bool>,
    /// simple: ignored.
    pub(crate) client_kwargs: Field<Any>,
    /// simple: ignored.
    pub(crate) raise_exceptions: Field<bool>,
    /// simple: ignored.
    pub(crate) use_ssl: Field<bool>,
    /// simple: ignored.
    pub(crate) internal_host: Field<String>,
    /// simple: ignored.
    pub(crate) internal_port: Field<i64>,
    /// aws: the region. Default: `us-east-1`.
    pub(crate) aws_region: Field<String>,
    /// aws: the access key id.
    pub(crate) aws_access_key_id: Field<String>,
    /// aws: the secret access key.
    pub(crate) aws_secret_access_key: Field<String>,
    /// solace (not supported): the VPN.
    pub(crate) vpn_name: Field<String>,
    /// solace (not supported).
    pub(crate) host_secured: Field<String>,
    /// solace (not supported).
    pub(crate) is_queue_temporary: Field<bool>,
}

impl Decode for RawMessageQueue {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let mut m = MapReader::new(node, cx, "message-queue")?;
        let raw = Self {
            kind: m.field(cx, "type"),
            url: m.field(cx, "url"),
            host: m.field(cx, "host"),
            port: m.field(cx, "port"),
            db: m.field(cx, "db"),
            username: m.field(cx, "username"),
            password: m.field(cx, "password"),
            ssl: m.field(cx, "ssl"),
            exclusive_mode: m.field(cx, "exclusive_mode"),
            exchange_name: m.field(cx, "exchange_name"),
            vhost: m.field(cx, "vhost"),
            secure: m.field(cx, "secure"),
            client_kwargs: m.field(cx, "client_kwargs"),
            raise_exceptions: m.field(cx, "raise_exceptions"),
            use_ssl: m.field(cx, "use_ssl"),
            internal_host: m.field(cx, "internal_host"),
            internal_port: m.field(cx, "internal_port"),
            aws_region: m.field(cx, "aws_region"),
            aws_access_key_id: m.field(cx, "aws_access_key_id"),
            aws_secret_access_key: m.field(cx, "aws_secret_access_key"),
            vpn_name: m.field(cx, "vpn_name"),
            host_secured: m.field(cx, "host_secured"),
            is_queue_temporary: m.field(cx, "is_queue_temporary"),
        };
        m.finish(cx, false);
        Some(raw)
    }
}

/// A command: a string run by `/bin/sh -c`, or a program and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

impl Decode for RawCommand {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        match &node.value {
            Value::Seq(_) => Vec::<String>::decode(node, cx).map(RawCommand::Argv),
            _ => String::decode(node, cx).map(RawCommand::Shell),
        }
    }
}

impl JsonSchema for RawCommand {
    fn schema_name() -> Cow<'static, str> {
        "Command".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A command line run by `/bin/sh -c`, or a list of a program and its arguments run directly.",
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string"}, "minItems": 1}
            ],
            "examples": ["python3 echo.py", ["python3", "echo.py"]]
        })
    }
}

/// One command or a list of commands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawCommands(pub(crate) Vec<Located<RawCommand>>);

impl Decode for RawCommands {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        match &node.value {
            Value::Seq(_) => Vec::<Located<RawCommand>>::decode(node, cx).map(RawCommands),
            _ => Located::<RawCommand>::decode(node, cx).map(|c| RawCommands(vec![c])),
        }
    }
}

impl JsonSchema for RawCommands {
    fn schema_name() -> Cow<'static, str> {
        "Commands".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let command = generator.subschema_for::<RawCommand>();
        json_schema!({
            "description": "One command, or a list of commands run in order.",
            "anyOf": [
                command,
                {"type": "array", "items": command}
            ],
            "examples": [["pip install -r requirements.txt", "make"]]
        })
    }
}

macro_rules! keyword {
    ($(#[$doc:meta])* $name:ident, $schema:literal, $what:literal, { $($(#[$vdoc:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
        #[schemars(rename = $schema)]
        pub(crate) enum $name {
            $($(#[$vdoc])* #[schemars(rename = $word)] $variant),+
        }

        impl Keyword for $name {
            const WHAT: &'static str = $what;
            const ALL: &'static [(&'static str, Self)] = &[$(($word, Self::$variant)),+];
        }
    };
}

keyword!(
    /// The kind of a source.
    SourceType, "SourceType", "a source type", {
        /// A folder next to the deployment file.
        Local = "local",
        /// A git repository.
        Git = "git",
        /// llama_deploy's docker source: not supported.
        Docker = "docker",
    }
);

keyword!(
    /// What a sync does with a folder that exists already.
    SyncPolicy, "SyncPolicy", "a sync policy", {
        /// Replace the folder with the new tree.
        Replace = "replace",
        /// Copy the new tree over the folder, keeping files it does not have.
        Merge = "merge",
        /// Keep the folder as it is.
        Skip = "skip",
        /// Fail the sync.
        Fail = "fail",
    }
);

keyword!(
    /// How a service's process is started.
    Runtime, "Runtime", "a runtime", {
        /// A llama-index workflow served by deployd's Python adapter.
        Python = "python",
        /// Any command speaking the service protocol.
        Process = "process",
    }
);

keyword!(
    /// When a service's process is restarted.
    RestartPolicy, "RestartPolicy", "a restart policy", {
        /// Whenever it exits.
        Always = "always",
        /// When it exits with a failure (non-zero status or a signal).
        OnFailure = "on-failure",
        /// Never.
        Never = "never",
    }
);

keyword!(
    /// The kind of a message queue.
    QueueType, "QueueType", "a message queue type", {
        /// deployd's embedded queue (llama_deploy's in-process queue).
        Simple = "simple",
        /// Redis.
        Redis = "redis",
        /// RabbitMQ.
        RabbitMq = "rabbitmq",
        /// Kafka.
        Kafka = "kafka",
        /// NATS JetStream.
        Nats = "nats",
        /// AWS SNS/SQS.
        Aws = "aws",
        /// llama_deploy's Solace queue: not supported.
        Solace = "solace",
    }
);

/// The mapping kinds [`MapReader`] reads, and the name of their schema definitions.
#[cfg(test)]
pub(crate) const SCHEMA_NAMES: &[(&str, &str)] = &[
    ("deployment", "Deployment"),
    ("service", "Service"),
    ("source", "Source"),
    ("health check", "Health"),
    ("restart policy", "Restart"),
    ("backoff", "Backoff"),
    ("control-plane", "ControlPlane"),
    ("message-queue", "MessageQueue"),
];
