//! The behaviour every [`ImageStore`] backend must have, written once and run on SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use smartfarm_core::time::from_unix_micros;
use smartfarm_store::Database;
use smartfarm_store::image::{
    ImageCursor, ImageFilter, ImageRecord, ImageStore, Inserted, PhotoToDiagnose, StoredDiagnosis, ThumbnailState,
    UploadState, VerdictMark,
};
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::testing::TestDatabase as Harness;
use uuid::Uuid;

/// A diagnosis asked for that would not make a photo wait for a verdict.
const ASKED: VerdictMark = VerdictMark::AskedFor { pending_if_first: false };

/// 2026-05-29 00:00:00 UTC.
const BASE_SECONDS: i64 = 1_780_012_800;

fn at(hours: i64) -> SystemTime {
    from_unix_micros((BASE_SECONDS + hours * 3600) * 1_000_000)
}

/// A farm with two cameras.
async fn farm(database: &Database, name: &str) -> (Uuid, [Uuid; 2]) {
    let registry = database.registry();
    let farm = registry.create_farm(Uuid::now_v7(), name, SystemTime::now()).await.unwrap();
    let mut cameras = [Uuid::nil(); 2];
    for (index, camera) in cameras.iter_mut().enumerate() {
        *camera = registry
            .create_device(NewDevice {
                id: Uuid::now_v7(),
                farm_id: farm.id,
                name: format!("camera {index}"),
                kind: DeviceKind::Camera,
                labels: BTreeMap::new(),
                credential_sha256: "00".repeat(32),
                create_time: SystemTime::now(),
            })
            .await
            .unwrap()
            .id;
    }
    (farm.id, cameras)
}

fn photo(farm_id: Uuid, device_id: Uuid, hour: i64, sha_byte: u8) -> ImageRecord {
    let sha256 = format!("{sha_byte:02x}").repeat(32);
    ImageRecord {
        id: Uuid::now_v7(),
        farm_id,
        device_id,
        capture_time: at(hour),
        receive_time: at(hour + 1),
        original_key: format!("images/{}/{sha256}", farm_id.simple()),
        sha256,
        size_bytes: 1000 + hour as u64,
        content_type: "image/jpeg".into(),
        width: 640,
        height: 480,
        labels: BTreeMap::from([("row".to_string(), hour.to_string())]),
        original_available: true,
        thumbnail_state: ThumbnailState::Pending,
        thumbnail_key: None,
        storage_class: None,
        diagnosis: None,
    }
}

/// Stores a new photo's row as an upload does: behind the intent for its blob.
async fn insert_new(images: &dyn ImageStore, image: ImageRecord, upload: Option<UploadState>) -> Inserted {
    images.add_blob_intent(&image.original_key, image.receive_time).await.unwrap();
    images.insert_image(image, upload).await.unwrap()
}

async fn photos_are_stored_once_per_farm_and_content(database: &Database) {
    let images = database.images();
    let (farm_a, cameras_a) = farm(database, "a").await;
    let (farm_b, cameras_b) = farm(database, "b").await;
    let first = photo(farm_a, cameras_a[0], 1, 0xaa);
    images.add_blob_intent(&first.original_key, at(1)).await.unwrap();
    assert_eq!(images.insert_image(first.clone(), None).await.unwrap(), Inserted::New(first.clone()));
    assert_eq!(images.get_image(first.id).await.unwrap(), first);
    assert!(images.stale_blob_intents(at(100), 10).await.unwrap().is_empty(), "the insert removed the intent");

    // The same content from the other camera of the farm: the existing row comes back, nothing new is stored.
    let again = photo(farm_a, cameras_a[1], 2, 0xaa);
    assert_eq!(images.insert_image(again.clone(), None).await.unwrap(), Inserted::Existing(first.clone()));
    assert!(matches!(images.get_image(again.id).await, Err(smartfarm_core::Error::NotFound { .. })));
    // Another farm keeps its own copy.
    let other_farm = photo(farm_b, cameras_b[0], 1, 0xaa);
    assert!(matches!(insert_new(&*images, other_farm, None).await, Inserted::New(_)));

    let asked = vec!["aa".repeat(32), "bb".repeat(32)];
    assert_eq!(images.known_sha256s(farm_a, &asked).await.unwrap(), vec!["aa".repeat(32)]);
    assert_eq!(images.find_image(farm_a, &"aa".repeat(32)).await.unwrap(), Some(first.clone()));
    assert_eq!(images.find_image(farm_a, &"bb".repeat(32)).await.unwrap(), None);

    // A diagnosis is saved on the photo, and a later one replaces it.
    for (label, confidence) in [("Apple___Apple_scab", 0.75), ("Apple___healthy", 0.99)] {
        let diagnosis = StoredDiagnosis {
            label: label.into(),
            confidence,
            model_name: "leafnet".into(),
            model_version: "1".into(),
            diagnose_time: at(3),
        };
        assert!(images.set_diagnosis(first.id, &diagnosis, ASKED).await.unwrap(), "saved");
        assert_eq!(images.get_image(first.id).await.unwrap().diagnosis, Some(diagnosis));
    }
    let missing = StoredDiagnosis {
        label: "x".into(),
        confidence: 0.5,
        model_name: "m".into(),
        model_version: "1".into(),
        diagnose_time: at(3),
    };
    assert!(matches!(
        images.set_diagnosis(Uuid::now_v7(), &missing, ASKED).await,
        Err(smartfarm_core::Error::NotFound { .. })
    ));
}

async fn listing_filters_and_pages_newest_first(database: &Database) {
    let images = database.images();
    let (farm_id, cameras) = farm(database, "a").await;
    for hour in 0..10 {
        insert_new(&*images, photo(farm_id, cameras[(hour % 2) as usize], hour, hour as u8), None).await;
    }
    let everything = ImageFilter { farm_id, ..Default::default() };
    let first_page = images.list_images(&everything, None, 4).await.unwrap();
    let hours: Vec<_> = first_page.iter().map(|image| image.capture_time).collect();
    assert_eq!(hours, vec![at(9), at(8), at(7), at(6)]);
    let last = first_page.last().unwrap();
    let cursor = ImageCursor { capture_time: last.capture_time, id: last.id };
    let second_page = images.list_images(&everything, Some(cursor), 100).await.unwrap();
    assert_eq!(second_page.len(), 6);
    assert_eq!(second_page[0].capture_time, at(5));

    let one_camera_in_range = ImageFilter {
        farm_id,
        device_id: Some(cameras[1]),
        captured_from: Some(at(3)),
        captured_to: Some(at(8)),
        diagnosis_label: None,
    };
    let found = images.list_images(&one_camera_in_range, None, 100).await.unwrap();
    assert_eq!(found.iter().map(|image| image.capture_time).collect::<Vec<_>>(), vec![at(7), at(5), at(3)]);
    let by_label = ImageFilter { diagnosis_label: Some("tomato_late_blight".into()), ..everything };
    assert!(images.list_images(&by_label, None, 100).await.unwrap().is_empty(), "no photo is diagnosed yet");
}

async fn uploads_resume_and_refuse_a_stale_writer(database: &Database) {
    let images = database.images();
    let (farm_id, cameras) = farm(database, "a").await;
    let mut state = UploadState {
        device_id: cameras[0],
        upload_id: "photo-1".into(),
        farm_id,
        sha256: "cd".repeat(32),
        size_bytes: 5000,
        received_bytes: 1000,
        start_time: at(0),
        update_time: at(0),
        image_id: None,
    };
    assert_eq!(images.get_upload(cameras[0], "photo-1").await.unwrap(), None);
    images.save_upload(&state, None).await.unwrap();
    assert_eq!(images.get_upload(cameras[0], "photo-1").await.unwrap(), Some(state.clone()));
    // A second first save (another connection that also started from zero) is refused.
    let error = images.save_upload(&state, None).await.unwrap_err();
    assert!(matches!(error, smartfarm_core::Error::FailedPrecondition(_)), "{error:?}");
    state.received_bytes = 3000;
    state.update_time = at(1);
    images.save_upload(&state, Some(1000)).await.unwrap();
    let error = images.save_upload(&state, Some(1000)).await.unwrap_err();
    assert!(matches!(error, smartfarm_core::Error::FailedPrecondition(_)), "{error:?}");
    assert_eq!(images.get_upload(cameras[0], "photo-1").await.unwrap().unwrap().received_bytes, 3000);
    assert_eq!(state.part_prefix(), format!("uploads/{}/photo-1/", cameras[0].simple()));

    assert!(images.stale_uploads(at(1), 10).await.unwrap().is_empty());
    assert_eq!(images.stale_uploads(at(2), 10).await.unwrap(), vec![state.clone()]);

    // Completing the upload records its photo in the same transaction as the row.
    let mut image = photo(farm_id, cameras[0], 1, 0xcd);
    image.size_bytes = 5000;
    let finished = UploadState { received_bytes: 5000, ..state.clone() };
    insert_new(&*images, image.clone(), Some(finished)).await;
    let stored = images.get_upload(cameras[0], "photo-1").await.unwrap().unwrap();
    assert_eq!((stored.received_bytes, stored.image_id), (5000, Some(image.id)));
    images.delete_upload(cameras[0], "photo-1").await.unwrap();
    assert_eq!(images.get_upload(cameras[0], "photo-1").await.unwrap(), None);
}

async fn intents_thumbnails_and_retention_keep_blobs_accounted_for(database: &Database) {
    let images = database.images();
    let (farm_id, cameras) = farm(database, "a").await;
    // An intent whose row never came: old enough, unreferenced, so the sweeper may delete its blob.
    images.add_blob_intent("images/orphan", at(0)).await.unwrap();
    assert_eq!(images.stale_blob_intents(at(1), 10).await.unwrap(), vec!["images/orphan".to_string()]);
    assert!(!images.blob_referenced("images/orphan").await.unwrap());
    // A sweeper claims it; a writer can then not renew it (and write a blob under it) until the sweep is done, and
    // another replica's sweeper cannot claim it too.
    let claim = images.claim_blob_intent("images/orphan", at(1), at(2)).await.unwrap().expect("claimed");
    let moment_later = at(2) + Duration::from_secs(1);
    assert_eq!(images.claim_blob_intent("images/orphan", at(1), moment_later).await.unwrap(), None, "another's claim");
    let error = images.add_blob_intent("images/orphan", at(2)).await.unwrap_err();
    assert!(matches!(error, smartfarm_core::Error::Unavailable(_)), "{error:?}");
    assert_eq!(images.stale_blob_intents(at(0), 10).await.unwrap(), vec!["images/orphan".to_string()], "claimed");
    assert!(images.delete_claimed_blob_intent("images/orphan", claim).await.unwrap());
    assert!(images.stale_blob_intents(at(1), 10).await.unwrap().is_empty());
    // A writer's new intent under the same key is not the claim's: a late sweeper leaves it alone.
    images.add_blob_intent("images/orphan", at(4)).await.unwrap();
    assert!(!images.delete_claimed_blob_intent("images/orphan", claim).await.unwrap());
    assert_eq!(images.stale_blob_intents(at(5), 10).await.unwrap(), vec!["images/orphan".to_string()]);
    // A claim older than its lifetime belongs to a sweep that died: another sweeper takes it over, and the dead
    // sweep's claim removes nothing.
    let lifetime = smartfarm_store::image::CLAIM_LIFETIME;
    let first = images.claim_blob_intent("images/orphan", at(5), at(10)).await.unwrap().expect("claimed");
    let early = at(10) + lifetime - Duration::from_secs(1);
    assert_eq!(images.claim_blob_intent("images/orphan", at(5), early).await.unwrap(), None);
    let late = at(10) + lifetime + Duration::from_secs(1);
    let second = images.claim_blob_intent("images/orphan", at(5), late).await.unwrap().expect("taken over");
    assert!(!images.delete_claimed_blob_intent("images/orphan", first).await.unwrap());
    assert!(images.delete_claimed_blob_intent("images/orphan", second).await.unwrap());
    // A sweep that cannot finish gives its claim up: writers may renew the intent at once, not after its lifetime.
    images.add_blob_intent("images/released", at(0)).await.unwrap();
    let claim = images.claim_blob_intent("images/released", at(1), at(2)).await.unwrap().expect("claimed");
    assert!(images.add_blob_intent("images/released", at(3)).await.is_err(), "claimed");
    images.release_blob_intent_claim("images/released", claim).await.unwrap();
    images.add_blob_intent("images/released", at(3)).await.unwrap();
    assert!(!images.delete_claimed_blob_intent("images/released", claim).await.unwrap(), "the claim is gone");
    images.delete_blob_intent("images/released").await.unwrap();
    // A writer that renewed its intent first keeps it: the claim of the old one fails.
    images.add_blob_intent("images/renewed", at(0)).await.unwrap();
    images.add_blob_intent("images/renewed", at(5)).await.unwrap();
    assert_eq!(images.claim_blob_intent("images/renewed", at(1), at(6)).await.unwrap(), None);
    images.delete_blob_intent("images/renewed").await.unwrap();

    // A writer that stalled past the grace: the sweeper claimed its intent (and may have deleted the blob), or
    // already removed it. Its row is not stored, so no row points at a missing blob; it sends the photo again.
    let stalled = photo(farm_id, cameras[1], 30, 3);
    images.add_blob_intent(&stalled.original_key, at(0)).await.unwrap();
    let claim = images.claim_blob_intent(&stalled.original_key, at(1), at(2)).await.unwrap().expect("claimed");
    let error = images.insert_image(stalled.clone(), None).await.unwrap_err();
    assert!(matches!(&error, smartfarm_core::Error::Unavailable(_)), "{error:?}");
    assert!(images.delete_claimed_blob_intent(&stalled.original_key, claim).await.unwrap());
    let error = images.insert_image(stalled.clone(), None).await.unwrap_err();
    assert!(matches!(&error, smartfarm_core::Error::Unavailable(_)), "{error:?}");
    assert!(matches!(images.get_image(stalled.id).await, Err(smartfarm_core::Error::NotFound { .. })));

    let old = photo(farm_id, cameras[0], 0, 1);
    let new = photo(farm_id, cameras[0], 48, 2);
    for image in [&old, &new] {
        insert_new(&*images, image.clone(), None).await;
    }
    assert!(images.blob_referenced(&old.original_key).await.unwrap());
    assert!(
        images.expire_originals(farm_id, at(24), 100, at(50)).await.unwrap().is_empty(),
        "an original waits for its thumbnail before retention takes it"
    );
    let pending = images.pending_thumbnails(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    // A thumbnail whose intent the sweeper took is not recorded either (it is made again).
    let error = images.set_thumbnail(old.id, Some("thumbnails/old")).await.unwrap_err();
    assert!(matches!(&error, smartfarm_core::Error::Unavailable(_)), "{error:?}");
    images.add_blob_intent("thumbnails/old", at(1)).await.unwrap();
    images.set_thumbnail(old.id, Some("thumbnails/old")).await.unwrap();
    // Another replica made the same thumbnail meanwhile: its intent went with the first record, and the row has it.
    images.set_thumbnail(old.id, Some("thumbnails/old")).await.unwrap();
    images.set_thumbnail(new.id, None).await.unwrap();
    assert!(images.pending_thumbnails(10).await.unwrap().is_empty());
    assert!(images.stale_blob_intents(at(100), 10).await.unwrap().is_empty(), "the thumbnail's intent is gone");
    let stored = images.get_image(old.id).await.unwrap();
    assert_eq!(
        (stored.thumbnail_state, stored.thumbnail_key.as_deref()),
        (ThumbnailState::Done, Some("thumbnails/old"))
    );
    assert_eq!(images.get_image(new.id).await.unwrap().thumbnail_state, ThumbnailState::Failed);

    // Retention: the old original is marked deleted with an intent for its key; the thumbnail stays referenced.
    let expired = images.expire_originals(farm_id, at(24), 100, at(50)).await.unwrap();
    assert_eq!(expired, vec![old.original_key.clone()]);
    assert!(!images.get_image(old.id).await.unwrap().original_available);
    assert!(!images.blob_referenced(&old.original_key).await.unwrap());
    assert!(images.blob_referenced("thumbnails/old").await.unwrap());
    assert_eq!(images.stale_blob_intents(at(51), 10).await.unwrap(), vec![old.original_key.clone()]);
    assert!(images.expire_originals(farm_id, at(24), 100, at(50)).await.unwrap().is_empty(), "only once");
    images.delete_blob_intent(&old.original_key).await.unwrap();
    // The same photo sent again after retention: the existing row answers, and the bytes just written keep their
    // intent so the sweeper removes them.
    images.add_blob_intent(&old.original_key, at(60)).await.unwrap();
    let again = ImageRecord { id: Uuid::now_v7(), ..old.clone() };
    assert!(matches!(images.insert_image(again, None).await.unwrap(), Inserted::Existing(_)));
    assert_eq!(images.stale_blob_intents(at(61), 10).await.unwrap(), vec![old.original_key.clone()]);
    images.delete_blob_intent(&old.original_key).await.unwrap();

    // Storage class: only available originals not yet moved.
    let to_move = images.originals_to_move(at(100), "GLACIER_IR", 10).await.unwrap();
    assert_eq!(to_move.iter().map(|image| image.id).collect::<Vec<_>>(), vec![new.id]);
    images.set_storage_class(new.id, "GLACIER_IR").await.unwrap();
    assert!(images.originals_to_move(at(100), "GLACIER_IR", 10).await.unwrap().is_empty());
}

async fn photos_without_a_diagnosis_are_found_for_late_diagnosis(database: &Database) {
    let images = database.images();
    let (farm_id, cameras) = farm(database, "a").await;
    // Received at hours 1 to 5 (see `photo`).
    let photos: Vec<ImageRecord> = (0..5).map(|hour| photo(farm_id, cameras[0], hour, 0x10 + hour as u8)).collect();
    for photo in &photos {
        insert_new(&*images, photo.clone(), None).await;
    }
    let diagnosis = StoredDiagnosis {
        label: "Apple___healthy".into(),
        confidence: 0.99,
        model_name: "leafnet".into(),
        model_version: "1".into(),
        diagnose_time: at(6),
    };
    images.set_diagnosis(photos[1].id, &diagnosis, ASKED).await.unwrap();
    // Up to 2 late tries each, the next try's time checked against `now`.
    let store = &*images;
    let to_diagnose = move |received_from, received_before, now, limit| async move {
        store.images_to_diagnose(received_from, received_before, now, 2, limit).await.unwrap()
    };
    let ids = |found: Vec<PhotoToDiagnose>| found.into_iter().map(|photo| photo.image.id).collect::<Vec<_>>();
    // Received within [hour 2, hour 5): the diagnosed one is left out, oldest first.
    let found = to_diagnose(at(2), at(5), at(5), 10).await;
    assert_eq!(found.iter().map(|photo| photo.late_tries).collect::<Vec<_>>(), vec![0, 0]);
    assert_eq!(ids(found), vec![photos[2].id, photos[3].id]);
    assert_eq!(ids(to_diagnose(at(0), at(10), at(10), 2).await), vec![photos[0].id, photos[2].id]);

    // A try counted waits for the time given for the next one. Counting is a claim: from the count read only.
    assert!(images.claim_late_try(photos[2].id, 0, at(5), at(8)).await.unwrap());
    assert!(!images.claim_late_try(photos[2].id, 0, at(5), at(8)).await.unwrap(), "claimed by another replica first");
    assert_eq!(images.get_image(photos[2].id).await.unwrap().diagnosis, None, "still without a diagnosis");
    assert_eq!(ids(to_diagnose(at(2), at(5), at(7), 10).await), vec![photos[3].id]);
    let later = to_diagnose(at(2), at(5), at(8), 10).await;
    assert_eq!(
        later.iter().map(|photo| (photo.image.id, photo.late_tries)).collect::<Vec<_>>(),
        vec![(photos[2].id, 1), (photos[3].id, 0)]
    );
    assert!(!images.claim_late_try(photos[2].id, 1, at(7), at(9)).await.unwrap(), "not due yet");
    // The last try allowed: never found again, unless it is given back.
    assert!(images.claim_late_try(photos[2].id, 1, at(8), at(30)).await.unwrap());
    assert_eq!(ids(to_diagnose(at(2), at(5), at(40), 10).await), vec![photos[3].id]);
    assert!(images.give_late_try_back(photos[2].id, 2).await.unwrap(), "given back");
    assert!(!images.give_late_try_back(photos[2].id, 2).await.unwrap(), "given back once");
    // Given back, it waits for the time of its next try: a replica that read it at count 1 before the claim
    // cannot claim it again on that count.
    assert!(!images.claim_late_try(photos[2].id, 1, at(20), at(40)).await.unwrap());
    assert_eq!(ids(to_diagnose(at(2), at(5), at(20), 10).await), vec![photos[3].id]);
    assert_eq!(ids(to_diagnose(at(2), at(5), at(30), 10).await), vec![photos[2].id, photos[3].id]);
    assert!(images.claim_late_try(photos[2].id, 1, at(30), at(60)).await.unwrap(), "due again");
    // A diagnosed photo needs no try: none is counted, and its diagnosis and its time stay.
    assert!(!images.claim_late_try(photos[1].id, 0, at(9), at(9)).await.unwrap());
    assert_eq!(images.get_image(photos[1].id).await.unwrap().diagnosis, Some(diagnosis.clone()));

    // A diagnosis announced as a verdict waits for the alert role: diagnosed again once a wait has passed since
    // it was made (at hour 6), until confirmed. A diagnosis asked for leaves that as it is.
    images.set_diagnosis(photos[4].id, &diagnosis, VerdictMark::Announced(true)).await.unwrap();
    images.set_diagnosis(photos[3].id, &diagnosis, VerdictMark::Announced(false)).await.unwrap();
    assert_eq!(ids(to_diagnose(at(4), at(6), at(6), 10).await), Vec::<Uuid>::new());
    assert_eq!(ids(to_diagnose(at(4), at(7), at(7), 10).await), vec![photos[4].id]);
    // A diagnosis asked for does not replace a pending verdict's.
    let asked = StoredDiagnosis { label: "Apple___Black_rot".into(), diagnose_time: at(7), ..diagnosis.clone() };
    assert!(!images.set_diagnosis(photos[4].id, &asked, ASKED).await.unwrap(), "not saved");
    assert_eq!(images.get_image(photos[4].id).await.unwrap().diagnosis, Some(diagnosis.clone()));
    assert_eq!(ids(to_diagnose(at(4), at(7), at(7), 10).await), vec![photos[4].id], "still pending");
    // Confirmed only for the verdict it has: one of another label or model version was not its latest.
    images.confirm_verdict(photos[4].id, "Apple___Black_rot", "1").await.unwrap();
    images.confirm_verdict(photos[4].id, "Apple___healthy", "0").await.unwrap();
    assert_eq!(ids(to_diagnose(at(4), at(7), at(7), 10).await), vec![photos[4].id], "a newer verdict pending");
    images.confirm_verdict(photos[4].id, "Apple___healthy", "1").await.unwrap();
    assert!(to_diagnose(at(4), at(7), at(7), 10).await.is_empty(), "confirmed");
    assert_eq!(images.get_image(photos[4].id).await.unwrap().diagnosis, Some(diagnosis.clone()));

    // A first diagnosis asked for, sure enough to alert on, waits for its verdict (the late diagnosis announces
    // it); a second one asked for meanwhile is not saved over it.
    let sure = VerdictMark::AskedFor { pending_if_first: true };
    assert!(images.set_diagnosis(photos[0].id, &diagnosis, sure).await.unwrap());
    assert_eq!(ids(to_diagnose(at(0), at(7), at(7), 10).await), vec![photos[0].id]);
    assert!(!images.set_diagnosis(photos[0].id, &asked, sure).await.unwrap(), "pending: not saved");
    assert_eq!(images.get_image(photos[0].id).await.unwrap().diagnosis, Some(diagnosis));
}

macro_rules! image_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn photos_are_stored_once_per_farm_and_content() {
                super::photos_are_stored_once_per_farm_and_content(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn listing_filters_and_pages_newest_first() {
                super::listing_filters_and_pages_newest_first(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn uploads_resume_and_refuse_a_stale_writer() {
                super::uploads_resume_and_refuse_a_stale_writer(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn photos_without_a_diagnosis_are_found_for_late_diagnosis() {
                super::photos_without_a_diagnosis_are_found_for_late_diagnosis(&Harness::$backend().await.database)
                    .await;
            }

            #[tokio::test]
            async fn intents_thumbnails_and_retention_keep_blobs_accounted_for() {
                super::intents_thumbnails_and_retention_keep_blobs_accounted_for(&Harness::$backend().await.database)
                    .await;
            }
        }
    };
}

image_suite!(sqlite);
image_suite!(postgres);
