-- The device registry: farms, devices, API keys. Times are microseconds since the Unix epoch; ids are UUID text.
CREATE TABLE farms (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    create_time      INTEGER NOT NULL,
    -- Bumped on every change to the farm's devices, so edge agents know when their cached registry is stale.
    registry_version INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE devices (
    id                TEXT PRIMARY KEY,
    farm_id           TEXT NOT NULL REFERENCES farms (id),
    name              TEXT NOT NULL,
    kind              TEXT NOT NULL CHECK (kind IN ('sensor', 'camera', 'actuator', 'gateway')),
    state             TEXT NOT NULL CHECK (state IN ('provisioned', 'active', 'decommissioned')),
    labels            TEXT NOT NULL DEFAULT '{}',
    credential_sha256 TEXT,
    last_seen_time    INTEGER,
    create_time       INTEGER NOT NULL,
    update_time       INTEGER NOT NULL
) STRICT;

-- A decommissioned device keeps its name for history, but a replacement may take the name again.
CREATE UNIQUE INDEX devices_farm_name_in_service ON devices (farm_id, name) WHERE state <> 'decommissioned';
CREATE INDEX devices_farm_id ON devices (farm_id, id);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    farm_id       TEXT REFERENCES farms (id),
    secret_sha256 TEXT NOT NULL,
    create_time   INTEGER NOT NULL,
    revoke_time   INTEGER
) STRICT;

CREATE INDEX api_keys_farm_id ON api_keys (farm_id, id);
