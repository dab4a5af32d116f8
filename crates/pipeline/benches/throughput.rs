//! Items per second through a 5-stage pass-through pipeline, against a hand-written 5-stage
//! chain of `tokio::sync::mpsc` channels measured in the same run: item at a time, and in
//! batches of 100 (the hand-written chain then passes `Vec`s of 100 items).
//!
//! Targets: the pipeline costs at most 1.5× the hand-written chain per item, and moves at least
//! 2,000,000 items per second in batches of 100. Prints `ok` or `MISS` for each and exits
//! non-zero on a miss. Run with `cargo bench -p deployd-pipeline`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use deployd_pipeline::{BatchConfig, Pipeline};
use tokio::sync::mpsc;

const STAGES: usize = 5;
/// Items a link holds, in both chains (the hand-written one holds `CAPACITY / BATCH` batches).
const CAPACITY: usize = 1_000;
const BATCH: usize = 100;
const ROUNDS: usize = 9;
const ITEMS_ONE_BY_ONE: u64 = 1_000_000;
const ITEMS_BATCHED: u64 = 5_000_000;
const MAX_COST_RATIO: f64 = 1.5;
const MIN_BATCHED_RATE: f64 = 2_000_000.0;

// The hand-written chains: a source task, then `STAGES` stage tasks each forwarding what it
// receives, the last one dropping it (as `Pipeline::run` does); the caller waits for the end.

async fn hand_written_one_by_one(items: u64) -> u64 {
    let (source, mut rx) = mpsc::channel::<u64>(CAPACITY);
    tokio::spawn(async move {
        for x in 0..items {
            if source.send(x).await.is_err() {
                return;
            }
        }
    });
    for _ in 1..STAGES {
        let (tx, next) = mpsc::channel::<u64>(CAPACITY);
        let mut input = rx;
        tokio::spawn(async move {
            while let Some(x) = input.recv().await {
                if tx.send(x).await.is_err() {
                    return;
                }
            }
        });
        rx = next;
    }
    let last = tokio::spawn(async move {
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        n
    });
    last.await.unwrap_or(0)
}

async fn hand_written_batched(items: u64) -> u64 {
    let (source, mut rx) = mpsc::channel::<Vec<u64>>(CAPACITY / BATCH);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        for x in 0..items {
            batch.push(x);
            if batch.len() == BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if source.send(full).await.is_err() {
                    return;
                }
            }
        }
        if !batch.is_empty() {
            source.send(batch).await.ok();
        }
    });
    for _ in 1..STAGES {
        let (tx, next) = mpsc::channel::<Vec<u64>>(CAPACITY / BATCH);
        let mut input = rx;
        tokio::spawn(async move {
            while let Some(batch) = input.recv().await {
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
        });
        rx = next;
    }
    let last = tokio::spawn(async move {
        let mut n = 0;
        while let Some(batch) = rx.recv().await {
            n += batch.len() as u64;
        }
        n
    });
    last.await.unwrap_or(0)
}

async fn pipeline_one_by_one(items: u64) -> u64 {
    let mut p = Pipeline::from_items(0..items).capacity(CAPACITY);
    for i in 0..STAGES {
        p = p.map(&format!("s{i}"), 1, |x| async move { x });
    }
    let progress = p.progress();
    if p.run().await.is_err() {
        return 0;
    }
    progress.snapshot().stages.last().map_or(0, |s| s.items_out)
}

async fn pipeline_batched(items: u64) -> u64 {
    let mut p = Pipeline::from_items(0..items).capacity(CAPACITY);
    let config = BatchConfig::new(BATCH, BATCH, Duration::from_millis(10));
    for i in 0..STAGES {
        p = p.batched_stage(&format!("s{i}"), config, |batch| async move {
            Ok::<_, std::convert::Infallible>(batch)
        });
    }
    let progress = p.progress();
    if p.run().await.is_err() {
        return 0;
    }
    progress.snapshot().stages.last().map_or(0, |s| s.items_out)
}

fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    seconds[seconds.len() / 2]
}

/// Medians over the rounds: seconds of each chain, and the cost ratio of the pipeline.
struct Measured {
    hand: f64,
    pipeline: f64,
    ratio: f64,
}

/// Runs both chains `ROUNDS` times, back to back in each round. The ratio is the median of the
/// rounds' ratios, so that a change in the machine's load between rounds (other processes on a
/// shared machine) moves both sides of a ratio alike.
fn measure<H, P, HF, PF>(
    runtime: &tokio::runtime::Runtime,
    items: u64,
    hand: H,
    pipeline: P,
) -> Result<Measured, String>
where
    H: Fn(u64) -> HF,
    P: Fn(u64) -> PF,
    HF: Future<Output = u64>,
    PF: Future<Output = u64>,
{
    let (mut h, mut p, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let mut run = |first_hand: bool| -> Result<(), String> {
            if first_hand {
                let start = Instant::now();
                let n = runtime.block_on(hand(items));
                h.push(start.elapsed().as_secs_f64());
                if n != items {
                    return Err(format!("the hand-written chain moved {n} of {items} items"));
                }
            } else {
                let start = Instant::now();
                let n = runtime.block_on(pipeline(items));
                p.push(start.elapsed().as_secs_f64());
                if n != items {
                    return Err(format!("the pipeline moved {n} of {items} items"));
                }
            }
            Ok(())
        };
        run(round % 2 == 0)?;
        run(round % 2 == 1)?;
        r.push(p[round] / h[round]);
    }
    Ok(Measured {
        hand: median(h),
        pipeline: median(p),
        ratio: median(r),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

fn report(mode: &str, items: u64, m: &Measured) -> bool {
    let n = items as f64;
    let ok = m.ratio <= MAX_COST_RATIO;
    println!(
        "{mode:<16} hand-written {:>12.0} items/s {:>7.1} ns/item | pipeline {:>12.0} items/s {:>7.1} ns/item | cost ×{:.2} (≤ ×{MAX_COST_RATIO}) {}",
        n / m.hand,
        m.hand * 1e9 / n,
        n / m.pipeline,
        m.pipeline * 1e9 / n,
        m.ratio,
        verdict(ok),
    );
    ok
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot build a tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "pipeline throughput: {STAGES} pass-through stages, links of {CAPACITY} items, 2 worker threads, median of {ROUNDS} rounds (cost: median of the rounds' ratios)"
    );
    // `cargo bench -p deployd-pipeline -- item` (or `-- batches`) runs one of the two.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |mode: &str| filter.as_deref().is_none_or(|f| mode.contains(f));
    let mut ok = true;
    if wanted("item at a time") {
        match measure(
            &runtime,
            ITEMS_ONE_BY_ONE,
            hand_written_one_by_one,
            pipeline_one_by_one,
        ) {
            Ok(one) => ok &= report("item at a time", ITEMS_ONE_BY_ONE, &one),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let batches = format!("batches of {BATCH}");
    if wanted(&batches) {
        match measure(
            &runtime,
            ITEMS_BATCHED,
            hand_written_batched,
            pipeline_batched,
        ) {
            Ok(batched) => {
                ok &= report(&batches, ITEMS_BATCHED, &batched);
                let rate = ITEMS_BATCHED as f64 / batched.pipeline;
                let fast = rate >= MIN_BATCHED_RATE;
                println!(
                    "{batches:<16} pipeline {rate:.0} items/s (≥ {MIN_BATCHED_RATE:.0}) {}",
                    verdict(fast),
                );
                ok &= fast;
            }
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
