//! The embedded backend: one SQLite file, no server. One connection behind a mutex, used from blocking threads:
//! SQLite serialises writers anyway, and farm-sized loads do not need more. WAL mode lets readers of other
//! processes (backups, `sqlite3`) read while the server writes; `synchronous = FULL` makes every commit durable
//! before it is acknowledged.

mod alerts;
mod commands;
mod image;
mod models;
mod registry;
mod telemetry;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use smartfarm_core::{Error, Result};

use crate::migrate::{self, MigrationReport};

/// A SQLite database.
#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, creating its directory too.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let opened = path.clone();
        let connection = tokio::task::spawn_blocking(move || -> Result<Connection> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|error| {
                    Error::Unavailable(format!("cannot create database directory {}: {error}", parent.display()))
                })?;
            }
            let connection = Connection::open(&path).map_err(|error| {
                Error::Unavailable(format!("cannot open sqlite database {}: {error}", path.display()))
            })?;
            connection
                .execute_batch(
                    "PRAGMA journal_mode = WAL;
                     PRAGMA synchronous = FULL;
                     PRAGMA foreign_keys = ON;
                     PRAGMA busy_timeout = 5000;",
                )
                .map_err(sql_error("configure the sqlite connection"))?;
            Ok(connection)
        })
        .await
        .map_err(|error| Error::internal("open sqlite", error))??;
        Ok(SqliteStore { connection: Arc::new(Mutex::new(connection)), path: opened })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies the migrations this database lacks, up to schema `version`.
    pub async fn migrate_to(&self, version: i64) -> Result<MigrationReport> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin migration"))?;
            transaction
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                         version      INTEGER PRIMARY KEY,
                         name         TEXT NOT NULL,
                         applied_time INTEGER NOT NULL
                     ) STRICT;",
                )
                .map_err(sql_error("create schema_migrations"))?;
            let current: i64 = transaction
                .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0))
                .map_err(sql_error("read the schema version"))?;
            let known = migrate::SQLITE.len() as i64;
            if current > known {
                return Err(migrate::too_new(current, known));
            }
            let mut report = MigrationReport { applied: Vec::new(), current_version: current };
            for migration in migrate::SQLITE.iter().filter(|m| m.version > current && m.version <= version) {
                transaction
                    .execute_batch(migration.sql)
                    .map_err(sql_error(&format!("apply migration {} ({})", migration.version, migration.name)))?;
                transaction
                    .execute(
                        "INSERT INTO schema_migrations (version, name, applied_time) VALUES (?1, ?2, ?3)",
                        params![
                            migration.version,
                            migration.name,
                            smartfarm_core::time::to_unix_micros(smartfarm_core::time::now())
                        ],
                    )
                    .map_err(sql_error("record migration"))?;
                report.applied.push(migration.version);
                report.current_version = migration.version;
            }
            transaction.commit().map_err(sql_error("commit migration"))?;
            Ok(report)
        })
        .await
    }

    /// The schema version the database is at (0 before any migration).
    pub async fn schema_version(&self) -> Result<i64> {
        self.run(|connection| {
            let exists: Option<String> = connection
                .query_row(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error("look for schema_migrations"))?;
            if exists.is_none() {
                return Ok(0);
            }
            connection
                .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0))
                .map_err(sql_error("read the schema version"))
        })
        .await
    }

    /// Runs `work` with the connection on a blocking thread.
    pub(crate) async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still consistent (SQLite rolls
            // back an unfinished transaction when it is dropped), so keep using it.
            let mut guard = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut guard)
        })
        .await
        .map_err(|error| Error::internal("sqlite worker thread failed", error))?
    }
}

/// Maps a SQLite error to the one error type, with what was being done.
pub(crate) fn sql_error(context: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |error| match &error {
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == rusqlite::ErrorCode::DatabaseBusy
                || failure.code == rusqlite::ErrorCode::DatabaseLocked =>
        {
            Error::Unavailable(format!("the database is busy ({context})"))
        }
        _ => Error::internal(context.to_string(), error),
    }
}

/// Whether the error is a UNIQUE or PRIMARY KEY violation.
pub(crate) fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(failure, _)
        if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// Whether the error is a FOREIGN KEY violation.
pub(crate) fn is_foreign_key_violation(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(failure, _)
        if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}

/// A count or cursor as SQLite's signed integer (a `limit` beyond it means no limit).
pub(crate) fn sql_count(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// An enum stored as its number; an unknown number is reported as a corrupt column.
pub(crate) fn number_column<T>(
    row: &rusqlite::Row<'_>,
    index: usize,
    decode: fn(i64) -> Option<T>,
) -> rusqlite::Result<T> {
    let value: i64 = row.get(index)?;
    decode(value).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Integer,
            format!("unknown stored value {value}").into(),
        )
    })
}
