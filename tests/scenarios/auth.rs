//! Tokens: a server that needs one, the CLI that sends it, and the refusals at start.

use std::process::{Command, Stdio};
use std::time::Duration;

use deployd_e2e::{Project, Server, binary, free_port, success};

const TOKEN: &str = "e2e-full-token-0123456789abcdef";
const TASK_TOKEN: &str = "e2e-task-token-0123456789abcdef";

/// Runs `deployd serve` with `args` and `env` expecting it to refuse to start: its stderr.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary());
    command
        .arg("serve")
        .args(["--data-dir"])
        .arg(data.path())
        .args(args)
        .env_remove("DEPLOYD_TOKEN")
        .env_remove("DEPLOYD_TASK_TOKEN")
        .env_remove("DEPLOYD_LISTEN")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start deployd");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                !status.success(),
                "deployd {args:?} started and ended with success"
            );
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("deployd {args:?} {env:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_a_token_deployd_refuses_a_non_loopback_address_and_says_why() {
    let port = free_port().to_string();
    for args in [
        vec!["--listen", &*format!("0.0.0.0:{port}")],
        vec!["--host", "0.0.0.0", "--port", &port],
    ] {
        let stderr = refused_start(&args, &[]);
        assert!(
            stderr.contains("refusing to listen on 0.0.0.0") && stderr.contains("DEPLOYD_TOKEN"),
            "{stderr}"
        );
        assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    }
    let stderr = refused_start(
        &["--listen", &format!("127.0.0.1:{port}")],
        &[("DEPLOYD_TOKEN", "short")],
    );
    assert!(
        stderr.contains("--token (DEPLOYD_TOKEN) is refused") && stderr.contains("at least 16"),
        "{stderr}"
    );
    let stderr = refused_start(
        &["--listen", &format!("127.0.0.1:{port}")],
        &[("DEPLOYD_TASK_TOKEN", TASK_TOKEN)],
    );
    assert!(stderr.contains("without --token"), "{stderr}");
    let stderr = refused_start(
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cors-origin",
            "*",
        ],
        &[],
    );
    assert!(stderr.contains("wildcard"), "{stderr}");
}

#[test]
fn the_cli_sends_deployd_token_and_the_task_token_cannot_deploy() {
    let project = Project::new();
    let file = project.deployment("guarded", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        &data.path().join("data"),
        &["--token", TOKEN, "--task-token", TASK_TOKEN],
    );
    assert!(
        server.log().contains("requests need a token"),
        "{}",
        server.log()
    );
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env("DEPLOYD_SERVER", &server.url)
            .env_remove("DEPLOYD_TOKEN");
        if let Some(token) = token {
            command.env("DEPLOYD_TOKEN", token);
        }
        command.output().expect("cannot run the deployd CLI")
    };
    let path = file.to_str().unwrap();
    let out = cli(None, &["deploy", path]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("token"),
        "{stderr}"
    );
    let out = cli(Some(TASK_TOKEN), &["deploy", path]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 403") && stderr.contains("task token"),
        "{stderr}"
    );
    assert_eq!(
        server.get("/status/").unwrap().1["deployments"],
        serde_json::Value::Null
    );

    let out = success(&cli(Some(TOKEN), &["deploy", path]));
    assert!(out.contains("deployment `guarded` created"), "{out}");
    // The task token runs tasks through the CLI, but cannot delete.
    let out = success(&cli(
        Some(TASK_TOKEN),
        &["run", "-d", "guarded", "-a", "message", "hi"],
    ));
    assert_eq!(out, "svc: hi\n");
    let out = cli(Some(TASK_TOKEN), &["delete", "guarded"]);
    assert!(!out.status.success());
    success(&cli(Some(TOKEN), &["delete", "guarded"]));
}
