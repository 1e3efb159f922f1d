//! The image service in one process, over SQLite and local files, behind a real tonic server: a stored photo is
//! announced on the bus once, and handed out to be diagnosed, with what the inference role needs; a duplicate is
//! not announced; a thumbnail
//! follows; and a farm's own retention applies.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use smartfarm_bus::{Bus, Event, Job, JobKind};
use smartfarm_core::Principal;
use smartfarm_core::config::{ImagesConfig, PostgresConfig};
use smartfarm_image::{ImageApi, UrlSigner};
use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_client::ImageServiceClient;
use smartfarm_proto::image::v1::image_service_server::ImageServiceServer;
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::{Database, blob};
use uuid::Uuid;

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 120]));
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

fn upload_messages(camera: Uuid, upload_id: &str, photo: &[u8]) -> Vec<pb::UploadRequest> {
    vec![
        pb::UploadRequest {
            body: Some(pb::upload_request::Body::Header(pb::UploadHeader {
                upload_id: upload_id.into(),
                device_id: camera.to_string(),
                capture_time: Some(smartfarm_core::time::to_timestamp(SystemTime::now())),
                sha256: hex::encode(Sha256::digest(photo)),
                size_bytes: photo.len() as u64,
                content_type: "image/png".into(),
                labels: [("row".to_string(), "7".to_string())].into(),
            })),
        },
        pb::UploadRequest {
            body: Some(pb::upload_request::Body::Chunk(pb::UploadChunk { offset: 0, data: photo.to_vec() })),
        },
    ]
}

/// A migrated SQLite database in a new directory, with a farm and its camera.
async fn farm_with_camera()
-> (tempfile::TempDir, Database, smartfarm_store::model::Farm, smartfarm_store::model::Device) {
    let dir = tempfile::tempdir().unwrap();
    let database =
        Database::connect(&format!("sqlite://{}", dir.path().join("db").display()), &PostgresConfig::default())
            .await
            .unwrap();
    database.migrate().await.unwrap();
    let registry = database.registry();
    let farm = registry.create_farm(Uuid::now_v7(), "farm", SystemTime::now()).await.unwrap();
    let camera = registry
        .create_device(NewDevice {
            id: Uuid::now_v7(),
            farm_id: farm.id,
            name: "camera".into(),
            kind: DeviceKind::Camera,
            labels: BTreeMap::new(),
            credential_sha256: "00".repeat(32),
            create_time: SystemTime::now(),
        })
        .await
        .unwrap();
    (dir, database, farm, camera)
}

/// A client of `api` behind a real tonic server, calling as the farm's gateway. The gateway's authentication layer
/// is what attaches principals; here an interceptor stands in for it.
async fn gateway_client(api: &ImageApi, farm_id: Uuid) -> ImageServiceClient<tonic::transport::Channel> {
    let gateway = Principal::Gateway { device_id: Uuid::now_v7(), farm_id, credential_sha256: "00".repeat(32) };
    let server = ImageServiceServer::with_interceptor(api.clone(), move |mut request: tonic::Request<()>| {
        request.extensions_mut().insert(gateway.clone());
        Ok(request)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    ImageServiceClient::new(channel)
}

#[tokio::test]
async fn a_stored_photo_is_announced_on_the_bus_once_and_gets_a_thumbnail() {
    let (dir, database, farm, camera) = farm_with_camera().await;
    let registry = database.registry();
    let blobs = blob::open(&format!("file://{}", dir.path().join("blobs").display())).await.unwrap();
    let bus = Bus::in_process();
    let mut events = bus.subscribe();
    let mut jobs = bus.take_work(JobKind::Diagnose);
    // Photos are kept forever, except on this farm, whose originals go a millisecond after they arrive.
    let settings =
        ImagesConfig { farm_retention: [(farm.id.to_string(), "1ms".to_string())].into(), ..ImagesConfig::default() };
    let api = ImageApi::new(registry, database.images(), blobs, bus, settings, UrlSigner::new(&[1; 32]).unwrap());
    tokio::spawn(api.clone().run_thumbnails());

    let mut client = gateway_client(&api, farm.id).await;

    let photo = png(400, 300);
    let stored =
        client.upload(tokio_stream::iter(upload_messages(camera.id, "first", &photo))).await.unwrap().into_inner();
    let image = stored.image.unwrap();
    assert!(!stored.duplicate);
    assert_eq!((image.width, image.height, image.labels["row"].as_str()), (400, 300, "7"));

    let Event::ImageStored(event) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap()
    else {
        panic!("the first event is the stored photo")
    };
    assert_eq!(event.image_id.to_string(), image.id);
    assert_eq!((event.farm_id, event.device_id), (farm.id, camera.id));
    assert_eq!((event.sha256.as_str(), event.content_type.as_str()), (image.sha256.as_str(), "image/png"));
    assert!(event.handed_out);
    let handed = jobs.next_within(Duration::from_secs(5)).await.expect("a job to diagnose the photo");
    assert_eq!(handed.job(), &Job::Diagnose(event.clone()), "handed out to be diagnosed, too");

    let again =
        client.upload(tokio_stream::iter(upload_messages(camera.id, "second", &photo))).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await.is_err(),
        "a duplicate is not announced"
    );

    // The thumbnail task, woken by the upload, makes one; the upload's status shows the stored photo with it.
    let mut has_thumbnail = false;
    for _ in 0..100 {
        let status = client
            .get_upload_status(pb::GetUploadStatusRequest {
                upload_id: "first".into(),
                device_id: camera.id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.received_bytes, photo.len() as u64);
        has_thumbnail = status.image.is_some_and(|image| image.has_thumbnail);
        if has_thumbnail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(has_thumbnail, "the thumbnail was made");
    // The farm's own retention applies (the default keeps photos forever): the original goes, the thumbnail stays.
    let report = api.sweep().await.unwrap();
    assert_eq!(report.originals_expired, 1, "{report:?}");
    let status = client
        .get_upload_status(pb::GetUploadStatusRequest { upload_id: "first".into(), device_id: camera.id.to_string() })
        .await
        .unwrap()
        .into_inner();
    let expired = status.image.unwrap();
    assert!(!expired.original_available && expired.has_thumbnail);

    // Gateways upload; reading the farm's photos is for API keys.
    let listed = client.list_images(pb::ListImagesRequest { farm_id: farm.id.to_string(), ..Default::default() }).await;
    assert_eq!(listed.unwrap_err().code(), tonic::Code::PermissionDenied);
}

/// At most `MAX_READING_ORIGINALS` originals are held in memory for reading at once: a read past them waits until
/// one of the responses before it is done with (here: dropped unread), and thumbnails do not wait.
#[tokio::test]
async fn reads_of_originals_wait_while_as_many_as_allowed_are_held() {
    use smartfarm_proto::image::v1::image_service_server::ImageService;
    let (dir, database, farm, camera) = farm_with_camera().await;
    let registry = database.registry();
    let blobs = blob::open(&format!("file://{}", dir.path().join("blobs").display())).await.unwrap();
    let signer = UrlSigner::new(&[1; 32]).unwrap();
    let api = ImageApi::new(registry, database.images(), blobs, Bus::in_process(), ImagesConfig::default(), signer);
    let photo = png(64, 48);
    let stored = gateway_client(&api, farm.id)
        .await
        .upload(tokio_stream::iter(upload_messages(camera.id, "one", &photo)))
        .await
        .unwrap()
        .into_inner();
    let image_id = stored.image.unwrap().id;

    let read = |variant: pb::ImageVariant| {
        let (api, image_id) = (api.clone(), image_id.clone());
        async move {
            let mut request = tonic::Request::new(pb::GetImageRequest { image_id, variant: variant as i32 });
            request.extensions_mut().insert(Principal::Admin { api_key_id: Uuid::now_v7() });
            ImageService::get_image(&api, request).await
        }
    };
    let mut held = Vec::new();
    for _ in 0..smartfarm_image::MAX_READING_ORIGINALS {
        held.push(read(pb::ImageVariant::Original).await.expect("within the bound"));
    }
    let waiting = tokio::spawn(read(pb::ImageVariant::Original));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a read past the bound waits");
    assert!(
        read(pb::ImageVariant::Thumbnail).await.is_err_and(|status| status.code() != tonic::Code::ResourceExhausted)
    );
    drop(held.pop());
    let read = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("goes once one is done").unwrap();
    assert!(read.is_ok(), "{:?}", read.err());
}
