//! [`PostgresStore`]: snapshots in Postgres, shared by workers on several machines.

use std::str::FromStr;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::Durability;

sql_backend!(sqlx::Postgres, " FOR UPDATE SKIP LOCKED", false);

/// Snapshots in Postgres. Several stores (processes, machines) may share one database: a
/// claim takes a row with `FOR UPDATE SKIP LOCKED` and checks its status in the same update,
/// so of concurrent claimers exactly one gets a snapshot, and every transition is a
/// conditional update on the status and the lease holder.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
    writer: super::writer::Writer,
}

/// The advisory lock taken while creating the schema, so that stores starting together do
/// not race on `CREATE TABLE IF NOT EXISTS`.
const SCHEMA_LOCK: i64 = 0x6465_706c_6f79_6401;

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host/db`) and uses the `public` schema.
    pub async fn connect(url: &str, durability: Durability) -> Result<Self, Error> {
        Self::connect_in_schema(url, "public", durability).await
    }

    /// Connects to `url` and keeps the table in `schema` (created if missing). `schema` must be
    /// a plain lowercase identifier.
    pub async fn connect_in_schema(
        url: &str,
        schema: &str,
        durability: Durability,
    ) -> Result<Self, Error> {
        let valid = schema
            .bytes()
            .enumerate()
            .all(|(i, c)| c == b'_' || c.is_ascii_lowercase() || (i > 0 && c.is_ascii_digit()));
        if schema.is_empty() || !valid {
            return Err(Error::Storage(format!(
                "schema name {schema:?} is not a plain lowercase identifier"
            )));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Storage(format!("invalid Postgres URL: {e}")))?
            .options([("search_path", schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|e| Error::Storage(format!("cannot connect to Postgres: {e}")))?;
        let mut tx = pool.begin().await.map_err(db_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        for statement in sql::SCHEMA {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        let writer = spawn_writer(&pool, durability);
        Ok(PostgresStore { pool, writer })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl_store!(PostgresStore);
