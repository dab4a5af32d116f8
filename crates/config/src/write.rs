//! A [`DeploymentSpec`] written back as a deployment file that [`crate::parse`] reads into the
//! same spec.

use std::fmt::Write as _;

use crate::decode::{escape_interpolation, format_duration};
use crate::spec::{
    Command, DeploymentSpec, HealthSpec, MessageQueueSpec, RestartPolicy, RestartSpec, Runtime,
    ServiceSpec, SourceKind, SourceSpec, StateStoreSpec, SyncPolicy,
};

impl DeploymentSpec {
    /// The spec as a deployment file, every default written out; parsing it (with any
    /// environment) gives this spec back.
    ///
    /// ```
    /// let text = "name: demo\nservices:\n  echo:\n    command: ./echo\n";
    /// let spec = deployd_config::parse(text, "demo.yaml").unwrap().spec;
    /// let again = deployd_config::parse(&spec.to_yaml(), "again.yaml").unwrap().spec;
    /// assert_eq!(spec, again);
    /// ```
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "name: {}", value(&self.name));
        let _ = writeln!(out, "default-service: {}", value(&self.default_service));
        if let Some(queue) = &self.message_queue {
            write_queue(&mut out, queue);
        }
        if let Some(store) = &self.state_store {
            let text = match store {
                StateStoreSpec::Sqlite { path } => format!("sqlite:{path}"),
                StateStoreSpec::Postgres { url } => url.clone(),
            };
            let _ = writeln!(out, "state-store: {}", value(&text));
        }
        out.push_str("services:\n");
        for service in &self.services {
            write_service(&mut out, service);
        }
        if let Some(ui) = &self.ui {
            out.push_str("ui:\n");
            if let Some(name) = &ui.name {
                let _ = writeln!(out, "  name: {}", value(name));
            }
            let _ = writeln!(out, "  port: {}", ui.port);
            if let Some(source) = &ui.source {
                write_source(&mut out, "  ", source);
            }
            if let Some(command) = &ui.command {
                let _ = writeln!(out, "  command: {}", command_text(command));
            }
            if !ui.build.is_empty() {
                out.push_str("  build:\n");
                for command in &ui.build {
                    let _ = writeln!(out, "    - {}", command_text(command));
                }
            }
        }
        out
    }
}

fn write_queue(out: &mut String, queue: &MessageQueueSpec) {
    out.push_str("message-queue:\n");
    match queue {
        MessageQueueSpec::Simple => out.push_str("  type: simple\n"),
        MessageQueueSpec::Redis {
            url,
            exclusive_mode,
        } => {
            let _ = writeln!(out, "  type: redis\n  url: {}", value(url));
            let _ = writeln!(out, "  exclusive_mode: {exclusive_mode}");
        }
        MessageQueueSpec::RabbitMq { url, exchange } => {
            let _ = writeln!(out, "  type: rabbitmq\n  url: {}", value(url));
            let _ = writeln!(out, "  exchange_name: {}", value(exchange));
        }
        MessageQueueSpec::Kafka { url } => {
            let _ = writeln!(out, "  type: kafka\n  url: {}", value(url));
        }
        MessageQueueSpec::Nats { url } => {
            let _ = writeln!(out, "  type: nats\n  url: {}", value(url));
        }
        MessageQueueSpec::Aws {
            region,
            access_key_id,
            secret_access_key,
        } => {
            let _ = writeln!(out, "  type: aws\n  aws_region: {}", value(region));
            if let Some(id) = access_key_id {
                let _ = writeln!(out, "  aws_access_key_id: {}", value(id));
            }
            if let Some(secret) = secret_access_key {
                let _ = writeln!(out, "  aws_secret_access_key: {}", value(secret));
            }
        }
    }
}

fn write_service(out: &mut String, service: &ServiceSpec) {
    let _ = writeln!(out, "  {}:", quote(&service.id));
    let pad = "    ";
    if let Some(name) = &service.name {
        let _ = writeln!(out, "{pad}name: {}", value(name));
    }
    if let Some(source) = &service.source {
        write_source(out, pad, source);
    }
    if let Some(path) = &service.import_path {
        let _ = writeln!(out, "{pad}import-path: {}", value(path));
    }
    let runtime = match service.runtime {
        Runtime::Python => "python",
        Runtime::Process => "process",
    };
    let _ = writeln!(out, "{pad}runtime: {runtime}");
    if let Some(command) = &service.command {
        let _ = writeln!(out, "{pad}command: {}", command_text(command));
    }
    if !service.build.is_empty() {
        let _ = writeln!(out, "{pad}build:");
        for command in &service.build {
            let _ = writeln!(out, "{pad}  - {}", command_text(command));
        }
    }
    if let Some(port) = service.port {
        let _ = writeln!(out, "{pad}port: {port}");
    }
    let _ = writeln!(out, "{pad}replicas: {}", service.replicas);
    write_health(out, pad, &service.health);
    write_restart(out, pad, &service.restart);
    if let Some(max) = service.max_concurrency {
        let _ = writeln!(out, "{pad}max-concurrency: {max}");
    }
    if let Some(timeout) = service.timeout {
        let _ = writeln!(out, "{pad}timeout: {}", format_duration(timeout));
    }
    if !service.env.is_empty() {
        let _ = writeln!(out, "{pad}env:");
        for (name, text) in &service.env {
            let _ = writeln!(out, "{pad}  {}: {}", quote(name), value(text));
        }
    }
    for (key, list) in [
        ("env-files", &service.env_files),
        ("python-dependencies", &service.python_dependencies),
    ] {
        if !list.is_empty() {
            let _ = writeln!(out, "{pad}{key}: {}", flow_list(list));
        }
    }
}

fn write_source(out: &mut String, pad: &str, source: &SourceSpec) {
    let kind = match source.kind {
        SourceKind::Local => "local",
        SourceKind::Git => "git",
    };
    let policy = match source.sync_policy {
        SyncPolicy::Replace => "replace",
        SyncPolicy::Merge => "merge",
        SyncPolicy::Skip => "skip",
        SyncPolicy::Fail => "fail",
    };
    let _ = writeln!(out, "{pad}source:\n{pad}  type: {kind}");
    let _ = writeln!(out, "{pad}  location: {}", value(&source.location));
    if let Some(reference) = &source.reference {
        let _ = writeln!(out, "{pad}  ref: {}", value(reference));
    }
    let _ = writeln!(out, "{pad}  sync-policy: {policy}");
}

fn write_health(out: &mut String, pad: &str, health: &HealthSpec) {
    let _ = writeln!(out, "{pad}health:");
    let _ = writeln!(out, "{pad}  path: {}", value(&health.path));
    let _ = writeln!(out, "{pad}  timeout: {}", format_duration(health.timeout));
}

fn write_restart(out: &mut String, pad: &str, restart: &RestartSpec) {
    let policy = match restart.policy {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    };
    let _ = writeln!(
        out,
        "{pad}restart:\n{pad}  policy: {policy}\n{pad}  backoff:"
    );
    let _ = writeln!(
        out,
        "{pad}    initial: {}",
        format_duration(restart.backoff_initial)
    );
    let _ = writeln!(
        out,
        "{pad}    max: {}",
        format_duration(restart.backoff_max)
    );
    let _ = writeln!(out, "{pad}  max-restarts: {}", restart.max_restarts);
    let _ = writeln!(out, "{pad}  window: {}", format_duration(restart.window));
}

fn command_text(command: &Command) -> String {
    match command {
        Command::Shell(line) => value(line),
        Command::Argv(argv) => flow_list(argv),
    }
}

fn flow_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| value(item)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A string value: quoted, with `${` escaped so interpolation gives it back.
fn value(text: &str) -> String {
    quote(&escape_interpolation(text))
}

/// A YAML double-quoted scalar holding exactly `text`.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{FEFF}' | '\u{FFFE}' | '\u{FFFF}' | '\u{2028}' | '\u{2029}'
                ) =>
            {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence};

    use crate::spec::UiSpec;
    use crate::{
        Command, DeploymentSpec, HealthSpec, MessageQueueSpec, RestartPolicy, RestartSpec, Runtime,
        ServiceSpec, SourceKind, SourceSpec, StateStoreSpec, SyncPolicy, parse_with,
    };

    /// Any text without NUL, with the characters that need care in YAML and interpolation.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9 ./:_-]{0,12}",
            "\\PC{0,10}",
            prop::sample::select(vec![
                "${X}",
                "$${",
                "\"",
                "'",
                "\\",
                "# no comment",
                "<<",
                "true",
                "~",
                "null",
                "",
                " lead",
                "trail ",
                "a\nb",
                "tab\tbed",
                "\u{7f}\u{85}\u{feff}",
                "- x",
                "{a: 1}",
                "@",
                "x: y",
                "0x10",
                "1e3",
            ])
            .prop_map(str::to_owned),
        ]
        .prop_map(|s| s.replace('\0', ""))
    }

    fn non_blank() -> impl Strategy<Value = String> {
        text().prop_filter("not blank", |s| !s.trim().is_empty())
    }

    fn id() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9_-]{0,12}"
    }

    fn relative_path() -> impl Strategy<Value = String> {
        "[a-z0-9_]{1,6}(/[a-z0-9_. -]{1,6}){0,2}".prop_filter("no dot segments", |p| {
            crate::validate::check_relative_path(p).is_ok()
        })
    }

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (1u64..100_000).prop_map(Duration::from_millis),
            (1u64..u64::from(u32::MAX)).prop_map(Duration::from_nanos),
            (1u64..1_000_000).prop_map(Duration::from_secs),
        ]
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            non_blank().prop_map(Command::Shell),
            (non_blank(), prop::collection::vec(text(), 0..3)).prop_map(|(program, args)| {
                Command::Argv(std::iter::once(program).chain(args).collect())
            }),
        ]
    }

    fn source() -> impl Strategy<Value = SourceSpec> {
        let sync = prop::sample::select(vec![
            SyncPolicy::Replace,
            SyncPolicy::Merge,
            SyncPolicy::Skip,
            SyncPolicy::Fail,
        ]);
        let local =
            (relative_path(), sync.clone()).prop_map(|(location, sync_policy)| SourceSpec {
                kind: SourceKind::Local,
                location,
                reference: None,
                sync_policy,
            });
        let url = prop_oneof![
            "https://(user:tok@)?[a-z]{1,8}\\.com/[a-z]{1,6}/[a-z]{1,6}\\.git",
            "git@[a-z]{1,8}\\.com:[a-z]{1,6}/[a-z@]{1,6}\\.git",
            "ssh://git@[a-z]{1,6}:22/[a-z]{1,6}",
        ];
        let reference = prop::option::of("[a-zA-Z0-9_]{1,6}(/[a-z0-9]{1,4})?");
        let git = (url, reference, sync).prop_map(|(location, reference, sync_policy)| {
            // Without a `ref`, an `@` after the host would be read as one.
            let mut location = location;
            while reference.is_none() {
                match crate::validate::split_git_ref(&location) {
                    (url, Some(_)) => location = url.to_owned(),
                    (_, None) => break,
                }
            }
            SourceSpec {
                kind: SourceKind::Git,
                location,
                reference,
                sync_policy,
            }
        });
        prop_oneof![local, git]
    }

    fn restart() -> impl Strategy<Value = RestartSpec> {
        (
            prop::sample::select(vec![
                RestartPolicy::Always,
                RestartPolicy::OnFailure,
                RestartPolicy::Never,
            ]),
            duration(),
            duration(),
            any::<u32>(),
            duration(),
        )
            .prop_map(|(policy, a, b, max_restarts, window)| RestartSpec {
                policy,
                backoff_initial: a.min(b),
                backoff_max: a.max(b),
                max_restarts,
                window,
            })
    }

    fn dependency() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z][a-z0-9-]{0,8}(>=[0-9]\\.[0-9])?",
            relative_path(),
            relative_path().prop_map(|p| format!("{p}/requirements.txt")),
        ]
    }

    fn service() -> impl Strategy<Value = ServiceSpec> {
        let runtime =
            prop_oneof![
                (relative_path(), "[a-z_]{1,8}", prop::option::of(command())).prop_map(
                    |(file, attribute, command)| {
                        (
                            Runtime::Python,
                            Some(format!("{file}:{attribute}")),
                            command,
                        )
                    }
                ),
                (prop::option::of(relative_path()), command()).prop_map(
                    |(import_path, command)| (Runtime::Process, import_path, Some(command))
                ),
            ];
        let health =
            ("/[a-z/]{0,10}", duration()).prop_map(|(path, timeout)| HealthSpec { path, timeout });
        (
            (
                id(),
                prop::option::of(text()),
                prop::option::of(source()),
                runtime,
                prop::collection::vec(command(), 0..3),
                1u32..=64,
                prop::option::of(1u16..),
            ),
            (
                health,
                restart(),
                prop::option::of(1u32..),
                prop::option::of(duration()),
                prop::collection::btree_map("[A-Za-z_<${\"][A-Za-z0-9_ .]{0,8}", text(), 0..4),
                prop::collection::vec(relative_path(), 0..3),
                prop::collection::vec(dependency(), 0..3),
            ),
        )
            .prop_map(
                |(
                    (id, name, source, (runtime, import_path, command), build, replicas, port),
                    (health, restart, max_concurrency, timeout, env, env_files, deps),
                )| ServiceSpec {
                    id,
                    name,
                    source,
                    import_path,
                    command,
                    port: if replicas == 1 { port } else { None },
                    env: env.into_iter().collect::<BTreeMap<_, _>>(),
                    runtime,
                    build,
                    replicas,
                    health,
                    restart,
                    max_concurrency,
                    timeout,
                    env_files,
                    python_dependencies: deps,
                },
            )
    }

    fn queue() -> impl Strategy<Value = MessageQueueSpec> {
        prop_oneof![
            Just(MessageQueueSpec::Simple),
            (text(), any::<bool>()).prop_map(|(url, exclusive_mode)| MessageQueueSpec::Redis {
                url,
                exclusive_mode
            }),
            (text(), text())
                .prop_map(|(url, exchange)| MessageQueueSpec::RabbitMq { url, exchange }),
            text().prop_map(|url| MessageQueueSpec::Kafka { url }),
            text().prop_map(|url| MessageQueueSpec::Nats { url }),
            (
                text(),
                prop::option::of(text().prop_filter("not empty", |t| !t.is_empty())),
                prop::option::of(text().prop_filter("not empty", |t| !t.is_empty())),
            )
                .prop_map(|(region, access_key_id, secret_access_key)| {
                    MessageQueueSpec::Aws {
                        region,
                        access_key_id,
                        secret_access_key,
                    }
                }),
        ]
    }

    fn state_store() -> impl Strategy<Value = StateStoreSpec> {
        prop_oneof![
            relative_path()
                .prop_filter("no outer spaces", |p| p.trim() == p)
                .prop_map(|path| StateStoreSpec::Sqlite { path }),
            "postgres(ql)?://[a-z]{1,6}(:[a-z]{1,4})?@[a-z]{1,6}/[a-z]{1,6}"
                .prop_map(|url| StateStoreSpec::Postgres { url }),
        ]
    }

    fn deployment() -> impl Strategy<Value = DeploymentSpec> {
        (
            id(),
            prop::collection::vec(service(), 1..4),
            any::<prop::sample::Index>(),
            prop::option::of(queue()),
            prop::option::of(state_store()),
            prop::option::of((prop::option::of(text()), 1u16.., prop::option::of(source()))),
        )
            .prop_map(
                |(name, mut services, default, message_queue, state_store, ui)| {
                    // Ids and ports are unique within a deployment.
                    let mut ids = std::collections::BTreeSet::new();
                    services.retain(|s| ids.insert(s.id.clone()));
                    let mut ports = std::collections::BTreeSet::new();
                    for service in &mut services {
                        if let Some(port) = service.port
                            && !ports.insert(port)
                        {
                            service.port = None;
                        }
                    }
                    let ui = ui.map(|(name, port, source)| UiSpec {
                        name,
                        port: if ports.contains(&port) { 3000 } else { port },
                        source,
                        build: Vec::new(),
                        command: None,
                    });
                    let ui = ui.filter(|ui| !ports.contains(&ui.port));
                    let default_service = default.get(&services).id.clone();
                    DeploymentSpec {
                        name,
                        default_service,
                        services,
                        message_queue,
                        state_store,
                        ui,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(Config {
            cases: 256,
            failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
            ..Config::default()
        })]

        /// Any spec the crate can produce, written back and parsed again, is the same spec.
        #[test]
        fn written_specs_parse_back_to_themselves(spec in deployment()) {
            let text = spec.to_yaml();
            let parsed = parse_with(&text, "roundtrip.yaml", &|_| Some("from the environment".to_owned()));
            match parsed {
                Ok(loaded) => prop_assert_eq!(loaded.spec, spec),
                Err(diagnostics) => prop_assert!(false, "{}\n{}", text, diagnostics.render(&text)),
            }
        }
    }
}
