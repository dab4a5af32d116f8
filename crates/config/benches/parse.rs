//! `cargo bench -p deployd-config`: parses a 1 MiB deployment file with 2,000 services and
//! checks the median time against the 50 ms target (exits non-zero when it misses).
//! A plain `main` (no harness): `cargo xtask bench` runs it and reads the verdict line.

use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SERVICES: usize = 2_000;
const TARGET: Duration = Duration::from_millis(50);
const RUNS: usize = 15;

/// A deployment of `SERVICES` services using most keys, padded to about 1 MiB.
fn deployment() -> String {
    let mut text = String::from(
        "name: bench\ndefault-service: svc-0\ncontrol-plane:\n  port: 8000\n\
         message-queue:\n  type: redis\n  url: redis://localhost:6379\nservices:\n",
    );
    for i in 0..SERVICES {
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
    text
}

fn main() -> ExitCode {
    let text = deployment();
    let mib = text.len() as f64 / (1024.0 * 1024.0);
    // Check the input is what it claims before timing it.
    match deployd_config::parse_with(&text, "bench.yaml", &|_| None) {
        Ok(loaded) if loaded.spec.services.len() == SERVICES => {}
        Ok(loaded) => {
            eprintln!(
                "expected {SERVICES} services, got {}",
                loaded.spec.services.len()
            );
            return ExitCode::FAILURE;
        }
        Err(diagnostics) => {
            eprintln!("{}", diagnostics.render(&text));
            return ExitCode::FAILURE;
        }
    }
    let times = measure(&text);
    let median = times[RUNS / 2];
    // Baseline, same run: the same file with a `---` document marker, which the fast reader
    // leaves to the full YAML parser.
    let baseline = measure(&format!("---\n{text}"))[RUNS / 2];
    let ok = median < TARGET;
    println!(
        "parse {mib:.2} MiB / {SERVICES} services: median {:.1} ms, min {:.1} ms, max {:.1} ms (target < {} ms): {}",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[RUNS - 1].as_secs_f64() * 1e3,
        TARGET.as_millis(),
        if ok { "ok" } else { "MISSED" }
    );
    println!(
        "  baseline (full YAML parser): median {:.1} ms; the fast reader is {:.1}x faster",
        baseline.as_secs_f64() * 1e3,
        baseline.as_secs_f64() / median.as_secs_f64()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses `text` `RUNS` times; the times, sorted.
fn measure(text: &str) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let loaded = deployd_config::parse_with(black_box(text), "bench.yaml", &|_| None);
            let elapsed = start.elapsed();
            assert!(black_box(loaded.is_ok()));
            elapsed
        })
        .collect();
    times.sort();
    times
}
