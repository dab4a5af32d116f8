//! A durable Rust graph served as a deployd service: a trip planner whose review step asks a
//! human. Every step is committed to the store deployd gives the service
//! (`DEPLOYD_GRAPH_STORE`, by default a SQLite file in the service's data folder), so a task
//! delivered again after a crash goes on from its last committed step.
//!
//! Input: `{"city": "Lisbon", "nights": 3}`, optionally `"slow": seconds` (the drafting step
//! takes that long: time to kill something in the middle of it). With `GRAPH_NODE_LOG` set,
//! every step appends `<task run> <node>` to that file when it starts (the end-to-end tests
//! count runs of each step with it).
//!
//! A second graph, `Steps` (input `{"graph": "Steps", "steps": 100}`), counts through that
//! many committed steps: `cargo xtask bench graph` runs it through deployd, and in this
//! process alone with `graph-service --in-process STEPS RUNS CONCURRENCY` (which prints the
//! durable steps per second of that run, as JSON), side by side.

use std::io::Write as _;
use std::time::Duration;

use deployd_graph::service::Service;
use deployd_graph::{Ctx, End, Node, NodeError, graph};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Trip {
    city: String,
    nights: u32,
    plan: Vec<String>,
}

/// Looks up what the city offers.
#[derive(Serialize, Deserialize)]
struct Research {
    slow: f64,
}

/// Drafts the itinerary (slowly, when asked to).
#[derive(Serialize, Deserialize)]
struct Draft {
    slow: f64,
}

/// Asks a human to approve the draft, or to change the number of nights.
#[derive(Serialize, Deserialize)]
struct Review;

/// Books the trip.
#[derive(Serialize, Deserialize)]
struct Book;

/// What the review asks.
#[derive(Serialize, Deserialize)]
struct Approval {
    draft: Vec<String>,
}

/// The human's answer: `{"approve": true}` or `{"approve": false, "nights": 5}`.
#[derive(Serialize, Deserialize)]
struct Decision {
    approve: bool,
    #[serde(default)]
    nights: Option<u32>,
}

graph! {
    /// Plans a trip with a human's approval.
    TripPlanner {
        state: Trip,
        output: String,
        event: Value,
        nodes {
            /// Looks up what the city offers.
            Research => ResearchNext [Draft],
            /// Drafts the itinerary.
            Draft => DraftNext [Review],
            /// Asks a human to approve the draft.
            Review => ReviewNext [Book "approved", Draft "redraft"] asks Approval => Decision,
            /// Books the trip.
            Book => BookNext [End "booked"],
        }
    }
}

/// Appends `<run> <node>` to `GRAPH_NODE_LOG`, when it is set.
fn log_step(ctx: &Ctx<'_, TripPlanner>, node: &str) {
    if let Some(path) = std::env::var_os("GRAPH_NODE_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{} {node}", ctx.run_id());
    }
}

impl Node<TripPlanner> for Research {
    async fn run(self, ctx: Ctx<'_, TripPlanner>) -> Result<ResearchNext, NodeError> {
        log_step(&ctx, "Research");
        ctx.state.plan = vec![format!("walk around {}", ctx.state.city)];
        ctx.emit(json!({"researched": ctx.state.city}));
        Ok(Draft { slow: self.slow }.into())
    }
}

impl Node<TripPlanner> for Draft {
    async fn run(self, ctx: Ctx<'_, TripPlanner>) -> Result<DraftNext, NodeError> {
        log_step(&ctx, "Draft");
        if self.slow > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(self.slow)).await;
        }
        let days = (1..=ctx.state.nights).map(|day| format!("day {day} in {}", ctx.state.city));
        ctx.state.plan.truncate(1);
        ctx.state.plan.extend(days);
        ctx.emit(json!({"drafted": ctx.state.plan.len()}));
        Ok(Review.into())
    }
}

impl Node<TripPlanner> for Review {
    async fn run(self, ctx: Ctx<'_, TripPlanner>) -> Result<ReviewNext, NodeError> {
        log_step(&ctx, "Review");
        Ok(match ctx.answer::<Self>()? {
            None => ReviewNext::Interrupt(Approval {
                draft: ctx.state.plan.clone(),
            }),
            Some(Decision { approve: true, .. }) => Book.into(),
            Some(Decision { nights, .. }) => {
                ctx.state.nights = nights.unwrap_or(ctx.state.nights);
                Draft { slow: 0.0 }.into()
            }
        })
    }
}

impl Node<TripPlanner> for Book {
    async fn run(self, ctx: Ctx<'_, TripPlanner>) -> Result<BookNext, NodeError> {
        log_step(&ctx, "Book");
        Ok(End(format!(
            "booked {} nights in {}",
            ctx.state.nights, ctx.state.city
        ))
        .into())
    }
}

/// How far the `Steps` graph has counted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Count {
    done: u32,
}

/// One committed step; goes on until `left` is 0.
#[derive(Serialize, Deserialize)]
struct Step {
    left: u32,
}

graph! {
    /// Counts through committed steps (the benchmark's graph).
    Steps {
        state: Count,
        output: u32,
        event: Value,
        nodes {
            /// One step.
            Step => StepNext [Step "again", End "done"],
        }
    }
}

impl Node<Steps> for Step {
    async fn run(self, ctx: Ctx<'_, Steps>) -> Result<StepNext, NodeError> {
        ctx.state.done += 1;
        Ok(if self.left <= 1 {
            End(ctx.state.done).into()
        } else {
            Step {
                left: self.left - 1,
            }
            .into()
        })
    }
}

fn start_steps(input: Value) -> Result<(Step, Count), String> {
    let steps = input["steps"].as_u64().unwrap_or(100).clamp(1, 1_000_000);
    let left = u32::try_from(steps).map_err(|_| "`steps` is too large")?;
    Ok((Step { left }, Count::default()))
}

/// `--in-process STEPS RUNS CONCURRENCY`: RUNS runs of `Steps` (CONCURRENCY at a time) in this
/// process, on a SQLite store in a fresh folder under `DEPLOYD_DATA_DIR` (or the current
/// folder), with the durability the service uses; prints `{"steps_per_second": …}`.
async fn in_process(args: &[String]) -> Result<(), String> {
    let number = |i: usize, default: usize| {
        args.get(i).map_or(Ok(default), |a| {
            a.parse::<usize>().map_err(|e| format!("{a}: {e}"))
        })
    };
    let (steps, runs, concurrency) = (number(0, 100)?, number(1, 50)?, number(2, 4)?.max(1));
    let dir = std::env::var_os("DEPLOYD_DATA_DIR")
        .map_or_else(|| std::path::PathBuf::from("."), std::path::PathBuf::from)
        .join(format!("in-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let store = deployd_graph::service::store_at(&format!(
        "sqlite://{}",
        dir.join("graph.sqlite").display()
    ))
    .await
    .map_err(|e| e.to_string())?;
    let runner = std::sync::Arc::new(deployd_graph::Runner::<Steps>::with_store(store, ()));
    let left = u32::try_from(steps).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (runner, next) = (runner.clone(), next.clone());
        workers.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < runs {
                runner
                    .run(Step { left }, Count::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({"steps_per_second": (steps * runs) as f64 / seconds, "seconds": seconds})
    );
    Ok(())
}

/// The first node and state of a task's input.
fn start(input: Value) -> Result<(Research, Trip), String> {
    let city = input["city"]
        .as_str()
        .ok_or("the input needs a `city`")?
        .to_owned();
    let nights = input["nights"].as_u64().unwrap_or(2);
    let nights = u32::try_from(nights).map_err(|_| "`nights` is too large")?;
    let slow = input["slow"].as_f64().unwrap_or(0.0);
    Ok((
        Research { slow },
        Trip {
            city,
            nights,
            plan: Vec::new(),
        },
    ))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--in-process") {
        return match in_process(&args[1..]).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("graph-service: {err}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let service = match Service::from_env().await {
        Ok(service) => service
            .graph::<TripPlanner, _>(start, ())
            .graph::<Steps, _>(start_steps, ()),
        Err(err) => {
            eprintln!("graph-service: cannot open the graph store: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("graph-service: serving {service:?}");
    if let Err(err) = service.run().await {
        eprintln!("graph-service: {err}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
