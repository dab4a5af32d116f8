//! A service's output through the API and the CLI: the tail, following, rotation.

use std::io::BufRead;
use std::process::Command;
use std::time::Duration;

use deployd_e2e::{Project, Server, binary, success, wait_for};

/// A deployment whose service answers its health check (the test service) and prints a
/// numbered line every `pause` seconds, plus one line on stderr at start.
fn ticker(project: &Project, pause: &str) -> std::path::PathBuf {
    project.write(
        "ticker.yaml",
        &format!(
            "name: ticker\nservices:\n  svc:\n    source:\n      type: local\n      \
             location: src\n    command: [\"sh\", \"-c\", \"echo to-stderr >&2; python3 echo.py & \
             i=0; while true; do echo tick $i; i=$((i+1)); sleep {pause}; done\"]\n"
        ),
    )
}

fn tick(line: &str) -> u64 {
    line.strip_prefix("tick ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a tick: {line:?}"))
}

#[test]
fn a_service_s_output_is_tailed_and_followed() {
    let project = Project::new();
    let file = ticker(&project, "0.05");
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    wait_for("ten ticks", Duration::from_secs(30), || {
        let (_, text) = server.get_text("/deployments/ticker/services/svc/logs?tail=10");
        (text.lines().filter(|l| l.starts_with("tick ")).count() == 10).then_some(())
    });

    let (status, text) = server.get_text("/deployments/ticker/services/svc/logs?tail=3");
    assert_eq!(status, 200);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let first = tick(lines[0]);
    assert_eq!([tick(lines[1]), tick(lines[2])], [first + 1, first + 2]);
    // stderr is in the log too, after deployd's line for the start.
    let (_, all) = server.get_text("/deployments/ticker/services/svc/logs?tail=10000");
    let start = all.find("--- deployd: starting").expect("the start line");
    assert!(all[start..].contains("to-stderr"), "{all}");

    // Following: the lines written after, in order, none missed.
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .get(format!(
            "{}/deployments/ticker/services/svc/logs?tail=1&follow=true",
            server.url
        ))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let followed: Vec<u64> = std::io::BufReader::new(response)
        .lines()
        .take(20)
        .map(|line| tick(&line.unwrap()))
        .collect();
    let base = followed[0];
    assert!(base >= first + 2, "{followed:?}");
    assert_eq!(followed, (base..base + 20).collect::<Vec<_>>());

    // The CLI, with the deployment's default service.
    let out = success(&server.cli(&["logs", "ticker", "-n", "2"]));
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().all(|l| l.starts_with("tick ")), "{out}");

    // Bad input.
    let (status, body) = server
        .get("/deployments/ticker/services/nope/logs")
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let (status, body) = server
        .get("/deployments/ticker/services/svc/logs?tail=100000")
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("tail"), "{body}");
    let (status, _) = server
        .get("/deployments/ticker/services/svc/logs?follow=maybe")
        .unwrap();
    assert_eq!(status, 400);

    // A follower ends when the deployment is deleted.
    let follower = std::thread::spawn({
        let url = format!(
            "{}/deployments/ticker/services/svc/logs?tail=0&follow=true",
            server.url
        );
        move || {
            let response = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap()
                .get(url)
                .send()
                .unwrap();
            std::io::BufReader::new(response).lines().count()
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    success(&server.cli(&["delete", "ticker"]));
    let seen = follower.join().expect("the follower ended");
    assert!(seen > 0);
}

#[test]
fn a_service_s_log_rotates_at_its_size_and_following_crosses_the_rotation() {
    let project = Project::new();
    let file = ticker(&project, "0.002");
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--service-log-max", "4096"]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(format!(
            "{}/deployments/ticker/services/svc/logs?tail=0&follow=true",
            server.url
        ))
        .send()
        .unwrap();
    // About 1,200 lines: more than three files' worth.
    let followed: Vec<u64> = std::io::BufReader::new(response)
        .lines()
        .map(|line| line.unwrap())
        .filter(|line| line.starts_with("tick "))
        .take(1200)
        .map(|line| tick(&line))
        .collect();
    let base = followed[0];
    assert_eq!(followed, (base..base + 1200).collect::<Vec<_>>());
    let logs = server.data_dir.join("deployments/ticker/logs");
    let current = std::fs::metadata(logs.join("svc.log")).unwrap().len();
    let rotated = std::fs::metadata(logs.join("svc.log.1")).unwrap().len();
    assert!(current <= 4096 && rotated <= 4096, "{current} {rotated}");
    assert!(!logs.join("svc.log.2").exists());
    // The CLI refuses a size below 1 KiB.
    let out = Command::new(binary())
        .args(["serve", "--service-log-max", "10", "--data-dir"])
        .arg(data.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service-log-max"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
