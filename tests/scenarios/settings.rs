//! What a service's settings do: build commands, env files, health path, restart policy,
//! task timeout.

use std::time::Duration;

use deployd_e2e::{Project, Server, success, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

fn service(extra: &str) -> String {
    format!(
        "    source:\n      type: local\n      location: src\n    command: python3 echo.py\n{extra}"
    )
}

#[test]
fn build_commands_and_env_files_prepare_the_service() {
    let project = Project::new();
    project.write("app.env", "GREETING=\"hello \"\n");
    project.write("later.env", "# the last file wins\nexport GREETING='hi '\n");
    let file = project.write(
        "prepared.yaml",
        &format!(
            "name: prepared\nservices:\n  svc:\n{}",
            service(
                "    build:\n      - printf built- > RESULT_PREFIX\n    env:\n      GREETING: from-env\n    env-files: [app.env, later.env]\n    health:\n      path: /healthz\n      timeout: 20s\n"
            )
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let out = success(&server.cli(&["run", "-d", "prepared", "-a", "message", "x"]));
    assert_eq!(out, "built-hi svc: x\n");
    let log = std::fs::read_to_string(
        server
            .data_dir
            .join("deployments/prepared/logs/svc.build.log"),
    );
    assert!(log.is_ok(), "the build's output is kept");
}

#[test]
fn a_failing_build_is_reported_with_its_output() {
    let project = Project::new();
    let file = project.write(
        "broken.yaml",
        &format!(
            "name: broken\nservices:\n  svc:\n{}",
            service("    build:\n      - \"echo 'error: missing semicolon' >&2; exit 3\"\n")
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let out = server.cli(&["deploy", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("build command"), "{stderr}");
    assert!(stderr.contains("error: missing semicolon"), "{stderr}");
    assert!(stderr.contains("exit status: 3"), "{stderr}");
}

#[test]
fn a_task_past_its_timeout_fails() {
    let project = Project::new();
    let file = project.write(
        "slow.yaml",
        &format!(
            "name: slow\nservices:\n  svc:\n{}",
            service("    timeout: 1s\n")
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (status, body) = server.post(
        "/deployments/slow/tasks/run",
        &json!({ "input": json!({ "wait_for_event": true }).to_string() }),
    );
    assert_eq!(status, 502, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{body}"
    );
}

#[test]
fn a_service_that_must_not_restart_fails_and_refuses_tasks() {
    let project = Project::new();
    let file = project.write(
        "once.yaml",
        &format!(
            "name: once\nservices:\n  svc:\n{}",
            service("    restart:\n      policy: never\n")
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (_, pid, _) = server.service("once", 0);
    kill(
        Pid::from_raw(i32::try_from(pid.unwrap()).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        "the service to be marked failed",
        Duration::from_secs(30),
        || {
            let (phase, _, restarts) = server.service("once", 0);
            (phase == "failed").then_some(restarts)
        },
    );
    let (status, body) = server.post("/deployments/once/tasks/create", &json!({ "input": "{}" }));
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("has failed (killed by SIGKILL)"),
        "{body}"
    );
}
