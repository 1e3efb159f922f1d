//! Image metadata storage: one row per stored photo (farm, camera, times, content address, size, type, dimensions,
//! labels, thumbnail, diagnosis), the state of uploads cut short, and the blob intents that keep the blob store and
//! the rows in step through crashes. Every backend implements [`ImageStore`] and passes the same suite
//! (`tests/image_suite.rs`).
//!
//! The no-orphan rule: before a blob is written (or deleted), its key is recorded as an intent; the row that
//! references the blob commits together with the removal of the intent. An intent older than any upload can take
//! therefore names a blob that may exist without a row, and the sweeper deletes that blob unless a row references
//! it ([`ImageStore::blob_referenced`]), after claiming the intent ([`ImageStore::claim_blob_intent`]) so that no
//! writer renews it meanwhile and no other sweeper works on it. A row is committed only after its blob is durable,
//! and only while its intent is still there unclaimed (a writer that stalled past the grace may have had its blob
//! swept: it is told to send again), so a row never points at a missing blob (retention marks the row before the
//! blob is deleted, through an intent as well).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use smartfarm_core::Result;

/// Where a photo's thumbnail stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThumbnailState {
    /// Not made yet.
    Pending,
    /// Made; `thumbnail_key` names it.
    Done,
    /// The photo could not be decoded into one; not retried.
    Failed,
}

impl ThumbnailState {
    pub fn as_str(self) -> &'static str {
        match self {
            ThumbnailState::Pending => "pending",
            ThumbnailState::Done => "done",
            ThumbnailState::Failed => "failed",
        }
    }

    pub fn parse_stored(value: &str) -> Result<ThumbnailState> {
        match value {
            "pending" => Ok(ThumbnailState::Pending),
            "done" => Ok(ThumbnailState::Done),
            "failed" => Ok(ThumbnailState::Failed),
            other => Err(smartfarm_core::Error::internal(
                "images.thumbnail_state",
                anyhow::anyhow!("unknown stored thumbnail state {other:?}"),
            )),
        }
    }
}

/// The columns every backend reads an image row and an upload row by, in the order their row decoders expect.
pub(crate) const IMAGE_COLUMNS: &str = "id, farm_id, device_id, capture_time, receive_time, sha256, size_bytes, \
     content_type, width, height, labels, original_key, original_available, thumbnail_state, thumbnail_key, \
     storage_class, diagnosis_label, diagnosis_confidence, diagnosis_model, diagnosis_version, diagnosis_time";
pub(crate) const UPLOAD_COLUMNS: &str =
    "device_id, upload_id, farm_id, sha256, size_bytes, received_bytes, start_time, update_time, image_id";

/// What a plant-disease model said about a photo.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDiagnosis {
    pub label: String,
    pub confidence: f64,
    pub model_name: String,
    pub model_version: String,
    pub diagnose_time: SystemTime,
}

/// A stored photo's metadata row.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRecord {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub device_id: Uuid,
    pub capture_time: SystemTime,
    pub receive_time: SystemTime,
    /// Hex SHA-256 of the original's bytes.
    pub sha256: String,
    pub size_bytes: u64,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub labels: BTreeMap<String, String>,
    /// The blob key of the original.
    pub original_key: String,
    /// False once retention deleted the original.
    pub original_available: bool,
    pub thumbnail_state: ThumbnailState,
    pub thumbnail_key: Option<String>,
    /// The S3 storage class the original was moved to, if any.
    pub storage_class: Option<String>,
    pub diagnosis: Option<StoredDiagnosis>,
}

/// How a diagnosis being saved relates to the photo's verdict, which waits for the alert role to confirm it
/// ([`ImageStore::confirm_verdict`]) once announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictMark {
    /// The pipeline's diagnosis: announced as a verdict (it then waits for confirmation) or not.
    Announced(bool),
    /// A diagnosis asked for (`ClassifyImage`). On a photo without a diagnosis it waits for confirmation as
    /// `pending_if_first` says (the late diagnosis announces it); on one waiting for a verdict it is not saved,
    /// since the verdict's confirmation names that diagnosis's label and version; otherwise the mark stays.
    AskedFor { pending_if_first: bool },
}

/// The mark as the backends' statement takes it: the pending flag to set whatever the photo holds (announced),
/// and the one to set on a first diagnosis asked for.
pub(crate) fn mark_parameters(mark: VerdictMark) -> (Option<bool>, bool) {
    match mark {
        VerdictMark::Announced(announced) => (Some(announced), false),
        VerdictMark::AskedFor { pending_if_first } => (None, pending_if_first),
    }
}

/// A photo found for a late diagnosis ([`ImageStore::images_to_diagnose`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PhotoToDiagnose {
    pub image: ImageRecord,
    /// Late tries it has had.
    pub late_tries: u32,
}

/// The result of [`ImageStore::insert_image`].
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// The row was stored.
    New(ImageRecord),
    /// The farm already had a photo with this sha256: nothing was stored, here is the existing row.
    Existing(ImageRecord),
}

/// An upload by its client-chosen id: how far it got, or the photo it stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadState {
    pub device_id: Uuid,
    pub upload_id: String,
    pub farm_id: Uuid,
    pub sha256: String,
    pub size_bytes: u64,
    /// The bytes held durably, as blobs under [`UploadState::part_prefix`].
    pub received_bytes: u64,
    pub start_time: SystemTime,
    pub update_time: SystemTime,
    /// Set once the upload finished: the photo it stored (or the farm's existing copy of it).
    pub image_id: Option<Uuid>,
}

impl UploadState {
    /// The blob key prefix of this upload's parts.
    pub fn part_prefix(&self) -> String {
        upload_part_prefix(self.device_id, &self.upload_id)
    }
}

/// The blob key prefix of an upload's parts: each part is named by its offset, zero-padded so keys sort in order.
pub fn upload_part_prefix(device_id: Uuid, upload_id: &str) -> String {
    format!("uploads/{}/{upload_id}/", device_id.simple())
}

/// Which photos [`ImageStore::list_images`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageFilter {
    pub farm_id: Uuid,
    pub device_id: Option<Uuid>,
    /// Inclusive.
    pub captured_from: Option<SystemTime>,
    /// Exclusive.
    pub captured_to: Option<SystemTime>,
    pub diagnosis_label: Option<String>,
}

/// A position in the newest-first order of photos: (capture time, id), both descending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageCursor {
    pub capture_time: SystemTime,
    pub id: Uuid,
}

/// Why a photo's row or thumbnail was not stored: its blob intent was claimed or removed by the sweeper (the writer
/// stalled past the orphan grace), so the blob may be gone. The writer sends the photo, or makes the thumbnail,
/// again.
pub(crate) fn swept_under_the_writer(key: &str) -> smartfarm_core::Error {
    smartfarm_core::Error::Unavailable(format!(
        "blob {key} was swept before its row was stored (the write took longer than the orphan grace); send it again"
    ))
}

/// How long a sweeper's claim on a blob intent holds. Far longer than a sweep takes over one intent; past it the
/// sweep is taken for dead and another sweeper may claim the intent.
pub const CLAIM_LIFETIME: Duration = Duration::from_secs(600);

/// Storage of photos' metadata, uploads in progress and blob intents.
///
/// Errors: `NotFound` for a missing image, `FailedPrecondition` when an upload moved on under the caller,
/// `Unavailable` when the database cannot be reached, `Internal` otherwise.
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// Reads one photo's row.
    async fn get_image(&self, id: Uuid) -> Result<ImageRecord>;
    /// The farm's photo with this content, if it has one.
    async fn find_image(&self, farm_id: Uuid, sha256: &str) -> Result<Option<ImageRecord>>;
    /// Which of `sha256s` the farm has.
    async fn known_sha256s(&self, farm_id: Uuid, sha256s: &[String]) -> Result<Vec<String>>;
    /// Photos matching `filter`, newest capture first, strictly after `after`.
    async fn list_images(
        &self,
        filter: &ImageFilter,
        after: Option<ImageCursor>,
        limit: usize,
    ) -> Result<Vec<ImageRecord>>;
    /// Stores a photo's row, removes the intent of its original's key, and marks the upload it came from as
    /// finished (its state is upserted with `image_id` set to the stored row), in one transaction. If the farm
    /// already has this sha256, nothing changes but the intent's removal (the existing row references the same
    /// content-addressed key) and the upload's state, and the existing row is returned. A new row needs its
    /// intent, unclaimed: without it the sweeper may have deleted the blob, and nothing is stored (`Unavailable`;
    /// the photo is sent again).
    async fn insert_image(&self, image: ImageRecord, upload: Option<UploadState>) -> Result<Inserted>;

    /// The state of an upload cut short, if any.
    async fn get_upload(&self, device_id: Uuid, upload_id: &str) -> Result<Option<UploadState>>;
    /// Records an upload's progress. `expected_received` is what the caller started from: if the stored state has
    /// moved on (another connection resumed the same upload), `FailedPrecondition`, and nothing changes.
    async fn save_upload(&self, state: &UploadState, expected_received: Option<u64>) -> Result<()>;
    /// Forgets an upload.
    async fn delete_upload(&self, device_id: Uuid, upload_id: &str) -> Result<()>;
    /// Uploads last touched before `before`: abandoned, or finished long enough ago to forget.
    async fn stale_uploads(&self, before: SystemTime, limit: usize) -> Result<Vec<UploadState>>;

    /// Records that `key` is about to be written or deleted (renewing an existing intent's time). `Unavailable` if
    /// the sweeper has claimed the key: the blob under it may be deleted at any moment, so nothing may be written
    /// there until the sweep is done; retry.
    async fn add_blob_intent(&self, key: &str, create_time: SystemTime) -> Result<()>;
    /// Intents recorded before `before` (or claimed by a sweep that did not finish), oldest first.
    async fn stale_blob_intents(&self, before: SystemTime, limit: usize) -> Result<Vec<String>>;
    /// Claims an intent for one sweeper, at `now`: one recorded before `before` that nobody claimed, or one whose
    /// claim is older than [`CLAIM_LIFETIME`] (its sweep died). Returns the claim, which removing the intent
    /// needs; `None` when the intent is gone, renewed, or another sweeper's. A claimed intent cannot be renewed by a
    /// writer, so the sweeper may then delete the blob safely.
    async fn claim_blob_intent(&self, key: &str, before: SystemTime, now: SystemTime) -> Result<Option<Uuid>>;
    /// Whether a row references `key` as an available original or as a thumbnail.
    async fn blob_referenced(&self, key: &str) -> Result<bool>;
    /// Removes an intent.
    async fn delete_blob_intent(&self, key: &str) -> Result<()>;
    /// Removes the intent `claim` holds; false when it holds none any more (taken over, or the intent is gone).
    async fn delete_claimed_blob_intent(&self, key: &str, claim: Uuid) -> Result<bool>;
    /// Gives up `claim` without removing the intent (the sweep could not finish): writers may renew it again.
    async fn release_blob_intent_claim(&self, key: &str, claim: Uuid) -> Result<()>;

    /// Photos whose thumbnail is not made yet, oldest first.
    async fn pending_thumbnails(&self, limit: usize) -> Result<Vec<ImageRecord>>;
    /// Records a photo's thumbnail (`Some(key)`, also removing that key's intent, which must still be there
    /// unclaimed, as for [`ImageStore::insert_image`]) or that none can be made.
    async fn set_thumbnail(&self, id: Uuid, thumbnail_key: Option<&str>) -> Result<()>;

    /// Marks up to `limit` of the farm's originals captured and received before `captured_before` as deleted and
    /// records an intent for each of their keys, in one transaction; returns the keys, which the caller then
    /// deletes. Both times count, so a camera with a wrong clock (a Pi without a real-time clock says 1970) or a
    /// backlog uploaded late still keeps its photos for the whole retention. A photo whose thumbnail is still
    /// pending keeps its original until the thumbnail is made (or found impossible).
    async fn expire_originals(
        &self,
        farm_id: Uuid,
        captured_before: SystemTime,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<String>>;
    /// Available originals captured before `captured_before` not yet in `storage_class`.
    async fn originals_to_move(
        &self,
        captured_before: SystemTime,
        storage_class: &str,
        limit: usize,
    ) -> Result<Vec<ImageRecord>>;
    /// Records that a photo's original was moved to `storage_class`.
    async fn set_storage_class(&self, id: Uuid, storage_class: &str) -> Result<()>;
    /// Records a model's diagnosis of a photo (replacing an earlier one); `NotFound` for an unknown photo.
    /// `mark` says whether it waits for the alert role to confirm a verdict (see [`VerdictMark`]). `false` when it
    /// was not saved: a diagnosis asked for on a photo whose verdict is pending.
    async fn set_diagnosis(&self, id: Uuid, diagnosis: &StoredDiagnosis, mark: VerdictMark) -> Result<bool>;
    /// Records that the alert role has recorded what the photo's verdict raised: the verdict of `label` by model
    /// version `model_version`. A photo diagnosed since to another label or by another version stays pending: its
    /// newer verdict may be the one that was lost.
    async fn confirm_verdict(&self, id: Uuid, label: &str, model_version: &str) -> Result<()>;
    /// Photos with an available original, received from `received_from` and before `received_before`, that have
    /// no diagnosis or an unconfirmed verdict, were not diagnosed since `received_before`, have had fewer than
    /// `max_tries` late tries and whose next try may start at `now` (see [`ImageStore::claim_late_try`]); oldest
    /// arrival first.
    async fn images_to_diagnose(
        &self,
        received_from: SystemTime,
        received_before: SystemTime,
        now: SystemTime,
        max_tries: u32,
        limit: usize,
    ) -> Result<Vec<PhotoToDiagnose>>;
    /// Claims a late try of a photo: counts it (from `expected` tries to one more), the next to start at
    /// `next_try_after`, if the photo still has `expected`, its next try may start at `now`, and it is still without
    /// a diagnosis or waiting for its verdict. `false` otherwise: another replica claimed it first, or the photo no
    /// longer needs one. A try given back keeps the time of the next, so a replica that read the photo before the
    /// claim cannot claim it again on the count it read.
    async fn claim_late_try(
        &self,
        id: Uuid,
        expected: u32,
        now: SystemTime,
        next_try_after: SystemTime,
    ) -> Result<bool>;
    /// Gives back a claimed late try (the count goes from `tries` to one fewer) that failed for want of a
    /// dependency; the time of the next try stays. `false` when the count is no longer `tries`.
    async fn give_late_try_back(&self, id: Uuid, tries: u32) -> Result<bool>;
}
