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

/// llama_deploy's API server settings by environment: host and port, the deployments folder,
/// and the rc folder whose files are deployed at start (all of them, or the one the deployment
/// file path names), relative to it.
#[test]
fn llama_deploy_apiserver_settings_by_environment() {
    let project = Project::new();
    let rc = project.path().join("rc");
    std::fs::create_dir(&rc).unwrap();
    std::fs::rename(project.path().join("src"), rc.join("src")).unwrap();
    for name in ["first", "second"] {
        std::fs::write(
            rc.join(format!("{name}.yml")),
            format!(
                "name: {name}\nservices:\n  svc:\n    source:\n      type: local\n      \
                 location: src\n    command: python3 echo.py\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(rc.join("notes.txt"), "not a deployment").unwrap();
    let data = tempfile::tempdir().unwrap();
    let start = |port: u16, one: Option<&str>, folder: &str| {
        let mut command = std::process::Command::new(deployd_e2e::binary());
        command
            .arg("serve")
            .env_remove("DEPLOYD_LISTEN")
            .env_remove("DEPLOYD_DATA_DIR")
            .env("LLAMA_DEPLOY_APISERVER_HOST", "localhost")
            .env("LLAMA_DEPLOY_APISERVER_PORT", port.to_string())
            .env("LLAMA_DEPLOY_APISERVER_RC_PATH", &rc)
            .env(
                "LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH",
                data.path().join(folder),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(one) = one {
            command.env("LLAMA_DEPLOY_APISERVER_DEPLOYMENT_FILE_PATH", one);
        }
        command.spawn().expect("cannot start deployd")
    };
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deployments = |port: u16, count: usize| {
        wait_for(
            "the rc folder's deployments",
            Duration::from_secs(60),
            || {
                let body: serde_json::Value = http
                    .get(format!("http://127.0.0.1:{port}/status/"))
                    .send()
                    .ok()?
                    .json()
                    .ok()?;
                let names = body["deployments"].as_array()?.clone();
                (names.len() == count).then_some(names)
            },
        )
    };
    for (one, folder, expected) in [
        (None, "all", json!(["first", "second"])),
        (Some("second.yml"), "one", json!(["second"])),
    ] {
        let port = deployd_e2e::free_port();
        let mut child = start(port, one, folder);
        let names = deployments(port, expected.as_array().unwrap().len());
        assert_eq!(json!(names), expected);
        assert!(
            data.path().join(folder).join("deployd.db").is_file(),
            "the deployments folder is the data directory"
        );
        let _ = kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGTERM,
        );
        let _ = child.wait();
    }
}

#[test]
fn ended_tasks_are_pruned_after_their_retention_and_waiting_ones_kept() {
    let project = Project::new();
    let file = project.deployment("brief", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--retention", "1"]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let out = success(&server.cli(&["run", "-d", "brief", "-a", "message", "hi"]));
    assert_eq!(out, "svc: hi\n");
    let (status, waiting) = server.post(
        "/deployments/brief/tasks/create",
        &json!({ "input": json!({ "wait_for_event": true }).to_string() }),
    );
    assert_eq!(status, 200, "{waiting}");
    let waiting = waiting["task_id"].as_str().unwrap().to_owned();
    let (_, tasks) = server.get("/deployments/brief/tasks").unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), 2, "{tasks}");
    // The ended task goes once it is more than a second old; the waiting one stays.
    let left = wait_for(
        "the ended task to be pruned",
        Duration::from_secs(30),
        || {
            let (_, tasks) = server.get("/deployments/brief/tasks").ok()?;
            let tasks = tasks.as_array()?.clone();
            (tasks.len() == 1).then_some(tasks)
        },
    );
    assert_eq!(left[0]["task_id"], json!(waiting));
    assert!(server.log().contains("pruned tasks past their retention"));
    // Let the waiting task end, so that deployd stops without a drain.
    let (status, body) = server.post(
        &format!("/deployments/brief/tasks/{waiting}/events"),
        &json!({ "service_id": "svc", "event_obj_str": "\"go\"" }),
    );
    assert_eq!(status, 200, "{body}");
    // A retention that is not a number is refused at start.
    let out = std::process::Command::new(deployd_e2e::binary())
        .args(["serve", "--retention", "soon", "--data-dir"])
        .arg(data.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}

/// A bare `deployd` (no command) is `deployd serve` with its environment: `DEPLOYD_LISTEN` and
/// `DEPLOYD_DATA_DIR` decide where it answers and what it keeps.
#[test]
fn a_bare_deployd_honours_deployd_listen_and_deployd_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("bare");
    let port = deployd_e2e::free_port();
    let mut child = std::process::Command::new(deployd_e2e::binary())
        .env("DEPLOYD_LISTEN", format!("127.0.0.1:{port}"))
        .env("DEPLOYD_DATA_DIR", &data_dir)
        .env_remove("DEPLOYD_TOKEN")
        .env_remove("DEPLOYD_TASK_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot start deployd");
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let status: serde_json::Value = wait_for(
        "the bare deployd to answer",
        Duration::from_secs(30),
        || {
            http.get(format!("http://127.0.0.1:{port}/status/"))
                .send()
                .ok()?
                .json()
                .ok()
        },
    );
    assert_eq!(status["status"], "Healthy");
    let _ = child.kill();
    let _ = child.wait();
    let kept: Vec<_> = std::fs::read_dir(&data_dir)
        .expect("the data directory was made")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!kept.is_empty(), "nothing kept in {}", data_dir.display());
}
