-- The device registry: farms, devices, API keys.
CREATE TABLE farms (
    id               uuid PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    create_time      timestamptz NOT NULL,
    -- Bumped on every change to the farm's devices, so edge agents know when their cached registry is stale.
    registry_version bigint NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    id                uuid PRIMARY KEY,
    farm_id           uuid NOT NULL REFERENCES farms (id),
    name              text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('sensor', 'camera', 'actuator', 'gateway')),
    state             text NOT NULL CHECK (state IN ('provisioned', 'active', 'decommissioned')),
    labels            jsonb NOT NULL DEFAULT '{}',
    credential_sha256 text,
    last_seen_time    timestamptz,
    create_time       timestamptz NOT NULL,
    update_time       timestamptz NOT NULL
);

-- A decommissioned device keeps its name for history, but a replacement may take the name again.
CREATE UNIQUE INDEX devices_farm_name_in_service ON devices (farm_id, name) WHERE state <> 'decommissioned';
CREATE INDEX devices_farm_id ON devices (farm_id, id);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    farm_id       uuid REFERENCES farms (id),
    secret_sha256 text NOT NULL,
    create_time   timestamptz NOT NULL,
    revoke_time   timestamptz
);

CREATE INDEX api_keys_farm_id ON api_keys (farm_id, id);
