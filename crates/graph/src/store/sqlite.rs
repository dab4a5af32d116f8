//! [`SqliteStore`]: snapshots in SQLite (WAL), the embedded default.

use std::path::Path;
use std::time::Duration as StdDuration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::Durability;

sql_backend!(sqlx::Sqlite, "");

/// Snapshots in a SQLite database in WAL mode with `synchronous = FULL`: a commit is on disk
/// when it is acknowledged. Writes go through one writer task that batches concurrent commits
/// into one transaction (see [`Durability`]); reads use a small pool.
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
            .busy_timeout(StdDuration::from_secs(10));
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
