-- Versioned models: the weights live in the blob store (content-addressed), the rows say which versions exist,
-- their card (kind, classes, evaluation figures) and which version of each model serves.
CREATE TABLE models (
    name          text NOT NULL,
    version       text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('plant_disease', 'sensor_anomaly')),
    sha256        text NOT NULL,
    size_bytes    bigint NOT NULL,
    blob_key      text NOT NULL,
    card          text NOT NULL,
    create_time   timestamptz NOT NULL,
    -- Set on the one version of a model that serves; NULL on the others.
    activate_time timestamptz,
    PRIMARY KEY (name, version)
);

CREATE UNIQUE INDEX models_one_active_version ON models (name) WHERE activate_time IS NOT NULL;
CREATE INDEX models_kind_active ON models (kind, activate_time DESC);
