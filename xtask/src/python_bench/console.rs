//! `cargo xtask bench console` (and part of `cargo xtask bench`): the web console's pages with
//! 100,000 tasks in the store and hundreds of deployments. deployd (release) runs
//! [`DEPLOYMENTS`] deployments of a native echo service and one, `console`, whose `echo`
//! service has run [`RAN`] tasks (in as many sessions) and whose `parked` service holds
//! [`PARKED`] queued ones (it takes one at a time, and never ends it). Then headless Chromium
//! (`tests/console/bench.mjs`, Playwright) loads each page [`LOADS`] times, from navigation
//! until its data is on screen, and the median of each must be under [`TARGET_MS`]. The API
//! calls behind the pages are timed too, for the record.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Process, exchange, free_port, load_expecting, one_shot, post};

const DEPLOYMENTS: usize = 200;
const RAN: usize = 98_000;
const PARKED: usize = 2_000;
const LOADS: usize = 5;
const TARGET_MS: f64 = 300.0;
/// The longest the tasks take to be made.
const CAP: Duration = Duration::from_secs(900);

fn get(port: u16, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes()
}

fn json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body, _) = one_shot(port, &get(port, path), Duration::from_secs(60))?;
    if status != 200 {
        bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

fn deploy(port: u16, file: &str) -> anyhow::Result<()> {
    let request = post(
        port,
        "/deployments/create?wait=false",
        "application/yaml",
        file.as_bytes(),
    );
    let (status, body, _) = one_shot(port, &request, Duration::from_secs(120))?;
    if status != 200 {
        bail!("deploy: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// The median of `LOADS` timings of `GET path` on one kept-alive connection, in ms.
fn api_median(port: u16, path: &str) -> anyhow::Result<f64> {
    let mut connection = super::connect(port, Duration::from_secs(60))?;
    let request = get(port, path);
    let mut times = Vec::new();
    for _ in 0..LOADS * 4 {
        let started = Instant::now();
        let (status, body, _) = exchange(&mut connection, &request)?;
        if status != 200 {
            bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub(crate) fn run() -> anyhow::Result<()> {
    let target = super::build_release_with("xtask", "echo-service")?;
    let deployd = target.join("release").join("deployd");
    let echo = target.join("release").join("echo-service");
    let work = target.join("console-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let port = free_port()?;
    let mut command = Command::new(&deployd);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--max-deployments",
            &(DEPLOYMENTS + 1).to_string(),
            "--data-dir",
        ])
        .arg(work.join("data"))
        .env("RUST_LOG", "warn")
        .current_dir(&work);
    let mut server = Process::spawn("deployd", &mut command, &work.join("deployd.log"))?;
    let result = (|| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while json(port, "/status/").is_err() {
            server.check_running()?;
            if Instant::now() > deadline {
                bail!("deployd did not answer within 30 s\n{}", server.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let echo = echo.display();
        deploy(
            port,
            &format!(
                "name: console\ndefault-service: echo\nservices:\n  echo:\n    command: {echo}\n  \
                 parked:\n    command: {echo}\n    max-concurrency: 1\n    env:\n      \
                 ECHO_DELAY_MS: \"1000000\"\n"
            ),
        )?;
        for n in 0..DEPLOYMENTS {
            deploy(
                port,
                &format!("name: d{n:03}\nservices:\n  svc:\n    command: {echo}\n"),
            )?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let status = json(port, "/deployments/console")?;
            if status["services"][0]["phase"] == "ready" {
                break;
            }
            if Instant::now() > deadline {
                bail!("the echo service is not ready after 300 s: {status}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("xtask: console bench: running {RAN} tasks");
        let started = Instant::now();
        let ran = post(
            port,
            "/deployments/console/tasks/run",
            "application/json",
            br#"{"input": "{\"message\": \"hi\"}"}"#,
        );
        let measured = load_expecting(&[port], 16, RAN, CAP, &|_, _| ran.clone(), "Message");
        if measured.done < RAN {
            bail!(
                "{} of {RAN} tasks ran ({} failed; first: {})",
                measured.done,
                measured.failures,
                measured.first_failure.as_deref().unwrap_or("none")
            );
        }
        let parked = post(
            port,
            "/deployments/console/tasks/create",
            "application/json",
            br#"{"input": "{\"message\": \"waits\"}", "service_id": "parked"}"#,
        );
        let measured = load_expecting(&[port], 8, PARKED, CAP, &|_, _| parked.clone(), "task_id");
        if measured.done < PARKED {
            bail!(
                "{} of {PARKED} parked tasks were made (first failure: {})",
                measured.done,
                measured.first_failure.as_deref().unwrap_or("none")
            );
        }
        eprintln!(
            "xtask: console bench: {} tasks in {:.0} s",
            RAN + PARKED,
            started.elapsed().as_secs_f64()
        );
        let newest = json(
            port,
            "/deployments/console/tasks/search?limit=1&status=succeeded",
        )?;
        let task = newest["tasks"][0]["task_id"]
            .as_str()
            .context("no task")?
            .to_owned();
        let session = newest["tasks"][0]["session_id"]
            .as_str()
            .context("no session")?
            .to_owned();
        // A cursor deep in the newest-first list: the 1,000th oldest task.
        let deep = json(port, "/deployments/console/tasks?limit=1000")?[999]["task_id"]
            .as_str()
            .context("no task")?
            .to_owned();

        println!();
        println!(
            "web console: {} tasks ({RAN} succeeded, {PARKED} queued), {} deployments",
            RAN + PARKED,
            DEPLOYMENTS + 1
        );
        println!("{:<58} {:>10}", "API call behind a page (median)", "ms");
        for path in [
            "/deployments/".to_owned(),
            "/deployments/console".to_owned(),
            "/deployments/console/tasks/search?limit=50".to_owned(),
            "/deployments/console/tasks/search?limit=50&status=queued".to_owned(),
            // No task has failed: the whole deployment is read to find none.
            "/deployments/console/tasks/search?limit=50&status=failed".to_owned(),
            "/deployments/console/tasks/search?limit=50&service=parked".to_owned(),
            format!("/deployments/console/tasks/search?limit=50&before={deep}"),
            format!("/deployments/console/tasks/{task}"),
            "/deployments/console/sessions/search?limit=50".to_owned(),
            "/deployments/console/revisions".to_owned(),
        ] {
            println!("{:<58} {:>10.1}", shorten(&path), api_median(port, &path)?);
        }

        let script = crate::root().join("tests/console/bench.mjs");
        let output = Command::new("bash")
            .arg(crate::root().join("tests/console/run-bench.sh"))
            .arg(&script)
            .args([
                "--base",
                &format!("http://127.0.0.1:{port}"),
                "--deployment",
                "console",
                "--task",
                &task,
                "--session",
                &session,
                "--loads",
                &LOADS.to_string(),
            ])
            .output()
            .context("cannot run the console's page benchmark")?;
        if !output.status.success() {
            bail!(
                "the page benchmark failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let pages: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("the page benchmark printed no JSON")?;
        println!();
        println!(
            "{:<40} {:>12} {:>12}",
            "console page (Chromium, load to data)", "median ms", "max ms"
        );
        let mut slow = Vec::new();
        for page in pages["pages"].as_array().context("no pages")? {
            let name = page["name"].as_str().unwrap_or("?");
            let median = page["median"].as_f64().unwrap_or(f64::MAX);
            let max = page["max"].as_f64().unwrap_or(f64::MAX);
            println!("{name:<40} {median:>12.0} {max:>12.0}");
            if median >= TARGET_MS {
                slow.push(format!("{name} ({median:.0} ms)"));
            }
        }
        println!("target: every page's median under {TARGET_MS:.0} ms");
        if !slow.is_empty() {
            bail!("console pages over {TARGET_MS} ms: {}", slow.join(", "));
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", server.log_tail());
    }
    server.stop();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn shorten(path: &str) -> String {
    match path.split_once("before=") {
        Some((head, _)) => format!("{head}before=<the 1,000th task>"),
        None => match path.rsplit_once("/tasks/") {
            Some((head, id)) if !id.starts_with("search") => format!("{head}/tasks/<id>"),
            _ => path.to_owned(),
        },
    }
}
