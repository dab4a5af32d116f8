//! The runtime on the in-memory store: running, stepping, failures, interrupts, events,
//! leases, ids and diagrams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use deployd_graph::store::MemoryStore;
use deployd_graph::{
    Ctx, End, Error, ManualClock, Node, NodeError, Outcome, RunId, Runner, SequentialIds, Status,
    Timestamp, graph, mermaid,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Doc {
    text: String,
    reviews: u32,
}

#[derive(Default)]
struct Deps {
    fail_first: AtomicU32,
    panic_first: AtomicU32,
}

/// Writes a draft.
#[derive(Debug, Serialize, Deserialize)]
struct Write {
    topic: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Review;

#[derive(Debug, Serialize, Deserialize)]
struct Publish {
    channel: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Question {
    draft: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum Verdict {
    Approve,
    Rewrite { note: String },
}

graph! {
    /// Writes, reviews with a human, publishes.
    Essay {
        state: Doc,
        deps: Deps,
        output: String,
        event: String,
        nodes {
            /// Writes a draft
            /// of the topic.
            Write => WriteNext [Review],
            /// Asks a human.
            Review as "review" => ReviewNext [Publish "approved", Write "rewrite"] asks Question => Verdict,
            Publish => PublishNext [End "published"],
        }
    }
}

impl Node<Essay> for Write {
    async fn run(self, ctx: Ctx<'_, Essay>) -> Result<WriteNext, NodeError> {
        if ctx.deps.fail_first.load(Ordering::SeqCst) > 0 {
            ctx.deps.fail_first.fetch_sub(1, Ordering::SeqCst);
            ctx.state.text = "this change is dropped".into();
            return Err(NodeError::msg("writer's block"));
        }
        if ctx.deps.panic_first.load(Ordering::SeqCst) > 0 {
            ctx.deps.panic_first.fetch_sub(1, Ordering::SeqCst);
            panic!("ink spilled");
        }
        ctx.state.text = format!("{} ({} reviews)", self.topic, ctx.state.reviews);
        ctx.emit(format!("wrote {}", ctx.state.text));
        Ok(Review.into())
    }
}

impl Node<Essay> for Review {
    async fn run(self, ctx: Ctx<'_, Essay>) -> Result<ReviewNext, NodeError> {
        match ctx.answer::<Self>()? {
            None => Ok(ReviewNext::Interrupt(Question {
                draft: ctx.state.text.clone(),
            })),
            Some(Verdict::Approve) => Ok(Publish {
                channel: "blog".into(),
            }
            .into()),
            Some(Verdict::Rewrite { note }) => {
                ctx.state.reviews += 1;
                Ok(Write { topic: note }.into())
            }
        }
    }
}

impl Node<Essay> for Publish {
    async fn run(self, ctx: Ctx<'_, Essay>) -> Result<PublishNext, NodeError> {
        Ok(End(format!("{} on {}", ctx.state.text, self.channel)).into())
    }
}

fn runner(deps: Deps) -> Runner<Essay> {
    Runner::new(MemoryStore::full_history(), deps)
        .ids(Arc::new(SequentialIds::new()))
        .owner("w1")
}

fn interrupt_of(outcome: &Outcome<String>) -> deployd_graph::Interrupt {
    match outcome {
        Outcome::Interrupted(i) => i.clone(),
        Outcome::End(out) => panic!("expected an interrupt, got the end {out}"),
    }
}

#[tokio::test]
async fn interrupt_then_answer_finishes_and_rejects_wrong_or_second_answers() {
    let runner = runner(Deps::default());
    let first = runner
        .run(
            Write {
                topic: "rust".into(),
            },
            Doc::default(),
        )
        .await
        .unwrap();
    let ask = interrupt_of(&first.outcome);
    assert_eq!(ask.node_id, "review");
    assert_eq!(
        ask.request::<Question>().unwrap(),
        Question {
            draft: "rust (0 reviews)".into()
        }
    );
    let run = first.run_id;
    assert_eq!(
        runner.history(&run).await.unwrap().last().unwrap().status,
        Status::Waiting
    );

    // A wrong id, then an answer of the wrong type, are refused and change nothing.
    let wrong = runner
        .resume_with(&run, &"review:nope".into(), Verdict::Approve)
        .await;
    assert!(
        matches!(wrong, Err(Error::UnknownInterrupt { .. })),
        "{wrong:?}"
    );
    let bad = runner.resume_with(&run, &ask.id, 42).await;
    assert!(matches!(bad, Err(Error::InvalidAnswer { .. })), "{bad:?}");

    // Rewrite: the review node runs again with the answer, then asks again.
    let second = runner
        .resume_with(
            &run,
            &ask.id,
            Verdict::Rewrite {
                note: "rust, shorter".into(),
            },
        )
        .await
        .unwrap();
    let ask2 = interrupt_of(&second.outcome);
    assert_ne!(ask2.id, ask.id);
    let again = runner.resume_with(&run, &ask.id, Verdict::Approve).await;
    assert!(
        matches!(again, Err(Error::AlreadyAnswered { .. })),
        "{again:?}"
    );

    let done = runner
        .resume_with(&run, &ask2.id, Verdict::Approve)
        .await
        .unwrap();
    match done.outcome {
        Outcome::End(out) => assert_eq!(out, "rust, shorter (1 reviews) on blog"),
        other => panic!("{other:?}"),
    }
    let statuses: Vec<(String, Status)> = runner
        .history(&run)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.node_id.into_owned(), s.status))
        .collect();
    let expected = [
        ("Write", Status::Success),
        ("review", Status::Success),
        ("review", Status::Success),
        ("Write", Status::Success),
        ("review", Status::Success),
        ("review", Status::Success),
        ("Publish", Status::Success),
        ("end", Status::Success),
    ];
    let expected: Vec<(String, Status)> =
        expected.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    assert_eq!(statuses, expected);
}

#[tokio::test]
async fn failure_and_panic_are_recorded_and_retried() {
    let deps = Deps::default();
    deps.fail_first.store(1, Ordering::SeqCst);
    deps.panic_first.store(1, Ordering::SeqCst);
    let runner = runner(deps);
    let err = runner
        .run(Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap_err();
    let Error::NodeFailed {
        run_id, message, ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(message, "writer's block");
    let history = runner.history(&run_id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, Status::Error);
    assert_eq!(history[0].error.as_deref(), Some("writer's block"));

    // Resuming a failed run reports the failure again; retrying tries again (and panics).
    assert!(matches!(
        runner.resume(&run_id).await,
        Err(Error::NodeFailed { .. })
    ));
    let err = runner.retry(&run_id).await.unwrap_err();
    assert!(err.to_string().contains("panicked: ink spilled"), "{err}");
    let done = runner.retry(&run_id).await.unwrap();
    assert!(matches!(done.outcome, Outcome::Interrupted(_)));
    let history = runner.history(&run_id).await.unwrap();
    let attempts: Vec<(u32, Status)> = history.iter().map(|s| (s.attempt, s.status)).collect();
    assert_eq!(
        attempts,
        [
            (1, Status::Error),
            (2, Status::Error),
            (3, Status::Success),
            (1, Status::Success),
            (1, Status::Waiting)
        ]
    );
    // The failed tries' state changes were dropped.
    assert_eq!(done.state.text, "t (0 reviews)");
}

#[tokio::test]
async fn max_attempts_retries_in_the_same_run() {
    let deps = Deps::default();
    deps.fail_first.store(2, Ordering::SeqCst);
    let runner = runner(deps).max_attempts(3);
    let done = runner
        .run(Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap();
    assert!(matches!(done.outcome, Outcome::Interrupted(_)));
    let history = runner.history(&done.run_id).await.unwrap();
    assert_eq!(history[2].attempt, 3);
    assert_eq!(history[2].status, Status::Success);
}

#[tokio::test]
async fn events_reach_the_caller() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = runner(Deps::default()).events(tx);
    let done = runner
        .run(Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap();
    let event = rx.try_recv().unwrap();
    assert_eq!(event.event, "wrote t (0 reviews)");
    assert_eq!(event.node_id, "Write");
    assert_eq!(event.run_id, done.run_id);
}

#[tokio::test]
async fn step_by_step_inspect_and_replace() {
    let runner = runner(Deps::default());
    let mut run = runner
        .start(Write { topic: "a".into() }, Doc::default())
        .await
        .unwrap();
    assert_eq!(run.next_node().unwrap().node_id(), "Write");
    let topic = run
        .next_node()
        .and_then(|n| n.downcast_ref::<Write>())
        .map(|w| w.topic.clone());
    assert_eq!(topic.as_deref(), Some("a"));
    run.replace_next(Write { topic: "b".into() }).await.unwrap();
    assert!(run.next().await.unwrap());
    assert_eq!(run.state().text, "b (0 reviews)");
    assert_eq!(run.next_node().unwrap().node_id(), "review");
    run.replace_next(Publish {
        channel: "feed".into(),
    })
    .await
    .unwrap();
    assert!(!run.next().await.unwrap());
    assert_eq!(
        run.output().map(String::as_str),
        Some("b (0 reviews) on feed")
    );
    let statuses: Vec<Status> = runner
        .history(run.id())
        .await
        .unwrap()
        .iter()
        .map(|s| s.status)
        .collect();
    use Status::*;
    assert_eq!(statuses, [Skipped, Success, Skipped, Success, Success]);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_the_next_attempt() {
    let store: Arc<dyn deployd_graph::Store> = Arc::new(MemoryStore::full_history());
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(1_000_000)));
    let dead = Runner::<Essay>::with_store(store.clone(), Deps::default())
        .owner("dead")
        .clock(clock.clone())
        .lease(Duration::from_secs(10));
    // The dead worker claimed the run and never ran it.
    let run = dead
        .start(Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap();
    let run_id = run.id().clone();
    drop(run);
    let live = Runner::<Essay>::with_store(store.clone(), Deps::default())
        .owner("live")
        .clock(clock.clone());
    let busy = live.resume(&run_id).await;
    assert!(matches!(busy, Err(Error::Conflict { .. })), "{busy:?}");
    clock.advance(Duration::from_secs(11));
    let done = live.resume(&run_id).await.unwrap();
    assert!(matches!(done.outcome, Outcome::Interrupted(_)));
    let first = &live.history(&run_id).await.unwrap()[0];
    assert_eq!((first.attempt, first.status), (2, Status::Success));
    assert_eq!(&*first.lease.as_ref().unwrap().owner, "live");
}

#[tokio::test]
async fn ids_and_times_are_deterministic() {
    let clock = Arc::new(ManualClock::new("2025-01-01T00:00:00Z".parse().unwrap()));
    let runner = runner(Deps::default()).clock(clock);
    let done = runner
        .run(Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap();
    assert_eq!(done.run_id.as_str(), "00000000000000000000000000000001");
    let json =
        deployd_graph::snapshot::to_json(&runner.history(&done.run_id).await.unwrap()).unwrap();
    insta::assert_snapshot!(json);
}

#[test]
fn mermaid_of_the_graph() {
    insta::assert_snapshot!(mermaid::graph::<Essay>(&mermaid::Options {
        title: Some("Essay"),
        highlight: &["review"],
        ..Default::default()
    }));
}

#[tokio::test]
async fn mermaid_of_a_run() {
    let deps = Deps::default();
    deps.fail_first.store(1, Ordering::SeqCst);
    let runner = runner(deps);
    let done = runner
        .run(Write { topic: "t".into() }, Doc::default())
        .await;
    let Err(Error::NodeFailed { run_id, .. }) = done else {
        panic!("{done:?}")
    };
    let failed = mermaid::run::<Essay>(&runner.history(&run_id).await.unwrap());
    let done = runner.retry(&run_id).await.unwrap();
    let waiting = mermaid::run::<Essay>(&runner.history(&done.run_id).await.unwrap());
    insta::assert_snapshot!(format!("{failed}\n---\n{waiting}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_submitted_runs() {
    let store: Arc<dyn deployd_graph::Store> = Arc::new(MemoryStore::full_history());
    let submitter = Runner::<Essay>::with_store(store.clone(), Deps::default());
    let mut runs = Vec::new();
    for i in 0..6 {
        let run = submitter
            .submit(
                &Publish {
                    channel: format!("c{i}"),
                },
                &Doc::default(),
            )
            .await
            .unwrap();
        runs.push(run);
    }
    let mut workers = Vec::new();
    for w in 0..3 {
        let runner =
            Runner::<Essay>::with_store(store.clone(), Deps::default()).owner(format!("w{w}"));
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while let Some(finished) = runner.run_next().await.unwrap() {
                done.push(finished.run_id);
            }
            done
        }));
    }
    let mut done = Vec::new();
    for worker in workers {
        done.extend(worker.await.unwrap());
    }
    done.sort();
    runs.sort();
    assert_eq!(done, runs, "every run ran exactly once");
}

/// A deployd task's run: its id comes from the task's id, so a delivery of the task after a
/// crash finds the run and goes on from its last committed step: the node committed before the
/// crash does not run again, and a delivery of a run that waits returns the same interrupt.
#[tokio::test]
async fn a_task_delivered_again_resumes_its_run_from_the_last_committed_step() {
    assert!(RunId::for_task("not a uuid").is_none());
    let task = "01938a8e-7b3c-7f00-8a1b-0123456789ab";
    let run_id = RunId::for_task(task).unwrap();
    assert_eq!(run_id.to_string(), "01938a8e7b3c7f008a1b0123456789ab");

    let store: Arc<dyn deployd_graph::Store> = Arc::new(MemoryStore::full_history());
    let clock = Arc::new(ManualClock::new(Timestamp::from_micros(1_000_000)));
    let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
    // The first delivery commits `Write` (and `Review` next), then its process dies.
    let first = Runner::<Essay>::with_store(store.clone(), Deps::default())
        .owner("first")
        .clock(clock.clone())
        .lease(Duration::from_secs(10))
        .events(events.clone());
    let mut run = first
        .start_as(&run_id, Write { topic: "t".into() }, Doc::default())
        .await
        .unwrap();
    assert!(run.next().await.unwrap());
    drop(run);
    assert!(matches!(
        first
            .start_as(&run_id, Write { topic: "t".into() }, Doc::default())
            .await,
        Err(Error::Conflict { .. })
    ));

    // The second delivery, in a new process, once the lease is over.
    let second = Runner::<Essay>::with_store(store.clone(), Deps::default())
        .owner("second")
        .clock(clock.clone())
        .events(events);
    clock.advance(Duration::from_secs(11));
    let done = second
        .run_as(
            &run_id,
            Write {
                topic: "again".into(),
            },
            Doc::default(),
        )
        .await
        .unwrap();
    let interrupt = interrupt_of(&done.outcome);
    assert_eq!(
        done.state.text, "t (0 reviews)",
        "the first delivery's state goes on"
    );
    // A third delivery of a run that waits: the same interrupt, nothing runs.
    let again = second
        .run_as(
            &run_id,
            Write {
                topic: "third".into(),
            },
            Doc::default(),
        )
        .await
        .unwrap();
    assert_eq!(interrupt_of(&again.outcome).id, interrupt.id);
    let writes: Vec<_> = std::iter::from_fn(|| heard.try_recv().ok())
        .filter(|e| e.node_id == "Write")
        .collect();
    assert_eq!(writes.len(), 1, "Write ran once: {writes:?}");
    let history = second.history(&run_id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|s| s.node_id == "Write" && s.status == Status::Success)
            .count(),
        1
    );
}
