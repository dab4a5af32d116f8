//! `cargo xtask bench graph` (and part of `cargo xtask bench`): a 100-step graph of
//! `deployd-graph`, durable on SQLite, run through deployd (each task a run of
//! `examples/graph-service`'s `Steps` graph) and in the service's process alone (the in-process
//! runner, `graph-service --in-process`), side by side in one run. Both keep every step in a
//! SQLite file with the same durability and run [`CONCURRENCY`] runs at a time; it prints the
//! durable steps per second of each and their ratio, which must be at least [`TARGET`].

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Process, free_port, load_expecting, one_shot, post};

/// Steps of one run, runs measured, and runs at a time.
const STEPS: usize = 100;
const RUNS: usize = 200;
const CONCURRENCY: usize = 4;
/// The longest the run through deployd takes.
const CAP: Duration = Duration::from_secs(60);
/// Through deployd, at least this share of the in-process runner's durable steps per second.
const TARGET: f64 = 0.8;

fn request(port: u16) -> Vec<u8> {
    post(
        port,
        "/deployments/graphs/tasks/run",
        "application/json",
        format!(r#"{{"input": "{{\"graph\": \"Steps\", \"steps\": {STEPS}}}"}}"#).as_bytes(),
    )
}

pub(crate) fn run() -> anyhow::Result<()> {
    let target = super::build_release_with("graph-service", "graph-service")?;
    let deployd = target.join("release").join("deployd");
    let service = target.join("release").join("graph-service");
    let work = target.join("graph-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    // In the service's process alone.
    let output = Command::new(&service)
        .args([
            "--in-process",
            &STEPS.to_string(),
            &RUNS.to_string(),
            &CONCURRENCY.to_string(),
        ])
        .env("DEPLOYD_DATA_DIR", &work)
        .output()
        .context("cannot run graph-service --in-process")?;
    if !output.status.success() {
        bail!(
            "graph-service --in-process failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("graph-service --in-process printed no JSON")?;
    let alone = figures["steps_per_second"]
        .as_f64()
        .context("no steps_per_second")?;

    // Through deployd.
    let file = work.join("deployment.yml");
    std::fs::write(
        &file,
        format!(
            "name: graphs\nservices:\n  steps:\n    command: {}\n",
            service.display()
        ),
    )?;
    let port = free_port()?;
    let mut command = Command::new(&deployd);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(work.join("deployd-data"))
        .arg(&file)
        .current_dir(&work);
    let mut server = Process::spawn("deployd", &mut command, &work.join("deployd.log"))?;
    let expected = format!("{STEPS}");
    let measured = (|| -> anyhow::Result<super::Measure> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            server.check_running()?;
            if let Ok((200, body, _)) = one_shot(port, &request(port), Duration::from_secs(30))
                && super::contains(&body, &expected)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "deployd did not run the graph within 60 s\n{}",
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let one = request(port);
        let request = |_: usize, _: usize| one.clone();
        Ok(load_expecting(
            &[port],
            CONCURRENCY,
            RUNS,
            CAP,
            &request,
            &expected,
        ))
    })();
    server.stop();
    let _ = std::fs::remove_dir_all(&work);
    let measured = measured?;
    let through = (measured.done * STEPS) as f64 / measured.elapsed.as_secs_f64().max(1e-9);
    let ratio = through / alone;
    println!();
    println!(
        "durable graph steps: a {STEPS}-step graph on SQLite (every step committed), {RUNS} runs, \
         {CONCURRENCY} at a time"
    );
    println!("{:<36} {:>14}", "", "steps/s");
    println!(
        "{:<36} {:>14.0}",
        "in-process runner (graph-service)", alone
    );
    println!(
        "{:<36} {:>14.0}   ({} tasks, p50 {:.1} ms, {} failed)",
        "through deployd (tasks/run)",
        through,
        measured.done,
        super::ms(measured.p50),
        measured.failures
    );
    println!("through deployd / in-process: {ratio:.2}x (target {TARGET}x)");
    if measured.failures > 0 {
        bail!(
            "{} graph tasks failed (first: {})",
            measured.failures,
            measured.first_failure.as_deref().unwrap_or("?")
        );
    }
    if ratio < TARGET {
        bail!(
            "durable steps through deployd: {ratio:.2}x the in-process runner's (target {TARGET}x)"
        );
    }
    Ok(())
}
