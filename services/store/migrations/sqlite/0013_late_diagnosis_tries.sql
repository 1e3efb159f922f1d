-- Late diagnosis tries (see 0012): how many a photo has had, and when the next may start (Unix microseconds). The
-- wait doubles with each try and the tries are bounded, so a photo that cannot be diagnosed, or whose verdict
-- nobody confirms (no alert role runs), is left after a few tries rather than tried all day. A failed try no longer
-- writes diagnosis_time, which so keeps the time of the photo's real diagnosis.
ALTER TABLE images ADD COLUMN late_tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN late_try_after INTEGER;
