-- Crop photos: metadata rows of content-addressed blobs, unfinished uploads, and the blob intents that let the
-- sweeper find objects a crash left without a row. Times are microseconds since the Unix epoch.
CREATE TABLE images (
    id                   TEXT PRIMARY KEY,
    farm_id              TEXT NOT NULL REFERENCES farms (id),
    device_id            TEXT NOT NULL REFERENCES devices (id),
    capture_time         INTEGER NOT NULL,
    receive_time         INTEGER NOT NULL,
    sha256               TEXT NOT NULL,
    size_bytes           INTEGER NOT NULL,
    content_type         TEXT NOT NULL,
    width                INTEGER NOT NULL,
    height               INTEGER NOT NULL,
    labels               TEXT NOT NULL DEFAULT '{}',
    original_key         TEXT NOT NULL,
    original_available   INTEGER NOT NULL DEFAULT 1,
    thumbnail_state      TEXT NOT NULL DEFAULT 'pending' CHECK (thumbnail_state IN ('pending', 'done', 'failed')),
    thumbnail_key        TEXT,
    storage_class        TEXT,
    diagnosis_label      TEXT,
    diagnosis_confidence REAL,
    diagnosis_model      TEXT,
    diagnosis_version    TEXT,
    diagnosis_time       INTEGER,
    -- One photo per farm and content: the same bytes sent twice are stored once.
    UNIQUE (farm_id, sha256)
) STRICT;

CREATE INDEX images_farm_capture ON images (farm_id, capture_time DESC, id DESC);
CREATE INDEX images_device_capture ON images (device_id, capture_time DESC, id DESC);
CREATE INDEX images_pending_thumbnails ON images (id) WHERE thumbnail_state = 'pending';
CREATE INDEX images_original_key ON images (original_key);
CREATE INDEX images_thumbnail_key ON images (thumbnail_key) WHERE thumbnail_key IS NOT NULL;

-- An upload by its client-chosen id: while unfinished, the bytes received so far are blobs under
-- uploads/<device>/<upload_id>/; once finished, the photo it stored (kept until upload_expiry, so a client that
-- missed the answer learns it from GetUploadStatus).
CREATE TABLE image_uploads (
    device_id      TEXT NOT NULL REFERENCES devices (id),
    upload_id      TEXT NOT NULL,
    farm_id        TEXT NOT NULL REFERENCES farms (id),
    sha256         TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    received_bytes INTEGER NOT NULL,
    start_time     INTEGER NOT NULL,
    update_time    INTEGER NOT NULL,
    image_id       TEXT,
    PRIMARY KEY (device_id, upload_id)
) STRICT;

-- A blob about to be written or deleted. The row that references the blob and the removal of its intent commit
-- together, so an intent older than the sweeper's grace period marks a blob a crash may have orphaned. The sweeper
-- claims such an intent before it deletes the blob; a writer cannot renew a claimed intent, so no blob is written
-- under a key while the sweeper may be deleting it.
CREATE TABLE blob_intents (
    key         TEXT PRIMARY KEY,
    create_time INTEGER NOT NULL,
    claimed     INTEGER NOT NULL DEFAULT 0
) STRICT;
