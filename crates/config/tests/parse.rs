//! Parsing deployment files: what loads, and how problems are reported and rendered.
//! The corpus under `tests/config/` (see `corpus.rs`) covers every key and every mistake; these
//! tests pin the API's behaviour around it.

use deployd_config::{
    Command, Diagnostic, MAX_FILE_SIZE, Runtime, Severity, SourceKind, parse, parse_with,
    render_all,
};

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
    assert_eq!(source.reference, None);
    assert_eq!(echo.command, Some(Command::Shell("python3 echo.py".into())));
    assert_eq!(echo.runtime, Runtime::Process);
    assert_eq!(echo.replicas, 1);
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
    assert_eq!(
        a.command,
        Some(Command::Argv(vec!["python3".into(), "a.py".into()]))
    );
    assert_eq!(a.port, Some(9000));
}

#[test]
fn git_location_splits_off_the_ref() {
    let text = "name: g\nservices:\n  a:\n    command: ./a\n    source:\n      type: git\n      location: https://bot:tok@github.com/o/r.git@v2\n";
    let source = parse(text, "g.yaml").unwrap().spec.services[0]
        .source
        .clone()
        .unwrap();
    assert_eq!(source.kind, SourceKind::Git);
    assert_eq!(source.location, "https://bot:tok@github.com/o/r.git");
    assert_eq!(source.reference.as_deref(), Some("v2"));
}

#[test]
fn parse_reads_the_process_environment() {
    // Cargo sets CARGO_PKG_NAME for the test process.
    let text = "name: ${CARGO_PKG_NAME}\nservices:\n  a:\n    command: ./a\n";
    assert_eq!(parse(text, "e.yaml").unwrap().spec.name, "deployd-config");
}

#[test]
fn parse_with_reads_the_lookup_only() {
    let text = "name: ${NAME}\nservices:\n  a:\n    command: ./a\n";
    let lookup = |name: &str| (name == "NAME").then(|| "from-lookup".to_owned());
    assert_eq!(
        parse_with(text, "e.yaml", &lookup).unwrap().spec.name,
        "from-lookup"
    );
    let err = parse_with(text, "e.yaml", &|_| None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "e.yaml:1:7: error: `name`: environment variable `NAME` is not set (set it, or give a default: `${NAME:-default}`)"
    );
}

#[test]
fn every_problem_is_reported_in_the_order_of_the_file() {
    let text = "name: bad/name\nservices:\n  a:\n    port: 80\n  b.c:\n    command: x\n    port: 80\n    colour: red\n";
    let err = parse(text, "deployment.yaml").unwrap_err();
    let lines: Vec<String> = err.items.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "deployment.yaml:1:7: error: `name`: invalid deployment name `bad/name`: it contains `/`; use letters, digits, `-` and `_`",
            "deployment.yaml:3:3: error: `services.a`: service `a` has neither a `command` nor an `import-path` (add `command: ./start.sh` to run a program, or `import-path: src/workflow:flow` to serve a llama-index workflow)",
            "deployment.yaml:5:3: error: `services.b.c`: invalid service id `b.c`: it contains `.`; use letters, digits, `-` and `_`",
            "deployment.yaml:7:11: error: `services.b.c.port`: port 80 is already used by service `a`",
            "deployment.yaml:8:5: error: `services.b.c.colour`: unknown key `colour` in a service (the keys of a service are `name`, `source`, `import-path`, `path`, `runtime`, `command`, `build`, `host`, `port`, `replicas`, `health`, `restart`, `max-concurrency`, `timeout`, `env`, `env-files`, `python-dependencies`, `ts-dependencies`)",
        ]
    );
}

#[test]
fn warnings_alone_let_the_file_load() {
    let text = "name: x\ndefault-service: nope\ncontrol-plane: {port: 8000}\nservices:\n  a:\n    command: x\n";
    let loaded = parse(text, "d.yaml").unwrap();
    assert_eq!(loaded.spec.default_service, "a");
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "d.yaml:2:18: warning: `default-service`: `default-service` names no service (`nope`); `a` is used",
            "d.yaml:3:17: warning: `control-plane.port`: `port` is ignored: deployd serves the control plane itself",
        ]
    );
    assert!(
        loaded
            .warnings
            .iter()
            .all(|w| w.severity == Severity::Warning)
    );
}

#[test]
fn rendering_follows_rustc() {
    let text = "name: x\nservices:\n  echo:\n    comand: run\n";
    let err = parse(text, "deployment.yaml").unwrap_err();
    assert_eq!(
        err.render(text),
        "\
error: unknown key `comand` in a service
 --> deployment.yaml:4:5
  |
4 |     comand: run
  |     ^^^^^^
  = key: services.echo.comand
  = help: did you mean `command`?

error: could not load `deployment.yaml`: 1 error
"
    );
    let loaded = parse(
        "name: x\nservices:\n  a:\n    command: x\n    host: 0.0.0.0\n",
        "w.yaml",
    )
    .unwrap();
    assert_eq!(
        render_all(
            &loaded.warnings,
            "name: x\nservices:\n  a:\n    command: x\n    host: 0.0.0.0\n"
        ),
        "\
warning: `host` is ignored: services listen on 127.0.0.1
 --> w.yaml:5:5
  |
5 |     host: 0.0.0.0
  |     ^^^^
  = key: services.a.host

"
    );
    let bare = Diagnostic::error("remote.yaml", "cannot read");
    assert_eq!(bare.render(""), "error: cannot read\n --> remote.yaml\n");
}

#[test]
fn oversized_files_are_refused_before_parsing() {
    let text = "#".repeat(MAX_FILE_SIZE + 1);
    let err = parse(&text, "big.yaml").unwrap_err();
    assert_eq!(err.items.len(), 1);
    assert!(
        err.items[0].message.contains("the largest accepted is"),
        "{err}"
    );
}
