//! `cargo bench -p deployd-config`: how long a deployment file takes to parse.
//!
//! 1. A 1 MiB file of 2,000 services, median against the 50 ms target; baseline: the same file
//!    read by the full YAML parser instead of the fast reader.
//! 2. Files of the largest accepted size (4 MiB) that have been slow before: one service whose
//!    `env` has about 100,000 entries with duplicated keys (through a merge key, and written
//!    twice), the same `env` in flow style on one line with non-ASCII text, and many services
//!    that each have a mistake. Each must parse in less than 1 s of CPU; baseline: a 4 MiB file
//!    of the first kind (many small valid services, full parser), whose time per byte each is
//!    compared to.
//!
//! A plain `main` (no harness): `cargo xtask bench` runs it; it exits non-zero when a target is
//! missed.

use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use deployd_config::{Loaded, MAX_FILE_SIZE, parse_with};

const SERVICES: usize = 2_000;
const TARGET: Duration = Duration::from_millis(50);
const RUNS: usize = 15;

/// The entries of the big `env` maps.
const ENV_ENTRIES: usize = 100_000;
/// Every this many entries, a key is written again.
const DUPLICATE_EVERY: usize = 20;
const BIG_TARGET: Duration = Duration::from_secs(1);
const BIG_RUNS: usize = 5;

/// A deployment of `services` services using most keys, about 540 bytes each.
fn deployment(services: usize) -> String {
    let mut text = header();
    for i in 0..services {
        push_service(&mut text, i);
    }
    text
}

fn header() -> String {
    "name: bench\ndefault-service: svc-0\ncontrol-plane:\n  port: 8000\n\
     message-queue:\n  type: redis\n  url: redis://localhost:6379\nservices:\n"
        .to_owned()
}

fn push_service(text: &mut String, i: usize) {
    let _ = write!(
        text,
        "  svc-{i}:\n\
         \x20   name: Service number {i}\n\
         \x20   source:\n\
         \x20     type: local\n\
         \x20     location: services/svc-{i}\n\
         \x20     sync-policy: replace\n\
         \x20   command: [python3, -m, service, --name, svc-{i}, --verbose]\n\
         \x20   build:\n\
         \x20     - pip install -r requirements.txt\n\
         \x20   port: {port}\n\
         \x20   health: {{path: /healthz, timeout: 30s}}\n\
         \x20   restart: {{policy: on-failure, max-restarts: 5, window: 2m}}\n\
         \x20   max-concurrency: 8\n\
         \x20   timeout: 90s\n\
         \x20   env:\n\
         \x20     SERVICE_INDEX: \"{i}\"\n\
         \x20     LOG_LEVEL: info\n\
         \x20   env-files: [.env, config/svc-{i}.env]\n\
         \x20   python-dependencies: [llama-index-core>=0.12, httpx]\n",
        port = 10_000 + i,
    );
}

/// The largest file of [`deployment`]'s kind, read by the full YAML parser (`---`).
fn services_4mib() -> (String, usize) {
    let mut text = format!("---\n{}", header());
    let mut services = 0;
    loop {
        let before = text.len();
        push_service(&mut text, services);
        if text.len() > MAX_FILE_SIZE {
            text.truncate(before);
            return (text, services);
        }
        services += 1;
    }
}

/// The values of `count` entries of `fixed` bytes each besides their value, padded so that the
/// entries fill a 4 MiB file but for `used` bytes (and a little slack).
struct Values {
    width: usize,
    /// The first `wider` entries are a byte wider.
    wider: usize,
}

impl Values {
    fn new(used: usize, count: usize, fixed: usize) -> Self {
        let budget = MAX_FILE_SIZE - 64 - used - count * fixed;
        Self {
            width: budget / count,
            wider: budget % count,
        }
    }

    /// `value-0000012-xxxx…`, the value of entry `i`.
    fn of(&self, i: usize) -> String {
        let width = self.width + usize::from(i < self.wider);
        let mut value = format!("value-{i:07}-");
        while value.len() < width {
            value.push('x');
        }
        value
    }
}

/// One service whose `env` merges `ENV_ENTRIES / 2` defaults (`<<: *defaults`) and writes
/// `ENV_ENTRIES / 2` of its own, one in `DUPLICATE_EVERY` a key of the defaults again (the
/// service's own value wins). Valid; the env ends up with the entries less the duplicates.
fn env_merged() -> (String, usize) {
    let half = ENV_ENTRIES / 2;
    let (head, middle) = (
        "name: bench-env\nx-defaults: &defaults\n",
        "services:\n  api:\n    command: ./api\n    env:\n      <<: *defaults\n",
    );
    // Entry lines: indent, `VAR_0000000`, `: `, the value and `\n`.
    let values = Values::new(head.len() + middle.len(), ENV_ENTRIES, 6 + 11 + 2 + 1);
    let mut text = head.to_owned();
    for i in 0..half {
        let _ = writeln!(text, "      VAR_{i:07}: {}", values.of(i));
    }
    text.push_str(middle);
    let mut duplicates = 0;
    for i in half..ENV_ENTRIES {
        let key = if i % DUPLICATE_EVERY == 0 {
            duplicates += 1;
            i - half
        } else {
            i
        };
        let _ = writeln!(text, "      VAR_{key:07}: {}", values.of(i));
    }
    (text, ENV_ENTRIES - duplicates)
}

/// One service whose `env` has `ENV_ENTRIES` entries, one in `DUPLICATE_EVERY` a key written
/// before: an error for each (the first value is kept).
fn env_written_twice() -> (String, usize) {
    let header = "name: bench-env\nservices:\n  api:\n    command: ./api\n    env:\n";
    let values = Values::new(header.len(), ENV_ENTRIES, 6 + 11 + 2 + 1);
    let mut text = header.to_owned();
    let mut duplicates = 0;
    for i in 0..ENV_ENTRIES {
        let key = if i > 0 && i % DUPLICATE_EVERY == 0 {
            duplicates += 1;
            i - 1
        } else {
            i
        };
        let _ = writeln!(text, "      VAR_{key:07}: {}", values.of(i));
    }
    (text, duplicates)
}

/// The same number of entries in flow style on one line, with a non-ASCII value first (so the
/// columns of the line are counted in characters, not bytes). Valid.
fn env_flow_line() -> (String, usize) {
    let header =
        "name: bench-env\nservices:\n  api:\n    command: ./api\n    env: {GREETING: grüß, ";
    // Entries: `VAR_0000000`, `: `, the value and `, `.
    let values = Values::new(header.len() + 2, ENV_ENTRIES - 1, 11 + 2 + 2);
    let mut text = header.to_owned();
    for i in 1..ENV_ENTRIES {
        let _ = write!(text, "VAR_{i:07}: {}, ", values.of(i));
    }
    text.truncate(text.len() - 2);
    text.push_str("}\n");
    (text, ENV_ENTRIES)
}

/// Many services, each with a mistake (a port out of range): an error for each.
fn services_with_mistakes() -> (String, usize) {
    let mut text = String::from("name: bench-errors\nservices:\n");
    let mut services = 0;
    while text.len() < MAX_FILE_SIZE - 64 {
        let _ = writeln!(text, "  svc-{services:07}: {{command: ./run, port: 0}}");
        services += 1;
    }
    (text, services)
}

fn main() -> ExitCode {
    let mut ok = services_bench();
    ok &= big_files_bench();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn services_bench() -> bool {
    let text = deployment(SERVICES);
    let mib = text.len() as f64 / (1024.0 * 1024.0);
    // Check the input is what it claims before timing it.
    match parse(&text) {
        Ok(loaded) if loaded.spec.services.len() == SERVICES => {}
        Ok(loaded) => {
            eprintln!(
                "expected {SERVICES} services, got {}",
                loaded.spec.services.len()
            );
            return false;
        }
        Err(diagnostics) => {
            eprintln!("{}", diagnostics.render(&text));
            return false;
        }
    }
    let times = measure(&text, RUNS).wall;
    let median = times[RUNS / 2];
    // Baseline, same run: the same file with a `---` document marker, which the fast reader
    // leaves to the full YAML parser.
    let baseline = measure(&format!("---\n{text}"), RUNS).wall[RUNS / 2];
    let ok = median < TARGET;
    println!(
        "parse {mib:.2} MiB / {SERVICES} services: median {:.1} ms, min {:.1} ms, max {:.1} ms (target < {} ms): {}",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[RUNS - 1].as_secs_f64() * 1e3,
        TARGET.as_millis(),
        verdict(ok)
    );
    println!(
        "  baseline (full YAML parser): median {:.1} ms; the fast reader is {:.1}x faster",
        baseline.as_secs_f64() * 1e3,
        baseline.as_secs_f64() / median.as_secs_f64()
    );
    ok
}

fn big_files_bench() -> bool {
    let (baseline_text, services) = services_4mib();
    if let Err(problem) = expect_services(&baseline_text, services) {
        eprintln!("baseline: {problem}");
        return false;
    }
    let baseline = measure(&baseline_text, BIG_RUNS);
    let baseline_per_byte = baseline.cpu_median().as_secs_f64() / baseline_text.len() as f64;
    println!(
        "parse {:.2} MiB / {services} services (baseline, full YAML parser): median {:.1} ms CPU, {:.1} ns/byte",
        mib(&baseline_text),
        baseline.cpu_median().as_secs_f64() * 1e3,
        baseline_per_byte * 1e9,
    );
    type Workload = (&'static str, fn() -> (String, usize), Expect);
    let workloads: [Workload; 4] = [
        (
            "one env of 100k entries, 5k merged over (`<<`)",
            env_merged,
            Expect::Env,
        ),
        (
            "one env of 100k entries, 5k keys written twice",
            env_written_twice,
            Expect::Errors,
        ),
        (
            "one env of 100k entries in flow style on one non-ASCII line",
            env_flow_line,
            Expect::Env,
        ),
        (
            "services with a mistake each",
            services_with_mistakes,
            Expect::Errors,
        ),
    ];
    let mut ok = true;
    for (what, generate, expect) in workloads {
        let (text, count) = generate();
        let checked = match expect {
            Expect::Env => expect_env(&text, count),
            Expect::Errors => expect_errors(&text, count),
        };
        if let Err(problem) = checked {
            eprintln!("{what}: {problem}");
            ok = false;
            continue;
        }
        let times = measure(&text, BIG_RUNS);
        let cpu = times.cpu_median();
        let per_byte = cpu.as_secs_f64() / text.len() as f64;
        let met = cpu < BIG_TARGET;
        ok &= met;
        println!(
            "parse {:.2} MiB / {what}: median {:.1} ms CPU ({:.1} ms wall), {:.1} ns/byte = {:.2}x the baseline's (target < {} ms CPU): {}",
            mib(&text),
            cpu.as_secs_f64() * 1e3,
            times.wall[BIG_RUNS / 2].as_secs_f64() * 1e3,
            per_byte * 1e9,
            per_byte / baseline_per_byte,
            BIG_TARGET.as_millis(),
            verdict(met),
        );
    }
    ok
}

#[derive(Clone, Copy)]
enum Expect {
    /// Loads, with one service whose env has this many entries.
    Env,
    /// Fails with this many errors.
    Errors,
}

fn parse(text: &str) -> Result<Loaded, deployd_config::Diagnostics> {
    parse_with(black_box(text), "bench.yaml", &|_| None)
}

fn expect_services(text: &str, services: usize) -> Result<(), String> {
    match parse(text) {
        Ok(loaded) if loaded.spec.services.len() == services => Ok(()),
        Ok(loaded) => Err(format!(
            "expected {services} services, got {}",
            loaded.spec.services.len()
        )),
        Err(diagnostics) => Err(diagnostics.render(text)),
    }
}

fn expect_env(text: &str, entries: usize) -> Result<(), String> {
    if text.len() > MAX_FILE_SIZE || text.len() < MAX_FILE_SIZE - 4096 {
        return Err(format!("the file is {} bytes", text.len()));
    }
    match parse(text) {
        Ok(loaded) if loaded.spec.services[0].env.len() == entries => Ok(()),
        Ok(loaded) => Err(format!(
            "expected {entries} env entries, got {}",
            loaded.spec.services[0].env.len()
        )),
        Err(diagnostics) => Err(diagnostics.to_string()),
    }
}

fn expect_errors(text: &str, errors: usize) -> Result<(), String> {
    if text.len() > MAX_FILE_SIZE || text.len() < MAX_FILE_SIZE - 4096 {
        return Err(format!("the file is {} bytes", text.len()));
    }
    match parse(text) {
        Ok(_) => Err("the file loads".to_owned()),
        Err(diagnostics) if diagnostics.errors().count() == errors => Ok(()),
        Err(diagnostics) => Err(format!(
            "expected {errors} errors, got {}",
            diagnostics.errors().count()
        )),
    }
}

fn mib(text: &str) -> f64 {
    text.len() as f64 / (1024.0 * 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// The times of `runs` parses, each sorted.
struct Times {
    wall: Vec<Duration>,
    /// CPU time of the parsing thread, where the system tells it (Linux).
    cpu: Option<Vec<Duration>>,
}

impl Times {
    /// The median CPU time; the wall time where CPU time is not known.
    fn cpu_median(&self) -> Duration {
        let times = self.cpu.as_ref().unwrap_or(&self.wall);
        times[times.len() / 2]
    }
}

/// Parses `text` `runs` times.
fn measure(text: &str, runs: usize) -> Times {
    let mut wall = Vec::with_capacity(runs);
    let mut cpu = Some(Vec::with_capacity(runs));
    for _ in 0..runs {
        let cpu_start = thread_cpu_time();
        let start = Instant::now();
        let loaded = parse(text);
        let elapsed = start.elapsed();
        let cpu_end = thread_cpu_time();
        black_box(loaded.is_ok());
        drop(loaded);
        wall.push(elapsed);
        cpu = match (cpu, cpu_start, cpu_end) {
            (Some(mut times), Some(start), Some(end)) => {
                times.push(end.saturating_sub(start));
                Some(times)
            }
            _ => None,
        };
    }
    wall.sort();
    if let Some(times) = &mut cpu {
        times.sort();
    }
    Times { wall, cpu }
}

/// The CPU time the calling thread has used (`/proc/thread-self/schedstat`, in nanoseconds).
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}
