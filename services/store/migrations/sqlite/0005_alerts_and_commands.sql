-- Alert rules, the alerts they raised, the alert event log, webhooks, and commands to devices with their status
-- history. Times are microseconds since the Unix epoch; ids are UUID text. Rule definitions and alerts are kept
-- whole as JSON (the core types), with the columns that filters and orderings need beside them. Alerts and commands
-- have no foreign key to devices or rules: they outlive both.

-- Moves on with every rule created or deleted, so edge agents know when their rules snapshot is stale.
ALTER TABLE farms ADD COLUMN rules_version INTEGER NOT NULL DEFAULT 0;

CREATE TABLE rules (
    id          TEXT PRIMARY KEY,
    farm_id     TEXT NOT NULL REFERENCES farms (id),
    create_time INTEGER NOT NULL,
    -- The rule as JSON.
    definition  TEXT NOT NULL
) STRICT;

CREATE INDEX rules_farm_id ON rules (farm_id, id);

-- One row per alert: the edge's and the cloud's copies of one alert share its id and are merged into it.
CREATE TABLE alerts (
    id        TEXT PRIMARY KEY,
    farm_id   TEXT NOT NULL REFERENCES farms (id),
    rule_id   TEXT NOT NULL,
    device_id TEXT,
    severity  INTEGER NOT NULL CHECK (severity BETWEEN 1 AND 3),
    state     INTEGER NOT NULL CHECK (state BETWEEN 1 AND 3),
    open_time INTEGER NOT NULL,
    -- The alert as JSON.
    body      TEXT NOT NULL
) STRICT;

CREATE INDEX alerts_farm_open ON alerts (farm_id, open_time DESC, id DESC);
CREATE INDEX alerts_open ON alerts (open_time DESC, id DESC);
-- The unresolved alerts of a rule on a device (a copy raised after a restart joins the one already open).
CREATE INDEX alerts_rule_device_unresolved ON alerts (rule_id, device_id) WHERE state < 3;

-- Append-only; the sequence is the resume cursor of live streams and webhooks. AUTOINCREMENT never reuses a number,
-- and a rolled-back append gives its number back with the transaction, so the log has no gaps.
CREATE TABLE alert_events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    farm_id  TEXT NOT NULL,
    severity INTEGER NOT NULL CHECK (severity BETWEEN 1 AND 3),
    kind     INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 4),
    -- The alert as JSON, as it was right after the event.
    alert    TEXT NOT NULL
) STRICT;

CREATE INDEX alert_events_farm ON alert_events (farm_id, sequence);

CREATE TABLE webhooks (
    id                   TEXT PRIMARY KEY,
    farm_id              TEXT NOT NULL REFERENCES farms (id),
    url                  TEXT NOT NULL,
    min_severity         INTEGER NOT NULL CHECK (min_severity BETWEEN 1 AND 3),
    secret               TEXT NOT NULL,
    state                INTEGER NOT NULL CHECK (state IN (1, 2)),
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT,
    last_success_time    INTEGER,
    create_time          INTEGER NOT NULL,
    delivered_sequence   INTEGER NOT NULL DEFAULT 0,
    -- The process that delivers this webhook's events, until when: one deliverer across replicas.
    lease_owner          TEXT,
    lease_until          INTEGER
) STRICT;

CREATE INDEX webhooks_farm_id ON webhooks (farm_id, id);

CREATE TABLE commands (
    id            TEXT PRIMARY KEY,
    farm_id       TEXT NOT NULL REFERENCES farms (id),
    device_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    parameters    TEXT NOT NULL,
    request_id    TEXT,
    create_time   INTEGER NOT NULL,
    expire_time   INTEGER NOT NULL,
    -- 1 queued, 2 sent, 3 delivered, 4 acked, 5 failed, 6 expired; the detail is the latest receipt's.
    status        INTEGER NOT NULL CHECK (status BETWEEN 1 AND 6),
    status_detail TEXT NOT NULL
) STRICT;

-- A client's retry with the same request id finds the command it created.
CREATE UNIQUE INDEX commands_device_request ON commands (device_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX commands_farm_create ON commands (farm_id, create_time DESC, id DESC);
CREATE INDEX commands_device_create ON commands (device_id, create_time DESC, id DESC);
CREATE INDEX commands_pending ON commands (farm_id, create_time, id) WHERE status IN (1, 2);
CREATE INDEX commands_unfinished_expire ON commands (expire_time) WHERE status IN (1, 2, 3);

CREATE TABLE command_receipts (
    command_id  TEXT NOT NULL REFERENCES commands (id),
    -- 1 for the queued receipt, then one more per status change.
    position    INTEGER NOT NULL,
    status      INTEGER NOT NULL CHECK (status BETWEEN 1 AND 6),
    detail      TEXT NOT NULL,
    change_time INTEGER NOT NULL,
    PRIMARY KEY (command_id, position)
) STRICT;
