//! Staged async pipelines: typed stages joined by bounded links, with batching, per-stage
//! concurrency, a budget of items and bytes in flight, progress, and fail-fast cancellation.
//!
//! deployd runs the deploy of a deployment (sync → prepare → launch → ready → switch, one item
//! per service) and its batched store writes through this crate. It knows nothing of
//! deployments: it moves values of any `Send + 'static` type through async functions.
//!
//! # The model
//!
//! A [`Pipeline`] is an input — a stream ([`Pipeline::from_stream`]), an iterator
//! ([`Pipeline::from_items`], or `Pipeline::from_iter` for items at hand), or a [`Feeder`] for
//! producers that come and go ([`Pipeline::channel`]) — followed by stages. Each stage runs as its own tokio task, reads from the link
//! before it and puts into the link after it. A link holds at most
//! [`capacity`](Pipeline::capacity) items ([`DEFAULT_CAPACITY`] unless set), so a slow stage
//! holds back the ones before it (backpressure). The end of the stream is the previous stage
//! finishing — there is no sentinel item, and no special last stage: what the last stage puts
//! is the pipeline's output, which the caller collects ([`Pipeline::collect`]), streams
//! ([`Pipeline::into_stream`]) or drains ([`Pipeline::run`]).
//!
//! Stages are closures, added with
//! - [`map`](Pipeline::map): one output per item;
//! - [`stage`](Pipeline::stage): one `Result` per item, the first `Err` fails the pipeline;
//! - [`try_stage`](Pipeline::try_stage) and [`and_then`](Pipeline::and_then): one `Result` per
//!   item, an `Err` fails *that item* only and flows on as `Err(`[`Failed`]`)`;
//! - [`batched_stage`](Pipeline::batched_stage): a batch of items at a time
//!   ([`BatchConfig`]: min, max, max wait; urgent items and flushes release a batch early);
//!
//! or written by hand with the [`Stage`] trait, which reads an [`Input`] (`next`,
//! `next_batch`) and `put`s into an [`Output`]. Item stages take a [`Concurrency`]: how many
//! items at once, in input or completion order (a plain `usize` means input order).
//!
//! # Failure and cancellation
//!
//! The first error of any stage (or a panic, which is caught) fails the pipeline: every stage
//! task is aborted, the pipeline waits until each one is gone, then returns the error
//! ([`Error::Stage`] names the stage; the stage's own error is its `source`). Stages after a
//! failed one never see a clean end of input, so they do not act on half the data. Dropping
//! the pipeline's future or stream aborts every stage as well (each stops at its next await
//! point; a destructor cannot wait), and [`Outputs::cancel`] aborts them and waits until every
//! one is gone. [`Progress::running_tasks`] counts the stage tasks still alive.
//!
//! # Budget
//!
//! [`Pipeline::budget`] bounds the items and bytes in flight from that point on with a
//! [`Budget`]; the permit travels with the item and is released when the item leaves the
//! pipeline or is dropped — on success, on error and on cancellation alike. An item heavier
//! than the whole budget passes alone.
//!
//! # Progress
//!
//! [`Pipeline::progress`] gives a [`Progress`] handle: a [`Snapshot`] of every stage's items
//! in, out and failed and of where its time went, readable at any time, or a stream of them
//! ([`Progress::updates`]). With [`Pipeline::track`], the snapshot also says for each item
//! which stage it is in and whether it waits, runs, is done or failed.
//!
//! # Example: a deploy
//!
//! One item per service goes through five stages with their own concurrency; a service whose
//! build fails is marked failed and the others still deploy.
//!
//! ```
//! use deployd_pipeline::{Failed, ItemState, Pipeline};
//!
//! #[derive(Debug)]
//! struct Service { name: String, build: &'static str }
//!
//! #[derive(Debug, PartialEq)]
//! struct DeployError { output: String }
//!
//! impl std::fmt::Display for DeployError {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "{}", self.output)
//!     }
//! }
//!
//! async fn sync(s: Service) -> Result<Service, DeployError> { Ok(s) }
//! async fn prepare(s: Service) -> Result<Service, DeployError> {
//!     match s.build {
//!         "false" => Err(DeployError { output: "build exited with 1".into() }),
//!         _ => Ok(s),
//!     }
//! }
//! async fn launch(s: Service) -> Result<Service, DeployError> { Ok(s) }
//! async fn ready(s: Service) -> Result<Service, DeployError> { Ok(s) }
//! async fn switch(s: Service) -> Result<String, DeployError> { Ok(s.name) }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), deployd_pipeline::Error> {
//! let services = vec![
//!     Service { name: "api".into(), build: "true" },
//!     Service { name: "worker".into(), build: "false" },
//!     Service { name: "ui".into(), build: "true" },
//! ];
//! let deploy = Pipeline::from_iter(services)
//!     .track(|s: &Service| s.name.clone())
//!     .try_stage("sync", 4, sync)
//!     .and_then("prepare", 2, prepare)
//!     .and_then("launch", 4, launch)
//!     .and_then("ready", 8, ready)
//!     .and_then("switch", 1, switch);
//! let progress = deploy.progress(); // keep it to answer `GET /deployments/{name}`
//! let outcomes = deploy.collect().await?;
//!
//! assert_eq!(outcomes[0], Ok("api".to_string()));
//! assert_eq!(
//!     outcomes[1],
//!     Err(Failed {
//!         stage: "prepare".into(),
//!         error: DeployError { output: "build exited with 1".into() },
//!     })
//! );
//! assert_eq!(outcomes[2], Ok("ui".to_string()));
//!
//! let snapshot = progress.snapshot();
//! let worker = snapshot.item("worker").map(|i| (i.stage.as_str(), &i.state));
//! let failed = ItemState::Failed { error: "build exited with 1".into() };
//! assert_eq!(worker, Some(("prepare", &failed)));
//! assert_eq!(snapshot.item("api").map(|i| &i.state), Some(&ItemState::Done));
//! let prepare = snapshot.stage("prepare").map(|s| (s.items_in, s.items_out, s.items_failed));
//! assert_eq!(prepare, Some((3, 2, 1)));
//! # Ok(())
//! # }
//! ```
//!
//! # Example: batched writes
//!
//! Producers put events through a [`Feeder`]; a batched stage writes them 100 at a time, or
//! what has come within 10 ms, or at once for an urgent event.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use deployd_pipeline::{BatchConfig, Pipeline};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
//! let (events, writer) = Pipeline::<String>::channel();
//! let written = Arc::clone(&store);
//! let writer = writer.batched_stage(
//!     "write",
//!     BatchConfig::new(100, 100, Duration::from_millis(10)),
//!     move |batch: Vec<String>| {
//!         let store = Arc::clone(&written);
//!         async move {
//!             // One transaction per batch.
//!             store.lock().map_err(|_| "store poisoned")?.push(batch);
//!             Ok::<_, &str>(Vec::<()>::new())
//!         }
//!     },
//! );
//! let writer = tokio::spawn(writer.run());
//!
//! events.put("started".to_string()).await?;
//! events.put_urgent("finished".to_string()).await?; // released without waiting 10 ms
//! drop(events); // the end of the input: the writer finishes
//! writer.await??;
//!
//! let batches = store.lock().map_err(|_| "store poisoned")?.clone();
//! assert_eq!(batches, vec![vec!["started".to_string(), "finished".to_string()]]);
//! # Ok(())
//! # }
//! ```

mod budget;
mod drivers;
mod error;
mod item;
mod link;
mod pipeline;
mod progress;
mod stage;

pub use budget::Budget;
pub use error::{BoxError, Closed, Error, Failed};
pub use item::{Batch, Item};
pub use pipeline::{DEFAULT_CAPACITY, Feeder, Outputs, Pipeline};
pub use progress::{
    ItemProgress, ItemState, PipelineState, Progress, Snapshot, StageProgress, StageState,
};
pub use stage::{BatchConfig, Batches, Concurrency, Input, Order, Output, Stage};
