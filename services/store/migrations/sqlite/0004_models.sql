-- Versioned models: the weights live in the blob store (content-addressed), the rows say which versions exist,
-- their card (kind, classes, evaluation figures) and which version of each model serves. Times are microseconds
-- since the Unix epoch.
CREATE TABLE models (
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('plant_disease', 'sensor_anomaly')),
    sha256        TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    blob_key      TEXT NOT NULL,
    card          TEXT NOT NULL,
    create_time   INTEGER NOT NULL,
    -- Set on the one version of a model that serves; NULL on the others.
    activate_time INTEGER,
    PRIMARY KEY (name, version)
) STRICT;

CREATE UNIQUE INDEX models_one_active_version ON models (name) WHERE activate_time IS NOT NULL;
CREATE INDEX models_kind_active ON models (kind, activate_time DESC);
