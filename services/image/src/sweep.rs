//! The image role's background work. The sweeper repairs what a crash can leave (a blob whose row never committed,
//! the parts of an abandoned upload) and applies retention and storage classes; the thumbnailer makes the
//! dashboard's thumbnails. Both are idempotent and safe to run on every replica at once: each step either finds
//! its work already done or does it again with the same result.

use std::time::Duration;

use smartfarm_core::{Result, time};
use smartfarm_store::model::KeysetPage;

use crate::{ImageApi, media, thumbnail_key};

/// Rows handled per database call.
const BATCH: usize = 200;
/// The longest a thumbnail waits for uploads in flight to finish.
const THUMBNAIL_DEFERRAL: Duration = Duration::from_secs(10);

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs deleted because no row references them (crash leftovers and expired originals).
    pub orphans_deleted: u64,
    /// Abandoned or long-finished uploads forgotten.
    pub uploads_expired: u64,
    /// Originals deleted by retention.
    pub originals_expired: u64,
    /// Originals moved to the cold storage class.
    pub originals_moved: u64,
}

impl ImageApi {
    /// Sweeps every `sweep_interval`, forever, starting at once (what a crash left is repaired on restart); run
    /// it in a task of its own.
    pub async fn run_sweeper(self) {
        let mut ticks = tokio::time::interval(self.settings.sweep_interval);
        loop {
            ticks.tick().await;
            match self.sweep().await {
                Ok(report) if report == SweepReport::default() => {}
                Ok(report) => tracing::info!(?report, "image sweep"),
                Err(error) => tracing::warn!(%error, "image sweep failed; retrying at the next interval"),
            }
        }
    }

    /// One pass of the sweeper.
    pub async fn sweep(&self) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let now = time::now();

        // Retention: originals are marked deleted (with an intent each) and then deleted; a crash in between leaves
        // intents, which the orphan pass below finishes.
        for farm in self.farms().await? {
            let Some(age) = self.retention_of(farm) else { continue };
            let Some(cutoff) = now.checked_sub(age) else { continue };
            loop {
                let keys = self.images.expire_originals(farm, cutoff, BATCH, now).await?;
                for key in &keys {
                    self.blobs.delete(key).await?;
                    self.images.delete_blob_intent(key).await?;
                }
                report.originals_expired += keys.len() as u64;
                if keys.len() < BATCH {
                    break;
                }
            }
        }

        if let Some(before) = now.checked_sub(self.settings.orphan_grace) {
            loop {
                let keys = self.images.stale_blob_intents(before, BATCH).await?;
                for key in &keys {
                    // Claimed first: a writer that renewed the intent meanwhile keeps it (and its blob); once
                    // claimed, no writer can put a blob under the key until the intent is gone, and no other
                    // replica's sweeper works on it.
                    let Some(claim) = self.images.claim_blob_intent(key, before, time::now()).await? else {
                        continue;
                    };
                    let referenced = match self.images.blob_referenced(key).await {
                        Ok(referenced) => referenced,
                        Err(error) => {
                            // Nothing was deleted: writers of this key need not wait for the claim to lapse.
                            self.release_claim(key, claim).await;
                            return Err(error);
                        }
                    };
                    if !referenced {
                        // A failed delete keeps the claim until it lapses: the request may still land (an S3 call
                        // that timed out), and no writer may put a blob under the key before it has.
                        self.blobs.delete(key).await?;
                        report.orphans_deleted += 1;
                        tracing::info!(key, "orphaned blob deleted");
                    }
                    self.images.delete_claimed_blob_intent(key, claim).await?;
                }
                if keys.len() < BATCH {
                    break;
                }
            }
        }

        if let Some(before) = now.checked_sub(self.settings.upload_expiry) {
            loop {
                let uploads = self.images.stale_uploads(before, BATCH).await?;
                let mut forgotten = 0;
                for upload in &uploads {
                    // Its row is how a later sweep finds parts left behind: it goes only once they are gone.
                    if self.delete_prefix(&upload.part_prefix()).await {
                        self.images.delete_upload(upload.device_id, &upload.upload_id).await?;
                        forgotten += 1;
                    }
                }
                report.uploads_expired += forgotten;
                // A batch with uploads left behind would come back whole: the next sweep tries them again.
                if uploads.len() < BATCH || forgotten < uploads.len() as u64 {
                    break;
                }
            }
        }

        let class = self.settings.cold_storage_class.as_str();
        if !class.is_empty()
            && let Some(before) = now.checked_sub(self.settings.cold_after)
        {
            for image in self.images.originals_to_move(before, class, BATCH).await? {
                self.blobs.set_storage_class(&image.original_key, class).await?;
                self.images.set_storage_class(image.id, class).await?;
                report.originals_moved += 1;
            }
        }
        metrics::counter!("smartfarm_image_orphans_deleted_total").increment(report.orphans_deleted);
        metrics::counter!("smartfarm_image_originals_expired_total").increment(report.originals_expired);
        Ok(report)
    }

    /// Gives up a claim the sweep could not use; one that cannot be given up lapses with its lifetime.
    async fn release_claim(&self, key: &str, claim: uuid::Uuid) {
        if let Err(error) = self.images.release_blob_intent_claim(key, claim).await {
            tracing::warn!(key, %error, "cannot release a blob intent's claim; it lapses");
        }
    }

    async fn farms(&self) -> Result<Vec<uuid::Uuid>> {
        let mut farms = Vec::new();
        loop {
            let page =
                self.registry.list_farms(None, KeysetPage { after: farms.last().copied(), limit: BATCH }).await?;
            let done = page.len() < BATCH;
            farms.extend(page.into_iter().map(|farm| farm.id));
            if done {
                return Ok(farms);
            }
        }
    }

    /// The retention age of a farm's originals, if they expire.
    fn retention_of(&self, farm: uuid::Uuid) -> Option<Duration> {
        let age = self
            .settings
            .farm_retention()
            .ok()
            .and_then(|overrides| overrides.get(&farm).copied())
            .unwrap_or(self.settings.retention);
        (!age.is_zero()).then_some(age)
    }

    /// Makes thumbnails as photos arrive (and, at start, for photos that have none yet), forever; run it in a task
    /// of its own.
    pub async fn run_thumbnails(self) {
        loop {
            let made = match self.make_thumbnails().await {
                Ok(made) => made,
                Err(error) => {
                    tracing::warn!(%error, "thumbnails failed; retrying shortly");
                    0
                }
            };
            if made == 0 {
                // Woken by a new photo, or every half minute for photos another replica stored.
                let _ = tokio::time::timeout(Duration::from_secs(30), self.thumbnails_wanted.notified()).await;
            }
        }
    }

    /// Decoding a photo for its thumbnail costs more CPU than receiving and storing it, and a farm's uploads come
    /// in bursts: thumbnails wait while uploads are being received, up to `THUMBNAIL_DEFERRAL`, so that a burst is
    /// stored first (and the uplink's photos leave the farm sooner).
    async fn wait_for_uploads(&self) {
        let started = std::time::Instant::now();
        while self.uploads_in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0
            && started.elapsed() < THUMBNAIL_DEFERRAL
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes the thumbnails of a batch of photos that lack one; returns how many it handled.
    pub async fn make_thumbnails(&self) -> Result<usize> {
        let pending = self.images.pending_thumbnails(16).await?;
        for image in &pending {
            self.wait_for_uploads().await;
            let original = match self.blobs.get(&image.original_key).await {
                Ok(original) => original,
                Err(smartfarm_core::Error::NotFound { .. }) => {
                    tracing::error!(image_id = %image.id, key = %image.original_key, "the original is missing; no thumbnail");
                    self.images.set_thumbnail(image.id, None).await?;
                    continue;
                }
                // The blob store is unreachable: the whole batch would fail the same way; try again later.
                Err(error) => return Err(error),
            };
            let (content_type, size) = (image.content_type.clone(), self.settings.thumbnail_size);
            let made = tokio::task::spawn_blocking(move || media::thumbnail(&original, &content_type, size))
                .await
                .map_err(|error| smartfarm_core::Error::internal("make thumbnail", error))?;
            match made {
                Ok(thumbnail) => {
                    let key = thumbnail_key(image.farm_id, &image.sha256);
                    self.images.add_blob_intent(&key, time::now()).await?;
                    self.blobs.put(&key, &thumbnail).await?;
                    self.images.set_thumbnail(image.id, Some(&key)).await?;
                    metrics::counter!("smartfarm_image_thumbnails_total", "outcome" => "made").increment(1);
                }
                Err(reason) => {
                    tracing::warn!(image_id = %image.id, reason, "no thumbnail can be made of this photo");
                    self.images.set_thumbnail(image.id, None).await?;
                    metrics::counter!("smartfarm_image_thumbnails_total", "outcome" => "failed").increment(1);
                }
            }
        }
        Ok(pending.len())
    }
}
