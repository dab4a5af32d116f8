//! The CPU time deployd spends deploying a large deployment file: a valid 4 MiB file whose
//! service has an `env` map of about 90,000 entries (the probe of issue 13 saw one take 80 s of
//! CPU, duplicate keys being removed one by one). Measured from the deploy call until the
//! service has been launched, against the same deploy of a small file in the same run.
//!
//! Target: the 4 MiB deploy takes under 1 s of CPU.

#![recursion_limit = "256"]

use std::time::Duration;

use deployd_manager::{Manager, Options};

const TARGET_CPU: Duration = Duration::from_secs(1);

/// CPU time (user + system) this process has used, from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let ticks = |index: usize| fields.get(index - 3).and_then(|f| f.parse::<u64>().ok());
    let total = ticks(14).unwrap_or(0) + ticks(15).unwrap_or(0);
    Duration::from_millis(total * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    // `getconf CLK_TCK`; 100 on every Linux this runs on.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// A deployment file of at most `bytes` bytes: one service with an `env` map filling it.
fn file(name: &str, bytes: usize) -> String {
    let mut text = format!(
        "name: {name}\nservices:\n  svc:\n    command: python3 -c 'import time; time.sleep(60)'\n    env:\n"
    );
    let mut n = 0usize;
    loop {
        let line = format!("      VARIABLE_{n:08}: \"value number {n:08}\"\n");
        if text.len() + line.len() > bytes {
            break;
        }
        text.push_str(&line);
        n += 1;
    }
    text
}

/// Deploys `text` and waits until its service has gone past `launch`; returns the CPU time.
async fn deploy(manager: &Manager, text: &str, base: &std::path::Path) -> Duration {
    let before = cpu_time();
    let deployed = manager
        .deploy(text, "bench.yaml", base, false)
        .await
        .expect("the deploy failed");
    let name = deployed.status.name;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = manager.status(&name).expect("status");
        let past_launch = status.services.iter().all(|s| {
            s.stage.as_ref().is_some_and(|stage| {
                matches!(stage.stage.as_str(), "ready" | "switch") || stage.state == "failed"
            })
        });
        if past_launch {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy did not get past launch"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let used = cpu_time().saturating_sub(before);
    manager.delete(&name).await.expect("delete");
    used
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let manager = Manager::start(
            Options::new(dir.path().join("data")).drain_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("manager");
        let big = file("big", 4 * 1024 * 1024);
        let small = file("small", 512);
        let mut small_cpu = Vec::new();
        let mut big_cpu = Vec::new();
        for _ in 0..3 {
            small_cpu.push(deploy(&manager, &small, dir.path()).await);
            big_cpu.push(deploy(&manager, &big, dir.path()).await);
        }
        manager.shutdown().await;
        let best = |runs: &[Duration]| runs.iter().min().copied().unwrap_or_default();
        let (small, big_best) = (best(&small_cpu), best(&big_cpu));
        let worst = big_cpu.iter().max().copied().unwrap_or_default();
        println!(
            "deploy of a 4 MiB env map: {:.3} s CPU (worst of 3: {:.3} s); a 512-byte file: {:.3} s; ratio {:.1}x",
            big_best.as_secs_f64(),
            worst.as_secs_f64(),
            small.as_secs_f64(),
            big_best.as_secs_f64() / small.as_secs_f64().max(0.001),
        );
        if worst >= TARGET_CPU {
            eprintln!(
                "missed: the 4 MiB deploy took {:.3} s of CPU (target under {:.1} s)",
                worst.as_secs_f64(),
                TARGET_CPU.as_secs_f64()
            );
            std::process::exit(1);
        }
        println!("target met: under {:.1} s of CPU", TARGET_CPU.as_secs_f64());
    });
}
