//! The PostgreSQL backend: a deadpool pool of tokio-postgres connections with the timeouts and TCP keepalives
//! tokio-postgres leaves unset by default. Plain PostgreSQL is fully supported. Whether the `timescaledb` extension
//! is installed is detected and reported ([`PostgresStore::timescaledb_version`]); the telemetry tables, which the
//! telemetry capability adds, are to use its hypertables when it is.

mod alerts;
mod commands;
mod image;
mod models;
mod registry;
mod telemetry;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use smartfarm_core::config::PostgresConfig;
use smartfarm_core::{Error, Result};

use crate::migrate::{self, MigrationReport};

/// Advisory lock key held while migrating, so replicas starting together apply each migration once.
const MIGRATION_LOCK_KEY: i64 = 0x736d_6172_7466_6172; // "smartfar"

/// A PostgreSQL database.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    telemetry: std::sync::Arc<TelemetryCaches>,
    /// The URL without its password, for logs.
    display_url: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("url", &self.display_url).finish()
    }
}

impl PostgresStore {
    /// Connects a pool to `url` and checks that one connection works, so a wrong URL fails at start with a clear
    /// message rather than at the first request.
    pub async fn connect(url: &str, settings: &PostgresConfig) -> Result<PostgresStore> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|error| Error::invalid("database_url", format!("not a postgres url: {error}")))?;
        config
            .connect_timeout(settings.connect_timeout)
            .keepalives(true)
            .keepalives_idle(settings.keepalive_idle)
            .options(format!("-c statement_timeout={}", settings.statement_timeout.as_millis()));
        if config.get_application_name().is_none() {
            config.application_name("smartfarm");
        }
        let display_url = display_url(&config);
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(settings.pool_wait_timeout),
                create: Some(settings.connect_timeout + Duration::from_secs(1)),
                recycle: Some(settings.connect_timeout),
            })
            .build()
            .map_err(|error| Error::internal("build the postgres pool", error))?;
        let store = PostgresStore { pool, display_url, telemetry: Default::default() };
        let _first_connection = store.client().await?;
        Ok(store)
    }

    /// The URL without its password.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|error| {
            tracing::warn!(url = %self.display_url, error = %error, "cannot get a postgres connection");
            Error::Unavailable(format!("the database at {} cannot be reached", self.display_url))
        })
    }

    /// Applies the migrations this database lacks up to schema `version`, all in one transaction under an advisory
    /// lock.
    pub async fn migrate_to(&self, version: i64) -> Result<MigrationReport> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin migration"))?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(pg_error("take the migration lock"))?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version      bigint PRIMARY KEY,
                     name         text NOT NULL,
                     applied_time timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(pg_error("create schema_migrations"))?;
        let current: i64 = transaction
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
            .await
            .map_err(pg_error("read the schema version"))?
            .get(0);
        let known = migrate::POSTGRES.len() as i64;
        if current > known {
            return Err(migrate::too_new(current, known));
        }
        let mut report = MigrationReport { applied: Vec::new(), current_version: current };
        for migration in migrate::POSTGRES.iter().filter(|m| m.version > current && m.version <= version) {
            transaction
                .batch_execute(migration.sql)
                .await
                .map_err(pg_error(&format!("apply migration {} ({})", migration.version, migration.name)))?;
            transaction
                .execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[&migration.version, &migration.name],
                )
                .await
                .map_err(pg_error("record migration"))?;
            report.applied.push(migration.version);
            report.current_version = migration.version;
        }
        transaction.commit().await.map_err(pg_error("commit migration"))?;
        Ok(report)
    }

    /// The schema version the database is at (0 before any migration).
    pub async fn schema_version(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0
                             ELSE (SELECT COALESCE(MAX(version), 0) FROM schema_migrations) END",
                &[],
            )
            .await
            .map_err(pg_error("read the schema version"))?;
        Ok(row.get::<_, i64>(0))
    }

    /// The installed version of the `timescaledb` extension, if any: telemetry storage is to use hypertables,
    /// compression and continuous aggregates when it is present, and plain partitioned tables otherwise.
    pub async fn timescaledb_version(&self) -> Result<Option<String>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'", &[])
            .await
            .map_err(pg_error("look for the timescaledb extension"))?;
        Ok(row.map(|row| row.get(0)))
    }
}

/// What telemetry writes remember between batches: facts that never change once learnt.
#[derive(Default)]
struct TelemetryCaches {
    /// Interned metric names (never deleted).
    metric_ids: std::sync::Mutex<std::collections::HashMap<String, i32>>,
    /// Reading series ids by (farm, device, metric id) (never deleted), the most recently used of them: a cloud
    /// with millions of series does not keep them all in memory.
    series_ids: std::sync::Mutex<telemetry::SeriesCache>,
    /// Monthly readings partitions known to exist (removed again when retention drops one).
    partitions: std::sync::Mutex<std::collections::BTreeSet<(i32, u32)>>,
    /// How often the partition cache was found wrong and cleared (a commit that saw it happen tries again).
    partition_resets: std::sync::atomic::AtomicU64,
    /// Whether readings is partitioned or a hypertable, read once after migration.
    layout: std::sync::Mutex<Option<telemetry::ReadingsLayout>>,
}

fn display_url(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_string());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let database = config.get_dbname().unwrap_or("");
    format!("postgres://{user}@{host}:{port}/{database}")
}

/// Maps a PostgreSQL error to the one error type, with what was being done.
pub(crate) fn pg_error(context: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |error| {
        if error.is_closed() {
            return Error::Unavailable(format!("the database connection was lost ({context})"));
        }
        match error.code().and_then(passing_trouble) {
            Some(trouble) => Error::Unavailable(format!("{trouble} ({context})")),
            None => Error::internal(context.to_string(), error),
        }
    }
}

/// What the database's error code says when it names trouble that passes: a server shutting down or starting, a
/// failover (a standby is read-only until promoted), a full server, a transaction that lost a race. Such errors are
/// `Unavailable`, so callers try again later and count no failure against what they were doing; any other database
/// error is `Internal`.
fn passing_trouble(code: &SqlState) -> Option<&'static str> {
    let trouble = match code.code() {
        "57014" => "the database took too long",
        "57P01" | "57P02" | "57P03" => "the database is shutting down or starting",
        "25006" => "the database is read-only for now (a failover?)",
        "40001" | "40P01" => "the database gave up a transaction that raced another",
        "55P03" => "the database could not take a lock in time",
        // Not 08P01 (a protocol violation) or 53400 (a configured limit): those fail the same way every time.
        "08000" | "08001" | "08003" | "08004" | "08006" => "the database connection failed",
        "53000" | "53100" | "53200" | "53300" => "the database is out of resources (connections, memory or disk)",
        _ => return None,
    };
    Some(trouble)
}

/// Whether the error is a violation of the named unique constraint or index.
pub(crate) fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Whether the error is a foreign-key violation.
pub(crate) fn is_foreign_key_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
}

/// A count or cursor as PostgreSQL's bigint (a `limit` beyond it means no limit).
pub(crate) fn sql_count(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// An enum stored as its number; an unknown number is reported as corrupt.
pub(crate) fn stored_number<T>(what: &str, value: i16, decode: fn(i64) -> Option<T>) -> Result<T> {
    decode(i64::from(value))
        .ok_or_else(|| Error::internal(format!("{what} holds an unknown value"), anyhow::anyhow!("{value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors of a server that is failing over or going down are `Unavailable` (callers try again later); a
    /// statement the server refuses for what it is stays `Internal`.
    #[tokio::test]
    async fn trouble_that_passes_is_unavailable_and_the_rest_internal() {
        let test = crate::testing::TestPostgres::create().await;
        let store = PostgresStore::connect(&test.url, &PostgresConfig::default()).await.unwrap();
        let client = store.client().await.unwrap();
        let error = client.batch_execute("SELEC 1").await.map_err(pg_error("a typo")).unwrap_err();
        assert!(matches!(error, Error::Internal { .. }), "{error:?}");
        // A standby before its promotion refuses writes the same way.
        client.batch_execute("SET default_transaction_read_only = on").await.unwrap();
        let error = client.batch_execute("CREATE TABLE t (x int)").await.map_err(pg_error("a write")).unwrap_err();
        assert!(matches!(&error, Error::Unavailable(reason) if reason.contains("read-only")), "{error:?}");
        // A server shutting down ends its sessions (an administrator's shutdown, here of this one session).
        let error = client
            .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
            .await
            .map_err(pg_error("a read"))
            .unwrap_err();
        assert!(matches!(&error, Error::Unavailable(reason) if reason.contains("shutting down")), "{error:?}");
        let error = client.batch_execute("SELECT 1").await.map_err(pg_error("after")).unwrap_err();
        assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    }
}
