//! [`SqliteStore`]: snapshots in SQLite (WAL), the embedded default.

use std::path::Path;
use std::time::Duration as StdDuration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::Durability;

sql_backend!(sqlx::Sqlite, "", true);

/// Snapshots in a SQLite database in WAL mode with `synchronous = FULL`: a commit is on disk
/// when it is acknowledged. Writes go through one writer task that batches concurrent commits
/// into one transaction (see [`Durability`]), writing a batch's inserts, starts and successes
/// with a few multi-row statements; reads use a small pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: Pool,
    writer: super::writer::Writer,
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path`.
    pub async fn open(path: impl AsRef<Path>, durability: Durability) -> Result<Self, Error> {
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(StdDuration::from_secs(10))
            // 64 MiB of page cache instead of 2: the indexes of a busy store stay in memory.
            .pragma("cache_size", "-65536");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Storage(format!("cannot open {}: {e}", path.as_ref().display())))?;
        Self::with_pool(pool, durability).await
    }

    /// Uses an open pool (creating the table if needed).
    pub async fn with_pool(pool: sqlx::SqlitePool, durability: Durability) -> Result<Self, Error> {
        for statement in sql::SCHEMA {
            sqlx::query(*statement)
                .execute(&pool)
                .await
                .map_err(db_error)?;
        }
        let writer = spawn_writer(&pool, durability);
        Ok(SqliteStore { pool, writer })
    }

    /// Waits for pending writes and closes the database.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl_store!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Status, Transition};
    use crate::store::Store;

    fn snapshot(id: &str, run: &str, seq: u64, status: Status) -> Snapshot {
        let raw = |text: &str| Json::from_string(text.to_owned()).unwrap();
        let mut s = Snapshot::node(
            RunId::from(run),
            seq,
            "A",
            id,
            raw(r#"{"node_id":"A"}"#),
            raw("{}"),
            Timestamp::from_micros(1),
        );
        s.status = status;
        if status != Status::Created {
            s.lease = Some(Lease {
                owner: "w".into(),
                until: Timestamp::from_micros(1_000_000),
            });
        }
        s
    }

    /// A batch written with the multi-row statements answers each op as running the ops one by
    /// one would, refusals included, and writes only what was accepted.
    #[tokio::test]
    async fn grouped_batch_answers_each_op() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("g.db"), Durability::Immediate)
            .await
            .unwrap();
        for s in [
            snapshot("p", "r1", 0, Status::Pending),
            snapshot("q", "r2", 0, Status::Pending),
            snapshot("x", "r3", 0, Status::Running),
            snapshot("y", "r4", 0, Status::Running),
            snapshot("old", "r5", 0, Status::Created),
        ] {
            assert!(store.insert(&s).await.unwrap());
        }
        let start = |owner: &str| Transition::Start {
            owner: owner.into(),
            at: Timestamp::from_micros(5),
            until: Timestamp::from_micros(2_000_000),
        };
        let succeed = |owner: &str, next: Snapshot| Transition::Succeed {
            owner: owner.into(),
            duration: 0.5,
            next: Box::new(next),
        };
        let ops = vec![
            Op::Insert(snapshot("new", "r6", 0, Status::Created)),
            Op::Insert(snapshot("old", "r5", 0, Status::Created)),
            Op::Transition(SnapshotId::from("A:p"), start("w")),
            Op::Transition(SnapshotId::from("A:q"), start("intruder")),
            Op::Transition(
                SnapshotId::from("A:x"),
                succeed("w", snapshot("x2", "r3", 1, Status::Running)),
            ),
            Op::Transition(
                SnapshotId::from("A:y"),
                succeed("intruder", snapshot("y2", "r4", 1, Status::Running)),
            ),
            Op::Transition(
                SnapshotId::from("A:nowhere"),
                succeed("w", snapshot("z2", "r7", 1, Status::Running)),
            ),
        ];
        let batch = SqlBatch {
            pool: store.pool.clone(),
        };
        let results = batch.run(&ops).await.unwrap();
        let shown: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(done) => format!("{done:?}"),
                Err(Error::Conflict { .. }) => "Conflict".to_owned(),
                Err(Error::NotFound { .. }) => "NotFound".to_owned(),
                Err(err) => format!("{err}"),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "Inserted(true)",
                "Inserted(false)",
                "Transitioned",
                "Conflict",
                "Transitioned",
                "Conflict",
                "NotFound"
            ]
        );
        let status = |id: &'static str| {
            let store = store.clone();
            async move { store.get(&SnapshotId::from(id)).await.map(|s| s.status) }
        };
        assert_eq!(status("A:new").await.unwrap(), Status::Created);
        assert_eq!(status("A:p").await.unwrap(), Status::Running);
        assert_eq!(status("A:q").await.unwrap(), Status::Pending);
        assert_eq!(status("A:x").await.unwrap(), Status::Success);
        assert_eq!(status("A:x2").await.unwrap(), Status::Running);
        assert_eq!(status("A:y").await.unwrap(), Status::Running);
        assert!(status("A:y2").await.is_err());
        assert!(status("A:z2").await.is_err());
        let p = store.get(&SnapshotId::from("A:p")).await.unwrap();
        assert_eq!(p.start_ts, Some(Timestamp::from_micros(5)));
        assert_eq!(p.lease.unwrap().until, Timestamp::from_micros(2_000_000));
        let x = store.get(&SnapshotId::from("A:x")).await.unwrap();
        assert_eq!(x.duration, Some(0.5));
    }
}
