-- Whether a photo's diagnosis was announced as a verdict (a disease, or a healthy photo, sure enough to alert on)
-- that the alert role has not confirmed recording yet.
ALTER TABLE images ADD COLUMN verdict_pending boolean NOT NULL DEFAULT false;

-- Photos to diagnose late, by arrival: those still without a diagnosis (their job was lost: a process on the
-- in-process bus stopped or died with it queued; or every try failed) and those whose verdict was not confirmed
-- (lost on the bus, or not recorded). A failed try records its time in diagnosis_time, the label staying empty,
-- so it is tried again only after a wait.
CREATE INDEX images_to_diagnose ON images (receive_time) WHERE diagnosis_label IS NULL OR verdict_pending;
