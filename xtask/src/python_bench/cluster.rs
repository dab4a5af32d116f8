//! `cargo xtask bench cluster` (and part of `cargo xtask bench`): the throughput of a cluster
//! of 1, 2 and 3 deployd nodes, side by side in one run on one machine.
//!
//! The nodes share the machine's PostgreSQL (a schema of the run's own) and Redis. The service
//! is `echo-service` answering after 20 ms (`ECHO_DELAY_MS`), with `max-concurrency: 1`: one
//! node runs at most 50 tasks/s, so the cluster's rate shows how well the nodes share the work.
//! Clients send `POST .../tasks/run` round-robin to the nodes (4 connections per node of the
//! largest cluster, for every size), for [`LOAD_CAP`] or [`TASKS`] tasks; every answer is
//! checked. It prints tasks/s and p50/p99 per size, and the ratios to one node; the target is
//! [`TARGET_3`] at three nodes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{DEPLOYMENT, Measure, Process, free_port, load_on, run_request};

/// What each task waits in the service.
const DELAY_MS: u64 = 20;
/// The cluster sizes measured.
const SIZES: [usize; 3] = [1, 2, 3];
/// Client connections (the same for every size: enough to keep three nodes busy).
const CONNECTIONS: usize = 12;
/// At most this many tasks per size, and at most this long.
const TASKS: usize = 2_000;
const LOAD_CAP: Duration = Duration::from_secs(8);
/// Target: three nodes run at least this many times the tasks of one.
const TARGET_3: f64 = 2.5;

fn native_file(binary: &Path) -> String {
    format!(
        "name: {DEPLOYMENT}\ndefault-service: echo\nservices:\n  echo:\n    name: Echo\n    \
         command: {}\n    max-concurrency: 1\n    env:\n      ECHO_DELAY_MS: \"{DELAY_MS}\"\n",
        binary.display()
    )
}

pub(crate) fn run(postgres: &str, redis: &str) -> anyhow::Result<()> {
    let target = super::build_release_with("xtask", "echo-service")?;
    let deployd = target.join("release").join("deployd");
    let echo = target.join("release").join("echo-service");
    let work = target.join("cluster-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let file = work.join("deployment.yml");
    std::fs::write(&file, native_file(&echo))?;

    let mut results = Vec::new();
    for size in SIZES {
        let schema = format!("bench_cluster_{}_{size}", std::process::id());
        let measured = measure(&deployd, &work, &file, postgres, redis, &schema, size);
        drop_schema(postgres, &schema);
        results.push((size, measured?));
    }
    println!();
    println!(
        "cluster throughput: echo-service, {DELAY_MS} ms a task, max-concurrency 1, {CONNECTIONS} \
         connections round-robin over the nodes, tasks/run"
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "nodes", "tasks/s", "p50 ms", "p99 ms", "failures", "ratio"
    );
    let one = results.first().map_or(1.0, |(_, m)| m.rate().max(1e-9));
    for (size, m) in &results {
        println!(
            "{:>6} {:>10.1} {:>9.1} {:>9.1} {:>9} {:>7.2}x",
            size,
            m.rate(),
            super::ms(m.p50),
            super::ms(m.p99),
            m.failures,
            m.rate() / one
        );
    }
    let mut missed = Vec::new();
    for (size, m) in &results {
        if m.failures > 0 {
            missed.push(format!(
                "{size} node(s): {} failed tasks (first: {})",
                m.failures,
                m.first_failure.as_deref().unwrap_or("?")
            ));
        }
    }
    if let Some((_, three)) = results.iter().find(|(size, _)| *size == 3) {
        let ratio = three.rate() / one;
        println!("target: 3 nodes >= {TARGET_3}x one node: {ratio:.2}x");
        if ratio < TARGET_3 {
            missed.push(format!(
                "3 nodes ran {ratio:.2}x one node's tasks, below {TARGET_3}x"
            ));
        }
    }
    if !missed.is_empty() {
        bail!("the cluster benchmark missed: {}", missed.join("; "));
    }
    Ok(())
}

/// Starts `size` nodes, deploys on the first, waits until every node serves, and measures.
fn measure(
    deployd: &Path,
    work: &Path,
    file: &Path,
    postgres: &str,
    redis: &str,
    schema: &str,
    size: usize,
) -> anyhow::Result<Measure> {
    let store = format!("{postgres}?schema={schema}");
    let cluster = format!("bench{}n{size}", std::process::id());
    let mut nodes: Vec<(Process, u16)> = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        for i in 0..size {
            let port = free_port()?;
            let data = work.join(format!("node-{size}-{i}"));
            let mut command = Command::new(deployd);
            command
                .args([
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--data-dir",
                ])
                .arg(&data)
                .args(["--store", &store, "--cluster", &cluster, "--queue", redis])
                .current_dir(work);
            // The first node deploys the file; the others take it from the store.
            if i == 0 {
                command.arg(file);
            }
            let log = work.join(format!("deployd-{size}-{i}.log"));
            let process = Process::spawn("deployd (cluster node)", &mut command, &log)?;
            nodes.push((process, port));
        }
        for (process, port) in &mut nodes {
            process.wait_serving(*port, &run_request(*port), Duration::from_secs(120))?;
        }
        Ok(())
    })();
    let measured = started.map(|()| {
        let ports: Vec<u16> = nodes.iter().map(|(_, port)| *port).collect();
        // Warm up every node's connections, then measure.
        let _ = load(&ports, CONNECTIONS, 100, LOAD_CAP);
        load(&ports, CONNECTIONS, TASKS, LOAD_CAP)
    });
    for (process, _) in &mut nodes {
        process.stop();
    }
    measured
}

/// `tasks` tasks/run over `connections` keep-alive connections, connection `c` to node
/// `c % nodes`; at most `cap`.
fn load(ports: &[u16], connections: usize, tasks: usize, cap: Duration) -> Measure {
    let requests: Vec<Vec<u8>> = ports.iter().map(|port| run_request(*port)).collect();
    let request = |_: usize, connection: usize| requests[connection % requests.len()].clone();
    load_on(ports, connections, tasks, cap, &request)
}

fn drop_schema(postgres: &str, schema: &str) {
    let dropped = Command::new("psql")
        .args([
            postgres,
            "-qc",
            &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        ])
        .output()
        .context("cannot run psql");
    if let Err(err) = dropped {
        eprintln!("xtask: cannot drop the schema {schema}: {err:#}");
    }
}
