-- Telemetry: readings sent by edge agents, exactly once.

-- Metric names are interned: a reading row carries a small integer instead of the name.
CREATE TABLE metric_names (
    id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
);

-- Per gateway spool, the highest edge sequence number committed: the whole deduplication state of the edge link.
CREATE TABLE edge_streams (
    gateway_id         uuid NOT NULL REFERENCES devices (id),
    spool_id           uuid NOT NULL,
    farm_id            uuid NOT NULL REFERENCES farms (id),
    committed_sequence bigint NOT NULL,
    update_time        timestamptz NOT NULL,
    PRIMARY KEY (gateway_id, spool_id)
);

-- The narrow readings table. With TimescaleDB installed it becomes a hypertable with native compression segmented
-- by device and metric; on plain PostgreSQL it is range-partitioned by month, with partitions made as batches need
-- them and dropped by the retention task.
DO $$
BEGIN
    -- Installed already, or installable: available and preloaded (CREATE EXTENSION fails without the preload).
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
           AND current_setting('shared_preload_libraries') LIKE '%timescaledb%') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        CREATE TABLE readings (
            time         timestamptz NOT NULL,
            farm_id      uuid NOT NULL,
            device_id    uuid NOT NULL,
            metric_id    integer NOT NULL,
            value        double precision NOT NULL,
            sequence     bigint NOT NULL,
            receive_time timestamptz NOT NULL
        );
        PERFORM create_hypertable('readings', 'time', chunk_time_interval => interval '1 day');
        EXECUTE 'ALTER TABLE readings SET (timescaledb.compress, '
            'timescaledb.compress_segmentby = ''device_id, metric_id'', timescaledb.compress_orderby = ''time'')';
        PERFORM add_compression_policy('readings', interval '7 days');
    ELSE
        CREATE TABLE readings (
            time         timestamptz NOT NULL,
            farm_id      uuid NOT NULL,
            device_id    uuid NOT NULL,
            metric_id    integer NOT NULL,
            value        double precision NOT NULL,
            sequence     bigint NOT NULL,
            receive_time timestamptz NOT NULL
        ) PARTITION BY RANGE (time);
    END IF;
END
$$;

CREATE INDEX readings_device_metric_time ON readings (device_id, metric_id, time);
CREATE INDEX readings_time_brin ON readings USING brin (time);

-- Windows the edge agents computed themselves (sent when the farm uploads aggregates).
CREATE TABLE edge_aggregates (
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    farm_id      uuid NOT NULL,
    device_id    uuid NOT NULL,
    metric_id    integer NOT NULL,
    count        bigint NOT NULL,
    min          double precision NOT NULL,
    max          double precision NOT NULL,
    avg          double precision NOT NULL,
    last         double precision NOT NULL,
    sequence     bigint NOT NULL,
    receive_time timestamptz NOT NULL
);

CREATE INDEX edge_aggregates_device_metric_start ON edge_aggregates (device_id, metric_id, window_start);
CREATE INDEX edge_aggregates_start_brin ON edge_aggregates USING brin (window_start);

-- Rollups kept by the service in the same transaction as the rows they summarise, one set per configured width
-- (in seconds): what long-range aggregate queries read instead of every raw row.
CREATE TABLE reading_rollups (
    width     integer NOT NULL,
    bucket    timestamptz NOT NULL,
    farm_id   uuid NOT NULL,
    device_id uuid NOT NULL,
    metric_id integer NOT NULL,
    count     bigint NOT NULL,
    sum       double precision NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    PRIMARY KEY (width, device_id, metric_id, bucket)
);

CREATE INDEX reading_rollups_farm_bucket ON reading_rollups (width, farm_id, bucket);

-- The newest reading per device and metric, kept by the service with each batch (what a dashboard shows first).
CREATE TABLE latest_readings (
    device_id    uuid NOT NULL,
    metric_id    integer NOT NULL,
    farm_id      uuid NOT NULL,
    time         timestamptz NOT NULL,
    value        double precision NOT NULL,
    sequence     bigint NOT NULL,
    receive_time timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric_id)
);

CREATE INDEX latest_readings_farm ON latest_readings (farm_id);
