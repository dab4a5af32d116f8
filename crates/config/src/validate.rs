//! From the file as written to a [`DeploymentSpec`]: every rule, every problem reported.
//!
//! A message about a value shows it with [`Located::shown`] / [`At::show`]: a value written
//! with `${` is shown as written, never as what the variable expanded to.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::rc::Rc;
use std::time::Duration;

use crate::decode::{At, Cx, KeyPath, Keyword, Located, list, suggest};
use crate::diagnostic::Severity;
use crate::raw::{
    Field, QueueType, RawCommand, RawCommands, RawControlPlane, RawDeployment, RawMessageQueue,
    RawRestart, RawService, RawSource, RestartPolicy as RawRestartPolicy, Runtime as RawRuntime,
    SourceType, SyncPolicy as RawSyncPolicy,
};
use crate::spec::{
    Command, DeploymentSpec, HealthSpec, MessageQueueSpec, RestartPolicy, RestartSpec, Runtime,
    ServiceSpec, SourceKind, SourceSpec, StateStoreSpec, SyncPolicy, UiSpec,
};
use crate::yaml::Span;

/// The default port of llama_deploy's UI.
const UI_PORT: u16 = 3000;
/// The most replicas of one service.
const MAX_REPLICAS: i64 = 64;

struct Checker<'c, 'a> {
    cx: &'c mut Cx<'a>,
}

impl Checker<'_, '_> {
    fn report(
        &mut self,
        severity: Severity,
        at: &At,
        on_key: bool,
        message: String,
        help: Option<String>,
    ) {
        let span = if on_key {
            at.key_span.unwrap_or(at.span)
        } else {
            at.span
        };
        self.cx
            .report_at(severity, &at.path.to_string(), span, message, help);
    }

    /// An error at the value.
    fn error(&mut self, at: &At, message: String) {
        self.report(Severity::Error, at, false, message, None);
    }

    /// An error at the value, with a hint.
    fn error_help(&mut self, at: &At, message: String, help: String) {
        self.report(Severity::Error, at, false, message, Some(help));
    }

    /// An error at the key.
    fn error_key(&mut self, at: &At, message: String) {
        self.report(Severity::Error, at, true, message, None);
    }

    /// Whether an error was reported at `path` or under it.
    fn error_under(&self, path: &str) -> bool {
        self.cx.error_under(path)
    }

    /// Whether an unknown key in the mapping at `parent` was reported as a likely typo of
    /// `key`: then `key` missing is not news.
    fn suggested(&self, parent: &str, key: &str) -> bool {
        self.cx.suggested(parent, key)
    }

    /// How many errors were reported so far.
    fn errors(&self) -> usize {
        self.cx.errors()
    }

    /// A warning at the key.
    fn warning_key(&mut self, at: &At, message: String) {
        self.report(Severity::Warning, at, true, message, None);
    }
}

pub(crate) fn validate(raw: RawDeployment, root: Span, cx: &mut Cx<'_>) -> Option<DeploymentSpec> {
    let mut c = Checker { cx };
    let document = At {
        path: KeyPath::new(""),
        span: Span {
            end_line: root.line,
            end_column: root.column,
            ..root
        },
        key_span: None,
        written: None,
    };

    let name = match raw.name {
        Some(name) => {
            if let Err(reason) = check_name(&name.value) {
                c.error(
                    &name.at,
                    format!("invalid deployment name `{}`: {reason}", name.shown()),
                );
            }
            Some(name.value)
        }
        None if c.error_under("name") || c.suggested("", "name") => None,
        None => {
            let at = At {
                path: KeyPath::new("name"),
                ..document.clone()
            };
            c.error(&at, "missing `name`: a deployment needs a name".to_owned());
            None
        }
    };

    let has_state_store = raw.state_store.is_some();
    let mut state_store = raw.state_store.and_then(|store| state_store(&mut c, store));
    if let Some(control_plane) = raw.control_plane {
        check_control_plane(
            &mut c,
            control_plane.value,
            &mut state_store,
            has_state_store,
        );
    }
    let message_queue = raw
        .message_queue
        .and_then(|queue| message_queue(&mut c, queue.value, &queue.at));

    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    let mut services = Vec::new();
    match raw.services {
        Some(list) if !list.value.0.is_empty() => {
            for (id, service) in list.value.0 {
                let Some(service) = service else { continue };
                if let Some(spec) = check_service(&mut c, id, service, &mut ports) {
                    services.push(spec);
                }
            }
        }
        Some(list) => {
            if !c.error_under("services") {
                c.error_key(
                    &list.at,
                    "a deployment needs at least one service".to_owned(),
                );
            }
        }
        None if c.suggested("", "services") || c.error_under("services") => {}
        None => {
            let at = At {
                path: KeyPath::new("services"),
                ..document
            };
            c.error(
                &at,
                "missing `services`: a deployment needs at least one service".to_owned(),
            );
        }
    }

    let ui = raw.ui.and_then(|ui| check_ui(&mut c, ui, &mut ports));

    let first = services
        .first()
        .map(|s: &ServiceSpec| s.id.clone())
        .unwrap_or_default();
    let default_service = match raw.default_service {
        Some(wanted) if services.iter().any(|s| s.id == wanted.value) => wanted.value,
        // Without services there is nothing to fall back to; that error is reported already.
        Some(_) if services.is_empty() => first,
        Some(wanted) => {
            let ids: Vec<&str> = services.iter().map(|s| s.id.as_str()).collect();
            let shown = wanted.shown();
            let help = suggest(&shown, &ids).map(|best| format!("did you mean `{best}`?"));
            c.report(
                Severity::Warning,
                &wanted.at,
                false,
                format!("`default-service` names no service (`{shown}`); `{first}` is used"),
                help,
            );
            first
        }
        None => first,
    };

    Some(DeploymentSpec {
        name: name?,
        default_service,
        services,
        message_queue,
        state_store,
        ui,
    })
}

fn check_control_plane(
    c: &mut Checker<'_, '_>,
    raw: RawControlPlane,
    state_store: &mut Option<StateStoreSpec>,
    has_state_store: bool,
) {
    let ignored: [(&str, Option<&At>); 12] = [
        ("port", raw.port.as_ref().map(|f| &f.at)),
        ("host", raw.host.as_ref().map(|f| &f.at)),
        ("internal_host", raw.internal_host.as_ref().map(|f| &f.at)),
        ("internal_port", raw.internal_port.as_ref().map(|f| &f.at)),
        ("running", raw.running.as_ref().map(|f| &f.at)),
        ("cors_origins", raw.cors_origins.as_ref().map(|f| &f.at)),
        (
            "topic_namespace",
            raw.topic_namespace.as_ref().map(|f| &f.at),
        ),
        ("use_tls", raw.use_tls.as_ref().map(|f| &f.at)),
        ("step_interval", raw.step_interval.as_ref().map(|f| &f.at)),
        (
            "services_store_key",
            raw.services_store_key.as_ref().map(|f| &f.at),
        ),
        (
            "tasks_store_key",
            raw.tasks_store_key.as_ref().map(|f| &f.at),
        ),
        (
            "session_store_key",
            raw.session_store_key.as_ref().map(|f| &f.at),
        ),
    ];
    for (key, at) in ignored {
        if let Some(at) = at {
            c.warning_key(
                at,
                format!("`{key}` is ignored: deployd serves the control plane itself"),
            );
        }
    }
    if let Some(uri) = raw.state_store_uri {
        let value = uri.value.trim();
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            if has_state_store {
                c.warning_key(
                    &uri.at,
                    "`state_store_uri` is ignored: `state-store` is given".to_owned(),
                );
            } else {
                *state_store = Some(StateStoreSpec::Postgres {
                    url: value.to_owned(),
                });
            }
        } else {
            c.warning_key(
                &uri.at,
                format!(
                    "state store `{}` is not supported and ignored; use `state-store` with `sqlite:` or `postgres://`",
                    uri.at.show(scheme_of(value))
                ),
            );
        }
    }
}

/// The path of a `sqlite:PATH` (or `sqlite://PATH`) state store.
fn sqlite_path(store: &str) -> Option<&str> {
    let path = store.strip_prefix("sqlite:")?;
    Some(path.strip_prefix("//").unwrap_or(path))
}

fn scheme_of(url: &str) -> &str {
    url.split_once("://").map_or(url, |(scheme, _)| scheme)
}

fn state_store(c: &mut Checker<'_, '_>, store: Located<String>) -> Option<StateStoreSpec> {
    let value = store.value.trim();
    if value.starts_with("postgres://") || value.starts_with("postgresql://") {
        return Some(StateStoreSpec::Postgres {
            url: value.to_owned(),
        });
    }
    if let Some(path) = sqlite_path(value) {
        return match check_relative_path(path) {
            Ok(()) => Some(StateStoreSpec::Sqlite {
                path: path.to_owned(),
            }),
            Err(reason) => {
                let shown = match store.at.written.as_deref() {
                    Some(written) => sqlite_path(written.trim()).unwrap_or(written),
                    None => path,
                };
                c.error(&store.at, format!("the SQLite path `{shown}` {reason}"));
                None
            }
        };
    }
    c.error_help(
        &store.at,
        format!("`{}` is not a state store", store.at.show(value)),
        "write `sqlite:PATH`, relative to the deployment's data directory, or a `postgres://` URL"
            .to_owned(),
    );
    None
}

/// The keys each message queue type takes; those marked `false` are accepted and ignored.
fn queue_keys(kind: QueueType) -> &'static [(&'static str, bool)] {
    match kind {
        QueueType::Simple => &[
            ("host", false),
            ("port", false),
            ("client_kwargs", false),
            ("raise_exceptions", false),
            ("use_ssl", false),
            ("internal_host", false),
            ("internal_port", false),
        ],
        QueueType::Redis => &[
            ("url", true),
            ("host", true),
            ("port", true),
            ("db", true),
            ("username", true),
            ("password", true),
            ("ssl", true),
            ("exclusive_mode", true),
        ],
        QueueType::RabbitMq => &[
            ("url", true),
            ("exchange_name", true),
            ("username", true),
            ("password", true),
            ("host", true),
            ("port", true),
            ("vhost", true),
            ("secure", true),
        ],
        QueueType::Kafka => &[("url", true), ("host", true), ("port", true)],
        QueueType::Nats => &[
            ("url", true),
            ("host", true),
            ("port", true),
            ("username", true),
            ("password", true),
        ],
        QueueType::Aws => &[
            ("aws_region", true),
            ("aws_access_key_id", true),
            ("aws_secret_access_key", true),
        ],
        QueueType::Solace => &[
            ("host", false),
            ("vpn_name", false),
            ("username", false),
            ("password", false),
            ("host_secured", false),
            ("is_queue_temporary", false),
        ],
    }
}

fn at_of<T>(field: &Field<T>) -> Option<&At> {
    field.as_ref().map(|f| &f.at)
}

fn text_of(field: &Field<String>) -> Option<&str> {
    field.as_ref().map(|f| f.value.as_str())
}

fn message_queue(
    c: &mut Checker<'_, '_>,
    raw: RawMessageQueue,
    at: &At,
) -> Option<MessageQueueSpec> {
    let Some(kind) = raw.kind else {
        if !c.error_under(&format!("{}.type", at.path)) {
            let words: Vec<&str> = QueueType::ALL.iter().map(|(w, _)| *w).collect();
            c.report(
                Severity::Error,
                at,
                true,
                "`message-queue` needs a `type`".to_owned(),
                Some(format!("use one of {}", list(&words))),
            );
        }
        return None;
    };
    let kind_word = kind.value.word();
    let present: [(&str, Option<&At>); 22] = [
        ("url", at_of(&raw.url)),
        ("host", at_of(&raw.host)),
        ("port", at_of(&raw.port)),
        ("db", at_of(&raw.db)),
        ("username", at_of(&raw.username)),
        ("password", at_of(&raw.password)),
        ("ssl", at_of(&raw.ssl)),
        ("exclusive_mode", at_of(&raw.exclusive_mode)),
        ("exchange_name", at_of(&raw.exchange_name)),
        ("vhost", at_of(&raw.vhost)),
        ("secure", at_of(&raw.secure)),
        ("client_kwargs", at_of(&raw.client_kwargs)),
        ("raise_exceptions", at_of(&raw.raise_exceptions)),
        ("use_ssl", at_of(&raw.use_ssl)),
        ("internal_host", at_of(&raw.internal_host)),
        ("internal_port", at_of(&raw.internal_port)),
        ("aws_region", at_of(&raw.aws_region)),
        ("aws_access_key_id", at_of(&raw.aws_access_key_id)),
        ("aws_secret_access_key", at_of(&raw.aws_secret_access_key)),
        ("vpn_name", at_of(&raw.vpn_name)),
        ("host_secured", at_of(&raw.host_secured)),
        ("is_queue_temporary", at_of(&raw.is_queue_temporary)),
    ];
    let allowed = queue_keys(kind.value);
    let names: Vec<&str> = allowed.iter().map(|(k, _)| *k).collect();
    let mut failed = false;
    for (key, key_at) in present {
        let Some(key_at) = key_at else { continue };
        match allowed.iter().find(|(k, _)| *k == key) {
            Some((_, true)) => {}
            Some((_, false)) => {
                if kind.value != QueueType::Solace {
                    c.warning_key(
                        key_at,
                        format!("`{key}` of the `{kind_word}` queue is ignored: deployd runs this queue in process"),
                    );
                }
            }
            None => {
                failed = true;
                let help = match suggest(key, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None if names.is_empty() => {
                        format!("a `{kind_word}` queue takes no keys besides `type`")
                    }
                    None => format!("the keys of a `{kind_word}` queue are {}", list(&names)),
                };
                c.report(
                    Severity::Error,
                    key_at,
                    true,
                    format!("`{key}` is not a key of a `{kind_word}` message queue"),
                    Some(help),
                );
            }
        }
    }
    let port = match &raw.port {
        Some(port) => match check_port(c, port) {
            Some(port) => Some(port),
            None => {
                failed = true;
                None
            }
        },
        None => None,
    };
    let db = match &raw.db {
        Some(db) if db.value < 0 => {
            c.error(
                &db.at,
                format!("the redis database `{}` is negative", db.shown()),
            );
            failed = true;
            None
        }
        Some(db) => Some(db.value),
        None => None,
    };
    if failed {
        return None;
    }
    let host = text_of(&raw.host);
    let flag = |f: &Field<bool>| f.as_ref().is_some_and(|f| f.value);
    let credentials = auth(text_of(&raw.username), text_of(&raw.password));
    if let (Some(url), Some(_)) = (&raw.url, host)
        && kind.value != QueueType::Simple
    {
        c.warning_key(
            &url.at,
            "`url` is ignored: the URL is built from `host`, `port` and the credentials, as llama_deploy does".to_owned(),
        );
    }
    let url_or = |default: &str| text_of(&raw.url).unwrap_or(default).to_owned();
    Some(match kind.value {
        QueueType::Simple => MessageQueueSpec::Simple,
        QueueType::Redis => MessageQueueSpec::Redis {
            url: match host {
                Some(host) => format!(
                    "{}://{credentials}{host}:{}/{}",
                    if flag(&raw.ssl) { "rediss" } else { "redis" },
                    port.unwrap_or(6379),
                    db.map(|d| d.to_string()).unwrap_or_default()
                ),
                None => url_or("redis://localhost:6379"),
            },
            exclusive_mode: flag(&raw.exclusive_mode),
        },
        QueueType::RabbitMq => MessageQueueSpec::RabbitMq {
            url: match host {
                Some(host) => format!(
                    "{}://{credentials}{host}:{}/{}",
                    if flag(&raw.secure) { "amqps" } else { "amqp" },
                    port.unwrap_or(5672),
                    percent_encode(text_of(&raw.vhost).unwrap_or(""))
                ),
                None => url_or("amqp://guest:guest@localhost/"),
            },
            exchange: text_of(&raw.exchange_name)
                .unwrap_or("llama-deploy")
                .to_owned(),
        },
        QueueType::Kafka => MessageQueueSpec::Kafka {
            url: match host {
                Some(host) => format!("{host}:{}", port.unwrap_or(9092)),
                None => url_or("localhost:9092"),
            },
        },
        QueueType::Nats => MessageQueueSpec::Nats {
            url: match host {
                Some(host) => format!("nats://{credentials}{host}:{}", port.unwrap_or(4222)),
                None => url_or("nats://localhost:4222"),
            },
        },
        QueueType::Aws => MessageQueueSpec::Aws {
            region: text_of(&raw.aws_region).unwrap_or("us-east-1").to_owned(),
            access_key_id: text_of(&raw.aws_access_key_id)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
            secret_access_key: text_of(&raw.aws_secret_access_key)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
        },
        QueueType::Solace => {
            c.warning_key(
                &kind.at,
                "the `solace` message queue is not supported; deployd's embedded queue is used"
                    .to_owned(),
            );
            return None;
        }
    })
}

/// `user:password@` for a URL, each part percent-encoded.
fn auth(username: Option<&str>, password: Option<&str>) -> String {
    match (username, password) {
        (Some(user), Some(password)) => {
            format!("{}:{}@", percent_encode(user), percent_encode(password))
        }
        (Some(user), None) => format!("{}@", percent_encode(user)),
        (None, Some(password)) => format!(":{}@", percent_encode(password)),
        (None, None) => String::new(),
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn check_port(c: &mut Checker<'_, '_>, port: &Located<i64>) -> Option<u16> {
    match u16::try_from(port.value) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            c.error_help(
                &port.at,
                format!("port {} is outside 1..65535", port.shown()),
                "leave `port` out to let deployd choose a free port".to_owned(),
            );
            None
        }
    }
}

fn claim_port(
    c: &mut Checker<'_, '_>,
    port: &Located<i64>,
    owner: &str,
    ports: &mut BTreeMap<u16, String>,
) -> Option<u16> {
    let value = check_port(c, port)?;
    if let Some(other) = ports.get(&value) {
        c.error(
            &port.at,
            format!("port {} is already used by {other}", port.at.show(value)),
        );
        return None;
    }
    ports.insert(value, owner.to_owned());
    Some(value)
}

fn check_service(
    c: &mut Checker<'_, '_>,
    id: Located<String>,
    raw: RawService,
    ports: &mut BTreeMap<u16, String>,
) -> Option<ServiceSpec> {
    let errors_before = c.errors();
    if let Err(reason) = check_name(&id.value) {
        c.error_key(
            &id.at,
            format!("invalid service id `{}`: {reason}", id.value),
        );
    }
    let source = raw
        .source
        .and_then(|source| check_source(c, source.value, &source.at));

    let import_path = raw.import_path.and_then(|path| {
        let file = path
            .value
            .split_once(':')
            .map_or(path.value.as_str(), |(file, _)| file);
        match check_relative_path(file) {
            Ok(()) => Some(path.value),
            Err(reason) => {
                c.error(
                    &path.at,
                    format!("the import path `{}` {reason}", path.shown()),
                );
                None
            }
        }
    });
    let (command, build) = check_commands(c, raw.command, raw.build);

    let runtime = match raw.runtime {
        Some(runtime) => {
            match (runtime.value, &import_path, &command) {
                (RawRuntime::Python, None, _) => c.error_key(
                    &runtime.at,
                    format!(
                        "service `{}` has runtime `python` and no `import-path` to a workflow",
                        id.value
                    ),
                ),
                (RawRuntime::Process, _, None) => c.error_key(
                    &runtime.at,
                    format!(
                        "service `{}` has runtime `process` and no `command`",
                        id.value
                    ),
                ),
                _ => {}
            }
            match runtime.value {
                RawRuntime::Python => Runtime::Python,
                RawRuntime::Process => Runtime::Process,
            }
        }
        None if import_path.is_some() => Runtime::Python,
        None => {
            let reported = ["command", "import-path", "runtime"].iter().any(|key| {
                c.error_under(&format!("{}.{key}", id.at.path))
                    || c.suggested(&id.at.path.to_string(), key)
            });
            if command.is_none() && !reported {
                c.report(
                    Severity::Error,
                    &id.at,
                    true,
                    format!(
                        "service `{}` has neither a `command` nor an `import-path`",
                        id.value
                    ),
                    Some(
                        "add `command: ./start.sh` to run a program, or `import-path: src/workflow:flow` to serve a llama-index workflow"
                            .to_owned(),
                    ),
                );
            }
            Runtime::Process
        }
    };

    let replicas = match &raw.replicas {
        Some(replicas) if (1..=MAX_REPLICAS).contains(&replicas.value) => {
            u32::try_from(replicas.value).unwrap_or(1)
        }
        Some(replicas) => {
            c.error(
                &replicas.at,
                format!(
                    "`replicas` is {}; use 1 to {MAX_REPLICAS}",
                    replicas.shown()
                ),
            );
            1
        }
        None => 1,
    };
    let port = raw.port.and_then(|port| {
        let value = claim_port(c, &port, &format!("service `{}`", id.value), ports)?;
        if replicas > 1 {
            let replicas = raw
                .replicas
                .as_ref()
                .map_or(replicas.to_string(), Located::shown);
            c.error_help(
                &port.at,
                format!(
                    "port {} cannot be shared by {replicas} replicas",
                    port.at.show(value)
                ),
                "leave `port` out: deployd gives each replica its own".to_owned(),
            );
        }
        Some(value)
    });
    if let Some(host) = &raw.host {
        c.warning_key(
            &host.at,
            "`host` is ignored: services listen on 127.0.0.1".to_owned(),
        );
    }
    if let Some(ts) = &raw.ts_dependencies {
        c.warning_key(
            &ts.at,
            "`ts-dependencies` is accepted for llama_deploy compatibility and ignored".to_owned(),
        );
    }

    let mut health = HealthSpec::default();
    if let Some(raw_health) = raw.health {
        if let Some(path) = raw_health.value.path {
            if path.value.starts_with('/') && !path.value.contains(char::is_whitespace) {
                health.path = path.value;
            } else {
                c.error(
                    &path.at,
                    format!(
                        "the health path `{}` must start with `/` and have no spaces",
                        path.shown()
                    ),
                );
            }
        }
        if let Some(timeout) = raw_health.value.timeout {
            health.timeout = positive(c, timeout.value.0, &timeout.at, "the health timeout")
                .unwrap_or(health.timeout);
        }
    }
    let restart = raw
        .restart
        .map(|r| check_restart(c, r.value))
        .unwrap_or_default();
    let max_concurrency = raw
        .max_concurrency
        .and_then(|max| match u32::try_from(max.value) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                c.error(
                    &max.at,
                    format!("`max-concurrency` is {}; use at least 1", max.shown()),
                );
                None
            }
        });
    let timeout = raw
        .timeout
        .and_then(|t| positive(c, t.value.0, &t.at, "`timeout`"));

    let mut env = BTreeMap::new();
    for (name, value) in raw.env.map(|m| m.value.0).unwrap_or_default() {
        if name.value.is_empty() || name.value.contains(['=', '\0']) {
            c.error_key(
                &name.at,
                format!("invalid environment variable name `{}`", name.value),
            );
        } else if let Some(value) = value {
            if value.contains('\0') {
                c.error_key(
                    &name.at,
                    "an environment value cannot contain a NUL byte".to_owned(),
                );
            } else {
                env.insert(name.value, value);
            }
        }
    }
    let env_files = checked_paths(c, raw.env_files, "the env file", |_| true);
    let python_dependencies =
        checked_paths(c, raw.python_dependencies, "the dependency", is_path_like);

    let errors_after = c.errors();
    (errors_after == errors_before).then(|| ServiceSpec {
        id: id.value,
        name: raw.name.map(|n| n.value),
        source,
        import_path,
        command,
        port,
        env,
        runtime,
        build,
        replicas,
        health,
        restart,
        max_concurrency,
        timeout,
        env_files,
        python_dependencies,
    })
}

fn positive(c: &mut Checker<'_, '_>, duration: Duration, at: &At, what: &str) -> Option<Duration> {
    if duration.is_zero() {
        c.error(at, format!("{what} must be longer than zero"));
        None
    } else {
        Some(duration)
    }
}

fn check_restart(c: &mut Checker<'_, '_>, raw: RawRestart) -> RestartSpec {
    let mut spec = RestartSpec::default();
    if let Some(policy) = raw.policy {
        spec.policy = match policy.value {
            RawRestartPolicy::Always => RestartPolicy::Always,
            RawRestartPolicy::OnFailure => RestartPolicy::OnFailure,
            RawRestartPolicy::Never => RestartPolicy::Never,
        };
    }
    if let Some(backoff) = raw.backoff {
        let backoff_at = backoff.at;
        // How each is shown: as written when it came from a variable.
        let mut initial_shown = None;
        let mut max_shown = None;
        if let Some(initial) = backoff.value.initial {
            spec.backoff_initial = positive(c, initial.value.0, &initial.at, "the initial backoff")
                .unwrap_or(spec.backoff_initial);
            initial_shown = initial.at.written;
        }
        if let Some(max) = backoff.value.max {
            spec.backoff_max = max.value.0;
            max_shown = max.at.written;
        }
        if spec.backoff_max < spec.backoff_initial {
            let shown = |written: Option<Rc<str>>, value: Duration| {
                written.map_or_else(|| format!("{value:?}"), |w| w.to_string())
            };
            c.error_key(
                &backoff_at,
                format!(
                    "the backoff's `max` ({}) is shorter than its `initial` ({})",
                    shown(max_shown, spec.backoff_max),
                    shown(initial_shown, spec.backoff_initial)
                ),
            );
        }
    }
    if let Some(max) = raw.max_restarts {
        match u32::try_from(max.value) {
            Ok(n) => spec.max_restarts = n,
            Err(_) => c.error(
                &max.at,
                format!("`max-restarts` is {}; use 0 or more", max.shown()),
            ),
        }
    }
    if let Some(window) = raw.window {
        spec.window =
            positive(c, window.value.0, &window.at, "the restart window").unwrap_or(spec.window);
    }
    spec
}

/// A service's (or the UI's) `command` and `build`.
fn check_commands(
    c: &mut Checker<'_, '_>,
    command: Option<Located<RawCommand>>,
    build: Option<Located<RawCommands>>,
) -> (Option<Command>, Vec<Command>) {
    let command = command.and_then(|command| check_command(c, command.value, &command.at));
    let build = build
        .map(|build| {
            let RawCommands(list) = build.value;
            list.into_iter()
                .filter_map(|command| check_command(c, command.value, &command.at))
                .collect()
        })
        .unwrap_or_default();
    (command, build)
}

fn check_command(c: &mut Checker<'_, '_>, command: RawCommand, at: &At) -> Option<Command> {
    match command {
        RawCommand::Shell(line) if line.trim().is_empty() => {
            c.error(at, "the command is empty".to_owned());
            None
        }
        RawCommand::Argv(argv) if argv.first().is_none_or(|p| p.is_empty()) => {
            c.error(at, "the command needs a program to run".to_owned());
            None
        }
        RawCommand::Shell(line) if line.contains('\0') => {
            c.error(at, "the command contains a NUL byte".to_owned());
            None
        }
        RawCommand::Argv(argv) if argv.iter().any(|a| a.contains('\0')) => {
            c.error(at, "the command contains a NUL byte".to_owned());
            None
        }
        RawCommand::Shell(line) => Some(Command::Shell(line)),
        RawCommand::Argv(argv) => Some(Command::Argv(argv)),
    }
}

/// Checks that the entries of a list that are paths stay inside the deployment's folder.
fn checked_paths(
    c: &mut Checker<'_, '_>,
    field: Field<Vec<Located<String>>>,
    what: &str,
    is_path: fn(&str) -> bool,
) -> Vec<String> {
    let Some(field) = field else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(field.value.len());
    for entry in field.value {
        if entry.value.trim().is_empty() {
            c.error(&entry.at, format!("{what} is empty"));
        } else if is_path(&entry.value)
            && let Err(reason) = check_relative_path(&entry.value)
        {
            c.error_help(
                &entry.at,
                format!("{what} `{}` {reason}", entry.shown()),
                "files must stay inside the deployment's folder".to_owned(),
            );
        } else {
            out.push(entry.value);
        }
    }
    out
}

/// A python dependency that names a file or folder (not a requirement spec or a URL).
fn is_path_like(dependency: &str) -> bool {
    let dependency = dependency.trim();
    if dependency.contains("://") {
        return false;
    }
    dependency.starts_with(['.', '/', '~'])
        || dependency.ends_with(".txt")
        || (dependency.contains('/')
            && !dependency.contains(['<', '>', '=', '!', ';', '@', ' ', '[']))
}

fn check_source(c: &mut Checker<'_, '_>, raw: RawSource, at: &At) -> Option<SourceSpec> {
    let location = match (raw.location, raw.name) {
        (Some(location), None) | (None, Some(location)) => location,
        (Some(_), Some(name)) => {
            c.error_key(
                &name.at,
                "`source` has both `location` and its older spelling `name`; keep one".to_owned(),
            );
            return None;
        }
        (None, None) => {
            let path = &at.path.to_string();
            if !c.error_under(&format!("{path}.location"))
                && !c.error_under(&format!("{path}.name"))
                && !c.suggested(path, "location")
            {
                c.error_key(at, "`source` needs a `location`".to_owned());
            }
            return None;
        }
    };
    let Some(kind) = raw.kind else {
        if !c.error_under(&format!("{}.type", at.path)) {
            c.report(
                Severity::Error,
                at,
                true,
                "`source` needs a `type`".to_owned(),
                Some("use `type: local` or `type: git`".to_owned()),
            );
        }
        return None;
    };
    let sync_policy = match raw.sync_policy.map(|p| p.value) {
        None | Some(RawSyncPolicy::Replace) => SyncPolicy::Replace,
        Some(RawSyncPolicy::Merge) => SyncPolicy::Merge,
        Some(RawSyncPolicy::Skip) => SyncPolicy::Skip,
        Some(RawSyncPolicy::Fail) => SyncPolicy::Fail,
    };
    match kind.value {
        SourceType::Local => {
            if let Some(reference) = &raw.reference {
                c.error_key(
                    &reference.at,
                    "`ref` is for git sources; a local source has none".to_owned(),
                );
                return None;
            }
            if let Err(reason) = check_relative_path(&location.value) {
                c.error_help(
                    &location.at,
                    format!("local source `{}` {reason}", location.shown()),
                    "a local source is a folder inside the deployment's folder".to_owned(),
                );
                return None;
            }
            Some(SourceSpec {
                kind: SourceKind::Local,
                location: location.value,
                reference: None,
                sync_policy,
            })
        }
        SourceType::Git => {
            let (url, reference) = match raw.reference {
                // With an explicit `ref`, the location is taken as it is.
                Some(reference) => (
                    location.value.clone(),
                    Some((reference.value, reference.at)),
                ),
                None => {
                    let (url, reference) = split_git_ref(&location.value);
                    (
                        url.to_owned(),
                        reference.map(|r| (r.to_owned(), location.at.clone())),
                    )
                }
            };
            // A location written with `${` is shown as written, split the same way.
            let written_split = location.at.written.as_deref().map(split_git_ref);
            if let Err(reason) = check_git_url(&url) {
                let shown = match written_split {
                    Some((url, _)) => url.to_owned(),
                    None => url.clone(),
                };
                c.error(&location.at, format!("git URL `{shown}` {reason}"));
                return None;
            }
            if let Some((reference, at)) = &reference
                && let Err(reason) = check_ref(reference)
            {
                let message = if reference.is_empty() {
                    "the git location ends in `@` but names no branch, tag or commit".to_owned()
                } else {
                    let shown = match (&at.written, written_split) {
                        (Some(_), Some((_, Some(written)))) if at == &location.at => {
                            written.to_owned()
                        }
                        _ => at.show(reference),
                    };
                    format!("git ref `{shown}` {reason}")
                };
                c.error(at, message);
                return None;
            }
            Some(SourceSpec {
                kind: SourceKind::Git,
                location: url,
                reference: reference.map(|(r, _)| r),
                sync_policy,
            })
        }
        SourceType::Docker => {
            c.error_help(
                &kind.at,
                "docker sources are not supported".to_owned(),
                "use `type: git` or `type: local`".to_owned(),
            );
            None
        }
    }
}

fn check_ui(
    c: &mut Checker<'_, '_>,
    ui: Located<RawService>,
    ports: &mut BTreeMap<u16, String>,
) -> Option<UiSpec> {
    let raw = ui.value;
    let ignored: [(&str, Option<&At>); 12] = [
        ("import-path", at_of(&raw.import_path)),
        ("runtime", at_of(&raw.runtime)),
        ("host", at_of(&raw.host)),
        ("replicas", at_of(&raw.replicas)),
        ("health", at_of(&raw.health)),
        ("restart", at_of(&raw.restart)),
        ("max-concurrency", at_of(&raw.max_concurrency)),
        ("timeout", at_of(&raw.timeout)),
        ("env", at_of(&raw.env)),
        ("env-files", at_of(&raw.env_files)),
        ("python-dependencies", at_of(&raw.python_dependencies)),
        ("ts-dependencies", at_of(&raw.ts_dependencies)),
    ];
    for (key, at) in ignored {
        if let Some(at) = at {
            c.warning_key(at, format!("`{key}` is ignored for `ui`"));
        }
    }
    let errors_before = c.errors();
    let port = match &raw.port {
        Some(port) => claim_port(c, port, "`ui`", ports),
        None if ports.contains_key(&UI_PORT) => {
            c.error_key(
                &ui.at,
                format!(
                    "the UI's default port {UI_PORT} is used by {}",
                    ports[&UI_PORT]
                ),
            );
            None
        }
        None => Some(UI_PORT),
    };
    let source = raw
        .source
        .and_then(|source| check_source(c, source.value, &source.at));
    let (command, build) = check_commands(c, raw.command, raw.build);
    let errors_after = c.errors();
    (errors_after == errors_before).then(|| UiSpec {
        name: raw.name.map(|n| n.value),
        port: port.unwrap_or(UI_PORT),
        source,
        build,
        command,
    })
}

/// Splits `url@ref` on the last `@` after the host part, so that `git@host:org/repo.git` and
/// `https://user:token@host/repo.git` keep their user.
pub(crate) fn split_git_ref(location: &str) -> (&str, Option<&str>) {
    let path_start = if let Some(scheme_end) = location.find("://") {
        let authority = scheme_end + 3;
        location[authority..]
            .find('/')
            .map_or(location.len(), |slash| authority + slash)
    } else {
        match (location.find(':'), location.find('/')) {
            // scp-like `[user@]host:path`: the path starts after the first `:`.
            (Some(colon), slash) if slash.is_none_or(|s| colon < s) => colon + 1,
            _ => 0,
        }
    };
    match location[path_start..].rfind('@') {
        Some(at) => {
            let split = path_start + at;
            (&location[..split], Some(&location[split + 1..]))
        }
        None => (location, None),
    }
}

fn check_git_url(url: &str) -> Result<(), &'static str> {
    if url.trim().is_empty() {
        return Err("is empty");
    }
    if url.starts_with('-') {
        return Err("starts with `-`");
    }
    let transport = url.find("::");
    if transport.is_some_and(|t| url.find("://").is_none_or(|s| t < s)) {
        return Err("uses a `transport::` address; use an https, ssh or git URL");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains a space or a control character");
    }
    Ok(())
}

/// A branch, tag or commit name git accepts (a conservative subset of `git check-ref-format`).
fn check_ref(reference: &str) -> Result<(), &'static str> {
    if reference.is_empty() {
        return Err("is empty");
    }
    if reference.len() > 255 {
        return Err("is longer than 255 characters");
    }
    if reference.starts_with(['-', '/', '.']) || reference.ends_with(['/', '.']) {
        return Err("starts or ends with `-`, `/` or `.`");
    }
    if reference.ends_with(".lock")
        || reference.contains("..")
        || reference.contains("@{")
        || reference.contains("//")
    {
        return Err("is not a valid git ref name");
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
    {
        return Err("contains a character git does not allow in a ref");
    }
    Ok(())
}

/// Names become URL path segments, topic names and directory names.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.contains("${") {
        return Err(
            "names cannot use variables: a name is a URL path segment and a directory name"
                .to_owned(),
        );
    }
    if name.len() > 63 {
        return Err("it is longer than 63 characters".to_owned());
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or a digit".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        let what = if c == ' ' {
            "a space".to_owned()
        } else {
            format!("`{}`", c.escape_default())
        };
        return Err(format!(
            "it contains {what}; use letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// A path that stays inside the folder it is relative to.
pub(crate) fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    if path.starts_with('~') {
        return Err("starts with `~`; write it relative to the deployment file");
    }
    let mut depth: usize = 0;
    for component in Path::new(path).components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err("is absolute; write it relative to the deployment file");
            }
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("escapes the deployment's folder")?;
            }
            Component::Normal(_) => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in ["src", "./src", "a/../b", ".", "a/b/../../c"] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok}");
        }
        for bad in ["../src", "/etc", "a/../../b", "", "../../etc", "~/x"] {
            assert!(check_relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "echo", "my_deployment", "QuickStart-2"] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "a.b", "a/b", "é", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn git_refs_split_on_the_last_at_after_the_host() {
        let cases = [
            (
                "https://github.com/org/repo.git",
                ("https://github.com/org/repo.git", None),
            ),
            (
                "https://github.com/org/repo.git@main",
                ("https://github.com/org/repo.git", Some("main")),
            ),
            (
                "https://user:tok@en@host/repo.git",
                ("https://user:tok@en@host/repo.git", None),
            ),
            (
                "https://user:token@host/repo.git@v1.2",
                ("https://user:token@host/repo.git", Some("v1.2")),
            ),
            (
                "git@github.com:org/repo.git",
                ("git@github.com:org/repo.git", None),
            ),
            (
                "git@github.com:org/repo.git@feature/x",
                ("git@github.com:org/repo.git", Some("feature/x")),
            ),
            (
                "ssh://git@host:22/repo.git@abc123",
                ("ssh://git@host:22/repo.git", Some("abc123")),
            ),
            ("https://host", ("https://host", None)),
            ("https://u@host", ("https://u@host", None)),
            ("/srv/repo.git@main", ("/srv/repo.git", Some("main"))),
            ("repo@", ("repo", Some(""))),
        ];
        for (input, expected) in cases {
            assert_eq!(split_git_ref(input), expected, "{input}");
        }
    }

    #[test]
    fn git_urls_and_refs() {
        assert!(check_git_url("ext::sh -c touch% /tmp/pwned").is_err());
        assert!(check_git_url("-uhttps://x").is_err());
        assert!(check_git_url("https://host/a::b").is_ok());
        assert!(check_ref("main").is_ok());
        assert!(check_ref("v1.2.3").is_ok());
        assert!(check_ref("0123abc").is_ok());
        for bad in ["", "-x", "a..b", "a b", "x.lock", "a@{1}", "/a", "a/"] {
            assert!(check_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_dependency_paths() {
        for path in ["requirements.txt", "./pkg", "../x", "/abs", "src/pkg", "."] {
            assert!(is_path_like(path), "{path}");
        }
        for spec in [
            "llama-index-core>=0.12",
            "httpx",
            "pkg @ https://x/y.whl",
            "git+https://h/r.git",
            "a[extra]",
        ] {
            assert!(!is_path_like(spec), "{spec}");
        }
    }
}
