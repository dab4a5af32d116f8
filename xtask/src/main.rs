//! deployd's project tasks: `cargo xtask ci | e2e | bench | codegen`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod brokers;
mod python_bench;
mod python_tools;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci       cargo fmt --check, clippy -D warnings, the unit and integration tests, the Python
           adapter's tests (sdk/python/run-tests.sh), then e2e, then the TypeScript client's
           tests (sdk/typescript) and the web console's browser test (tests/console), both
           against the deployd e2e built
  e2e      starts the brokers that are not running (Redis, RabbitMQ, NATS, tansu, moto), runs
           the queue's conformance suite against each, then builds deployd and runs the
           end-to-end scenarios against the real binary (with a llama-deploy 0.9.2
           virtualenv for its llamactl and Client); stops only the brokers it started
  bench    runs every crate's benchmarks in release; each prints its measurements, the ratio
           to its baseline measured in the same run, and fails when it misses its target
           (the queue's bench runs against every broker, started as for e2e; the Python echo
           workflow runs through deployd, the adapter alone and llama_deploy 0.9.2; the task
           path runs deployd with a native and a Python echo service against llama_deploy; a
           cluster of 1, 2 and 3 nodes on PostgreSQL and Redis runs a 20 ms service; a 100-step
           durable graph runs through deployd and in process; the web console's pages load
           with 100,000 tasks in the store)
  bench tasks          only the task path (the same as bench-tasks)
  bench cluster        only the cluster benchmark (throughput of 1, 2 and 3 nodes)
  bench graph          only the durable graph benchmark (a 100-step graph through deployd and
                       in process)
  bench console        only the web console's benchmark (its pages in headless Chromium with
                       100,000 tasks and 201 deployments; every page under 300 ms)
  bench python         only the Python workflow benchmark (the same as bench-python)
  bench-python [--without-deployd]
                       only the Python workflow benchmark (without deployd: only the adapter
                       and llama_deploy, no release build, no reload target)
  bench-tasks          only the task path benchmark (deployd with a native and a Python echo
                       service against llama_deploy 0.9.2)
  llama-deploy-python  makes (or finds) the llama-deploy 0.9.2 virtualenv; prints its python
  codegen  writes the generated files that are checked in (docs/deployment.schema.json)";

fn main() -> std::process::ExitCode {
    let task = std::env::args().nth(1);
    let result = match task.as_deref() {
        Some("ci") => ci(),
        Some("e2e") => e2e(),
        Some("bench") => match std::env::args().nth(2).as_deref() {
            None => bench(),
            Some("tasks") => python_bench::tasks::run(),
            Some("cluster") => bench_cluster(),
            Some("graph") => python_bench::graph::run(),
            Some("console") => python_bench::console::run(),
            Some("python") => python_bench::run(true),
            Some(other) => Err(anyhow::anyhow!("unknown benchmark `{other}`\n\n{USAGE}")),
        },
        Some("bench-python") => match std::env::args().nth(2).as_deref() {
            None => python_bench::run(true),
            Some("--without-deployd") => python_bench::run(false),
            Some(other) => Err(anyhow::anyhow!(
                "unknown argument `{other}` of bench-python\n\n{USAGE}"
            )),
        },
        Some("bench-tasks") => python_bench::tasks::run(),
        Some("llama-deploy-python") => python_tools::print_llama_deploy_python(),
        Some("codegen") => codegen(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task `{other}`\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

fn run(what: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs tests with nextest when it is installed, else with `cargo test`.
fn test(what: &str, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let mut command = cargo();
    if has_nextest() {
        command.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        command.args(["test", "--no-fail-fast"]);
    }
    command.args(args);
    for (key, value) in envs {
        command.env(key, value);
    }
    run(what, &mut command)
}

/// `vars` as [`test`] takes them.
fn env_refs<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a std::ffi::OsStr)> {
    vars.iter()
        .map(|(key, value)| (*key, std::ffi::OsStr::new(value.as_str())))
        .collect()
}

fn ci() -> anyhow::Result<()> {
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    brokers::ensure_postgres()?;
    // The workspace builds deployd-queue with every broker feature (the deployd binary has them
    // on by default), so its broker suites are built here too; they run in `e2e`, once their
    // brokers are started.
    if has_nextest() {
        test(
            "unit and integration tests",
            &[
                "--workspace",
                "--exclude",
                "deployd-e2e",
                "-E",
                "not (package(deployd-queue) and kind(test) and not binary(memory))",
            ],
            &[],
        )?;
    } else {
        // `cargo test` cannot leave test targets out by name: start their brokers.
        brokers::with_brokers(|env| {
            let vars = env.vars();
            let envs = env_refs(&vars);
            test(
                "unit and integration tests",
                &["--workspace", "--exclude", "deployd-e2e"],
                &envs,
            )
        })?;
    }
    run(
        "doc tests",
        cargo().args(["test", "--workspace", "--exclude", "deployd-e2e", "--doc"]),
    )?;
    run(
        "the Python adapter's tests (sdk/python, one virtualenv per workflow library)",
        std::process::Command::new("bash")
            .arg(root().join("sdk/python/run-tests.sh"))
            .current_dir(root()),
    )?;
    e2e()?;
    // Against the binary e2e built: the TypeScript client's tests, and the web console in
    // headless Chromium.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let binary = std::path::absolute(target.join("debug").join("deployd"))?;
    run(
        "the TypeScript client's tests (sdk/typescript, against deployd)",
        Command::new("bash")
            .arg(root().join("sdk/typescript/run-tests.sh"))
            .env("DEPLOYD_BIN", &binary)
            .current_dir(root()),
    )?;
    let (key, python) = python_tools::scenario_env(&target)?;
    run(
        "the web console's browser test (tests/console, headless Chromium)",
        Command::new("bash")
            .arg(root().join("tests/console/run-tests.sh"))
            .env("DEPLOYD_BIN", &binary)
            .env(
                "DEPLOYD_GRAPH_SERVICE_BIN",
                std::path::absolute(target.join("debug").join("graph-service"))?,
            )
            .env(key, python)
            .current_dir(root()),
    )
}

fn e2e() -> anyhow::Result<()> {
    if Command::new("python3").arg("--version").output().is_err() {
        bail!("the scenarios' services need python3, which is not installed");
    }
    run(
        "build deployd and the example graph service",
        cargo().args([
            "build",
            "-p",
            "deployd",
            "--bin",
            "deployd",
            "-p",
            "graph-service",
            "--bin",
            "graph-service",
        ]),
    )?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let binary = target.join("debug").join("deployd");
    brokers::with_brokers(|env| {
        let mut suite = cargo();
        suite.args(brokers::queue_test_args(has_nextest()));
        suite.envs(env.vars());
        run(
            "the queue's conformance suite against every broker",
            &mut suite,
        )?;
        let vars = env.vars();
        let mut envs = env_refs(&vars);
        envs.push(("DEPLOYD_BIN", binary.as_os_str()));
        let graph_service = target.join("debug").join("graph-service");
        envs.push(("DEPLOYD_GRAPH_SERVICE_BIN", graph_service.as_os_str()));
        envs.push(python_tools::scenario_env(&target)?);
        test("end-to-end scenarios", &["-p", "deployd-e2e"], &envs)
    })
}

/// The packages with benchmarks. Each bench target is a plain `harness = false` program that
/// measures, prints its ratios against a baseline measured in the same run, and exits non-zero
/// when it misses a target.
const BENCHED: &[&str] = &[
    "deployd-config",
    "deployd-sources",
    "deployd-pipeline",
    "deployd-graph",
    "deployd-manager",
];

/// The cluster benchmark, with PostgreSQL and Redis running.
fn bench_cluster() -> anyhow::Result<()> {
    brokers::ensure_postgres()?;
    brokers::with_brokers(|env| {
        let postgres = std::env::var("DEPLOYD_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        python_bench::cluster::run(&postgres, &env.redis_url)
    })
}

fn bench() -> anyhow::Result<()> {
    brokers::ensure_postgres()?;
    let mut missed = Vec::new();
    for package in BENCHED {
        let what = format!("benchmarks of {package}");
        if let Err(err) = run(&what, cargo().args(["bench", "-p", package, "--benches"])) {
            eprintln!("xtask: {err:#}");
            missed.push(*package);
        }
    }
    // The queue's bench measures every adapter against its broker's own client.
    let queue = brokers::with_brokers(|env| {
        let mut command = cargo();
        command.args(brokers::queue_bench_args());
        command.envs(env.vars());
        run("benchmarks of deployd-queue (every broker)", &mut command)
    });
    if let Err(err) = queue {
        eprintln!("xtask: {err:#}");
        missed.push("deployd-queue");
    }
    // The Python workflow served by deployd, by its adapter alone and by llama_deploy 0.9.2.
    if let Err(err) = python_bench::run(true) {
        eprintln!("xtask: {err:#}");
        missed.push("python workflow (deployd, adapter, llama_deploy)");
    }
    // The task path: deployd with a native and a Python echo service against llama_deploy.
    if let Err(err) = python_bench::tasks::run() {
        eprintln!("xtask: {err:#}");
        missed.push("task path (bench-tasks)");
    }
    // A 100-step durable graph through deployd and in process.
    if let Err(err) = python_bench::graph::run() {
        eprintln!("xtask: {err:#}");
        missed.push("durable graph steps (bench graph)");
    }
    // The web console's pages with 100,000 tasks and 201 deployments.
    if let Err(err) = python_bench::console::run() {
        eprintln!("xtask: {err:#}");
        missed.push("web console pages (bench console)");
    }
    // A cluster of 1, 2 and 3 nodes on PostgreSQL and Redis.
    if let Err(err) = bench_cluster() {
        eprintln!("xtask: {err:#}");
        missed.push("cluster (bench cluster)");
    }
    if missed.is_empty() {
        eprintln!("xtask: every benchmark met its targets");
        Ok(())
    } else {
        bail!(
            "benchmarks that missed a target or failed: {}",
            missed.join(", ")
        )
    }
}

fn codegen() -> anyhow::Result<()> {
    let path = root().join("docs/deployment.schema.json");
    std::fs::write(&path, deployd_config::json_schema())
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}
