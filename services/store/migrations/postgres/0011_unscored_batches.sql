-- Committed batches whose readings the inference role has not confirmed scoring yet. A commit writes its row in
-- the same transaction as the readings, and the scorer deletes it once the batch is scored, so a batch whose
-- announcement was lost (the process died or stopped first, or its pipeline fell behind) is found here and scored
-- late rather than never. `series` lists each device's metric with the first and last measurement time it added.
CREATE TABLE unscored_batches (
    gateway_id    uuid NOT NULL,
    spool_id      uuid NOT NULL,
    last_sequence bigint NOT NULL,
    farm_id       uuid NOT NULL,
    series        jsonb NOT NULL,
    receive_time  timestamptz NOT NULL,
    -- Late scorings begun: a batch that fails three times is given up (logged).
    attempts      integer NOT NULL DEFAULT 0,
    -- A late scorer's lease: another replica leaves the batch alone until then.
    claimed_until timestamptz,
    PRIMARY KEY (gateway_id, spool_id, last_sequence)
);

CREATE INDEX unscored_batches_receive_time ON unscored_batches (receive_time);
