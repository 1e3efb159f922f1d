//! Versioned schema migrations, one list per backend, embedded in the binary. Each is applied once, in order, in a
//! transaction together with its row in `schema_migrations`; a database newer than the binary is refused rather
//! than written to.

/// One migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Increases by one from 1.
    pub version: i64,
    /// What it does, for logs.
    pub name: &'static str,
    /// The SQL, applied as one batch.
    pub sql: &'static str,
}

/// SQLite's migrations.
pub const SQLITE: &[Migration] = &[
    Migration { version: 1, name: "registry", sql: include_str!("../migrations/sqlite/0001_registry.sql") },
    Migration { version: 2, name: "telemetry", sql: include_str!("../migrations/sqlite/0002_telemetry.sql") },
    Migration { version: 3, name: "images", sql: include_str!("../migrations/sqlite/0003_images.sql") },
    Migration { version: 4, name: "models", sql: include_str!("../migrations/sqlite/0004_models.sql") },
    Migration {
        version: 5,
        name: "alerts_and_commands",
        sql: include_str!("../migrations/sqlite/0005_alerts_and_commands.sql"),
    },
    Migration {
        version: 6,
        name: "command_retention",
        sql: include_str!("../migrations/sqlite/0006_command_retention.sql"),
    },
    Migration {
        version: 7,
        name: "alert_retention",
        sql: include_str!("../migrations/sqlite/0007_alert_retention.sql"),
    },
    Migration {
        version: 8,
        name: "blob_intent_claims",
        sql: include_str!("../migrations/sqlite/0008_blob_intent_claims.sql"),
    },
    Migration { version: 9, name: "rollup_widths", sql: include_str!("../migrations/sqlite/0009_rollup_widths.sql") },
    Migration {
        version: 10,
        name: "reading_series",
        sql: include_str!("../migrations/sqlite/0010_reading_series.sql"),
    },
    Migration {
        version: 11,
        name: "unscored_batches",
        sql: include_str!("../migrations/sqlite/0011_unscored_batches.sql"),
    },
    Migration {
        version: 12,
        name: "images_to_diagnose",
        sql: include_str!("../migrations/sqlite/0012_images_to_diagnose.sql"),
    },
    Migration {
        version: 13,
        name: "late_diagnosis_tries",
        sql: include_str!("../migrations/sqlite/0013_late_diagnosis_tries.sql"),
    },
];

/// PostgreSQL's migrations.
pub const POSTGRES: &[Migration] = &[
    Migration { version: 1, name: "registry", sql: include_str!("../migrations/postgres/0001_registry.sql") },
    Migration { version: 2, name: "telemetry", sql: include_str!("../migrations/postgres/0002_telemetry.sql") },
    Migration { version: 3, name: "images", sql: include_str!("../migrations/postgres/0003_images.sql") },
    Migration { version: 4, name: "models", sql: include_str!("../migrations/postgres/0004_models.sql") },
    Migration {
        version: 5,
        name: "alerts_and_commands",
        sql: include_str!("../migrations/postgres/0005_alerts_and_commands.sql"),
    },
    Migration {
        version: 6,
        name: "command_retention",
        sql: include_str!("../migrations/postgres/0006_command_retention.sql"),
    },
    Migration {
        version: 7,
        name: "alert_retention",
        sql: include_str!("../migrations/postgres/0007_alert_retention.sql"),
    },
    Migration {
        version: 8,
        name: "blob_intent_claims",
        sql: include_str!("../migrations/postgres/0008_blob_intent_claims.sql"),
    },
    Migration { version: 9, name: "rollup_widths", sql: include_str!("../migrations/postgres/0009_rollup_widths.sql") },
    Migration {
        version: 10,
        name: "reading_series",
        sql: include_str!("../migrations/postgres/0010_reading_series.sql"),
    },
    Migration {
        version: 11,
        name: "unscored_batches",
        sql: include_str!("../migrations/postgres/0011_unscored_batches.sql"),
    },
    Migration {
        version: 12,
        name: "images_to_diagnose",
        sql: include_str!("../migrations/postgres/0012_images_to_diagnose.sql"),
    },
    Migration {
        version: 13,
        name: "late_diagnosis_tries",
        sql: include_str!("../migrations/postgres/0013_late_diagnosis_tries.sql"),
    },
];

/// What a migration run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run.
    pub applied: Vec<i64>,
    /// The schema version after the run.
    pub current_version: i64,
}

/// The refusal to touch a database whose schema is newer than this binary.
pub(crate) fn too_new(found: i64, known: i64) -> smartfarm_core::Error {
    smartfarm_core::Error::FailedPrecondition(format!(
        "the database schema is at version {found}, newer than the {known} this smartfarm knows; upgrade smartfarm"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_from_one_on_every_backend() {
        for list in [SQLITE, POSTGRES] {
            for (index, migration) in list.iter().enumerate() {
                assert_eq!(migration.version, index as i64 + 1, "{}", migration.name);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len(), "both backends must carry the same schema versions");
    }
}
