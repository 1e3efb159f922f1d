-- Committed batches whose readings the inference role has not confirmed scoring yet (see the PostgreSQL migration
-- of the same number). Times are microseconds since the epoch; `series` is JSON.
CREATE TABLE unscored_batches (
    gateway_id    TEXT NOT NULL,
    spool_id      TEXT NOT NULL,
    last_sequence INTEGER NOT NULL,
    farm_id       TEXT NOT NULL,
    series        TEXT NOT NULL,
    receive_time  INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_until INTEGER,
    PRIMARY KEY (gateway_id, spool_id, last_sequence)
);

CREATE INDEX unscored_batches_receive_time ON unscored_batches (receive_time);
