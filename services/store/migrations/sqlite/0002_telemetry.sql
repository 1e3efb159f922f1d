-- Telemetry: readings sent by edge agents, exactly once. Times are microseconds since the Unix epoch.

-- Metric names are interned: a reading row carries a small integer instead of the name.
CREATE TABLE metric_names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
) STRICT;

-- Per gateway spool, the highest edge sequence number committed: the whole deduplication state of the edge link.
CREATE TABLE edge_streams (
    gateway_id         TEXT NOT NULL REFERENCES devices (id),
    spool_id           TEXT NOT NULL,
    farm_id            TEXT NOT NULL REFERENCES farms (id),
    committed_sequence INTEGER NOT NULL,
    update_time        INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, spool_id)
) STRICT;

CREATE TABLE readings (
    time         INTEGER NOT NULL,
    farm_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    metric_id    INTEGER NOT NULL,
    value        REAL NOT NULL,
    -- The edge sequence number that carried the reading; with device and time it orders pages stably.
    sequence     INTEGER NOT NULL,
    receive_time INTEGER NOT NULL
) STRICT;

CREATE INDEX readings_device_metric_time ON readings (device_id, metric_id, time);
CREATE INDEX readings_farm_time ON readings (farm_id, time);

-- Windows the edge agents computed themselves (sent when the farm uploads aggregates).
CREATE TABLE edge_aggregates (
    window_start INTEGER NOT NULL,
    window_end   INTEGER NOT NULL,
    farm_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    metric_id    INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    min          REAL NOT NULL,
    max          REAL NOT NULL,
    avg          REAL NOT NULL,
    last         REAL NOT NULL,
    sequence     INTEGER NOT NULL,
    receive_time INTEGER NOT NULL
) STRICT;

CREATE INDEX edge_aggregates_device_metric_start ON edge_aggregates (device_id, metric_id, window_start);
CREATE INDEX edge_aggregates_farm_start ON edge_aggregates (farm_id, window_start);

-- Rollups kept by the service in the same transaction as the rows they summarise, one set per configured width
-- (in seconds): what long-range aggregate queries read instead of every raw row.
CREATE TABLE reading_rollups (
    width     INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    farm_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    metric_id INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (width, device_id, metric_id, bucket)
) STRICT, WITHOUT ROWID;

CREATE INDEX reading_rollups_farm_bucket ON reading_rollups (width, farm_id, bucket);

-- The newest reading per device and metric, kept by the service with each batch (what a dashboard shows first).
CREATE TABLE latest_readings (
    device_id    TEXT NOT NULL,
    metric_id    INTEGER NOT NULL,
    farm_id      TEXT NOT NULL,
    time         INTEGER NOT NULL,
    value        REAL NOT NULL,
    sequence     INTEGER NOT NULL,
    receive_time INTEGER NOT NULL,
    PRIMARY KEY (device_id, metric_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX latest_readings_farm ON latest_readings (farm_id);
