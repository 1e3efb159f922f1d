-- The widths whose rollups are complete: filled from the raw readings when the width was recorded, and kept by every
-- commit since (see TelemetryStore::align_rollups, which every server runs at start with its configured widths).
-- A database from before this table has complete rollups of the widths it holds rollups of.
CREATE TABLE rollup_widths (
    width INTEGER PRIMARY KEY
);

INSERT INTO rollup_widths (width) SELECT DISTINCT width FROM reading_rollups;
