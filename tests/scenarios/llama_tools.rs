//! llama_deploy's own tools against deployd, unchanged: `llamactl` and `llama_deploy.Client`
//! from a real llama-deploy 0.9.2 install deploy, run, create and stream tasks, send events, and
//! read results and sessions.
//!
//! The tools live in a virtualenv of their own: its interpreter comes from
//! `DEPLOYD_LLAMA_DEPLOY_PYTHON` (as `cargo xtask e2e` sets it), or else the scenarios make or
//! find `target/python-tools/llama-deploy-0.9.2` themselves, the way xtask does
//! (`xtask/src/python_tools.rs`). Nothing here is skipped: a missing tool fails the scenario.
//!
//! The client is driven by `tests/fixtures/llama_tools/client.py`, which prints what it saw as
//! JSON. `tests/fixtures/llama_tools/e2e` holds llama_deploy v0.9.2's own apiserver e2e fixtures
//! (`e2e_tests/apiserver/deployments`), git sources made local.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deployd_e2e::{Project, Server, copy_dir, copy_python_fixtures, workspace};
use serde_json::{Value, json};

/// The variable that names the virtualenv's interpreter.
const ENV_VAR: &str = "DEPLOYD_LLAMA_DEPLOY_PYTHON";

/// What the virtualenv holds.
const REQUIREMENT: &str = "llama-deploy==0.9.2";

/// The longest a tool may run before the scenario fails.
const TOOL_LIMIT: Duration = Duration::from_secs(240);

/// llama-deploy 0.9.2's interpreter and `llamactl`.
struct Tools {
    python: PathBuf,
    llamactl: PathBuf,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let python = match std::env::var_os(ENV_VAR) {
            Some(path) => {
                let path = PathBuf::from(path);
                assert!(
                    path.is_file(),
                    "{ENV_VAR}={} does not exist: make it with `cargo xtask e2e` or unset it",
                    path.display()
                );
                path
            }
            None => make_venv(),
        };
        let llamactl = python.with_file_name("llamactl");
        assert!(
            llamactl.is_file(),
            "{} has no llamactl beside it: is {REQUIREMENT} installed there?",
            python.display()
        );
        Tools { python, llamactl }
    })
}

/// The virtualenv `cargo xtask e2e` makes, made the same way by the same code when the
/// scenarios run without it (`cargo xtask llama-deploy-python`, `xtask/src/python_tools.rs`).
fn make_venv() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = run_limited(
        Command::new(cargo)
            .args(["run", "--quiet", "-p", "xtask", "--", "llama-deploy-python"])
            .current_dir(workspace()),
    );
    assert!(
        output.status.success(),
        "cannot make the {REQUIREMENT} virtualenv:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(python.is_file(), "xtask printed {}", python.display());
    python
}

/// Runs `command` to its end, at most [`TOOL_LIMIT`] (then kills it and panics); its output goes
/// through files, so a chatty tool never blocks on a full pipe.
fn run_limited(command: &mut Command) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > TOOL_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not end within {TOOL_LIMIT:?}\nstdout: {}\nstderr: {}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures/llama_tools").join(name)
}

/// Runs a command of the client driver against `url`: `Ok` with what it printed, or `Err` with
/// its report of what the client raised (the request and the response it failed on).
fn try_client(url: &str, command: &str, args: &Value) -> Result<Value, Value> {
    let output = run_limited(
        Command::new(&tools().python)
            .arg(fixture("client.py"))
            .args([url, command, &args.to_string()]),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let Some(Ok(report)) = stdout.lines().last().map(serde_json::from_str::<Value>) else {
        panic!(
            "client.py {command} {args} printed no JSON ({})\nstdout: {stdout}\nstderr: {stderr}",
            output.status
        );
    };
    if output.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// The client driver's answer to a command that must succeed.
fn client(server: &Server, command: &str, args: Value) -> Value {
    try_client(&server.url, command, &args).unwrap_or_else(|report| {
        panic!(
            "llama_deploy's client failed on `{command}` {args}:\n{report:#}\nserver log:\n{}",
            server.log()
        )
    })
}

/// `llamactl -s <server> args…`, with its configuration in `home` (llamactl writes one there
/// when it has none).
fn llamactl(server: &Server, home: &Path, args: &[&str]) -> Output {
    run_limited(
        Command::new(&tools().llamactl)
            .args(["-s", &server.url])
            .args(args)
            .env("XDG_CONFIG_HOME", home)
            .current_dir(home),
    )
}

/// llamactl's stdout, which must have succeeded.
fn llamactl_ok(server: &Server, home: &Path, args: &[&str]) -> String {
    let output = llamactl(server, home, args);
    assert!(
        output.status.success(),
        "llamactl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// llamactl's stderr, which must have failed.
fn llamactl_err(server: &Server, home: &Path, args: &[&str]) -> String {
    let output = llamactl(server, home, args);
    assert!(
        !output.status.success(),
        "llamactl {args:?} succeeded:\nstdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A project with the Python scenarios' workflows (`tests/fixtures/python`) in `src/`.
fn project() -> Project {
    let project = Project::new();
    copy_python_fixtures(&project.path().join("src"));
    project
}

/// A llama_deploy deployment file of the fixture workflows, every service an `import-path`.
fn deployment(name: &str, default_service: &str, services: &[(&str, &str)]) -> String {
    let mut text = format!(
        "name: {name}\n\ncontrol-plane:\n  port: 8000\n\ndefault-service: {default_service}\n\nservices:\n"
    );
    for (id, attribute) in services {
        text.push_str(&format!(
            "  {id}:\n    name: {id}\n    source:\n      type: local\n      location: src\n    \
             import-path: src/workflow:{attribute}\n    python-dependencies:\n      \
             - src/requirements.txt\n"
        ));
    }
    text
}

const FLOWS: &[(&str, &str)] = &[
    ("echo_workflow", "echo_workflow"),
    ("counter_workflow", "counter_workflow"),
    ("approval_workflow", "approval_workflow"),
    ("failing_workflow", "failing_workflow"),
];

fn progress(message: &str) -> Vec<Value> {
    (1..=3)
        .map(|step| json!({"step": step, "message": message}))
        .collect()
}

/// `llamactl` as its users type it: deploy (and `--reload`, `--base-path`), status, run with
/// arguments, a service and a session, sessions create, profiles from a config file, and its
/// errors.
#[test]
fn llamactl_deploys_runs_and_keeps_sessions() {
    let project = project();
    let file = project.write(
        "deployment.yml",
        &deployment("flows", "echo_workflow", FLOWS),
    );
    let file = file.to_str().expect("utf-8 path");
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);

    let status = llamactl_ok(&server, home, &["status"]);
    assert_eq!(
        status,
        "LlamaDeploy is up and running.\n\nCurrently there are no active deployments\n"
    );

    let out = llamactl_ok(&server, home, &["deploy", file]);
    assert_eq!(out, "Deployment successful: flows\n");
    let status = llamactl_ok(&server, home, &["status"]);
    assert_eq!(
        status,
        "LlamaDeploy is up and running.\n\nActive deployments:\n- flows\n"
    );

    // `llamactl run` sends {"input": json.dumps(dict(args))} and prints the result.
    let out = llamactl_ok(
        &server,
        home,
        &["run", "--deployment", "flows", "--arg", "message", "hi"],
    );
    assert_eq!(out, "Message received: hi (six 1.16.0)\n");
    let out = llamactl_ok(
        &server,
        home,
        &["run", "-d", "flows", "-s", "counter_workflow"],
    );
    assert_eq!(out, "1\n");

    // A session from `llamactl sessions create`, used by `llamactl run -i`: 1, then 2.
    let out = llamactl_ok(&server, home, &["sessions", "create", "-d", "flows"]);
    let session = out
        .strip_prefix("session_id='")
        .and_then(|rest| rest.split_once('\''))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("no session id in {out:?}"));
    assert!(out.ends_with("task_ids=[] state={}\n"), "{out:?}");
    for expected in ["1\n", "2\n"] {
        let out = llamactl_ok(
            &server,
            home,
            &[
                "run",
                "-d",
                "flows",
                "-s",
                "counter_workflow",
                "-i",
                &session,
            ],
        );
        assert_eq!(out, expected);
    }
    let (status, body) = server
        .get(&format!("/deployments/flows/sessions/{session}"))
        .expect("GET session");
    assert_eq!(
        (status, &body["session_id"]),
        (200, &json!(session)),
        "{body}"
    );

    // Errors come back as llamactl shows them: the status and deployd's detail.
    let err = llamactl_err(
        &server,
        home,
        &["run", "-d", "flows", "-s", "failing_workflow"],
    );
    assert!(err.contains("502"), "{err}");
    assert!(
        err.contains("ValueError") && err.contains("the input was wrong"),
        "{err}"
    );
    let err = llamactl_err(
        &server,
        home,
        &["run", "-d", "nowhere", "-a", "message", "hi"],
    );
    assert!(
        err.contains("404") && err.contains("Deployment not found"),
        "{err}"
    );
    let err = llamactl_err(
        &server,
        home,
        &["run", "-d", "flows", "-s", "no_such_service"],
    );
    assert!(
        err.contains("404") && err.contains("no_such_service"),
        "{err}"
    );

    // Deploying a name that exists fails without --reload; with it, the new file takes over
    // (here: another default service).
    let err = llamactl_err(&server, home, &["deploy", file]);
    assert!(err.contains("409"), "{err}");
    let moved = project.path().join("elsewhere");
    std::fs::create_dir(&moved).expect("mkdir");
    let reloaded = moved.join("deployment.yml");
    std::fs::write(&reloaded, deployment("flows", "counter_workflow", FLOWS)).expect("write");
    // The file is not beside its sources: `--base-path` names their folder.
    let out = llamactl_ok(
        &server,
        home,
        &[
            "deploy",
            "--reload",
            "--base-path",
            project.path().to_str().expect("utf-8"),
            reloaded.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out, "Deployment successful: flows\n");
    let out = llamactl_ok(&server, home, &["run", "-d", "flows"]);
    assert_eq!(out, "1\n", "the reloaded default service is the counter");

    // A profile of a llamactl config file names the server (`-c`, `-p`).
    let config = home.join("profiles.yaml");
    std::fs::write(
        &config,
        format!(
            "current_profile: deployd\nprofiles:\n  deployd:\n    server: {}\n    insecure: false\n    timeout: 60.0\n",
            server.url
        ),
    )
    .expect("write the llamactl config");
    let output = run_limited(
        Command::new(&tools().llamactl)
            .args([
                "-c",
                config.to_str().expect("utf-8"),
                "-p",
                "deployd",
                "status",
            ])
            .env("XDG_CONFIG_HOME", home),
    );
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("Active deployments:\n- flows\n"),
        "{output:?}"
    );
}

/// `llama_deploy.Client`, with asyncio and with `client.sync`: status, deploy, run, create and
/// stream, a human in the loop, results, sessions, errors, and a server that is down.
#[test]
fn the_llama_deploy_client_runs_streams_and_answers() {
    let project = project();
    // As llama_deploy's own e2e deployment files: a default service that names no service
    // falls back to the first one.
    let file = project.write(
        "deployment.yml",
        &deployment("flows", "dummy_workflow", FLOWS),
    );
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(&data.path().join("data"), &[]);

    let status = client(&server, "status", json!({}));
    for api in ["async", "sync"] {
        assert_eq!(
            status[api],
            json!({
                "status": "Healthy",
                "status_message": "LlamaDeploy is up and running.\nCurrently there are no active deployments",
                "deployments": [],
            }),
            "{status}"
        );
    }

    let deployed = client(
        &server,
        "deploy",
        json!({"file": file, "base_path": project.path()}),
    );
    assert_eq!(deployed, json!({"id": "flows"}));
    let status = client(&server, "status", json!({}));
    for api in ["async", "sync"] {
        assert_eq!(status[api]["status"], "Healthy", "{status}");
        assert_eq!(status[api]["deployments"], json!(["flows"]), "{status}");
        assert_eq!(
            status[api]["status_message"],
            "LlamaDeploy is up and running.\nActive deployments:\n- flows"
        );
    }

    // `deployments.get(name).tasks.run(TaskDefinition(...))`, both ways.
    let input = json!({"message": "hi"}).to_string();
    let run = client(
        &server,
        "run",
        json!({"deployment": "flows", "input": input}),
    );
    assert_eq!(run, json!({"result": "Message received: hi (six 1.16.0)"}));
    let input = json!({"message": "async"}).to_string();
    let run = client(
        &server,
        "run_async",
        json!({"deployment": "flows", "input": input}),
    );
    assert_eq!(
        run,
        json!({"result": "Message received: async (six 1.16.0)"})
    );

    // `tasks.create` then `task.events()`: each event's value in order, then the StopEvent's
    // (`{}`) as llama_deploy 0.9.2 streams them; then `task.results()`.
    for command in ["stream", "stream_sync"] {
        let input = json!({"message": command}).to_string();
        let streamed = client(
            &server,
            command,
            json!({"deployment": "flows", "input": input}),
        );
        let mut expected = progress(command);
        expected.push(json!({}));
        assert_eq!(streamed["events"], json!(expected), "{streamed:#}");
        let task_id = streamed["task_id"].as_str().expect("a task id");
        assert!(streamed["session_id"].is_string(), "{streamed:#}");
        assert_eq!(
            streamed["result"],
            json!({
                "task_id": task_id,
                "history": [],
                "result": format!("Message received: {command} (six 1.16.0)"),
                "data": {},
            }),
            "{streamed:#}"
        );
    }

    // A human in the loop: the question comes on the stream, `task.send_event` answers with a
    // HumanResponseEvent serialized by llama_deploy's JsonSerializer, the workflow resumes.
    let input = json!({"item": "the plan"}).to_string();
    let hitl = client(
        &server,
        "hitl",
        json!({"deployment": "flows", "service": "approval_workflow", "input": input, "response": "yes"}),
    );
    assert_eq!(
        hitl["asked"],
        json!([{"_data": {"prefix": "approve the plan? "}}]),
        "{hitl:#}"
    );
    assert_eq!(hitl["after"], json!([{}]), "{hitl:#}");
    assert_eq!(
        hitl["event_definition"]["service_id"], "approval_workflow",
        "{hitl:#}"
    );
    let sent: Value = serde_json::from_str(
        hitl["event_definition"]["event_obj_str"]
            .as_str()
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    assert_eq!(
        sent,
        json!({
            "__is_pydantic": true,
            "value": {"_data": {"response": "yes"}},
            "qualified_name": "workflows.events.HumanResponseEvent",
        }),
        "{hitl:#}"
    );
    assert_eq!(hitl["result"]["result"], "human said: yes", "{hitl:#}");

    // `task.results()` read until it is not None.
    let input = json!({"message": "later"}).to_string();
    let later = client(
        &server,
        "results_later",
        json!({"deployment": "flows", "input": input}),
    );
    assert_eq!(
        later["result"]["result"], "Message received: later (six 1.16.0)",
        "{later:#}"
    );
    assert_eq!(later["result"]["task_id"], later["task_id"], "{later:#}");

    // Sessions: the workflow's Context carries across the session's tasks (1, then 2), a task
    // outside it starts at 1; the session is listed, read, deleted.
    let sessions = client(
        &server,
        "sessions",
        json!({"deployment": "flows", "service": "counter_workflow"}),
    );
    let session = &sessions["created"]["session_id"];
    assert!(session.is_string(), "{sessions:#}");
    assert_eq!(sessions["created"]["task_ids"], json!([]), "{sessions:#}");
    assert_eq!(sessions["in_session"], json!(["1", "2"]), "{sessions:#}");
    assert_eq!(sessions["outside"], json!("1"), "{sessions:#}");
    let listed = sessions["listed"].as_array().expect("a list");
    assert!(listed.contains(session), "{sessions:#}");
    assert_eq!(sessions["got"], json!(true), "{sessions:#}");
    let after = sessions["listed_after_delete"].as_array().expect("a list");
    assert!(!after.contains(session), "{sessions:#}");
    assert_eq!(after.len(), listed.len() - 1, "{sessions:#}");

    // A failed task: the client raises httpx's error with deployd's status and detail.
    let failed = try_client(
        &server.url,
        "run",
        &json!({"deployment": "flows", "input": "{}", "service": "failing_workflow"}),
    )
    .expect_err("a failing workflow's run must raise");
    assert_eq!(failed["error"], "HTTPStatusError", "{failed:#}");
    assert_eq!(failed["status"], 502, "{failed:#}");
    let response: Value =
        serde_json::from_str(failed["response"].as_str().unwrap_or_default()).unwrap_or_default();
    let detail = response["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("ValueError: the input was wrong"),
        "{failed:#}"
    );
    let missing = try_client(
        &server.url,
        "run",
        &json!({"deployment": "nowhere", "input": "{}"}),
    )
    .expect_err("an unknown deployment must raise");
    assert_eq!(
        (&missing["status"], &missing["response"]),
        (&json!(404), &json!(r#"{"detail":"Deployment not found"}"#)),
        "{missing:#}"
    );

    // A server that is down reads as Down.
    server.kill();
    let status = client(&server, "status", json!({}));
    for api in ["async", "sync"] {
        assert_eq!(
            status[api],
            json!({"status": "Down", "status_message": "API Server is down", "deployments": null}),
            "{status}"
        );
    }
}

/// llama_deploy v0.9.2's own apiserver e2e suite (`e2e_tests/apiserver`), its deployment files
/// and workflows unchanged (written against `llama-index-workflows`), against deployd:
/// test_status (up), test_streaming, test_hitl and test_env_vars_local.
#[test]
fn llama_deploys_own_apiserver_e2e_suite_passes() {
    let suite = tempfile::tempdir().expect("tempdir");
    let root = suite.path().join("deployments");
    copy_dir(&fixture("e2e"), &root);
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);
    let deploy = |file: &str, command: &str| {
        let deployed = client(
            &server,
            command,
            json!({"file": root.join(file), "base_path": root}),
        );
        deployed["id"].as_str().expect("a deployment id").to_owned()
    };

    // test_status_up, test_status_up_sync
    let status = client(&server, "status", json!({}));
    assert_eq!(status["async"]["status"], "Healthy", "{status}");
    assert_eq!(status["sync"]["status"], "Healthy", "{status}");

    // test_stream: three events with `text`, in order.
    assert_eq!(
        deploy("deployment_streaming.yml", "deploy_async"),
        "Streaming"
    );
    let streamed = client(
        &server,
        "stream",
        json!({"deployment": "Streaming", "input": r#"{"a": "b"}"#}),
    );
    let texts: Vec<&Value> = streamed["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|ev| ev.get("text").is_some())
        .collect();
    assert_eq!(
        texts,
        [
            &json!({"text": "message number 1"}),
            &json!({"text": "message number 2"}),
            &json!({"text": "message number 3"}),
        ],
        "{streamed:#}"
    );
    assert_eq!(streamed["result"]["result"], "Done.", "{streamed:#}");

    // test_hitl: the answer is sent right after the task is created, before the workflow asks;
    // the workflow has 3 s to get it. (llama_deploy's test reads `results()` once, 0.1 s later:
    // deployd answers null until the task ends, so the result is read until it comes.)
    assert_eq!(deploy("deployment_hitl.yml", "deploy"), "HumanInTheLoop");
    let hitl = client(
        &server,
        "hitl_at_once",
        json!({"deployment": "HumanInTheLoop", "service": "hitl_workflow", "input": "{}", "response": "42", "poll": true}),
    );
    assert_eq!(
        hitl["event_definition"]["service_id"], "hitl_workflow",
        "{hitl:#}"
    );
    assert_eq!(hitl["result"]["result"], "42", "{hitl:#}");

    // test_read_env_vars_local: `env`, then `env-files` over it; an empty input.
    assert_eq!(
        deploy("deployment_env_local.yml", "deploy_async"),
        "EnvironmentVariablesLocal"
    );
    let run = client(
        &server,
        "run_async",
        json!({"deployment": "EnvironmentVariablesLocal", "service": "test_env_workflow", "input": ""}),
    );
    assert_eq!(
        run,
        json!({"result": "var_1: z, var_2: y, api_key: 123"}),
        "{run:#}"
    );

    let status = client(&server, "status", json!({}));
    let mut names: Vec<&str> = status["sync"]["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["EnvironmentVariablesLocal", "HumanInTheLoop", "Streaming"],
        "{status}"
    );
}

/// llama_deploy v0.9.2's test_deploy_local and test_reload (git source made local):
/// `path: src:my_workflow` names the source folder itself as a package (`src/__init__.py`, with
/// relative imports), and both files give their service `port: 8002`, which llama_deploy 0.9
/// ignores (its workflows run inside its own process).
#[test]
fn llama_deploys_own_package_import_paths_deploy_and_reload() {
    let suite = tempfile::tempdir().expect("tempdir");
    let root = suite.path().join("deployments");
    copy_dir(&fixture("e2e"), &root);
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);
    let deploy = |file: &str, reload: bool| {
        client(
            &server,
            "deploy_async",
            json!({"file": root.join(file), "base_path": root, "reload": reload}),
        )
    };

    // test_deploy_local (and a run of its workflow, which the original does not do).
    assert_eq!(
        deploy("deployment2.yml", false),
        json!({"id": "TestDeployment2"})
    );
    let status = client(&server, "status", json!({}));
    assert_eq!(status["async"]["deployments"], json!(["TestDeployment2"]));
    let run = client(
        &server,
        "run_async",
        json!({"deployment": "TestDeployment2", "input": "{}"}),
    );
    assert_eq!(run, json!({"result": "Done."}));

    // test_reload
    assert_eq!(
        deploy("deployment_reload1.yml", false),
        json!({"id": "ReloadMe"})
    );
    let run = client(
        &server,
        "run_async",
        json!({"deployment": "ReloadMe", "input": r#"{"data": "bar"}"#}),
    );
    assert_eq!(run, json!({"result": "I have received:bar"}));
    assert_eq!(
        deploy("deployment_reload2.yml", true),
        json!({"id": "ReloadMe"})
    );
    let run = client(
        &server,
        "run_async",
        json!({"deployment": "ReloadMe", "input": r#"{"data": "bar"}"#}),
    );
    assert_eq!(run, json!({"result": "Ho ricevuto:bar"}));
}

/// `llamactl deploy` of a deployment whose workflow cannot be imported fails, as with
/// llama_deploy 0.9.2 (its create answers 500 and llamactl exits 1).
#[test]
fn llamactl_deploy_fails_when_a_workflow_cannot_load() {
    let project = project();
    let file = project.write(
        "deployment.yml",
        &deployment(
            "broken",
            "echo_workflow",
            &[("echo_workflow", "no_such_workflow")],
        ),
    );
    let home = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);
    let err = llamactl_err(
        &server,
        home.path(),
        &["deploy", file.to_str().expect("utf-8")],
    );
    // llamactl prints the status, not the answer's detail; the detail and the service's
    // state name what failed.
    assert!(err.contains("/deployments/create"), "{err}");
    let (_, body) = server.get("/deployments/broken").expect("GET deployment");
    let service = &body["services"][0];
    assert_eq!(service["phase"], "failed", "{body}");
    assert!(
        service["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_workflow")),
        "{body}"
    );
}

/// llama_deploy 0.9.2's `GET …/tasks/{id}/results` waits for the task (`await handler`), so
/// `task.results()` right after `tasks.create` is the TaskResult, never None: llama_deploy's
/// own test_hitl relies on it (it reads `results()` once, 0.1 s after sending the answer).
#[test]
fn task_results_wait_for_the_task_as_in_llama_deploy_0_9() {
    let suite = tempfile::tempdir().expect("tempdir");
    let root = suite.path().join("deployments");
    copy_dir(&fixture("e2e"), &root);
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);
    client(
        &server,
        "deploy",
        json!({"file": root.join("deployment_streaming.yml"), "base_path": root}),
    );
    let results = client(
        &server,
        "results_later",
        json!({"deployment": "Streaming", "input": "{}"}),
    );
    assert_eq!(results["first"]["result"], "Done.", "{results:#}");
}

/// Two llama_deploy deployments whose services name the same `port` (llama_deploy's e2e files
/// all say `port: 8002`; llama_deploy 0.9 ignores it): each runs its own workflow.
#[test]
fn deployments_that_name_the_same_port_run_their_own_workflows() {
    let suite = tempfile::tempdir().expect("tempdir");
    let root = suite.path().join("deployments");
    copy_dir(&fixture("e2e"), &root);
    let port = deployd_e2e::free_port();
    for (name, path) in [
        ("PortA", "src/workflow_env:workflow"),
        ("PortB", "src/workflow:streaming_workflow"),
    ] {
        std::fs::write(
            root.join(format!("{name}.yml")),
            format!(
                "name: {name}\ncontrol-plane: {{}}\nservices:\n  test-workflow:\n    name: Test Workflow\n    port: {port}\n    host: localhost\n    source:\n      type: local\n      name: src\n    path: {path}\n"
            ),
        )
        .expect("write");
    }
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&data.path().join("data"), &[]);
    for name in ["PortA", "PortB"] {
        client(
            &server,
            "deploy",
            json!({"file": root.join(format!("{name}.yml")), "base_path": root}),
        );
    }
    let a = client(
        &server,
        "run",
        json!({"deployment": "PortA", "input": "{}"}),
    );
    assert_eq!(
        a,
        json!({"result": "var_1: None, var_2: None, api_key: None"})
    );
    let b = client(
        &server,
        "run",
        json!({"deployment": "PortB", "input": "{}"}),
    );
    assert_eq!(b, json!({"result": "Done."}), "PortB's task ran elsewhere");
}

/// Runs the fixture script `script` with `args` on the tools' interpreter; what it printed last,
/// as JSON. It must succeed.
fn fixture_json(script: &str, args: &[&str]) -> Value {
    let output = run_limited(
        Command::new(&tools().python)
            .arg(fixture(script))
            .args(args),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{script} printed {stdout}: {err}"))
}

/// `sse_client.py`: at most `count` events of `path` as server-sent events, resuming after
/// `last` when given; (events, whether the stream ended on its own).
fn sse(server: &Server, path: &str, count: usize, last: Option<&str>) -> (Vec<Value>, bool) {
    let count = count.to_string();
    let mut args = vec![server.url.as_str(), path, count.as_str()];
    args.extend(last);
    let report = fixture_json("sse_client.py", &args);
    (
        report["events"].as_array().cloned().unwrap_or_default(),
        report["ended"] == json!(true),
    )
}

#[test]
fn an_sse_client_resumes_a_task_s_events_without_missing_or_repeating_one() {
    let project = Project::new();
    let file = project.deployment("sse", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    deployd_e2e::success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (status, task) = server.post(
        "/deployments/sse/tasks/create",
        &json!({"input": json!({"message": "m", "wait_for_event": true}).to_string()}),
    );
    assert_eq!(status, 200, "{task}");
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let path = format!("/deployments/sse/tasks/{task_id}/events");

    // Two events, then the connection drops; the service is still waiting.
    let (first, ended) = sse(&server, &path, 2, None);
    assert!(!ended);
    // Resumed after the last one seen: the third (the service says it waits), then dropped.
    let last = first[1]["id"].as_str().unwrap().to_owned();
    let (second, ended) = sse(&server, &path, 1, Some(&last));
    assert!(!ended);
    // The task goes on while nobody follows it, and the rest comes on the next resume.
    let (status, body) = server.post(
        &format!("/deployments/sse/tasks/{task_id}/events"),
        &json!({"service_id": "svc", "event_obj_str": "\"answered\""}),
    );
    assert_eq!(status, 200, "{body}");
    let last = second[0]["id"].as_str().unwrap().to_owned();
    let (third, ended) = sse(&server, &path, 100, Some(&last));
    assert!(ended, "the stream did not end with the result: {third:?}");

    let all: Vec<&Value> = first.iter().chain(&second).chain(&third).collect();
    let ids: Vec<u64> = all
        .iter()
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "{all:?}");
    let kinds: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["event", "event", "event", "result"], "{all:?}");
    for event in &all {
        assert_eq!(
            event["data"]["seq"].to_string(),
            *event["id"].as_str().unwrap()
        );
        assert_eq!(event["data"]["type"], event["event"]);
    }
    assert_eq!(all[2]["data"]["data"], json!({"step": "waiting"}));
    assert!(
        all[3]["data"]["data"]
            .as_str()
            .unwrap()
            .ends_with("answered"),
        "{all:?}"
    );

    // A Last-Event-ID that is not a number is a 400 naming it.
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}{path}", server.url))
        .header("accept", "text/event-stream")
        .header("last-event-id", "later")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.text().unwrap().contains("Last-Event-ID"));
}

/// deployd's metrics page as prometheus_client's parser reads it.
fn metrics(server: &Server, token: Option<&str>) -> Value {
    let url = format!("{}/status/metrics", server.url);
    let mut args = vec![url.as_str()];
    args.extend(token);
    fixture_json("metrics.py", &args)
}

#[test]
fn the_metrics_page_parses_and_its_task_counters_move() {
    const TOKEN: &str = "metrics-token-0123456789abcdef";
    let project = Project::new();
    let file = project.deployment("metered", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--token", TOKEN]);
    let cli = |args: &[&str]| {
        Command::new(deployd_e2e::binary())
            .args(args)
            .env("DEPLOYD_SERVER", &server.url)
            .env("DEPLOYD_TOKEN", TOKEN)
            .output()
            .expect("cannot run the deployd CLI")
    };
    deployd_e2e::success(&cli(&["deploy", file.to_str().unwrap()]));
    // The page needs the token like every route but the health check.
    let (status, _) = server.get("/status/metrics").unwrap();
    assert_eq!(status, 401);

    let before = metrics(&server, Some(TOKEN));
    assert!(
        before["content_type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{before}"
    );
    let samples = &before["samples"];
    let succeeded = "deployd_tasks{deployment=metered,service=svc,status=succeeded}";
    assert_eq!(samples[succeeded], Value::Null, "{samples}");
    assert_eq!(
        samples["deployd_service_up{deployment=metered,service=svc}"],
        json!(1.0)
    );
    assert_eq!(
        samples["apiserver_state{apiserver_state=running}"],
        json!(1.0)
    );
    assert_eq!(
        samples["deployment_state{deployment_name=metered,deployment_state=ready}"],
        json!(1.0)
    );
    assert_eq!(
        samples["service_state{deployment_name=metered,service_name=svc,service_state=ready}"],
        json!(1.0)
    );
    assert_eq!(
        before["kinds"]["deployd_http_request_duration_seconds"],
        "histogram"
    );

    for n in 0..3 {
        let out = deployd_e2e::success(&cli(&[
            "run",
            "-d",
            "metered",
            "-a",
            "message",
            &n.to_string(),
        ]));
        assert_eq!(out, format!("svc: {n}\n"));
    }
    let after = metrics(&server, Some(TOKEN));
    let samples = &after["samples"];
    assert_eq!(samples[succeeded], json!(3.0), "{samples}");
    let runs =
        "deployd_http_requests_total{method=POST,route=/deployments/{name}/tasks/run,status=200}";
    assert_eq!(samples[runs], json!(3.0), "{samples}");
    let refused = "deployd_http_requests_total{method=GET,route=/status/metrics,status=401}";
    assert_eq!(samples[refused], json!(1.0), "{samples}");
    let count = "deployd_http_request_duration_seconds_count{method=POST,route=/deployments/{name}/tasks/run}";
    assert_eq!(samples[count], json!(3.0), "{samples}");
    // The three tasks in the task duration histogram: each took less than 30 s.
    let tasks = "deployd_task_duration_seconds_count{deployment=metered,service=svc}";
    assert_eq!(samples[tasks], json!(3.0), "{samples}");
    let quick: Vec<&Value> = samples
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, _)| {
            ["30", "30.0"].iter().any(|le| {
                **key == format!("deployd_task_duration_seconds_bucket{{deployment=metered,le={le},service=svc}}")
            })
        })
        .map(|(_, value)| value)
        .collect();
    assert_eq!(quick, [&json!(3.0)], "{samples}");
    assert_eq!(after["kinds"]["deployd_task_duration_seconds"], "histogram");
}

/// schemathesis (from the same virtualenv) against `/openapi.json` of a deployd that needs a
/// token: every operation of the document is exercised with generated data, on a running
/// deployment (`tests/fixtures/schemathesis/schemathesis.toml`), and no answer is a server
/// error or falls outside what the document describes (status, content type, headers, body).
#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_openapi_document() {
    const TOKEN: &str = "e2e-schemathesis-token-0123456789";
    let tools = tools();
    let project = Project::new();
    let quickstart = project.deployment("quickstart", &[("echo", &[])]);
    let doomed = project.deployment("doomed", &[("echo", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        &data.path().join("data"),
        &[
            "--token",
            TOKEN,
            "--run-timeout",
            "5",
            quickstart.to_str().unwrap(),
            doomed.to_str().unwrap(),
        ],
    );
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let get = |path: &str| -> Value {
        let response = http
            .get(format!("{}{path}", server.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().unwrap()
    };
    for name in ["quickstart", "doomed"] {
        deployd_e2e::wait_for(
            &format!("deployment {name} to be ready"),
            Duration::from_secs(120),
            || {
                let status = http
                    .get(format!("{}/deployments/{name}", server.url))
                    .bearer_auth(TOKEN)
                    .send()
                    .ok()?
                    .json::<Value>()
                    .ok()?;
                (status["services"][0]["phase"] == "ready").then_some(())
            },
        );
    }
    let document = get("/openapi.json");
    assert_eq!(document["openapi"], "3.1.0");
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert!(operations >= 19, "{operations} operations");

    let schemathesis = tools.python.with_file_name("schemathesis");
    let work = tempfile::tempdir().unwrap();
    let output = run_limited(
        Command::new(&schemathesis)
            .arg("--config-file")
            .arg(workspace().join("tests/fixtures/schemathesis/schemathesis.toml"))
            // Every path, the document's own too (left out unless named).
            .args(["run", "--no-color", "--include-path-regex", ".*"])
            .arg(format!("{}/openapi.json", server.url))
            .env("DEPLOYD_TOKEN", TOKEN)
            .env("NO_PROXY", "127.0.0.1")
            // Its example database and reports stay out of the checkout.
            .current_dir(work.path()),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    // Every operation of the document was selected and tested.
    let compact: String = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        compact.contains(&format!("Selected: {operations}/{operations}"))
            && compact.contains(&format!("Tested: {operations}")),
        "not every operation was tested:\n{stdout}"
    );
    assert!(!compact.contains("failed"), "{stdout}");
    // The deployment the rest ran on is still there; the one the deletes named is gone.
    let names = get("/deployments/");
    assert_eq!(names, json!([{"name": "quickstart"}]), "{stdout}");
}

/// One span of what the OTLP receiver (`tests/fixtures/llama_tools/otlp_collector.py`) got.
fn spans_of(file: &Path, trace_id: &str) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|span| span["trace_id"] == trace_id)
        .collect()
}

/// `--otlp-endpoint`: a task's trace (its request's span, its time in the queue, its service
/// call) reaches an OTLP collector, continues the client's `traceparent`, and the service gets
/// the `traceparent` of its call.
#[test]
fn a_task_s_trace_reaches_an_otlp_collector_and_its_service() {
    let tools = tools();
    let dir = tempfile::tempdir().unwrap();
    let received = dir.path().join("spans.jsonl");
    let collector_port = deployd_e2e::free_port();
    let mut collector = std::process::Command::new(&tools.python)
        .arg(fixture("otlp_collector.py"))
        .arg(collector_port.to_string())
        .arg(&received)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(collector.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _collector = Kill(collector);

    let project = Project::new();
    let file = project.deployment("traced", &[("echo", &[])]);
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{collector_port}"),
        ],
    );
    deployd_e2e::success(&server.cli(&["deploy", file.to_str().unwrap()]));

    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // The client's own trace, which deployd continues.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let run = |traceparent: Option<String>| -> (String, String) {
        let mut request = http
            .post(format!("{}/deployments/traced/tasks/create", server.url))
            .json(&json!({"input": "{\"message\": \"hi\", \"report_headers\": true}"}));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let task: Value = request.send().unwrap().json().unwrap();
        let task_id = task["task_id"].as_str().unwrap().to_owned();
        let lines = server.read_lines_until(
            &format!("/deployments/traced/tasks/{task_id}/events?envelope=true"),
            |line| line["type"] != "event",
        );
        assert_eq!(lines.last().unwrap()["type"], "result", "{lines:?}");
        let sent = lines
            .iter()
            .find(|line| line["data"]["step"] == "headers")
            .and_then(|line| line["data"]["traceparent"].as_str())
            .unwrap_or_else(|| panic!("the service got no traceparent: {lines:?}"))
            .to_owned();
        (task_id, sent)
    };
    let (task_id, sent) = run(Some(format!("00-{client_trace}-{client_span}-01")));
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(
        parts[1], client_trace,
        "the service's call is in the client's trace"
    );

    // The spans arrive in the exporter's next batch (every 5 s).
    let spans = deployd_e2e::wait_for("the task's spans", Duration::from_secs(60), || {
        let spans = spans_of(&received, client_trace);
        (spans.len() >= 3).then_some(spans)
    });
    let named = |name: &str| {
        spans
            .iter()
            .find(|span| span["name"] == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
    };
    let request = named("POST /deployments/{name}/tasks/create");
    let queued = named("task queued");
    let call = named("service call echo");
    for span in [request, queued, call] {
        assert_eq!(span["service"], "deployd");
        assert!(span["end"].as_u64() >= span["start"].as_u64(), "{span}");
    }
    // SERVER, CONSUMER, CLIENT (OTLP's span kinds).
    assert_eq!(
        (&request["kind"], &queued["kind"], &call["kind"]),
        (&json!(2), &json!(5), &json!(3))
    );
    assert_eq!(request["parent_span_id"], client_span);
    assert_eq!(request["attributes"]["http.response.status_code"], 200);
    assert_eq!(queued["parent_span_id"], request["span_id"]);
    assert_eq!(call["parent_span_id"], request["span_id"]);
    assert_eq!(call["attributes"]["deployd.task_id"], task_id.as_str());
    assert_eq!(call["span_id"], parts[2], "the service got its call's span");
    assert!(queued["start"].as_u64() <= call["start"].as_u64());

    // Without a client's traceparent the task's trace starts at its request.
    let (_, sent) = run(None);
    let trace = sent.split('-').nth(1).unwrap().to_owned();
    assert_ne!(trace, client_trace);
    let spans = deployd_e2e::wait_for("the second task's spans", Duration::from_secs(60), || {
        let spans = spans_of(&received, &trace);
        (spans.len() >= 3).then_some(spans)
    });
    let request = spans
        .iter()
        .find(|span| span["kind"] == 2)
        .expect("a server span");
    assert_eq!(request["parent_span_id"], "", "{request}");
}
