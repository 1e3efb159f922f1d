-- Alert rules, the alerts they raised, the alert event log, webhooks, and commands to devices with their status
-- history. Rule definitions and alerts are kept whole as JSON (the core types), with the columns that filters and
-- orderings need beside them. Alerts and commands have no foreign key to devices or rules: they outlive both.

-- Moves on with every rule created or deleted, so edge agents know when their rules snapshot is stale.
ALTER TABLE farms ADD COLUMN rules_version bigint NOT NULL DEFAULT 0;

CREATE TABLE rules (
    id          uuid PRIMARY KEY,
    farm_id     uuid NOT NULL REFERENCES farms (id),
    create_time timestamptz NOT NULL,
    definition  jsonb NOT NULL
);

CREATE INDEX rules_farm_id ON rules (farm_id, id);

-- One row per alert: the edge's and the cloud's copies of one alert share its id and are merged into it.
CREATE TABLE alerts (
    id        uuid PRIMARY KEY,
    farm_id   uuid NOT NULL REFERENCES farms (id),
    rule_id   uuid NOT NULL,
    device_id uuid,
    severity  smallint NOT NULL CHECK (severity BETWEEN 1 AND 3),
    state     smallint NOT NULL CHECK (state BETWEEN 1 AND 3),
    open_time timestamptz NOT NULL,
    body      jsonb NOT NULL
);

CREATE INDEX alerts_farm_open ON alerts (farm_id, open_time DESC, id DESC);
CREATE INDEX alerts_open ON alerts (open_time DESC, id DESC);
-- The unresolved alerts of a rule on a device (a copy raised after a restart joins the one already open).
CREATE INDEX alerts_rule_device_unresolved ON alerts (rule_id, device_id) WHERE state < 3;

-- Append-only; the sequence is the resume cursor of live streams and webhooks. Writers number events themselves
-- (the last number plus one) while holding a transaction-scoped advisory lock, so events commit in sequence order
-- and a rolled-back append leaves no gap, which a sequence (bigserial) would.
CREATE TABLE alert_events (
    sequence bigint PRIMARY KEY CHECK (sequence > 0),
    farm_id  uuid NOT NULL,
    severity smallint NOT NULL CHECK (severity BETWEEN 1 AND 3),
    kind     smallint NOT NULL CHECK (kind BETWEEN 1 AND 4),
    -- The alert as it was right after the event.
    alert    jsonb NOT NULL
);

CREATE INDEX alert_events_farm ON alert_events (farm_id, sequence);

CREATE TABLE webhooks (
    id                   uuid PRIMARY KEY,
    farm_id              uuid NOT NULL REFERENCES farms (id),
    url                  text NOT NULL,
    min_severity         smallint NOT NULL CHECK (min_severity BETWEEN 1 AND 3),
    secret               text NOT NULL,
    state                smallint NOT NULL CHECK (state IN (1, 2)),
    consecutive_failures bigint NOT NULL DEFAULT 0,
    last_error           text,
    last_success_time    timestamptz,
    create_time          timestamptz NOT NULL,
    delivered_sequence   bigint NOT NULL DEFAULT 0,
    -- The process that delivers this webhook's events, until when: one deliverer across replicas.
    lease_owner          uuid,
    lease_until          timestamptz
);

CREATE INDEX webhooks_farm_id ON webhooks (farm_id, id);

CREATE TABLE commands (
    id            uuid PRIMARY KEY,
    farm_id       uuid NOT NULL REFERENCES farms (id),
    device_id     uuid NOT NULL,
    name          text NOT NULL,
    -- A JSON object kept as the client sent it.
    parameters    text NOT NULL,
    request_id    text,
    create_time   timestamptz NOT NULL,
    expire_time   timestamptz NOT NULL,
    -- 1 queued, 2 sent, 3 delivered, 4 acked, 5 failed, 6 expired; the detail is the latest receipt's.
    status        smallint NOT NULL CHECK (status BETWEEN 1 AND 6),
    status_detail text NOT NULL
);

-- A client's retry with the same request id finds the command it created.
CREATE UNIQUE INDEX commands_device_request ON commands (device_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX commands_farm_create ON commands (farm_id, create_time DESC, id DESC);
CREATE INDEX commands_device_create ON commands (device_id, create_time DESC, id DESC);
CREATE INDEX commands_pending ON commands (farm_id, create_time, id) WHERE status IN (1, 2);
CREATE INDEX commands_unfinished_expire ON commands (expire_time) WHERE status IN (1, 2, 3);

CREATE TABLE command_receipts (
    command_id  uuid NOT NULL REFERENCES commands (id),
    -- 1 for the queued receipt, then one more per status change.
    position    integer NOT NULL,
    status      smallint NOT NULL CHECK (status BETWEEN 1 AND 6),
    detail      text NOT NULL,
    change_time timestamptz NOT NULL,
    PRIMARY KEY (command_id, position)
);
