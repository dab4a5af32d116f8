//! Parsing deployment files: what loads, and what each mistake reports.

use deployd_config::{Command, SourceKind, parse};

/// Parses `text` and compares the rendered diagnostics (errors, or warnings of a file that
/// loaded) with `expected`, one per line.
fn check(text: &str, expected: &str) {
    let rendered = match parse(text, "deployment.yaml") {
        Ok(loaded) => loaded
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        Err(diagnostics) => diagnostics.to_string(),
    };
    assert_eq!(rendered, expected.trim(), "for:\n{text}");
}

const QUICKSTART: &str = r#"
name: quickstart
default-service: echo
services:
  echo:
    name: Echo
    source:
      type: local
      location: src
    command: python3 echo.py
    env:
      GREETING: hello
      RETRIES: 3
"#;

#[test]
fn quickstart_loads() {
    let loaded = parse(QUICKSTART, "deployment.yaml").unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let spec = loaded.spec;
    assert_eq!(spec.name, "quickstart");
    assert_eq!(spec.default_service, "echo");
    let echo = spec.service("echo").unwrap();
    assert_eq!(echo.name.as_deref(), Some("Echo"));
    let source = echo.source.as_ref().unwrap();
    assert_eq!(source.kind, SourceKind::Local);
    assert_eq!(source.location, "src");
    assert_eq!(echo.command, Some(Command::Shell("python3 echo.py".into())));
    assert_eq!(echo.env["GREETING"], "hello");
    assert_eq!(echo.env["RETRIES"], "3");
}

#[test]
fn older_spellings_load() {
    let text = "name: old\ndefault_service: b\nservices:\n  a:\n    source: {type: local, name: x}\n    command: [python3, a.py]\n    port: 9000\n  b:\n    command: b\n";
    let spec = parse(text, "d.yaml").unwrap().spec;
    assert_eq!(spec.default_service, "b");
    let ids: Vec<_> = spec.services.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "services keep the order of the file");
    let a = spec.service("a").unwrap();
    assert_eq!(a.source.as_ref().unwrap().location, "x");
    assert_eq!(a.command, Some(Command::Argv(vec!["python3".into(), "a.py".into()])));
    assert_eq!(a.port, Some(9000));
}

#[test]
fn type_error_has_line_and_column() {
    check(
        "name: x\nservices:\n  echo:\n    command: run\n    port: eighty\n",
        "deployment.yaml:5:11: error: `services.echo.port`: invalid type: string \"eighty\", expected u16",
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    check(
        "name: x\nservices:\n  echo:\n    command: \"unclosed\n",
        "deployment.yaml:5:1: error: found unexpected end of stream at line 5 column 1, while scanning a quoted scalar at line 4 column 14",
    );
}

#[test]
fn unknown_key_is_an_error() {
    check(
        "name: x\nservices:\n  echo:\n    comand: run\n",
        "deployment.yaml:4:5: error: `services.echo`: unknown field `comand`, expected one of `name`, `source`, `import-path`, `import_path`, `path`, `command`, `host`, `port`, `env`, `env-files`, `env_files`, `python-dependencies`, `python_dependencies`, `ts-dependencies`, `ts_dependencies`",
    );
}

#[test]
fn escaping_and_absolute_sources_are_rejected() {
    check(
        "name: x\nservices:\n  a:\n    command: run\n    source:\n      type: local\n      location: ../../etc\n  b:\n    command: run\n    source:\n      type: local\n      location: /etc\n",
        "deployment.yaml:7:7: error: `services.a.source.location`: local source `../../etc` escapes the deployment's folder\n\
         deployment.yaml:12:7: error: `services.b.source.location`: local source `/etc` is absolute; write it relative to the deployment file",
    );
}

#[test]
fn every_problem_is_reported() {
    check(
        "name: bad/name\nservices:\n  a:\n    port: 80\n  b.c:\n    command: x\n    port: 80\n",
        "deployment.yaml:1:1: error: `name`: invalid deployment name `bad/name`: it contains `/`; use letters, digits, `-` and `_`\n\
         deployment.yaml:3:3: error: `services.a`: service `a` needs a `command` (or an `import-path` to a Python workflow)\n\
         deployment.yaml:5:3: error: `services.b.c`: invalid service id `b.c`: it contains `.`; use letters, digits, `-` and `_`\n\
         deployment.yaml:7:5: error: `services.b.c.port`: port 80 is already used by service `a`",
    );
}

#[test]
fn duplicate_service_is_an_error() {
    let err = parse("name: x\nservices:\n  a:\n    command: x\n  a:\n    command: y\n", "d.yaml")
        .unwrap_err();
    assert!(err.to_string().contains("`a` is defined twice"), "{err}");
}

#[test]
fn empty_services_is_an_error() {
    check(
        "name: x\nservices: {}\n",
        "deployment.yaml:2:1: error: `services`: a deployment needs at least one service",
    );
}

#[test]
fn unknown_default_service_warns_and_falls_back() {
    let text = "name: x\ndefault-service: nope\ncontrol-plane: {}\nservices:\n  a:\n    command: x\n";
    check(
        text,
        "deployment.yaml:3:1: warning: `control-plane`: `control-plane` is accepted for llama_deploy compatibility and ignored: deployd serves the control plane itself\n\
         deployment.yaml:2:1: warning: `default-service`: `default-service` names no service (`nope`); `a` is used",
    );
    assert_eq!(parse(text, "d").unwrap().spec.default_service, "a");
}
