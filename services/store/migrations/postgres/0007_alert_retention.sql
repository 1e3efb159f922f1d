-- Alert retention. Events carry no time of their own, so each retention run notes where the log stood
-- (alert_event_marks); a later run deletes the events that were in the log at the newest mark older than the
-- retention. The horizon is the newest event deleted: a resume cursor before it cannot be honoured.
CREATE TABLE alert_event_marks (
    mark_time timestamptz PRIMARY KEY,
    sequence  bigint NOT NULL
);

CREATE TABLE alert_event_horizon (
    id       smallint PRIMARY KEY CHECK (id = 1),
    sequence bigint NOT NULL
);

INSERT INTO alert_event_horizon (id, sequence) VALUES (1, 0);

-- Resolved alerts by age.
CREATE INDEX alerts_resolved_open ON alerts (open_time) WHERE state = 3;
