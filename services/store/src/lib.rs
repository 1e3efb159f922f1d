//! smartfarm-store owns persistence: narrow storage traits for what the services need ([`RegistryStore`],
//! [`BlobStore`], [`ImageStore`], [`ModelStore`], [`AlertStore`], [`CommandStore`]), their backends picked by URL (`sqlite://` by default, `postgres://`; blobs `file://`), and the
//! versioned migrations of each backend. It knows SQL and files; it must never know about gRPC, HTTP or the
//! contracts' messages, and it never decides who may do what (that is the services' job).

#![forbid(unsafe_code)]

pub mod alerts;
pub mod blob;
pub mod commands;
pub mod image;
pub mod migrate;
pub mod model;
pub mod models;
pub mod postgres;
pub mod registry;
pub mod sqlite;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

use std::path::Path;
use std::sync::Arc;

use smartfarm_core::config::PostgresConfig;
use smartfarm_core::{Error, Result};

pub use alerts::AlertStore;
pub use blob::BlobStore;
pub use commands::CommandStore;
pub use image::ImageStore;
pub use migrate::MigrationReport;
pub use models::ModelStore;
pub use registry::RegistryStore;
pub use telemetry::TelemetryStore;

use crate::postgres::PostgresStore;
use crate::sqlite::SqliteStore;

/// The metadata and time-series database, whichever backend the URL picked.
#[derive(Clone, Debug)]
pub enum Database {
    /// The embedded default.
    Sqlite(SqliteStore),
    /// PostgreSQL (with TimescaleDB features when the extension is installed).
    Postgres(PostgresStore),
}

impl Database {
    /// Connects to the database a URL names: `sqlite://PATH` (relative or absolute) or `postgres://…` /
    /// `postgresql://…`. It does not migrate; call [`Database::migrate`].
    pub async fn connect(url: &str, postgres: &PostgresConfig) -> Result<Database> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::invalid("database_url", "sqlite:// needs a file path, e.g. sqlite://smartfarm.db"));
            }
            return Ok(Database::Sqlite(SqliteStore::open(Path::new(path)).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(PostgresStore::connect(url, postgres).await?));
        }
        Err(Error::invalid(
            "database_url",
            format!("{url:?} is not a database url: expected sqlite://PATH or postgres://…"),
        ))
    }

    /// Applies the migrations the database lacks.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        self.migrate_to(i64::MAX).await
    }

    /// Applies the migrations the database lacks up to schema `version`: how tests build a database as an
    /// earlier release left it, to check that a migration keeps what it holds.
    pub async fn migrate_to(&self, version: i64) -> Result<MigrationReport> {
        match self {
            Database::Sqlite(store) => store.migrate_to(version).await,
            Database::Postgres(store) => store.migrate_to(version).await,
        }
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i64> {
        match self {
            Database::Sqlite(store) => store.schema_version().await,
            Database::Postgres(store) => store.schema_version().await,
        }
    }

    /// The device registry.
    pub fn registry(&self) -> Arc<dyn RegistryStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// The telemetry store.
    pub fn telemetry(&self) -> Arc<dyn TelemetryStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// The image metadata store.
    pub fn images(&self) -> Arc<dyn ImageStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// The model version store.
    pub fn models(&self) -> Arc<dyn ModelStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// Alert rules, alerts, their event log and webhooks.
    pub fn alerts(&self) -> Arc<dyn AlertStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// Commands to devices.
    pub fn commands(&self) -> Arc<dyn CommandStore> {
        match self {
            Database::Sqlite(store) => Arc::new(store.clone()),
            Database::Postgres(store) => Arc::new(store.clone()),
        }
    }

    /// A description for logs, without secrets, including whether TimescaleDB features are on.
    pub async fn describe(&self) -> String {
        match self {
            Database::Sqlite(store) => format!("sqlite://{}", store.path().display()),
            Database::Postgres(store) => match store.timescaledb_version().await {
                Ok(Some(version)) => format!("{} (timescaledb {version})", store.display_url()),
                Ok(None) => format!("{} (plain postgresql, no timescaledb)", store.display_url()),
                Err(_) => store.display_url().to_string(),
            },
        }
    }
}
