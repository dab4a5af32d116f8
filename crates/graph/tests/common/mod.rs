//! Fixtures shared by the integration tests: a fresh store of each backend.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deployd_graph::store::{FileStore, MemoryStore, PostgresStore, SqliteStore};
use deployd_graph::{Durability, Json, RunId, Store};

/// A fresh store, with other handles onto the same data (other connections or pools, as other
/// workers would have) for the concurrency tests.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub handles: Vec<Arc<dyn Store>>,
    pub keeps_history: bool,
    pub memory: Option<Arc<MemoryStore>>,
    _dir: Option<tempfile::TempDir>,
}

pub fn raw(text: &str) -> Json {
    Json::from_string(text.to_owned()).unwrap()
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 32 hex digits, unique in this process and across test runs.
pub fn hex() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{:08x}{:08x}{:016x}", std::process::id(), nanos as u32, n)
}

pub fn run_id() -> RunId {
    RunId::from(hex())
}

pub async fn memory(keeps_history: bool) -> Fixture {
    let store = Arc::new(if keeps_history {
        MemoryStore::full_history()
    } else {
        MemoryStore::latest_only()
    });
    let dyn_store: Arc<dyn Store> = store.clone();
    Fixture {
        handles: vec![dyn_store.clone()],
        store: dyn_store,
        keeps_history,
        memory: Some(store),
        _dir: None,
    }
}

pub async fn file(durability: Durability) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        FileStore::open(dir.path().join("runs.log"), durability)
            .await
            .unwrap(),
    );
    Fixture {
        handles: vec![store.clone()],
        store,
        keeps_history: true,
        memory: None,
        _dir: Some(dir),
    }
}

pub async fn sqlite(durability: Durability) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, durability).await.unwrap());
    let mut handles = vec![store.clone()];
    for _ in 0..2 {
        handles.push(Arc::new(
            SqliteStore::open(&path, durability).await.unwrap(),
        ));
    }
    Fixture {
        store,
        handles,
        keeps_history: true,
        memory: None,
        _dir: Some(dir),
    }
}

pub fn postgres_url() -> String {
    std::env::var("DEPLOYD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own for one test, named so that old ones can be found and dropped.
pub async fn postgres_schema() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let schema = format!("graph_test_{secs}_{}_{n}", std::process::id());
    drop_old_schemas(secs).await;
    schema
}

async fn drop_old_schemas(now: u64) {
    use sqlx::Row;
    let pool = sqlx::PgPool::connect(&postgres_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Postgres is required at {} (set DEPLOYD_TEST_POSTGRES): {e}",
                postgres_url()
            )
        });
    let rows = sqlx::query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'graph_test_%'")
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

pub async fn postgres(durability: Durability) -> Fixture {
    let schema = postgres_schema().await;
    let url = postgres_url();
    let open = || async {
        PostgresStore::connect_in_schema(&url, &schema, durability)
            .await
            .unwrap_or_else(|e| panic!("Postgres is required at {url}: {e}"))
    };
    let store: Arc<dyn Store> = Arc::new(open().await);
    let mut handles = vec![store.clone()];
    for _ in 0..2 {
        handles.push(Arc::new(open().await));
    }
    Fixture {
        store,
        handles,
        keeps_history: true,
        memory: None,
        _dir: None,
    }
}
