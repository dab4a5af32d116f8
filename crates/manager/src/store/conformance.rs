//! The control store's conformance suite: every case runs against SQLite (a file in a
//! temporary directory) and against PostgreSQL (a schema of its own in the database at
//! `DEPLOYD_TEST_POSTGRES`, by default `postgres://postgres@127.0.0.1:5432/test`; the cases
//! fail when it is not there).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::{
    CommitJob, ControlStore, PostgresStore, SCHEMA_VERSION, SqliteStore, StoredDeployment, Write,
    Written,
};
use crate::{EventKind, TaskInfo, TaskStatus};

/// Where a case's store lives; [`Backend::open`] opens another handle on it (another node).
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, schema: String },
}

fn postgres_url() -> String {
    std::env::var("DEPLOYD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

static SCHEMAS: AtomicU64 = AtomicU64::new(0);

impl Backend {
    fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = SCHEMAS.fetch_add(1, Ordering::SeqCst);
        let schema = format!("control_test_{secs}_{}_{n}", std::process::id());
        drop_old_schemas(secs).await;
        Self::Postgres {
            url: postgres_url(),
            schema,
        }
    }

    async fn open(&self) -> Arc<dyn ControlStore> {
        match self {
            Self::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join("deployd.db"))
                    .await
                    .unwrap(),
            ),
            Self::Postgres { url, schema } => Arc::new(
                PostgresStore::connect(url, schema)
                    .await
                    .unwrap_or_else(|err| panic!("PostgreSQL is required at {url}: {err}")),
            ),
        }
    }

    /// Runs `sql` on the store, outside deployd (as an older or newer deployd left it).
    async fn execute(&self, sql: &str) {
        match self {
            Self::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("deployd.db")).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Self::Postgres { url, schema } => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SET LOCAL search_path TO {schema}"
                )))
                .execute(&mut *tx)
                .await
                .unwrap();
                for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
                    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                pool.close().await;
            }
        }
    }

    /// Sets the stored schema version, as a newer deployd would.
    async fn set_schema_version(&self, version: i64) {
        match self {
            Self::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("deployd.db")).unwrap();
                conn.execute("UPDATE schema_version SET version = ?", [version])
                    .unwrap();
            }
            Self::Postgres { url, schema } => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {schema}.schema_version SET version = {version}"
                )))
                .execute(&pool)
                .await
                .unwrap();
                pool.close().await;
            }
        }
    }
}

/// Drops the schemas of test runs older than an hour.
async fn drop_old_schemas(now: u64) {
    use sqlx::Row;
    let pool = sqlx::PgPool::connect(&postgres_url())
        .await
        .unwrap_or_else(|err| {
            panic!(
                "PostgreSQL is required at {} (set DEPLOYD_TEST_POSTGRES): {err}",
                postgres_url()
            )
        });
    let rows = sqlx::query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'control_test_%'")
        .fetch_all(&pool)
        .await
        .unwrap();
    for row in rows {
        let name: String = row.get(0);
        let secs: u64 = name
            .split('_')
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(now);
        if now.saturating_sub(secs) > 3600 {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE"
            )))
            .execute(&pool)
            .await;
        }
    }
    pool.close().await;
}

fn task(id: &str, session: &str) -> TaskInfo {
    TaskInfo {
        id: id.into(),
        deployment: "d".into(),
        service: "svc".into(),
        session_id: session.into(),
        input: json!({"n": id}),
        status: TaskStatus::Queued,
        attempt: 0,
        result: None,
        error: None,
    }
}

fn create(id: &str, session: &str, new_session: bool) -> Write {
    Write::Create {
        task: task(id, session),
        new_session,
    }
}

fn running(id: &str, attempt: u32, node: &str) -> Write {
    Write::Running {
        task_id: id.into(),
        attempt,
        node: Arc::from(node),
    }
}

fn event(id: &str, data: Value) -> Write {
    Write::Event {
        task_id: id.into(),
        attempt: 1,
        data,
    }
}

fn finish(id: &str, outcome: Result<Value, String>, only_if_queued: bool) -> Write {
    Write::Finish {
        task_id: id.into(),
        session_id: "s".into(),
        attempt: 1,
        outcome,
        state: Some(json!({"after": id})),
        only_if_queued,
        cancelled: false,
    }
}

fn deployment(name: &str, spec: &str) -> StoredDeployment {
    StoredDeployment {
        name: name.into(),
        spec: spec.into(),
        origin: "/somewhere".into(),
        base_path: "/base".into(),
        from: "client".into(),
    }
}

fn ids(tasks: &[TaskInfo]) -> Vec<&str> {
    tasks.iter().map(|t| t.id.as_str()).collect()
}

/// Hands `writes` to the group commit and waits for what they did.
async fn commit(store: &dyn ControlStore, writes: Vec<Write>) -> Vec<Written> {
    let (done, answer) = oneshot::channel();
    let (_closed, closed) = watch::channel(false);
    store
        .commit(CommitJob {
            writes,
            closed,
            failures: Arc::default(),
            done: Box::new(move |written| {
                let _ = done.send(written);
            }),
        })
        .unwrap();
    answer.await.unwrap().unwrap()
}

async fn deployments_are_created_replaced_and_deleted_with_their_tasks(backend: Backend) {
    let store = backend.open().await;
    assert!(
        store
            .insert_deployment(&deployment("a", "one"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .insert_deployment(&deployment("a", "two"))
            .await
            .unwrap(),
        "a second create of one name loses"
    );
    assert_eq!(store.deployment("a").await.unwrap().unwrap().spec, "one");
    store
        .put_deployment(&deployment("a", "three"))
        .await
        .unwrap();
    store
        .put_deployment(&deployment("b", "four"))
        .await
        .unwrap();
    assert_eq!(
        store.deployments().await.unwrap(),
        [deployment("a", "three"), deployment("b", "four")]
    );
    assert!(store.deployment("c").await.unwrap().is_none());
    store
        .write(vec![create("t", "s", true), event("t", json!(1))])
        .await
        .unwrap();
    store.delete_deployment("d").await.unwrap();
    store.delete_deployment("a").await.unwrap();
    assert!(store.task("t").await.unwrap().is_none());
    assert!(store.session("s").await.unwrap().is_none());
    assert!(store.log_after("t", 0).await.unwrap().is_none());
    assert_eq!(
        store.deployments().await.unwrap(),
        [deployment("b", "four")]
    );
}

async fn a_task_runs_streams_and_ends_once(backend: Backend) {
    let store = backend.open().await;
    let written = commit(
        &*store,
        vec![
            create("t", "s", true),
            running("t", 1, "n1"),
            event("t", json!({"step": 1})),
        ],
    )
    .await;
    assert!(written.iter().all(|w| w.applied));
    let (started, state) = written[1].started.clone().expect("started");
    assert_eq!(started.status, TaskStatus::Running);
    assert_eq!(started.attempt, 1);
    assert_eq!(started.input, json!({"n": "t"}));
    assert_eq!(state, None);
    assert_eq!(written[2].event.as_ref().unwrap().seq, 1);
    assert_eq!(store.owner("t").await.unwrap().as_deref(), Some("n1"));

    let written = commit(
        &*store,
        vec![
            finish("t", Ok(json!("done")), false),
            finish("t", Err("late".into()), false),
            event("t", json!("after the end")),
            event("missing", json!("no such task")),
        ],
    )
    .await;
    let end = written[0].event.as_ref().expect("the final entry");
    assert_eq!((end.seq, end.kind), (2, EventKind::Result));
    assert!(!written[1].applied, "the first outcome is kept");
    assert!(written[2].applied, "an entry after the end is still logged");
    assert!(
        !written[3].applied,
        "an event of a task not stored is not logged"
    );
    let stored = store.task("t").await.unwrap().unwrap();
    assert_eq!(stored.status, TaskStatus::Succeeded);
    assert_eq!(stored.result, Some(json!("done")));
    assert_eq!(store.owner("t").await.unwrap(), None);
    let (_, state) = store.session("s").await.unwrap().unwrap();
    assert_eq!(state, Some(json!({"after": "t"})));
    let (log, ended) = store.log_after("t", 0).await.unwrap().unwrap();
    assert!(ended);
    assert_eq!(
        log.iter().map(|e| (e.seq, e.kind)).collect::<Vec<_>>(),
        [
            (1, EventKind::Event),
            (2, EventKind::Result),
            (3, EventKind::Event)
        ]
    );
    assert_eq!(log[0].data, json!({"step": 1}));
    assert_eq!(log[0].attempt, 1);
    let (after, _) = store.log_after("t", 2).await.unwrap().unwrap();
    assert_eq!(after.len(), 1);
    assert!(store.log_after("missing", 0).await.unwrap().is_none());
    // A running mark of an ended task does not apply.
    let written = store.write(vec![running("t", 2, "n1")]).await.unwrap();
    assert!(!written[0].applied && written[0].started.is_none());
    assert!(store.events_after("t", 0).await.unwrap().is_some());
}

async fn a_queued_task_fails_only_while_queued(backend: Backend) {
    let store = backend.open().await;
    store
        .write(vec![create("q", "s", true), create("r", "s", false)])
        .await
        .unwrap();
    store.write(vec![running("r", 1, "n1")]).await.unwrap();
    let written = store
        .write(vec![
            finish("q", Err("never started".into()), true),
            finish("r", Err("never started".into()), true),
        ])
        .await
        .unwrap();
    assert!(written[0].applied);
    assert_eq!(written[0].event.as_ref().unwrap().kind, EventKind::Error);
    assert!(!written[1].applied, "a running task is left alone");
    assert_eq!(
        store.task("q").await.unwrap().unwrap().error.as_deref(),
        Some("never started")
    );
    assert_eq!(
        store.task("r").await.unwrap().unwrap().status,
        TaskStatus::Running
    );
}

async fn sessions_list_their_tasks_and_keep_them_when_deleted(backend: Backend) {
    let store = backend.open().await;
    store.create_session("s1", "d").await.unwrap();
    store.create_session("s2", "d").await.unwrap();
    store.create_session("other", "e").await.unwrap();
    store
        .write(vec![create("t1", "s1", false), create("t2", "s1", false)])
        .await
        .unwrap();
    let sessions = store.sessions("d").await.unwrap();
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.id.as_str(), s.task_ids.clone()))
            .collect::<Vec<_>>(),
        [
            ("s1", vec!["t1".to_owned(), "t2".to_owned()]),
            ("s2", vec![])
        ]
    );
    assert_eq!(store.session("s1").await.unwrap().unwrap().0, "d");
    assert!(
        !store.delete_session("e", "s1").await.unwrap(),
        "not its deployment"
    );
    assert!(store.delete_session("d", "s1").await.unwrap());
    assert!(!store.delete_session("d", "s1").await.unwrap());
    assert!(store.task("t1").await.unwrap().is_some());
}

async fn tasks_are_listed_in_pages_and_counted(backend: Backend) {
    let store = backend.open().await;
    for n in 0..5 {
        store
            .write(vec![create(&format!("t{n}"), "s", n == 0)])
            .await
            .unwrap();
    }
    assert_eq!(
        ids(&store.tasks("d").await.unwrap()),
        ["t0", "t1", "t2", "t3", "t4"]
    );
    let first = store.tasks_page("d", None, 2).await.unwrap().unwrap();
    assert_eq!(ids(&first), ["t0", "t1"]);
    let next = store.tasks_page("d", Some("t1"), 2).await.unwrap().unwrap();
    assert_eq!(ids(&next), ["t2", "t3"]);
    let last = store.tasks_page("d", Some("t4"), 2).await.unwrap().unwrap();
    assert!(last.is_empty());
    assert!(
        store
            .tasks_page("d", Some("nope"), 2)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .tasks_page("e", Some("t1"), 2)
            .await
            .unwrap()
            .is_none()
    );

    store.write(vec![running("t0", 1, "n")]).await.unwrap();
    store
        .write(vec![
            finish("t0", Ok(json!(0)), false),
            finish("t1", Err("x".into()), true),
        ])
        .await
        .unwrap();
    let counts: Vec<_> = store
        .task_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.status, c.count))
        .collect();
    assert_eq!(
        counts,
        [
            (TaskStatus::Failed, 1),
            (TaskStatus::Queued, 3),
            (TaskStatus::Succeeded, 1)
        ]
    );
    let durations = store.task_durations(&[0.0, 3600.0]).await.unwrap();
    assert_eq!(durations.len(), 1);
    assert_eq!(durations[0].count, 2);
    assert_eq!(durations[0].at_most[1], 2, "both ended within the hour");
    assert!(durations[0].sum_seconds >= 0.0);
}

async fn unfinished_waiting_requeued_and_pruned_tasks(backend: Backend) {
    let store = backend.open().await;
    store
        .write(vec![
            create("a", "s", true),
            create("b", "s", false),
            create("c", "s", false),
        ])
        .await
        .unwrap();
    store.write(vec![running("b", 1, "n")]).await.unwrap();
    store
        .write(vec![running("c", 1, "n"), finish("c", Ok(json!(1)), false)])
        .await
        .unwrap();
    assert_eq!(ids(&store.unfinished_tasks("d").await.unwrap()), ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = super::now_ms() + 1000;
    assert_eq!(
        ids(&store.waiting_tasks("d", "svc", later, 10).await.unwrap()),
        ["a"]
    );
    assert!(
        store
            .waiting_tasks("d", "svc", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.requeue("b").await.unwrap();
    assert_eq!(
        store.task("b").await.unwrap().unwrap().status,
        TaskStatus::Queued
    );
    assert!(
        store
            .set_task_status("b", TaskStatus::Running, 3)
            .await
            .unwrap()
    );
    assert_eq!(store.task("b").await.unwrap().unwrap().attempt, 3);
    assert!(
        !store
            .set_task_status("c", TaskStatus::Queued, 3)
            .await
            .unwrap(),
        "c ended"
    );

    assert_eq!(store.prune_ended(later, 10).await.unwrap(), 1);
    assert!(store.task("c").await.unwrap().is_none());
    assert!(store.log_after("c", 0).await.unwrap().is_none());
    assert_eq!(store.prune_ended(later, 10).await.unwrap(), 0);
    assert!(store.task("a").await.unwrap().is_some());
}

async fn group_commits_apply_in_the_order_they_were_handed_over(backend: Backend) {
    let store = backend.open().await;
    let mut answers = Vec::new();
    let (_closed, closed) = watch::channel(false);
    for n in 0..20 {
        let id = format!("t{n}");
        for writes in [
            vec![create(&id, &format!("s{n}"), true)],
            vec![running(&id, 1, "n")],
            vec![event(&id, json!(n)), finish(&id, Ok(json!(n)), false)],
        ] {
            let (done, answer) = oneshot::channel();
            store
                .commit(CommitJob {
                    writes,
                    closed: closed.clone(),
                    failures: Arc::default(),
                    done: Box::new(move |written| {
                        let _ = done.send(written);
                    }),
                })
                .unwrap();
            answers.push(answer);
        }
    }
    for answer in answers {
        assert!(answer.await.unwrap().unwrap().iter().all(|w| w.applied));
    }
    for n in 0..20 {
        let task = store.task(&format!("t{n}")).await.unwrap().unwrap();
        assert_eq!(task.result, Some(json!(n)));
    }
}

async fn a_task_runs_on_one_live_node_at_a_time(backend: Backend) {
    let a = backend.open().await;
    let b = backend.open().await;
    a.hold_lease("a", Some("http://127.0.0.1:1"), "1.0", 60_000)
        .await
        .unwrap();
    b.hold_lease("b", None, "1.0", 60_000).await.unwrap();
    let (nodes, now) = b.nodes().await.unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(nodes[0].address.as_deref(), Some("http://127.0.0.1:1"));
    assert!(nodes.iter().all(|n| n.lease_until_ms > now));
    a.write(vec![create("t", "s", true), create("u", "s", false)])
        .await
        .unwrap();
    assert!(a.write(vec![running("t", 1, "a")]).await.unwrap()[0].applied);
    assert!(
        !b.write(vec![running("t", 2, "b")]).await.unwrap()[0].applied,
        "a task running on a live node stays there"
    );
    assert!(
        a.write(vec![running("t", 2, "a")]).await.unwrap()[0].applied,
        "its own node may"
    );
    assert!(b.write(vec![running("u", 1, "b")]).await.unwrap()[0].applied);
    assert!(
        a.take_orphans().await.unwrap().is_empty(),
        "every owner is live"
    );

    // a's lease lapses: its task may run elsewhere, and is an orphan.
    a.hold_lease("a", None, "1.0", -1).await.unwrap();
    let orphans = b.take_orphans().await.unwrap();
    assert_eq!(ids(&orphans), ["t"]);
    assert_eq!(orphans[0].status, TaskStatus::Queued);
    assert_eq!(orphans[0].attempt, 2);
    assert!(
        b.take_orphans().await.unwrap().is_empty(),
        "an orphan is taken once"
    );
    assert!(b.write(vec![running("t", 3, "b")]).await.unwrap()[0].applied);
    assert_eq!(a.owner("t").await.unwrap().as_deref(), Some("b"));
    b.release_lease("b").await.unwrap();
    let (nodes, _) = a.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    let mut orphans = a.take_orphans().await.unwrap();
    orphans.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(
        ids(&orphans),
        ["t", "u"],
        "a node that left cleanly leaves its tasks to the others"
    );
}

async fn nodes_of_another_version_cannot_join_a_live_cluster(backend: Backend) {
    let a = backend.open().await;
    let b = backend.open().await;
    a.hold_lease("a", None, "1.0", 60_000).await.unwrap();
    let err = b
        .hold_lease("b", None, "2.0", 60_000)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1.0") && err.contains("2.0") && err.contains("`a`"),
        "{err}"
    );
    a.release_lease("a").await.unwrap();
    b.hold_lease("b", None, "2.0", 60_000).await.unwrap();
}

async fn two_nodes_appending_to_one_log_take_distinct_places(backend: Backend) {
    let a = backend.open().await;
    let b = backend.open().await;
    a.write(vec![create("t", "s", true)]).await.unwrap();
    let append = |store: Arc<dyn ControlStore>, who: &'static str| async move {
        for n in 0..25 {
            store
                .write(vec![event("t", json!([who, n]))])
                .await
                .unwrap();
        }
    };
    tokio::join!(append(a.clone(), "a"), append(b.clone(), "b"));
    let log = a.events_after("t", 0).await.unwrap().unwrap();
    assert_eq!(log.len(), 50);
    assert!(log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
}

async fn a_store_of_a_newer_schema_is_refused(backend: Backend) {
    let store = backend.open().await;
    store.close().await;
    backend.set_schema_version(SCHEMA_VERSION + 1).await;
    let err = match &backend {
        Backend::Sqlite(dir) => SqliteStore::open(&dir.path().join("deployd.db"))
            .await
            .unwrap_err(),
        Backend::Postgres { url, schema } => PostgresStore::connect(url, schema).await.unwrap_err(),
    }
    .to_string();
    assert!(err.contains("newer deployd"), "{err}");
    backend.set_schema_version(SCHEMA_VERSION).await;
    let store = backend.open().await;
    assert!(store.deployments().await.unwrap().is_empty());
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::postgres().await).await;
                }
            )*
        }
    };
}

fn cancel(id: &str) -> Write {
    Write::Finish {
        task_id: id.into(),
        session_id: "s".into(),
        attempt: 1,
        outcome: Err(format!("cancelled by client 127.0.0.1 ({id})")),
        state: None,
        only_if_queued: false,
        cancelled: true,
    }
}

async fn a_task_is_cancelled_once_while_queued_or_running(backend: Backend) {
    let store = backend.open().await;
    store
        .write(vec![
            create("q", "s", true),
            create("r", "s", false),
            create("done", "s", false),
        ])
        .await
        .unwrap();
    store
        .write(vec![
            running("r", 1, "n1"),
            running("done", 1, "n1"),
            finish("done", Ok(json!("ok")), false),
        ])
        .await
        .unwrap();
    let written = commit(
        &*store,
        vec![
            cancel("q"),
            cancel("r"),
            cancel("done"),
            // The worker's outcome that comes after the cancel is not kept.
            finish("r", Ok(json!("too late")), false),
        ],
    )
    .await;
    assert!(written[0].applied && written[1].applied);
    assert!(!written[2].applied, "an ended task keeps its outcome");
    assert!(!written[3].applied, "a cancelled task keeps its cancel");
    for id in ["q", "r"] {
        let task = store.task(id).await.unwrap().unwrap();
        assert_eq!(task.status, TaskStatus::Cancelled, "{id}");
        assert!(task.status.is_finished());
        assert_eq!(
            task.error,
            Some(format!("cancelled by client 127.0.0.1 ({id})"))
        );
        assert_eq!(task.result, None);
        let (log, ended) = store.log_after(id, 0).await.unwrap().unwrap();
        assert!(ended, "{id}: the log has ended");
        let last = log.last().unwrap();
        assert_eq!(last.kind, EventKind::Cancelled);
        assert!(last.kind.is_terminal());
        assert_eq!(
            last.data,
            json!(format!("cancelled by client 127.0.0.1 ({id})"))
        );
    }
    assert_eq!(
        store.task("done").await.unwrap().unwrap().status,
        TaskStatus::Succeeded
    );
    assert_eq!(store.owner("r").await.unwrap(), None);
    // A redelivery of the cancelled task does not run it.
    let written = store.write(vec![running("q", 1, "n1")]).await.unwrap();
    assert!(!written[0].applied && written[0].started.is_none());
    // A cancelled task is an ended one: it is pruned with them, and left out of the unfinished.
    assert!(store.unfinished_tasks("d").await.unwrap().is_empty());
    let pruned = store.prune_ended(i64::MAX, 100).await.unwrap();
    assert_eq!(pruned, 3);
}

async fn tasks_are_searched_newest_first_by_status_and_service(backend: Backend) {
    use crate::TaskFilter;
    let store = backend.open().await;
    // Ten tasks, a millisecond apart or more: t0 oldest. Even ones of `svc`, odd ones of
    // `other`; t3 and t6 succeed.
    for n in 0..10 {
        let mut task = task(&format!("t{n}"), "s");
        if n % 2 == 1 {
            task.service = "other".into();
        }
        store
            .write(vec![Write::Create {
                task,
                new_session: n == 0,
            }])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for id in ["t3", "t6"] {
        store
            .write(vec![running(id, 1, "n1"), finish(id, Ok(json!(id)), false)])
            .await
            .unwrap();
    }
    let search = |filter: TaskFilter, before: Option<&'static str>, limit: usize| {
        let store = Arc::clone(&store);
        async move {
            store
                .search_tasks("d", &filter, before, limit)
                .await
                .unwrap()
                .map(|records| {
                    records
                        .iter()
                        .map(|r| r.task.id.clone())
                        .collect::<Vec<_>>()
                })
        }
    };
    let all = TaskFilter::default();
    assert_eq!(
        search(all.clone(), None, 4).await.unwrap(),
        ["t9", "t8", "t7", "t6"]
    );
    assert_eq!(
        search(all.clone(), Some("t6"), 4).await.unwrap(),
        ["t5", "t4", "t3", "t2"]
    );
    assert_eq!(
        search(all.clone(), Some("t2"), 4).await.unwrap(),
        ["t1", "t0"]
    );
    assert_eq!(search(all.clone(), Some("nope"), 4).await, None);
    let svc = TaskFilter {
        service: Some("svc".into()),
        ..TaskFilter::default()
    };
    assert_eq!(
        search(svc.clone(), Some("t7"), 10).await.unwrap(),
        ["t6", "t4", "t2", "t0"]
    );
    let succeeded = TaskFilter {
        status: Some(TaskStatus::Succeeded),
        ..TaskFilter::default()
    };
    assert_eq!(
        search(succeeded.clone(), None, 10).await.unwrap(),
        ["t6", "t3"]
    );
    let both = TaskFilter {
        status: Some(TaskStatus::Succeeded),
        service: Some("other".into()),
    };
    assert_eq!(search(both, None, 10).await.unwrap(), ["t3"]);
    let queued_svc = TaskFilter {
        status: Some(TaskStatus::Queued),
        service: Some("svc".into()),
    };
    assert_eq!(
        search(queued_svc, Some("t8"), 2).await.unwrap(),
        ["t4", "t2"]
    );
    // Another deployment's tasks are not found, nor taken as a cursor.
    assert_eq!(
        store
            .search_tasks("e", &all, None, 10)
            .await
            .unwrap()
            .unwrap()
            .len(),
        0
    );
    assert!(
        store
            .search_tasks("e", &all, Some("t1"), 10)
            .await
            .unwrap()
            .is_none()
    );
    let record = store.task_record("t6").await.unwrap().unwrap();
    assert_eq!(record.task.status, TaskStatus::Succeeded);
    assert!(record.updated_ms >= record.created_ms && record.created_ms > 0);
    assert!(store.task_record("nope").await.unwrap().is_none());
}

async fn sessions_are_searched_newest_first_with_their_tasks(backend: Backend) {
    let store = backend.open().await;
    for n in 0..5 {
        store.create_session(&format!("s{n}"), "d").await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    store.create_session("other", "e").await.unwrap();
    for (task, session) in [("a", "s1"), ("b", "s3"), ("c", "s3")] {
        store
            .write(vec![create(task, session, false)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let page = |before: Option<&'static str>, limit: usize| {
        let store = Arc::clone(&store);
        async move { store.search_sessions("d", before, limit).await.unwrap() }
    };
    let first = page(None, 2).await.unwrap();
    assert_eq!(
        first
            .iter()
            .map(|s| (s.id.as_str(), s.task_ids.clone()))
            .collect::<Vec<_>>(),
        [("s4", vec![]), ("s3", vec!["b".to_owned(), "c".to_owned()])]
    );
    let second = page(Some("s3"), 2).await.unwrap();
    assert_eq!(
        second.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s2", "s1"]
    );
    assert_eq!(second[1].task_ids, ["a"]);
    let last = page(Some("s1"), 2).await.unwrap();
    assert_eq!(
        last.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s0"]
    );
    assert!(
        page(Some("other"), 2).await.is_none(),
        "another deployment's session"
    );
    assert!(page(Some("nope"), 2).await.is_none());
}

fn revision(deployment: &str, kind: &str) -> crate::Revision {
    crate::Revision {
        deployment: deployment.into(),
        revision: 99,
        created_ms: 1_000,
        by: "client 127.0.0.1".into(),
        kind: kind.into(),
        rollback_of: (kind == "rollback").then_some(1),
        outcome: "deploying".into(),
        error: None,
        sources: [(
            "svc".to_owned(),
            crate::RevisionSource {
                digest: "sha256:abc".into(),
                commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            },
        )]
        .into(),
        spec: format!("name: {deployment}\n# {kind}"),
        origin: "deployment.yml".into(),
        base_path: "/base".into(),
        from: "client".into(),
    }
}

async fn revisions_are_numbered_ended_listed_and_deleted(backend: Backend) {
    let store = backend.open().await;
    assert_eq!(
        store.add_revision(&revision("a", "deploy")).await.unwrap(),
        1
    );
    assert_eq!(
        store.add_revision(&revision("a", "reload")).await.unwrap(),
        2
    );
    assert_eq!(
        store.add_revision(&revision("b", "deploy")).await.unwrap(),
        1
    );
    assert_eq!(
        store
            .add_revision(&revision("a", "rollback"))
            .await
            .unwrap(),
        3
    );
    store.end_revision("a", 1, "deployed", None).await.unwrap();
    store
        .end_revision("a", 2, "failed", Some("service `svc` is not ready"))
        .await
        .unwrap();
    let listed = store.revisions("a", 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.revision, r.kind.as_str(), r.outcome.as_str()))
            .collect::<Vec<_>>(),
        [
            (3, "rollback", "deploying"),
            (2, "reload", "failed"),
            (1, "deploy", "deployed")
        ]
    );
    assert_eq!(listed[0].rollback_of, Some(1));
    assert_eq!(
        listed[1].error.as_deref(),
        Some("service `svc` is not ready")
    );
    assert_eq!(store.revisions("a", 1).await.unwrap().len(), 1);
    let mut expected = revision("a", "reload");
    expected.revision = 2;
    expected.outcome = "failed".into();
    expected.error = Some("service `svc` is not ready".into());
    assert_eq!(store.revision("a", 2).await.unwrap(), Some(expected));
    assert_eq!(store.revision("a", 4).await.unwrap(), None);
    // A deployment's revisions go with it; another's stay.
    store.put_deployment(&deployment("a", "x")).await.unwrap();
    store.delete_deployment("a").await.unwrap();
    assert!(store.revisions("a", 10).await.unwrap().is_empty());
    assert_eq!(store.revisions("b", 10).await.unwrap().len(), 1);
    // Numbers start again for a deployment made anew.
    assert_eq!(
        store.add_revision(&revision("a", "deploy")).await.unwrap(),
        1
    );
}

async fn a_store_of_schema_version_1_is_brought_to_the_current_one(backend: Backend) {
    let store = backend.open().await;
    store.add_revision(&revision("a", "deploy")).await.unwrap();
    store.write(vec![create("t", "s", true)]).await.unwrap();
    store.close().await;
    drop(store);
    // As deployd 1 left it: no revisions table, version 1.
    backend
        .execute("DROP TABLE revisions; UPDATE schema_version SET version = 1")
        .await;
    let store = backend.open().await;
    assert_eq!(
        store.add_revision(&revision("a", "deploy")).await.unwrap(),
        1
    );
    assert!(
        store.task("t").await.unwrap().is_some(),
        "the tasks are kept"
    );
    store.write(vec![cancel("t")]).await.unwrap();
    assert_eq!(store.prune_ended(i64::MAX, 10).await.unwrap(), 1);
}

conformance!(
    a_task_is_cancelled_once_while_queued_or_running,
    sessions_are_searched_newest_first_with_their_tasks,
    tasks_are_searched_newest_first_by_status_and_service,
    revisions_are_numbered_ended_listed_and_deleted,
    a_store_of_schema_version_1_is_brought_to_the_current_one,
    deployments_are_created_replaced_and_deleted_with_their_tasks,
    a_task_runs_streams_and_ends_once,
    a_queued_task_fails_only_while_queued,
    sessions_list_their_tasks_and_keep_them_when_deleted,
    tasks_are_listed_in_pages_and_counted,
    unfinished_waiting_requeued_and_pruned_tasks,
    group_commits_apply_in_the_order_they_were_handed_over,
    a_task_runs_on_one_live_node_at_a_time,
    nodes_of_another_version_cannot_join_a_live_cluster,
    two_nodes_appending_to_one_log_take_distinct_places,
    a_store_of_a_newer_schema_is_refused,
);

/// With PostgreSQL, the entries one node commits reach another node's notifier (with the
/// entry), and so do the notes it publishes; a node does not hear its own notes.
#[tokio::test]
async fn postgres_notes_go_from_node_to_node() {
    use crate::notifier::{Note, Notifier, channel};
    let backend = Backend::postgres().await;
    let Backend::Postgres { url, schema } = &backend else {
        unreachable!()
    };
    let a = PostgresStore::connect(url, schema).await.unwrap();
    a.notify_as("a");
    let b = PostgresStore::connect(url, schema).await.unwrap();
    b.notify_as("b");
    let hears_a = Notifier::postgres("a", a.pool().clone(), channel(schema))
        .await
        .unwrap();
    let hears_b = Notifier::postgres("b", b.pool().clone(), channel(schema))
        .await
        .unwrap();
    let mut entries = hears_b.subscribe_entries();
    let mut notes = hears_b.subscribe();
    let mut own = hears_a.subscribe_entries();
    commit(
        &a,
        vec![
            create("t", "s", true),
            event("t", json!({"big": "x".repeat(9000)})),
            event("t", json!(2)),
        ],
    )
    .await;
    let within = Duration::from_secs(10);
    let first = tokio::time::timeout(within, entries.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.event().is_none(),
        "too large for a note: read from the store"
    );
    assert!(matches!(&*first, Note::Entry { t, s: 1, .. } if t == "t"));
    let second = tokio::time::timeout(within, entries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.event().unwrap().data, json!(2));
    hears_a
        .publish(&Note::Deployment { name: "d".into() })
        .await
        .unwrap();
    let note = tokio::time::timeout(within, notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*note, Note::Deployment { name: "d".into() });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), own.recv())
            .await
            .is_err(),
        "a node does not hear itself"
    );
}
