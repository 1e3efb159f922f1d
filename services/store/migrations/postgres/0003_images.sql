-- Crop photos: metadata rows of content-addressed blobs, unfinished uploads, and the blob intents that let the
-- sweeper find objects a crash left without a row.
CREATE TABLE images (
    id                   uuid PRIMARY KEY,
    farm_id              uuid NOT NULL REFERENCES farms (id),
    device_id            uuid NOT NULL REFERENCES devices (id),
    capture_time         timestamptz NOT NULL,
    receive_time         timestamptz NOT NULL,
    sha256               text NOT NULL,
    size_bytes           bigint NOT NULL,
    content_type         text NOT NULL,
    width                integer NOT NULL,
    height               integer NOT NULL,
    labels               jsonb NOT NULL DEFAULT '{}',
    original_key         text NOT NULL,
    original_available   boolean NOT NULL DEFAULT true,
    thumbnail_state      text NOT NULL DEFAULT 'pending' CHECK (thumbnail_state IN ('pending', 'done', 'failed')),
    thumbnail_key        text,
    storage_class        text,
    diagnosis_label      text,
    diagnosis_confidence double precision,
    diagnosis_model      text,
    diagnosis_version    text,
    diagnosis_time       timestamptz,
    -- One photo per farm and content: the same bytes sent twice are stored once.
    UNIQUE (farm_id, sha256)
);

CREATE INDEX images_farm_capture ON images (farm_id, capture_time DESC, id DESC);
CREATE INDEX images_device_capture ON images (device_id, capture_time DESC, id DESC);
CREATE INDEX images_pending_thumbnails ON images (id) WHERE thumbnail_state = 'pending';
CREATE INDEX images_original_key ON images (original_key);
CREATE INDEX images_thumbnail_key ON images (thumbnail_key) WHERE thumbnail_key IS NOT NULL;

-- An upload by its client-chosen id: while unfinished, the bytes received so far are blobs under
-- uploads/<device>/<upload_id>/; once finished, the photo it stored (kept until upload_expiry, so a client that
-- missed the answer learns it from GetUploadStatus).
CREATE TABLE image_uploads (
    device_id      uuid NOT NULL REFERENCES devices (id),
    upload_id      text NOT NULL,
    farm_id        uuid NOT NULL REFERENCES farms (id),
    sha256         text NOT NULL,
    size_bytes     bigint NOT NULL,
    received_bytes bigint NOT NULL,
    start_time     timestamptz NOT NULL,
    update_time    timestamptz NOT NULL,
    image_id       uuid,
    PRIMARY KEY (device_id, upload_id)
);

-- A blob about to be written or deleted. The row that references the blob and the removal of its intent commit
-- together, so an intent older than the sweeper's grace period marks a blob a crash may have orphaned. The sweeper
-- claims such an intent before it deletes the blob; a writer cannot renew a claimed intent, so no blob is written
-- under a key while the sweeper may be deleting it.
CREATE TABLE blob_intents (
    key         text PRIMARY KEY,
    create_time timestamptz NOT NULL,
    claimed     boolean NOT NULL DEFAULT false
);
