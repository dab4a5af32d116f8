//! The `Store` contract, checked against every backend: memory (latest only and full
//! history), file, SQLite and Postgres, each durable one in both durability modes.
//!
//! Postgres is expected at `DEPLOYD_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`); its tests fail when it is not there. Each test
//! gets its own schema.

mod common;

use std::time::Duration;

use deployd_graph::snapshot::{from_json, to_json};
use deployd_graph::{
    Error, Lease, RunId, Snapshot, SnapshotId, Status, Store, Timestamp, Transition,
};

use common::{Fixture, raw};

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_micros(1_700_000_000_000_000 + secs * 1_000_000)
}

fn lease(owner: &str, until: i64) -> Lease {
    Lease {
        owner: owner.into(),
        until: ts(until),
    }
}

fn node(run: &RunId, seq: u64, node_id: &str) -> Snapshot {
    Snapshot::node(
        run.clone(),
        seq,
        node_id,
        &common::hex(),
        raw(&format!(r#"{{"n":{seq},"node_id":"{node_id}"}}"#)),
        raw(&format!(r#"{{"count":{seq}}}"#)),
        ts(seq as i64),
    )
}

fn start(owner: &str) -> Transition {
    Transition::Start {
        owner: owner.into(),
        at: ts(1),
        until: ts(100),
    }
}

fn succeed(owner: &str, next: Snapshot) -> Transition {
    Transition::Succeed {
        owner: owner.into(),
        duration: 0.25,
        next: Box::new(next),
    }
}

fn fail(owner: &str, retry: Option<Snapshot>) -> Transition {
    Transition::Fail {
        owner: owner.into(),
        duration: 0.5,
        error: "boom".into(),
        retry: retry.map(Box::new),
    }
}

fn answer() -> Transition {
    Transition::Answer {
        answer: raw(r#"{"ok":true}"#),
    }
}

/// A snapshot of a new run, inserted and brought to `status`.
async fn at_status(store: &dyn Store, status: Status) -> Snapshot {
    let run = common::run_id();
    let mut s = node(&run, 0, "A");
    if status == Status::Waiting {
        s.status = Status::Waiting;
        s.request = Some(raw(r#"{"q":1}"#));
    }
    store.insert(&s).await.unwrap();
    let id = s.id.clone();
    match status {
        Status::Created | Status::Waiting => {}
        Status::Pending => {
            store
                .claim(Some(&run), lease("w", 100))
                .await
                .unwrap()
                .unwrap();
        }
        Status::Running | Status::Success | Status::Error | Status::Skipped => {
            store
                .claim(Some(&run), lease("w", 100))
                .await
                .unwrap()
                .unwrap();
            if status == Status::Skipped {
                let next = node(&run, 1, "B");
                let replace = Transition::Replace {
                    owner: "w".into(),
                    next: Box::new(next),
                };
                store.transition(&id, replace).await.unwrap();
            } else {
                store.transition(&id, start("w")).await.unwrap();
            }
            if status == Status::Success {
                store
                    .transition(&id, succeed("w", node(&run, 1, "B")))
                    .await
                    .unwrap();
            }
            if status == Status::Error {
                store.transition(&id, fail("w", None)).await.unwrap();
            }
        }
    }
    let got = store.get(&id).await.unwrap();
    assert_eq!(got.status, status);
    got
}

pub(crate) async fn empty_store(f: Fixture) {
    let store = &f.store;
    let run = common::run_id();
    assert!(store.latest(&run).await.unwrap().is_none());
    assert!(store.history(&run).await.unwrap().is_empty());
    assert!(store.claim(None, lease("w", 1)).await.unwrap().is_none());
    assert!(
        store
            .claim(Some(&run), lease("w", 1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.expire_leases(ts(1_000_000)).await.unwrap().is_empty());
}

pub(crate) async fn unknown_ids(f: Fixture) {
    let store = &f.store;
    let missing = SnapshotId::from("A:0000");
    let err = store.get(&missing).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let run = common::run_id();
    for transition in [
        Transition::Claim {
            lease: lease("w", 1),
        },
        start("w"),
        succeed("w", node(&run, 1, "B")),
        fail("w", None),
        answer(),
    ] {
        let err = store.transition(&missing, transition).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    }
    // Nothing was inserted along the way.
    assert!(store.history(&run).await.unwrap().is_empty());
}

pub(crate) async fn insert_if_new(f: Fixture) {
    let store = &f.store;
    let run = common::run_id();
    let s = node(&run, 0, "A");
    assert!(store.insert(&s).await.unwrap());
    assert!(!store.insert(&s).await.unwrap());
    let mut changed = s.clone();
    changed.status = Status::Error;
    assert!(
        !store.insert(&changed).await.unwrap(),
        "an existing id is kept as it is"
    );
    assert_eq!(store.get(&s.id).await.unwrap().status, Status::Created);
    assert_eq!(store.history(&run).await.unwrap().len(), 1);
    // Another snapshot at the same place in the run is a conflict.
    let err = store.insert(&node(&run, 0, "B")).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
}

pub(crate) async fn lifecycle(f: Fixture) {
    let store = &f.store;
    let run = common::run_id();
    let first = node(&run, 0, "A");
    store.insert(&first).await.unwrap();

    let claimed = store
        .claim(Some(&run), lease("w", 30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, first.id);
    assert_eq!(claimed.status, Status::Pending);
    assert_eq!(claimed.lease, Some(lease("w", 30)));
    // Claimed already: nothing else to claim.
    assert!(
        store
            .claim(Some(&run), lease("x", 30))
            .await
            .unwrap()
            .is_none()
    );

    store.transition(&first.id, start("w")).await.unwrap();
    let running = store.get(&first.id).await.unwrap();
    assert_eq!(running.status, Status::Running);
    assert_eq!(running.start_ts, Some(ts(1)));
    assert_eq!(running.lease.as_ref().unwrap().until, ts(100));
    let renew = Transition::Renew {
        owner: "w".into(),
        until: ts(200),
    };
    store.transition(&first.id, renew).await.unwrap();
    assert_eq!(
        store.get(&first.id).await.unwrap().lease.unwrap().until,
        ts(200)
    );

    // Success and the successor, together.
    let mut second = node(&run, 1, "B");
    second.status = Status::Pending;
    second.lease = Some(lease("w", 300));
    store
        .transition(&first.id, succeed("w", second.clone()))
        .await
        .unwrap();
    let latest = store.latest(&run).await.unwrap().unwrap();
    assert_eq!(latest.id, second.id);
    assert_eq!(latest.status, Status::Pending);
    if f.keeps_history {
        let done = store.get(&first.id).await.unwrap();
        assert_eq!(done.status, Status::Success);
        assert_eq!(done.duration, Some(0.25));
    }

    // Failure with a retry, together.
    store.transition(&second.id, start("w")).await.unwrap();
    let mut retry = node(&run, 2, "B");
    retry.attempt = 2;
    store
        .transition(&second.id, fail("w", Some(retry.clone())))
        .await
        .unwrap();
    if f.keeps_history {
        let failed = store.get(&second.id).await.unwrap();
        assert_eq!(failed.status, Status::Error);
        assert_eq!(failed.error.as_deref(), Some("boom"));
    }
    let latest = store.latest(&run).await.unwrap().unwrap();
    assert_eq!((latest.id.clone(), latest.attempt), (retry.id.clone(), 2));

    // An interrupt: waiting → created with the answer.
    store
        .claim(Some(&run), lease("w", 30))
        .await
        .unwrap()
        .unwrap();
    store.transition(&retry.id, start("w")).await.unwrap();
    let mut waiting = node(&run, 3, "C");
    waiting.status = Status::Waiting;
    waiting.request = Some(raw(r#"{"q":"?"}"#));
    store
        .transition(&retry.id, succeed("w", waiting.clone()))
        .await
        .unwrap();
    assert!(
        store
            .claim(Some(&run), lease("w", 30))
            .await
            .unwrap()
            .is_none()
    );
    store.transition(&waiting.id, answer()).await.unwrap();
    let answered = store.get(&waiting.id).await.unwrap();
    assert_eq!(answered.status, Status::Created);
    assert_eq!(
        answered.answer.as_ref().map(|a| a.get()),
        Some(r#"{"ok":true}"#)
    );
    assert_eq!(
        answered.request.as_ref().map(|a| a.get()),
        Some(r#"{"q":"?"}"#)
    );

    // The end.
    store
        .claim(Some(&run), lease("w", 30))
        .await
        .unwrap()
        .unwrap();
    store.transition(&waiting.id, start("w")).await.unwrap();
    let end = Snapshot::end(run.clone(), 4, &common::hex(), raw("42"), raw("{}"), ts(5));
    store
        .transition(&waiting.id, succeed("w", end.clone()))
        .await
        .unwrap();
    let latest = store.latest(&run).await.unwrap().unwrap();
    assert_eq!((latest.id, latest.status), (end.id, Status::Success));
    let history = store.history(&run).await.unwrap();
    let seqs: Vec<u64> = history.iter().map(|s| s.seq).collect();
    assert_eq!(
        seqs,
        if f.keeps_history {
            vec![0, 1, 2, 3, 4]
        } else {
            vec![4]
        }
    );
}

pub(crate) async fn illegal_transitions(f: Fixture) {
    use Status::*;
    let store = &f.store;
    let statuses = [Created, Pending, Running, Success, Error, Waiting, Skipped];
    for from in statuses {
        if !f.keeps_history && matches!(from, Success | Skipped) {
            // Only kept while it is the run's latest snapshot, which these never are.
            continue;
        }
        for (name, allowed) in [
            ("claim", &[Created][..]),
            ("start", &[Pending]),
            ("renew", &[Pending, Running]),
            ("succeed", &[Running]),
            ("fail", &[Running]),
            ("replace", &[Pending]),
            ("answer", &[Waiting]),
        ] {
            let s = at_status(&**store, from).await;
            let next = node(&s.run_id, 7, "Z");
            let transition = match name {
                "claim" => Transition::Claim {
                    lease: lease("w", 100),
                },
                "start" => start("w"),
                "renew" => Transition::Renew {
                    owner: "w".into(),
                    until: ts(300),
                },
                "succeed" => succeed("w", next),
                "fail" => fail("w", Some(next)),
                "replace" => Transition::Replace {
                    owner: "w".into(),
                    next: Box::new(next),
                },
                _ => answer(),
            };
            let to = transition.target();
            let result = store.transition(&s.id, transition).await;
            if allowed.contains(&from) {
                assert!(result.is_ok(), "{name} from {from}: {result:?}");
            } else {
                match result {
                    Err(deployd_graph::Error::IllegalTransition {
                        id,
                        from: got_from,
                        to: got_to,
                    }) => {
                        assert_eq!((id, got_from, got_to), (s.id.clone(), from, to), "{name}");
                    }
                    other => {
                        panic!("{name} from {from}: expected IllegalTransition, got {other:?}")
                    }
                }
                // Refused: nothing changed, nothing inserted.
                let after = store.get(&s.id).await.unwrap();
                assert_eq!(after.status, from, "{name} from {from}");
                if f.keeps_history {
                    let seqs: Vec<u64> = store
                        .history(&s.run_id)
                        .await
                        .unwrap()
                        .iter()
                        .map(|s| s.seq)
                        .collect();
                    assert!(
                        !seqs.contains(&7),
                        "{name} from {from} inserted its snapshot"
                    );
                }
            }
        }
    }
    // Someone else's lease.
    let s = at_status(&**store, Running).await;
    let err = store
        .transition(&s.id, succeed("thief", node(&s.run_id, 1, "B")))
        .await;
    assert!(
        matches!(err, Err(deployd_graph::Error::Conflict { .. })),
        "{err:?}"
    );
    assert_eq!(store.get(&s.id).await.unwrap().status, Running);
    // A successor whose place in the run is taken: the whole commit is refused.
    let taken = node(&s.run_id, 0, "Dup");
    let err = store.transition(&s.id, succeed("w", taken)).await;
    assert!(
        matches!(err, Err(deployd_graph::Error::Conflict { .. })),
        "{err:?}"
    );
    assert_eq!(store.get(&s.id).await.unwrap().status, Running);
}

pub(crate) async fn concurrent_claims(f: Fixture) {
    // One snapshot, many claimers on every handle: exactly one wins.
    for round in 0..5 {
        let run = common::run_id();
        let s = node(&run, 0, "A");
        f.store.insert(&s).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = f.handles[i % f.handles.len()].clone();
            let run = run.clone();
            tasks.push(tokio::spawn(async move {
                let owner = format!("w{i}");
                if i % 2 == 0 {
                    store.claim(Some(&run), lease(&owner, 100)).await
                } else {
                    // Claims of any run compete too (other tests' runs are in other schemas
                    // or files, but this backend may share them: only count this run).
                    match store.claim(None, lease(&owner, 100)).await {
                        Ok(Some(s)) if s.run_id != run => Ok(None),
                        other => other,
                    }
                }
            }));
        }
        let mut winners = 0;
        for task in tasks {
            if task.await.unwrap().unwrap().is_some() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}");
        assert_eq!(f.store.get(&s.id).await.unwrap().status, Status::Pending);
    }
    // Many snapshots, many claimers: each snapshot goes to exactly one.
    let runs: Vec<RunId> = (0..6).map(|_| common::run_id()).collect();
    for run in &runs {
        f.store.insert(&node(run, 0, "A")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = f.handles[i % f.handles.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(s) = store
                .claim(None, lease(&format!("w{i}"), 100))
                .await
                .unwrap()
            {
                got.push(s.run_id);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    claimed.sort();
    let mut expected = runs.clone();
    expected.sort();
    assert_eq!(claimed, expected);
}

pub(crate) async fn lease_expiry(f: Fixture) {
    let store = &f.store;
    let pending = at_status(&**store, Status::Pending).await; // lease until ts(100)
    let running = at_status(&**store, Status::Running).await; // lease until ts(100)
    let created = at_status(&**store, Status::Created).await;
    assert!(store.expire_leases(ts(99)).await.unwrap().is_empty());
    let mut expired = store.expire_leases(ts(101)).await.unwrap();
    expired.sort();
    let mut expected = vec![pending.id.clone(), running.id.clone()];
    expected.sort();
    assert_eq!(expired, expected);
    for id in [&pending.id, &running.id] {
        let s = store.get(id).await.unwrap();
        assert_eq!((s.status, s.attempt), (Status::Created, 2), "{id}");
        assert!(s.lease.is_none());
        assert!(s.start_ts.is_none());
    }
    assert_eq!(store.get(&created.id).await.unwrap().attempt, 1);
    // The old holder's commit is refused; a new claim works.
    let err = store
        .transition(&running.id, succeed("w", node(&running.run_id, 1, "B")))
        .await;
    assert!(
        matches!(err, Err(Error::IllegalTransition { .. })),
        "{err:?}"
    );
    let again = store
        .claim(Some(&running.run_id), lease("w2", 500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.attempt), (running.id.clone(), 2));
    assert!(store.expire_leases(ts(101)).await.unwrap().is_empty());
}

pub(crate) async fn history_json_round_trip(f: Fixture) {
    let store = &f.store;
    let run = common::run_id();
    let first = node(&run, 0, "A");
    store.insert(&first).await.unwrap();
    store.claim(Some(&run), lease("w", 100)).await.unwrap();
    store.transition(&first.id, start("w")).await.unwrap();
    let mut waiting = node(&run, 1, "B");
    waiting.status = Status::Waiting;
    waiting.request = Some(raw(r#"{"question":"ok?","options":[1,2]}"#));
    store
        .transition(&first.id, succeed("w", waiting.clone()))
        .await
        .unwrap();
    store.transition(&waiting.id, answer()).await.unwrap();
    store.claim(Some(&run), lease("w", 100)).await.unwrap();
    store.transition(&waiting.id, start("w")).await.unwrap();
    let end = Snapshot::end(
        run.clone(),
        2,
        &common::hex(),
        raw(r#""done""#),
        raw("{}"),
        ts(3),
    );
    store
        .transition(&waiting.id, succeed("w", end))
        .await
        .unwrap();

    let history = store.history(&run).await.unwrap();
    let json = to_json(&history).unwrap();
    let back = from_json(&json).unwrap();
    assert_eq!(to_json(&back).unwrap(), json);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let last = value.as_array().unwrap().last().unwrap();
    assert_eq!(last["kind"], "end");
    assert_eq!(last["result"]["data"], "done");
    assert!(last["id"].as_str().unwrap().starts_with("end:"));
    if f.keeps_history {
        let first = &value[0];
        assert_eq!(first["kind"], "node");
        assert_eq!(first["status"], "success");
        assert_eq!(first["node"]["node_id"], "A");
        assert_eq!(first["start_ts"], ts(1).to_string());
        assert_eq!(first["duration"], 0.25);
        assert_eq!(first["state"]["count"], 0);
        let id = first["id"].as_str().unwrap();
        let (node_id, hex) = id.split_once(':').unwrap();
        assert_eq!((node_id, hex.len()), ("A", 32));
        assert_eq!(value[1]["request"]["options"][1], 2);
        assert_eq!(value[1]["answer"]["ok"], true);
    }
    // Every handle reads the same.
    for handle in &f.handles {
        assert_eq!(to_json(&handle.history(&run).await.unwrap()).unwrap(), json);
    }
}

macro_rules! suite {
    ($($backend:ident => $open:expr;)*) => {$(
        mod $backend {
            use super::*;

            async fn fixture() -> Fixture {
                $open.await
            }

            #[tokio::test]
            async fn empty_store() {
                super::empty_store(fixture().await).await;
            }
            #[tokio::test]
            async fn unknown_ids() {
                super::unknown_ids(fixture().await).await;
            }
            #[tokio::test]
            async fn insert_if_new() {
                super::insert_if_new(fixture().await).await;
            }
            #[tokio::test]
            async fn lifecycle() {
                super::lifecycle(fixture().await).await;
            }
            #[tokio::test]
            async fn illegal_transitions() {
                super::illegal_transitions(fixture().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_claims() {
                super::concurrent_claims(fixture().await).await;
            }
            #[tokio::test]
            async fn lease_expiry() {
                super::lease_expiry(fixture().await).await;
            }
            #[tokio::test]
            async fn history_json_round_trip() {
                super::history_json_round_trip(fixture().await).await;
            }
        }
    )*};
}

suite! {
    memory_latest_only => common::memory(false);
    memory_full_history => common::memory(true);
    file => common::file(deployd_graph::Durability::Immediate);
    file_group_commit => common::file(deployd_graph::Durability::group());
    sqlite => common::sqlite(deployd_graph::Durability::Immediate);
    sqlite_group_commit => common::sqlite(deployd_graph::Durability::group());
    postgres => common::postgres(deployd_graph::Durability::Immediate);
    postgres_group_commit => common::postgres(deployd_graph::Durability::group());
}

#[tokio::test]
async fn memory_dump_and_load_keep_every_run() {
    let f = common::memory(true).await;
    let run = common::run_id();
    let s = node(&run, 0, "A");
    f.store.insert(&s).await.unwrap();
    let other = node(&common::run_id(), 0, "A");
    f.store.insert(&other).await.unwrap();
    let dump = f.memory.as_ref().unwrap().dump_json().unwrap();
    let loaded = deployd_graph::store::MemoryStore::load_json(&dump).unwrap();
    assert_eq!(loaded.dump_json().unwrap(), dump);
    assert_eq!(loaded.get(&s.id).await.unwrap().node.get(), s.node.get());
}

#[tokio::test]
async fn file_store_compaction_keeps_histories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.log");
    let store = deployd_graph::store::FileStore::open(&path, Default::default())
        .await
        .unwrap();
    let run = common::run_id();
    let first = node(&run, 0, "A");
    store.insert(&first).await.unwrap();
    store.claim(Some(&run), lease("w", 100)).await.unwrap();
    store.transition(&first.id, start("w")).await.unwrap();
    store
        .transition(&first.id, succeed("w", node(&run, 1, "B")))
        .await
        .unwrap();
    let before = to_json(&store.history(&run).await.unwrap()).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    store.compact().await.unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < size);
    store
        .insert(&node(&common::run_id(), 0, "C"))
        .await
        .unwrap();
    drop(store);
    let reopened = deployd_graph::store::FileStore::open(&path, Default::default())
        .await
        .unwrap();
    assert_eq!(
        to_json(&reopened.history(&run).await.unwrap()).unwrap(),
        before
    );
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert_eq!(
        lines, 2,
        "one line per run after compaction, then one per commit"
    );
}

#[tokio::test]
async fn file_store_lock_excludes_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.log");
    let store = deployd_graph::store::FileStore::open(&path, Default::default())
        .await
        .unwrap();
    let second = deployd_graph::store::FileStore::open_with_timeout(
        &path,
        Default::default(),
        Duration::from_millis(50),
    )
    .await;
    assert!(matches!(second, Err(Error::Locked { .. })), "{second:?}");
    drop(store);
    // The writer thread releases the lock once it has finished.
    let mut reopened = None;
    for _ in 0..100 {
        match deployd_graph::store::FileStore::open_with_timeout(
            &path,
            Default::default(),
            Duration::from_millis(50),
        )
        .await
        {
            Ok(store) => {
                reopened = Some(store);
                break;
            }
            Err(Error::Locked { .. }) => continue,
            Err(err) => panic!("{err}"),
        }
    }
    assert!(reopened.is_some());
}
