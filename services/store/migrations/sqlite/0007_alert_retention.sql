-- Alert retention. Events carry no time of their own, so each retention run notes where the log stood
-- (alert_event_marks); a later run deletes the events that were in the log at the newest mark older than the
-- retention. The horizon is the newest event deleted: a resume cursor before it cannot be honoured.
CREATE TABLE alert_event_marks (
    mark_time INTEGER PRIMARY KEY,
    sequence  INTEGER NOT NULL
) STRICT;

CREATE TABLE alert_event_horizon (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    sequence INTEGER NOT NULL
) STRICT;

INSERT INTO alert_event_horizon (id, sequence) VALUES (1, 0);

-- Resolved alerts by age.
CREATE INDEX alerts_resolved_open ON alerts (open_time) WHERE state = 3;
