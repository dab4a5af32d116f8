//! The behaviour of pipelines: order, backpressure, batching, budget, fail-fast, cancellation,
//! progress.

use std::future::{Future, pending};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use deployd_pipeline::{
    BatchConfig, Budget, Concurrency, Error, Failed, Input, ItemState, Output, Pipeline,
    PipelineState, StageState,
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, timeout};

/// Counts the values alive; the count drops when one is dropped (on completion or on cancel).
#[derive(Clone, Default)]
struct Live(Arc<AtomicUsize>);

struct LiveGuard(Arc<AtomicUsize>);

impl Live {
    fn enter(&self) -> LiveGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        LiveGuard(Arc::clone(&self.0))
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, PartialEq)]
struct Boom(u32);

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "boom at {}", self.0)
    }
}

impl std::error::Error for Boom {}

/// Lets aborted tasks be dropped: they go when the scheduler next reaches them.
async fn settle(progress: &deployd_pipeline::Progress) {
    for _ in 0..100 {
        if progress.running_tasks() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_preserved_end_to_end() {
    let n = 20_000u64;
    let out = Pipeline::from_stream(futures::stream::iter(0..n))
        .capacity(7)
        .map("double", 1, |x| async move { x * 2 })
        .stage("jitter", 8, |x| async move {
            if x % 3 == 0 {
                tokio::task::yield_now().await;
            }
            Ok::<_, Boom>(x)
        })
        .batched_stage(
            "batch",
            BatchConfig::new(3, 50, Duration::from_millis(1)),
            |b| async { Ok::<_, Boom>(b) },
        )
        .custom_stage(
            "halve",
            |mut input: Input<u64>, mut output: Output<u64>| async move {
                while let Some(x) = input.next().await {
                    output.put(x / 2).await?;
                }
                Ok::<_, deployd_pipeline::Closed>(())
            },
        )
        .collect()
        .await;
    let expected: Vec<u64> = (0..n).collect();
    assert_eq!(out.ok(), Some(expected));
}

#[tokio::test(start_paused = true)]
async fn unordered_concurrency_passes_items_on_as_they_complete() {
    let out = Pipeline::from_iter(1..=5u64)
        .map("sleep", Concurrency::unordered(5), |x| async move {
            sleep(Duration::from_secs(10 - x)).await;
            x
        })
        .collect()
        .await;
    assert_eq!(out.ok(), Some(vec![5, 4, 3, 2, 1]));
}

#[tokio::test(start_paused = true)]
async fn a_stage_runs_at_most_its_concurrency() {
    let live = Live::default();
    let most = Arc::new(AtomicUsize::new(0));
    let (l, m) = (live.clone(), Arc::clone(&most));
    let out = Pipeline::from_iter(0..50u32)
        .map("work", 4, move |x| {
            let guard = l.enter();
            m.fetch_max(l.count(), Ordering::SeqCst);
            async move {
                sleep(Duration::from_millis(u64::from(x % 7))).await;
                drop(guard);
                x
            }
        })
        .collect()
        .await;
    assert_eq!(out.ok(), Some((0..50).collect()));
    assert_eq!(most.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_slow_last_stage_holds_the_first_back_to_the_capacities() {
    let produced = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let most_ahead = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&produced);
    let source = futures::stream::iter(0..200u32).inspect(move |_| {
        p.fetch_add(1, Ordering::SeqCst);
    });
    let (p, f, m) = (
        Arc::clone(&produced),
        Arc::clone(&finished),
        Arc::clone(&most_ahead),
    );
    let capacity = 2;
    let out = Pipeline::from_stream(source)
        .capacity(capacity)
        .map("a", 1, |x| async move { x })
        .map("b", 1, |x| async move { x })
        .map("slow", 1, move |x| {
            let (p, f, m) = (Arc::clone(&p), Arc::clone(&f), Arc::clone(&m));
            async move {
                sleep(Duration::from_secs(1)).await;
                let done = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(p.load(Ordering::SeqCst) - done, Ordering::SeqCst);
                x
            }
        })
        .collect()
        .await;
    assert_eq!(out.map(|v| v.len()).ok(), Some(200));
    // In flight at most: what the source holds before it can send (one link's worth) and
    // what each of the three links into the stages holds.
    let bound = capacity + 3 * capacity;
    let most = most_ahead.load(Ordering::SeqCst);
    assert!(most <= bound, "ran {most} items ahead, more than {bound}");
    assert!(
        most >= 3 * capacity,
        "ran only {most} items ahead: the stages did not overlap"
    );
}

/// A pipeline fed by hand whose single stage releases batches to the test.
fn batcher(
    config: BatchConfig,
) -> (
    deployd_pipeline::Feeder<u32>,
    deployd_pipeline::Outputs<Vec<u32>>,
) {
    let (feeder, pipeline) = Pipeline::channel();
    let outputs = pipeline
        .capacity(64)
        .batched_stage("batch", config, |batch| async move {
            Ok::<_, Boom>(vec![batch])
        })
        .into_stream();
    (feeder, outputs)
}

/// The next batch released within `within` (virtual time), if any.
async fn released(
    outputs: &mut deployd_pipeline::Outputs<Vec<u32>>,
    within: Duration,
) -> Option<Vec<u32>> {
    match timeout(within, outputs.next()).await {
        Ok(Some(Ok(batch))) => Some(batch),
        _ => None,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn a_batch_is_released_once_it_has_min_items() {
    let (feeder, mut outputs) = batcher(BatchConfig::new(3, 10, HOUR));
    for x in [1, 2] {
        feeder.put(x).await.ok();
    }
    assert_eq!(released(&mut outputs, MS).await, None);
    feeder.put(3).await.ok();
    assert_eq!(released(&mut outputs, MS).await, Some(vec![1, 2, 3]));
}

#[tokio::test(start_paused = true)]
async fn a_batch_takes_what_is_queued_up_to_max() {
    let (feeder, mut outputs) = batcher(BatchConfig::new(2, 4, HOUR));
    for x in 0..10 {
        feeder.put(x).await.ok();
    }
    drop(feeder);
    let batches: Vec<Vec<u32>> = outputs
        .by_ref()
        .filter_map(|b| async { b.ok() })
        .collect()
        .await;
    assert_eq!(
        batches,
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );

    // Greedy: beyond `min` when more is queued.
    let (feeder, mut outputs) = batcher(BatchConfig::new(2, 100, HOUR));
    for x in 0..10 {
        feeder.put(x).await.ok();
    }
    assert_eq!(released(&mut outputs, MS).await, Some((0..10).collect()));
}

#[tokio::test(start_paused = true)]
async fn max_wait_releases_a_partial_batch() {
    let wait = Duration::from_millis(100);
    let (feeder, mut outputs) = batcher(BatchConfig::new(10, 20, wait));
    let start = Instant::now();
    feeder.put(1).await.ok();
    feeder.put(2).await.ok();
    assert_eq!(released(&mut outputs, wait - MS).await, None);
    assert_eq!(released(&mut outputs, HOUR).await, Some(vec![1, 2]));
    assert_eq!(
        start.elapsed(),
        wait,
        "released when max_wait passed since the first item"
    );
    // The next batch has a timer of its own, started by its first item.
    sleep(Duration::from_secs(5)).await;
    let start = Instant::now();
    feeder.put(3).await.ok();
    assert_eq!(released(&mut outputs, HOUR).await, Some(vec![3]));
    assert_eq!(start.elapsed(), wait);
}

#[tokio::test(start_paused = true)]
async fn an_urgent_item_releases_its_batch_at_once() {
    let (feeder, mut outputs) = batcher(BatchConfig::new(10, 20, HOUR));
    feeder.put(1).await.ok();
    assert_eq!(released(&mut outputs, MS).await, None);
    feeder.put_urgent(2).await.ok();
    assert_eq!(released(&mut outputs, MS).await, Some(vec![1, 2]));
    feeder.put(3).await.ok();
    assert_eq!(released(&mut outputs, MS).await, None);
    // With what was queued behind it (greedy, up to `max`).
    feeder.put_urgent(4).await.ok();
    feeder.put(5).await.ok();
    assert_eq!(released(&mut outputs, MS).await, Some(vec![3, 4, 5]));
}

#[tokio::test(start_paused = true)]
async fn urgency_and_flushes_pass_through_item_stages() {
    let (feeder, pipeline) = Pipeline::channel();
    let mut outputs = pipeline
        .map("inc", 1, |x: u32| async move { x + 1 })
        .map("slow", 2, |x: u32| async move {
            sleep(MS).await;
            x
        })
        .batched_stage("batch", BatchConfig::new(10, 20, HOUR), |b| async move {
            Ok::<_, Boom>(vec![b])
        })
        .into_stream();
    feeder.put(1).await.ok();
    feeder.put_urgent(2).await.ok();
    assert_eq!(
        released(&mut outputs, Duration::from_secs(1)).await,
        Some(vec![2, 3])
    );
    feeder.put(3).await.ok();
    feeder.flush();
    assert_eq!(
        released(&mut outputs, Duration::from_secs(1)).await,
        Some(vec![4])
    );
}

#[tokio::test(start_paused = true)]
async fn a_flush_releases_a_partial_batch_and_never_an_empty_one() {
    let (feeder, mut outputs) = batcher(BatchConfig::new(10, 20, HOUR));
    feeder.flush();
    assert_eq!(
        released(&mut outputs, MS).await,
        None,
        "a flush with nothing pending"
    );
    feeder.put(1).await.ok();
    feeder.put(2).await.ok();
    feeder.flush();
    assert_eq!(released(&mut outputs, MS).await, Some(vec![1, 2]));
    feeder.flush();
    drop(feeder);
    // Nothing more: the end of the stream releases no empty batch.
    assert_eq!(released(&mut outputs, HOUR).await, None);
    assert!(outputs.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_stream_releases_a_partial_batch() {
    let batches = Pipeline::from_iter(0..5u32)
        .batched_stage("batch", BatchConfig::new(10, 20, HOUR), |b| async move {
            Ok::<_, Boom>(vec![b])
        })
        .collect()
        .await;
    assert_eq!(batches.ok(), Some(vec![vec![0, 1, 2, 3, 4]]));

    let empty = Pipeline::from_iter(Vec::<u32>::new())
        .batched_stage("batch", BatchConfig::new(1, 20, MS), |b| async move {
            Ok::<_, Boom>(vec![b])
        })
        .collect()
        .await;
    assert_eq!(empty.ok(), Some(vec![]));
}

#[tokio::test(start_paused = true)]
async fn the_budget_blocks_until_items_leave_and_is_released_on_success() {
    let budget = Budget::new(2, 1_000);
    let produced = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&produced);
    let gate = Arc::new(Semaphore::new(0));
    let g = Arc::clone(&gate);
    let source = futures::stream::iter(0..10u32).inspect(move |_| {
        p.fetch_add(1, Ordering::SeqCst);
    });
    let pipeline = Pipeline::from_stream(source)
        .capacity(16)
        .budget(&budget, |_| 10)
        .map("held", 4, move |x| {
            let g = Arc::clone(&g);
            async move {
                g.acquire().await.map(|p| p.forget()).ok();
                x
            }
        });
    let progress = pipeline.progress();
    let run = tokio::spawn(pipeline.collect());
    sleep(Duration::from_secs(1)).await;
    // Two items in flight; the source took a third from its stream and waits for the budget.
    assert_eq!(budget.available_items(), 0);
    assert_eq!(budget.available_bytes(), 980);
    assert_eq!(produced.load(Ordering::SeqCst), 3);
    assert_eq!(
        progress.snapshot().stage("held").map(|s| s.items_in),
        Some(2)
    );
    gate.add_permits(100);
    let out = run.await.ok().and_then(Result::ok);
    assert_eq!(out, Some((0..10).collect()));
    assert_eq!(budget.available_items(), 2);
    assert_eq!(budget.available_bytes(), 1_000);
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_released_on_error_and_on_cancel() {
    let budget = Budget::new(4, 100);
    let result = Pipeline::from_iter(0..100u32)
        .budget(&budget, |_| 1)
        .stage("fail", 2, |x| async move {
            if x == 10 { Err(Boom(x)) } else { Ok(x) }
        })
        .map("hold", 2, |x| async move {
            sleep(HOUR).await;
            x
        })
        .run()
        .await;
    assert!(matches!(result, Err(Error::Stage { ref stage, .. }) if stage == "fail"));
    assert_eq!(
        (budget.available_items(), budget.available_bytes()),
        (4, 100)
    );

    let pipeline =
        Pipeline::from_iter(0..100u32)
            .budget(&budget, |_| 1)
            .map("hold", 2, |x| async move {
                pending::<()>().await;
                x
            });
    let progress = pipeline.progress();
    assert!(
        timeout(Duration::from_secs(1), pipeline.run())
            .await
            .is_err()
    );
    settle(&progress).await;
    assert_eq!(progress.running_tasks(), 0);
    assert_eq!(
        (budget.available_items(), budget.available_bytes()),
        (4, 100)
    );
}

#[tokio::test(start_paused = true)]
async fn an_item_heavier_than_the_budget_passes_alone() {
    let budget = Budget::new(10, 100);
    let inside = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
    let current = Arc::new(Mutex::new(Vec::<u32>::new()));
    let (i, c) = (Arc::clone(&inside), Arc::clone(&current));
    let weights = [10u32, 500, 10, 10, 20];
    let out = Pipeline::from_iter(weights)
        .budget(&budget, |w| *w as usize)
        .map("work", 5, move |w| {
            let (i, c) = (Arc::clone(&i), Arc::clone(&c));
            async move {
                if let Ok(mut now) = c.lock() {
                    now.push(w);
                    i.lock().map(|mut all| all.push(now.clone())).ok();
                }
                sleep(Duration::from_secs(1)).await;
                c.lock().map(|mut now| now.retain(|x| *x != w)).ok();
                w
            }
        })
        .collect()
        .await;
    assert_eq!(out.ok(), Some(weights.to_vec()));
    let seen = inside.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        seen.contains(&vec![500]),
        "the heavy item ran alone: {seen:?}"
    );
    assert!(
        seen.iter().all(|set| !set.contains(&500) || set.len() == 1),
        "{seen:?}"
    );
    assert_eq!(budget.available_bytes(), 100);
}

#[tokio::test(start_paused = true)]
async fn the_first_error_cancels_every_stage_and_leaves_no_task() {
    let live = Live::default();
    let (l1, l2) = (live.clone(), live.clone());
    let pipeline = Pipeline::from_stream(futures::stream::iter(0u32..))
        .map("before", 2, move |x| {
            let guard = l1.enter();
            async move {
                sleep(MS).await;
                drop(guard);
                x
            }
        })
        .stage("fail", 1, |x| async move {
            if x == 50 { Err(Boom(x)) } else { Ok(x) }
        })
        .map("forever", 3, move |x| {
            let guard = l2.enter();
            async move {
                pending::<()>().await;
                drop(guard);
                x
            }
        })
        .map("after", 1, |x| async move { x });
    let progress = pipeline.progress();
    let result = pipeline.run().await;

    match result {
        Err(Error::Stage { stage, source }) => {
            assert_eq!(stage, "fail");
            assert_eq!(source.downcast_ref::<Boom>(), Some(&Boom(50)));
        }
        other => panic!("expected the error of `fail`, got {other:?}"),
    }
    assert_eq!(progress.running_tasks(), 0, "every stage task awaited");
    assert_eq!(live.count(), 0, "no work of any stage left");
    let snapshot = progress.snapshot();
    assert!(
        matches!(snapshot.state, PipelineState::Failed { ref error } if error.contains("boom at 50"))
    );
    let states: Vec<_> = snapshot
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("before", StageState::Cancelled),
            ("fail", StageState::Failed),
            ("forever", StageState::Cancelled),
            ("after", StageState::Cancelled),
        ]
    );
    assert_eq!(snapshot.stage("fail").map(|s| s.items_failed), Some(1));
}

#[tokio::test(start_paused = true)]
async fn stages_after_a_failure_never_see_a_clean_end() {
    let writes = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&writes);
    let result = Pipeline::from_iter(0..10u32)
        .stage("fail", 1, |x| async move {
            if x == 5 { Err(Boom(x)) } else { Ok(x) }
        })
        .batched_stage("write", BatchConfig::new(100, 100, HOUR), move |b| {
            w.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Boom>(b) }
        })
        .run()
        .await;
    assert!(result.is_err());
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "the partial batch was not written"
    );
}

#[tokio::test]
async fn a_panic_in_a_stage_is_caught_and_returned() {
    let pipeline = Pipeline::from_iter(0..10u32).map("explode", 1, |x| async move {
        if x == 3 {
            panic!("exploded at {x}");
        }
        x
    });
    let progress = pipeline.progress();
    let result = pipeline.collect().await;
    match result {
        Err(Error::Panicked { stage, message }) => {
            assert_eq!(stage, "explode");
            assert_eq!(message, "exploded at 3");
        }
        other => panic!("expected a caught panic, got {other:?}"),
    }
    assert_eq!(progress.running_tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_pipeline_future_cancels_every_stage() {
    let live = Live::default();
    let l = live.clone();
    let pipeline = Pipeline::from_stream(futures::stream::iter(0u32..))
        .map("a", 1, |x| async move { x })
        .map("hold", 4, move |x| {
            let guard = l.enter();
            async move {
                sleep(HOUR).await;
                drop(guard);
                x
            }
        })
        .map("b", 1, |x| async move { x });
    let progress = pipeline.progress();
    assert!(
        timeout(Duration::from_secs(1), pipeline.run())
            .await
            .is_err()
    );
    settle(&progress).await;
    assert_eq!(progress.running_tasks(), 0);
    assert_eq!(live.count(), 0);
    assert_eq!(progress.state(), PipelineState::Cancelled);
    let states: Vec<_> = progress.snapshot().stages.iter().map(|s| s.state).collect();
    assert_eq!(states, [StageState::Cancelled; 3]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_output_stream_cancels_every_stage() {
    let pipeline =
        Pipeline::from_stream(futures::stream::iter(0u32..)).map("a", 2, |x| async move {
            sleep(MS).await;
            x
        });
    let progress = pipeline.progress();
    let mut outputs = pipeline.into_stream();
    let first: Vec<u32> = outputs
        .by_ref()
        .take(5)
        .filter_map(|x| async { x.ok() })
        .collect()
        .await;
    assert_eq!(first, vec![0, 1, 2, 3, 4]);
    drop(outputs);
    settle(&progress).await;
    assert_eq!(progress.running_tasks(), 0);
    assert_eq!(progress.state(), PipelineState::Cancelled);
}

#[tokio::test]
async fn a_stage_that_stops_reading_ends_the_pipeline_normally() {
    let out = Pipeline::from_stream(futures::stream::iter(0u32..))
        .map("all", 1, |x| async move { x })
        .custom_stage(
            "first three",
            |mut input: Input<u32>, mut output: Output<u32>| async move {
                for _ in 0..3 {
                    if let Some(x) = input.next().await {
                        output.put(x).await?;
                    }
                }
                Ok::<_, deployd_pipeline::Closed>(())
            },
        )
        .collect()
        .await;
    assert_eq!(out.ok(), Some(vec![0, 1, 2]));
}

#[tokio::test]
async fn a_feeder_fails_once_the_pipeline_failed() {
    let (feeder, pipeline) = Pipeline::channel();
    let run = tokio::spawn(
        pipeline
            .stage("fail", 1, |x: u32| async move { Err::<u32, _>(Boom(x)) })
            .run(),
    );
    feeder.put(1).await.ok();
    assert!(run.await.ok().is_some_and(|r| r.is_err()));
    assert!(feeder.is_closed());
    assert_eq!(feeder.put(2).await, Err(deployd_pipeline::Closed));
}

#[test]
fn a_pipeline_needs_a_runtime() {
    let mut run = std::pin::pin!(Pipeline::from_iter([1u32]).run());
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(
        run.as_mut().poll(&mut cx),
        Poll::Ready(Err(Error::NoRuntime))
    ));
}

#[derive(Debug, PartialEq)]
struct Service {
    name: &'static str,
    fails_in: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
struct DeployError(String);

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn step(
    stage: &'static str,
    gate: &Arc<Semaphore>,
) -> impl FnMut(Service) -> std::pin::Pin<Box<dyn Future<Output = Result<Service, DeployError>> + Send>>
+ Send
+ 'static {
    let gate = Arc::clone(gate);
    move |s: Service| {
        let gate = Arc::clone(&gate);
        Box::pin(async move {
            if s.name == "slow" && stage == "prepare" {
                gate.acquire().await.map(|p| p.forget()).ok();
            }
            if s.fails_in == stage {
                Err(DeployError(format!("{} failed in {stage}", s.name)))
            } else {
                Ok(s)
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_deploy_shows_each_item_in_its_stage_and_fails_items_alone() {
    let gate = Arc::new(Semaphore::new(0));
    let services = vec![
        Service {
            name: "api",
            fails_in: "",
        },
        Service {
            name: "slow",
            fails_in: "",
        },
        Service {
            name: "broken",
            fails_in: "prepare",
        },
    ];
    let pipeline = Pipeline::from_iter(services)
        .track(|s: &Service| s.name.to_string())
        .try_stage("sync", 4, step("sync", &gate))
        .and_then("prepare", 1, step("prepare", &gate))
        .and_then("launch", 4, step("launch", &gate))
        .and_then("ready", 4, step("ready", &gate))
        .and_then("switch", 1, |s: Service| async move { Ok(s.name) });
    let progress = pipeline.progress();
    let updates = tokio::spawn(
        progress
            .updates(Duration::from_millis(100))
            .collect::<Vec<_>>(),
    );
    let run = tokio::spawn(pipeline.collect());
    sleep(Duration::from_secs(1)).await;

    // `slow` holds `prepare` (concurrency 1); `broken` waits behind it; `api` went through.
    let snapshot = progress.snapshot();
    assert_eq!(snapshot.state, PipelineState::Running);
    let where_ = |label: &str| {
        snapshot
            .item(label)
            .map(|i| (i.stage.clone(), i.state.clone()))
    };
    assert_eq!(where_("api"), Some(("switch".into(), ItemState::Done)));
    assert_eq!(where_("slow"), Some(("prepare".into(), ItemState::Running)));
    assert_eq!(
        where_("broken"),
        Some(("prepare".into(), ItemState::Waiting))
    );
    let prepare = snapshot
        .stage("prepare")
        .map(|s| (s.items_in, s.in_progress()));
    assert_eq!(prepare, Some((3, 2)));

    gate.add_permits(1);
    let out = run.await.ok().and_then(Result::ok);
    assert_eq!(
        out,
        Some(vec![
            Ok("api"),
            Ok("slow"),
            Err(Failed {
                stage: "prepare".into(),
                error: DeployError("broken failed in prepare".into()),
            }),
        ])
    );
    let snapshot = progress.snapshot();
    let failed = ItemState::Failed {
        error: "broken failed in prepare".into(),
    };
    assert_eq!(
        snapshot
            .item("broken")
            .map(|i| (i.stage.as_str(), &i.state)),
        Some(("prepare", &failed))
    );
    assert_eq!(
        snapshot.item("slow").map(|i| &i.state),
        Some(&ItemState::Done)
    );
    let counts: Vec<_> = snapshot
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.items_in, s.items_out, s.items_failed))
        .collect();
    assert_eq!(
        counts,
        [
            ("sync", 3, 3, 0),
            ("prepare", 3, 2, 1),
            ("launch", 3, 3, 0),
            ("ready", 3, 3, 0),
            ("switch", 3, 3, 0),
        ]
    );
    // The stream of snapshots saw the pipeline run and ends with its final state.
    let all = updates.await.unwrap_or_default();
    assert!(all.len() > 2);
    assert_eq!(
        all.last().map(|s| s.state.clone()),
        Some(PipelineState::Finished)
    );
    assert!(all.iter().any(|s| s.state == PipelineState::Running));
}

#[tokio::test(start_paused = true)]
async fn progress_counts_the_time_of_each_stage() {
    let pipeline = Pipeline::from_iter(0..4u32)
        .capacity(1)
        .map("work", 1, |x| async move {
            sleep(Duration::from_secs(1)).await;
            x
        })
        .map("idle", 1, |x| async move { x });
    let progress = pipeline.progress();
    assert_eq!(progress.state(), PipelineState::NotStarted);
    pipeline.run().await.ok();
    let snapshot = progress.snapshot();
    assert_eq!(snapshot.state, PipelineState::Finished);
    let work = snapshot
        .stage("work")
        .map(|s| (s.items_in, s.items_out, s.busy));
    assert_eq!(work, Some((4, 4, Duration::from_secs(4))));
    let idle = snapshot
        .stage("idle")
        .map(|s| (s.items_out, s.busy, s.waiting_for_input));
    assert_eq!(idle, Some((4, Duration::ZERO, Duration::from_secs(4))));
}

#[tokio::test(start_paused = true)]
async fn cancel_aborts_and_awaits_every_stage() {
    let live = Live::default();
    let l = live.clone();
    let pipeline = Pipeline::from_stream(futures::stream::iter(0u32..)).map("hold", 3, move |x| {
        let guard = l.enter();
        async move {
            sleep(HOUR).await;
            drop(guard);
            x
        }
    });
    let progress = pipeline.progress();
    let mut outputs = pipeline.into_stream();
    assert!(
        timeout(Duration::from_secs(1), outputs.next())
            .await
            .is_err()
    );
    assert_eq!(live.count(), 3);
    outputs.cancel().await;
    // No settling: `cancel` returns once every stage task is gone.
    assert_eq!(progress.running_tasks(), 0);
    assert_eq!(live.count(), 0);
    assert_eq!(progress.state(), PipelineState::Cancelled);
}

#[tokio::test]
async fn dropping_an_unstarted_pipeline_closes_its_feeder() {
    let (feeder, pipeline) = Pipeline::<u32>::channel();
    let progress = pipeline.progress();
    drop(pipeline);
    assert_eq!(feeder.put(1).await, Err(deployd_pipeline::Closed));
    assert_eq!(progress.state(), PipelineState::Cancelled);
}
