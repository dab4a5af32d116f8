//! From the file as written to a [`DeploymentSpec`]: every rule, every problem reported.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use crate::raw::{RawCommand, RawDeployment, RawService, RawSourceKind};
use crate::{
    Command, Diagnostic, Diagnostics, DeploymentSpec, Loaded, ServiceSpec, Severity, SourceKind,
    SourceSpec,
};

struct Checker<'a> {
    text: &'a str,
    origin: &'a str,
    found: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn report(&mut self, severity: Severity, key: &[&str], message: String) {
        let mut diagnostic = match severity {
            Severity::Error => Diagnostic::error(self.origin, message),
            Severity::Warning => Diagnostic::warning(self.origin, message),
        };
        diagnostic = diagnostic
            .at_key(key.join("."))
            .at(locate(self.text, key));
        self.found.push(diagnostic);
    }

    fn error(&mut self, key: &[&str], message: String) {
        self.report(Severity::Error, key, message);
    }

    fn warning(&mut self, key: &[&str], message: String) {
        self.report(Severity::Warning, key, message);
    }
}

pub(crate) fn validate(raw: RawDeployment, text: &str, origin: &str) -> Result<Loaded, Diagnostics> {
    let mut checker = Checker {
        text,
        origin,
        found: Vec::new(),
    };
    if let Err(reason) = check_name(&raw.name) {
        checker.error(&["name"], format!("invalid deployment name `{}`: {reason}", raw.name));
    }
    if raw.control_plane.is_some() {
        checker.warning(
            &["control-plane"],
            "`control-plane` is accepted for llama_deploy compatibility and ignored: deployd \
             serves the control plane itself"
                .to_owned(),
        );
    }
    if let Some(queue) = &raw.message_queue {
        let kind = queue.get("type").and_then(|t| t.as_str()).unwrap_or("simple");
        if kind != "simple" {
            checker.warning(
                &["message-queue"],
                format!("message queue `{kind}` is not supported yet; the embedded queue is used"),
            );
        }
    }
    if raw.ui.is_some() {
        checker.warning(&["ui"], "`ui` is accepted and ignored".to_owned());
    }
    if raw.services.0.is_empty() {
        checker.error(&["services"], "a deployment needs at least one service".to_owned());
    }

    let mut services = Vec::with_capacity(raw.services.0.len());
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (id, service) in raw.services.0 {
        if let Some(spec) = check_service(&mut checker, &id, service, &mut ports) {
            services.push(spec);
        }
    }

    let default_service = match raw.default_service {
        Some(name) if services.iter().any(|s| s.id == name) => name,
        other => {
            let first = services.first().map(|s| s.id.clone()).unwrap_or_default();
            if let Some(name) = other {
                checker.warning(
                    &["default-service"],
                    format!("`default-service` names no service (`{name}`); `{first}` is used"),
                );
            }
            first
        }
    };

    if checker.found.iter().any(|d| d.severity == Severity::Error) {
        return Err(Diagnostics {
            items: checker.found,
        });
    }
    Ok(Loaded {
        spec: DeploymentSpec {
            name: raw.name,
            default_service,
            services,
        },
        warnings: checker.found,
    })
}

fn check_service(
    checker: &mut Checker<'_>,
    id: &str,
    raw: RawService,
    ports: &mut BTreeMap<u16, String>,
) -> Option<ServiceSpec> {
    let errors_before = checker.found.len();
    let key = |leaf: &'static str| -> Vec<&str> {
        if leaf.is_empty() {
            vec!["services", id]
        } else {
            vec!["services", id, leaf]
        }
    };
    if let Err(reason) = check_name(id) {
        checker.error(&key(""), format!("invalid service id `{id}`: {reason}"));
    }
    let source = raw.source.and_then(|source| {
        let location = match (source.location, source.name) {
            (Some(location), None) | (None, Some(location)) => location,
            (Some(_), Some(_)) => {
                checker.error(
                    &key("source"),
                    "`source` has both `location` and its older spelling `name`; keep one"
                        .to_owned(),
                );
                return None;
            }
            (None, None) => {
                checker.error(&key("source"), "`source` needs a `location`".to_owned());
                return None;
            }
        };
        if source.sync_policy.is_some() {
            checker.warning(
                &["services", id, "source", "sync-policy"],
                "`sync-policy` is not implemented yet; the source is replaced on every sync"
                    .to_owned(),
            );
        }
        let kind = match source.kind {
            RawSourceKind::Local => {
                if let Err(reason) = check_relative_path(&location) {
                    checker.error(
                        &["services", id, "source", "location"],
                        format!("local source `{location}` {reason}"),
                    );
                    return None;
                }
                SourceKind::Local
            }
            RawSourceKind::Git => SourceKind::Git,
            RawSourceKind::Docker => {
                checker.error(
                    &["services", id, "source", "type"],
                    "docker sources are not supported; use `git` or `local`".to_owned(),
                );
                return None;
            }
        };
        Some(SourceSpec { kind, location })
    });

    let command = match raw.command {
        Some(RawCommand::Shell(line)) if line.trim().is_empty() => {
            checker.error(&key("command"), "`command` is empty".to_owned());
            None
        }
        Some(RawCommand::Argv(argv)) if argv.first().is_none_or(|p| p.is_empty()) => {
            checker.error(&key("command"), "`command` needs a program to run".to_owned());
            None
        }
        Some(RawCommand::Shell(line)) => Some(Command::Shell(line)),
        Some(RawCommand::Argv(argv)) => Some(Command::Argv(argv)),
        None => None,
    };
    if command.is_none() && raw.import_path.is_none() {
        checker.error(
            &key(""),
            format!("service `{id}` needs a `command` (or an `import-path` to a Python workflow)"),
        );
    }

    match raw.port {
        Some(0) => checker.error(&key("port"), "port 0 is not a port; use 1 to 65535".to_owned()),
        Some(port) => {
            if let Some(other) = ports.insert(port, id.to_owned()) {
                checker.error(
                    &key("port"),
                    format!("port {port} is already used by service `{other}`"),
                );
            }
        }
        None => {}
    }
    if raw.host.is_some() {
        checker.warning(
            &key("host"),
            "`host` is ignored: services listen on 127.0.0.1".to_owned(),
        );
    }
    for (present, name) in [
        (raw.env_files.is_some(), "env-files"),
        (raw.python_dependencies.is_some(), "python-dependencies"),
        (raw.ts_dependencies.is_some(), "ts-dependencies"),
    ] {
        if present {
            checker.warning(&key(name), format!("`{name}` is not supported yet and is ignored"));
        }
    }

    let mut env = BTreeMap::new();
    for (name, value) in raw.env.map(|m| m.0).unwrap_or_default() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            checker.error(
                &["services", id, "env", &name],
                format!("invalid environment variable name `{name}`"),
            );
        } else if value.0.contains('\0') {
            checker.error(
                &["services", id, "env", &name],
                "an environment value cannot contain a NUL byte".to_owned(),
            );
        } else {
            env.insert(name, value.0);
        }
    }

    let failed = checker.found[errors_before..]
        .iter()
        .any(|d| d.severity == Severity::Error);
    (!failed).then(|| ServiceSpec {
        id: id.to_owned(),
        name: raw.name,
        source,
        import_path: raw.import_path,
        command,
        port: raw.port,
        env,
    })
}

/// Names become URL path segments, topic names and directory names.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
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
        return Err(format!(
            "it contains `{c}`; use letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

/// A path that stays inside the folder it is relative to.
fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
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

/// Finds the line and column of the key at `path` in block-style YAML, when it is there.
///
/// A best-effort map from key paths to places for diagnostics that arise after parsing; a key
/// written in flow style (`{a: 1}`) is not found, and the diagnostic then has no location.
fn locate(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    let mut found = None;
    let mut parent_indent: Option<usize> = None;
    let mut lines = text.lines().enumerate();
    'segments: for segment in path {
        for (number, line) in lines.by_ref() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if parent_indent.is_some_and(|p| indent <= p) {
                return found;
            }
            let key = trimmed
                .split_once(':')
                .map(|(k, _)| k.trim().trim_matches(|c| c == '"' || c == '\''));
            if key == Some(*segment) {
                found = Some((number + 1, indent + 1));
                parent_indent = Some(indent);
                continue 'segments;
            }
        }
        return found;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in ["src", "./src", "a/../b", "."] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok}");
        }
        for bad in ["../src", "/etc", "a/../../b", "", "../../etc"] {
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
    fn locates_nested_keys() {
        let text = "name: x\nservices:\n  a:\n    port: 1\n  b:\n    # c\n    port: 2\n";
        assert_eq!(locate(text, &["services", "b", "port"]), Some((7, 5)));
        assert_eq!(locate(text, &["services", "a", "port"]), Some((4, 5)));
        assert_eq!(locate(text, &["services", "a"]), Some((3, 3)));
        // `a` has no `env`: the nearest enclosing key is reported.
        assert_eq!(locate(text, &["services", "a", "env"]), Some((3, 3)));
    }
}
