-- Photos still without a diagnosis, by arrival: the inference role diagnoses late those whose job was lost (a
-- process on the in-process bus stopped or died with it queued) or whose tries failed. A failed try records its
-- time in diagnosis_time, the label staying empty, so it is tried again only after a wait.
CREATE INDEX images_undiagnosed ON images (receive_time) WHERE diagnosis_label IS NULL;
