-- Retention deletes finished commands (4 acked, 5 failed, 6 expired) by age, oldest first; unfinished ones stay.
CREATE INDEX commands_finished_create ON commands (create_time) WHERE status IN (4, 5, 6);
