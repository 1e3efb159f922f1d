//! Images end to end: photos dropped into an edge agent's camera directory reach the blob store once each,
//! byte-identical, with their metadata, on local files and on a real S3 server; a link cut in the middle of a large
//! upload resumes; a cloud killed between blob write and row commit leaves no orphan; bad uploads get clear errors.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::proxy::CuttingProxy;
use smartfarm_e2e::{Backend, Bearer, Cloud, CloudData, CloudOptions, TestS3, bootstrap_admin_key};
use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_client::ImageServiceClient;

type Images = ImageServiceClient<InterceptedService<Channel, Bearer>>;

const FIXTURES: &[&str] = &["apple_scab.jpg", "potato_late_blight.jpg", "apple_healthy.jpg"];

fn fixture(name: &str) -> Vec<u8> {
    let (_, bytes) =
        smartfarm_edge::sim::PHOTO_FIXTURES.iter().find(|(fixture, _)| *fixture == name).expect("a fixture");
    bytes.to_vec()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn images_client(cloud: &Cloud, key: &str) -> Images {
    ImageServiceClient::with_interceptor(cloud.channel().await, Bearer::new(key)).max_decoding_message_size(64 << 20)
}

fn drop_photo(dir: &Path, name: &str, bytes: &[u8]) {
    smartfarm_edge::sim::drop_photos(dir, &[(name, bytes)]).expect("drop a photo");
}

async fn list(images: &mut Images, farm_id: &str) -> Vec<pb::Image> {
    images
        .list_images(pb::ListImagesRequest { farm_id: farm_id.into(), page_size: 1000, ..Default::default() })
        .await
        .expect("list images")
        .into_inner()
        .images
}

async fn fetch(images: &mut Images, image_id: &str, variant: pb::ImageVariant) -> (pb::Image, Vec<u8>) {
    let mut stream = images
        .get_image(pb::GetImageRequest { image_id: image_id.into(), variant: variant as i32 })
        .await
        .expect("get image")
        .into_inner();
    let mut metadata = None;
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.expect("read the image stream") {
        match message.body {
            Some(pb::get_image_response::Body::Image(image)) => metadata = Some(image),
            Some(pb::get_image_response::Body::Data(data)) => bytes.extend_from_slice(&data),
            None => panic!("an empty GetImage message"),
        }
    }
    (metadata.expect("metadata first"), bytes)
}

/// Where the blob store keeps objects: a directory on local storage, the bucket's directory on s3s-fs.
fn objects_under(root: &Path, prefix: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut pending = vec![root.join(prefix)];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                let key = relative.to_string_lossy().into_owned();
                // s3s-fs keeps its own metadata files beside objects.
                if !key.contains(".s3s") && !key.ends_with(".metadata.json") {
                    keys.insert(key);
                }
            }
        }
    }
    keys
}

fn original_key(farm_id: &str, sha256: &str) -> String {
    format!("images/{}/{}/{sha256}", farm_id.replace('-', ""), &sha256[..2])
}

/// The shared scenario: three photos, one dropped twice and one non-image, through a real agent.
async fn photos_arrive_once_each(data: &CloudData, cloud_options: CloudOptions, blob_root: &Path, cold_storage: bool) {
    let cloud = Cloud::start(data, cloud_options).await;
    let key = bootstrap_admin_key(data);
    let fleet = Fleet::register(&cloud, &key, "orchard", 0).await;
    let camera = fleet.register_camera(&cloud, &key, "row 7 camera").await;
    let camera_dir = data.data_dir.path().join("camera-7");
    let edge = Edge::start(&EdgeOptions {
        config: "diagnose_photos = false\ncamera_poll_interval = \"200ms\"\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    })
    .await;
    let started = SystemTime::now() - Duration::from_secs(5);
    for name in FIXTURES {
        drop_photo(&camera_dir, name, &fixture(name));
    }
    drop_photo(&camera_dir, "again.jpg", &fixture(FIXTURES[0]));
    drop_photo(&camera_dir, "notes.txt", b"irrigation schedule, not a photo");

    let mut images = images_client(&cloud, &key).await;
    let arrived = eventually(Duration::from_secs(30), || {
        let mut images = images.clone();
        let farm = fleet.farm_id.clone();
        async move { list(&mut images, &farm).await.len() >= FIXTURES.len() }
    })
    .await;
    assert!(arrived, "photos did not arrive:\n{}", edge.log());
    // Time for a duplicate to arrive, if the agent were to send one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = list(&mut images, &fleet.farm_id).await;
    assert_eq!(stored.len(), FIXTURES.len(), "the photo dropped twice is stored once: {stored:#?}");

    let expected: BTreeSet<String> =
        FIXTURES.iter().map(|name| original_key(&fleet.farm_id, &sha256(&fixture(name)))).collect();
    assert_eq!(objects_under(blob_root, "images"), expected, "one object per photo, at its content address");
    for name in FIXTURES {
        let bytes = fixture(name);
        let image = stored.iter().find(|image| image.sha256 == sha256(&bytes)).expect("every photo is listed");
        assert_eq!(image.device_id, camera);
        assert_eq!((image.size_bytes, image.content_type.as_str()), (bytes.len() as u64, "image/jpeg"));
        assert_eq!((image.width, image.height), (256, 256));
        let captured =
            smartfarm_core::time::from_timestamp("capture_time", image.capture_time.as_ref().unwrap()).unwrap();
        assert!(captured >= started && captured <= SystemTime::now(), "capture time is the file's: {captured:?}");
        assert!(image.original_available);
        let stored_bytes =
            std::fs::read(blob_root.join(original_key(&fleet.farm_id, &image.sha256))).expect("the object");
        assert_eq!(stored_bytes, bytes, "{name} is stored byte for byte");
        let (metadata, served) = fetch(&mut images, &image.id, pb::ImageVariant::Original).await;
        assert_eq!((metadata.id.as_str(), served), (image.id.as_str(), bytes));
    }

    // Thumbnails follow, and can be fetched without gRPC through a URL.
    let first = stored[0].clone();
    let thumbnailed = eventually(Duration::from_secs(20), || {
        let mut images = images.clone();
        let farm = fleet.farm_id.clone();
        async move { list(&mut images, &farm).await.iter().all(|image| image.has_thumbnail) }
    })
    .await;
    assert!(thumbnailed, "thumbnails were not made:\n{}", cloud.log());
    let (thumbnail_meta, thumbnail) = fetch(&mut images, &first.id, pb::ImageVariant::Thumbnail).await;
    assert_eq!(thumbnail_meta.content_type, "image/jpeg");
    assert!(thumbnail.starts_with(&[0xff, 0xd8, 0xff]) && !thumbnail.is_empty());
    let url = images
        .get_image_url(pb::GetImageUrlRequest {
            image_id: first.id.clone(),
            variant: pb::ImageVariant::Original as i32,
            expires_in: None,
        })
        .await
        .expect("an image url")
        .into_inner()
        .url;
    let fetched = http_get_bytes(&url, &cloud).await;
    assert_eq!(sha256(&fetched), first.sha256, "the URL serves the photo ({url})");

    // The non-image was set aside in the camera directory, and the agent's image area is empty.
    assert!(camera_dir.join("rejected/notes.txt").exists(), "a non-image is moved to rejected/");
    let spool_images = data.data_dir.path().join("spool/images");
    let emptied = eventually(Duration::from_secs(10), || {
        let dir = spool_images.clone();
        async move {
            std::fs::read_dir(&dir).map(|entries| entries.flatten().all(|entry| entry.path().is_dir())).unwrap_or(false)
        }
    })
    .await;
    assert!(emptied, "the agent keeps only what the cloud lacks");

    if cold_storage {
        // Configured to move originals to a colder class at once: the sweeper did so for every photo, in place.
        let moved = eventually(Duration::from_secs(10), || {
            let log = cloud.log();
            async move { originals_moved(&log) >= FIXTURES.len() as u64 }
        })
        .await;
        assert!(moved, "the originals were not moved to the cold storage class:\n{}", cloud.log());
        for name in FIXTURES {
            let bytes = fixture(name);
            let stored = std::fs::read(blob_root.join(original_key(&fleet.farm_id, &sha256(&bytes)))).unwrap();
            assert_eq!(stored, bytes, "{name} is unchanged by its move");
        }
    }
    edge.stop().await;
    cloud.stop().await;
}

/// The originals the sweeper reports having moved to the cold storage class, over its whole log.
fn originals_moved(log: &str) -> u64 {
    log.match_indices("originals_moved: ")
        .filter_map(|(at, label)| {
            let digits: String = log[at + label.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// GET of a URL the cloud returned: a presigned S3 URL or a path on the cloud itself.
async fn http_get_bytes(url: &str, cloud: &Cloud) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (address, path) = match url.strip_prefix("http://") {
        Some(rest) => {
            let (host, path) = rest.split_once('/').unwrap();
            (host.to_string(), format!("/{path}"))
        }
        None => (cloud.addr.to_string(), url.to_string()),
    };
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect for the url");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").expect("http headers");
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "GET {url}: {head}");
    let body = response[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        return decoded;
    }
    body
}

#[tokio::test]
async fn photos_from_a_camera_directory_arrive_once_each_on_local_files() {
    let data = CloudData::new(Backend::Sqlite).await;
    let blobs = data.data_dir.path().join("blobs");
    photos_arrive_once_each(&data, CloudOptions::default(), &blobs, false).await;
}

#[tokio::test]
async fn photos_from_a_camera_directory_arrive_once_each_on_s3() {
    let s3 = TestS3::start().await;
    let data = CloudData::new(Backend::Postgres).await;
    let options = CloudOptions {
        env: vec![("SMARTFARM_BLOB_URL".into(), s3.url.clone())],
        config: Some(
            "[images]\ncold_storage_class = \"STANDARD_IA\"\ncold_after = \"0s\"\nsweep_interval = \"500ms\"\n".into(),
        ),
        ..Default::default()
    };
    photos_arrive_once_each(&data, options, &s3.bucket_dir, true).await;
}

/// A photo too big to come through a cut link in one go: random pixels, stored losslessly, about 7.5 MB.
fn large_png() -> Vec<u8> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let image = image::RgbImage::from_fn(1800, 1400, |_, _| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        image::Rgb([seed as u8, (seed >> 8) as u8, (seed >> 16) as u8])
    });
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

#[tokio::test]
async fn a_link_cut_in_the_middle_of_a_large_upload_resumes_and_a_photo_sent_twice_is_stored_once() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "greenhouse", 0).await;
    let camera = fleet.register_camera(&cloud, &key, "bench camera").await;
    let photo = large_png();
    assert!(photo.len() > 7 << 20, "the photo is large: {} bytes", photo.len());
    // Cut past the server's 4 MiB stream window and 1.5 MiB more: the sender cannot have got that far unless the
    // service had read at least that much, so there is something to keep (a cut any earlier may come while the
    // service is still busy before its first read, and then what the window held is rightly gone with the link).
    let proxy = CuttingProxy::start(cloud.addr, (4 << 20) + (3 << 19)).await;
    let camera_dir = data.data_dir.path().join("camera");
    let edge = Edge::start(&EdgeOptions {
        cloud: proxy.addr,
        // Kept as PNG, so the bytes stored are the bytes dropped; small chunks so the cut lands between some.
        config: "diagnose_photos = false\ncamera_poll_interval = \"200ms\"\nreencode = \"keep\"\nimage_chunk_bytes = 131072\nreconnect_min = \"300ms\"\n"
            .into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    })
    .await;
    drop_photo(&camera_dir, "large.png", &photo);

    let mut images = images_client(&cloud, &key).await;
    let arrived = eventually(Duration::from_secs(60), || {
        let mut images = images.clone();
        let farm = fleet.farm_id.clone();
        async move { !list(&mut images, &farm).await.is_empty() }
    })
    .await;
    assert!(arrived, "the photo did not arrive:\n{}\n{}", edge.log(), cloud.log());
    assert!(proxy.has_cut(), "the link was cut during the upload");
    let log = cloud.log();
    assert!(log.contains("upload cut short; kept for resuming"), "{log}");
    assert!(!log.contains("ERROR"), "a cut link is a farm's everyday event, not an error of the service:\n{log}");
    let resumed = edge.metric("smartfarm_edge_image_resumed_bytes_total").await;
    assert!(
        resumed > 0.0,
        "the upload resumed from the bytes the cloud kept, not from zero:\n{}\n{}",
        edge.log(),
        cloud.log()
    );
    let stored = list(&mut images, &fleet.farm_id).await;
    let (_, bytes) = fetch(&mut images, &stored[0].id, pb::ImageVariant::Original).await;
    assert_eq!(bytes, photo, "the resumed photo is byte-identical");
    let blobs = data.data_dir.path().join("blobs");
    assert!(objects_under(&blobs, "uploads").is_empty(), "the kept parts are deleted once the photo is stored");
    let status = images
        .get_upload_status(pb::GetUploadStatusRequest { upload_id: sha256(&photo), device_id: camera.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.received_bytes, photo.len() as u64);
    assert_eq!(status.image.map(|image| image.id), Some(stored[0].id.clone()));

    // The same photo again: the agent learns the cloud has it and sends nothing.
    drop_photo(&camera_dir, "large-again.png", &photo);
    let skipped = eventually(Duration::from_secs(20), || {
        let edge = &edge;
        async move { edge.metric("smartfarm_edge_images_known_skipped_total").await >= 1.0 }
    })
    .await;
    assert!(skipped, "the second copy was not skipped:\n{}", edge.log());
    assert_eq!(list(&mut images, &fleet.farm_id).await.len(), 1);
    assert_eq!(objects_under(&blobs, "images").len(), 1, "stored once");
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_cloud_killed_between_blob_write_and_row_commit_leaves_no_orphan() {
    let data = CloudData::new(Backend::Postgres).await;
    let sweep_config = "[images]\nsweep_interval = \"500ms\"\norphan_grace = \"1s\"\n".to_string();
    let crashing = Cloud::start(
        &data,
        CloudOptions {
            env: vec![("SMARTFARM_FAILPOINT".into(), "image-after-blob-put".into())],
            config: Some(sweep_config.clone()),
            ..Default::default()
        },
    )
    .await;
    let listen = crashing.addr;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&crashing, &key, "vineyard", 0).await;
    let camera = fleet.register_camera(&crashing, &key, "gate camera").await;
    let camera_dir = data.data_dir.path().join("camera");
    let edge_options = EdgeOptions {
        config: "diagnose_photos = false\ncamera_poll_interval = \"200ms\"\nreconnect_min = \"300ms\"\nreconnect_max = \"1s\"\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&crashing, &fleet, data.data_dir.path().join("spool"))
    };
    let edge = Edge::start(&edge_options).await;
    let photo = fixture(FIXTURES[1]);
    drop_photo(&camera_dir, "photo.jpg", &photo);

    let status = crashing.wait_for_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "the failpoint aborts the cloud: {status}");
    let blobs = data.data_dir.path().join("blobs");
    let key_of_photo = original_key(&fleet.farm_id, &sha256(&photo));
    assert_eq!(objects_under(&blobs, "images"), BTreeSet::from([key_of_photo.clone()]), "the blob was written");
    // The agent must not heal this by sending again before the sweeper has had its chance: stop it.
    edge.stop().await;

    let cloud =
        Cloud::start(&data, CloudOptions { listen: Some(listen), config: Some(sweep_config), ..Default::default() })
            .await;
    let mut images = images_client(&cloud, &key).await;
    let swept = eventually(Duration::from_secs(20), || {
        let blobs = blobs.clone();
        async move { objects_under(&blobs, "images").is_empty() }
    })
    .await;
    assert!(swept, "the orphaned blob was not swept:\n{}", cloud.log());
    assert!(list(&mut images, &fleet.farm_id).await.is_empty(), "no row either");

    // The agent still has the photo (the cloud never acknowledged it) and sends it again: one row, one blob.
    let edge = Edge::start(&edge_options).await;
    let arrived = eventually(Duration::from_secs(30), || {
        let mut images = images.clone();
        let farm = fleet.farm_id.clone();
        async move { list(&mut images, &farm).await.len() == 1 }
    })
    .await;
    assert!(arrived, "the photo did not arrive after the restart:\n{}", edge.log());
    // Past the sweeper's grace: the stored photo's blob stays, since its row references it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(objects_under(&blobs, "images"), BTreeSet::from([key_of_photo]));
    assert_eq!(list(&mut images, &fleet.farm_id).await.len(), 1);
    edge.stop().await;
    cloud.stop().await;
}

fn header(upload_id: &str, device_id: &str, bytes: &[u8], size_bytes: u64, content_type: &str) -> pb::UploadRequest {
    pb::UploadRequest {
        body: Some(pb::upload_request::Body::Header(pb::UploadHeader {
            upload_id: upload_id.into(),
            device_id: device_id.into(),
            capture_time: Some(smartfarm_core::time::to_timestamp(SystemTime::now() - Duration::from_secs(60))),
            sha256: sha256(bytes),
            size_bytes,
            content_type: content_type.into(),
            labels: Default::default(),
        })),
    }
}

fn chunk(offset: u64, data: &[u8]) -> pb::UploadRequest {
    pb::UploadRequest { body: Some(pb::upload_request::Body::Chunk(pb::UploadChunk { offset, data: data.to_vec() })) }
}

async fn upload(images: &mut Images, messages: Vec<pb::UploadRequest>) -> Result<pb::UploadResponse, tonic::Status> {
    images.upload(tokio_stream::iter(messages)).await.map(|response| response.into_inner())
}

#[tokio::test]
async fn bad_uploads_get_clear_errors_store_nothing_and_the_service_stays_up() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "bad inputs", 0).await;
    let camera = fleet.register_camera(&cloud, &key, "camera").await;
    let mut images = images_client(&cloud, &key).await;
    let photo = fixture(FIXTURES[0]);
    let size = photo.len() as u64;
    let text = b"this is a text file, not a photo".to_vec();

    let ended_early = format!("ended after {size} of the {} bytes declared", size + 10);
    let hash_mismatch = format!("hash to {}, not to the declared", sha256(&photo));
    let cases: Vec<(&str, Vec<pb::UploadRequest>, Code, &str)> = vec![
        (
            "not an image",
            vec![header("u1", &camera, &text, text.len() as u64, "image/jpeg"), chunk(0, &text)],
            Code::InvalidArgument,
            "not an image (text)",
        ),
        (
            "declared size larger than the bytes",
            vec![header("u2", &camera, &photo, size + 10, "image/jpeg"), chunk(0, &photo)],
            Code::InvalidArgument,
            &ended_early,
        ),
        (
            "declared size smaller than the bytes",
            vec![header("u3", &camera, &photo, size - 10, "image/jpeg"), chunk(0, &photo)],
            Code::InvalidArgument,
            "larger than the",
        ),
        (
            "a chunk out of order",
            vec![header("u4", &camera, &photo, size, "image/jpeg"), chunk(100, &photo[100..])],
            Code::FailedPrecondition,
            "chunks must come in order",
        ),
        (
            "over the maximum",
            vec![header("u5", &camera, &photo, 25 << 20, "image/jpeg")],
            Code::InvalidArgument,
            "over the maximum photo size of 20971520 bytes",
        ),
        (
            "a sha256 mismatch",
            vec![
                {
                    let mut message = header("u6", &camera, &photo, size, "image/jpeg");
                    if let Some(pb::upload_request::Body::Header(header)) = &mut message.body {
                        header.sha256 = "ab".repeat(32);
                    }
                    message
                },
                chunk(0, &photo),
            ],
            Code::InvalidArgument,
            &hash_mismatch,
        ),
        (
            "a declared type the bytes are not",
            vec![header("u7", &camera, &photo, size, "image/png"), chunk(0, &photo)],
            Code::InvalidArgument,
            "declared image/png, but the bytes are image/jpeg",
        ),
        (
            "an unsupported type",
            vec![header("u8", &camera, &photo, size, "image/gif"), chunk(0, &photo)],
            Code::InvalidArgument,
            "\"image/gif\" is not a stored type",
        ),
        (
            "a bad upload id",
            vec![header("../etc", &camera, &photo, size, "image/jpeg"), chunk(0, &photo)],
            Code::InvalidArgument,
            "upload_id",
        ),
        (
            "a device that is not a camera",
            vec![header("u9", &fleet.gateway_id, &photo, size, "image/jpeg"), chunk(0, &photo)],
            Code::FailedPrecondition,
            "is a gateway, not a camera",
        ),
        ("no header", vec![chunk(0, &photo)], Code::InvalidArgument, "must be its header"),
    ];
    for (what, messages, code, message) in cases {
        let status = upload(&mut images, messages).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(message), "{what}: {}", status.message());
    }

    let blobs = data.data_dir.path().join("blobs");
    assert!(objects_under(&blobs, "images").is_empty(), "nothing stored");
    assert!(list(&mut images, &fleet.farm_id).await.is_empty());

    // Still up: a good upload works, and the same photo again is a duplicate.
    let good = vec![
        header("good", &camera, &photo, size, "image/jpeg"),
        chunk(0, &photo[..1000]),
        chunk(1000, &photo[1000..]),
    ];
    let stored = upload(&mut images, good.clone()).await.expect("a good upload");
    assert!(!stored.duplicate);
    let mut again = good;
    if let Some(pb::upload_request::Body::Header(header)) = &mut again[0].body {
        header.upload_id = "good-again".into();
    }
    let duplicate = upload(&mut images, again).await.expect("a duplicate upload");
    assert!(duplicate.duplicate);
    assert_eq!(duplicate.image.unwrap().id, stored.image.unwrap().id);
    assert_eq!(objects_under(&blobs, "images").len(), 1);
    let known = images
        .check_images(pb::CheckImagesRequest {
            farm_id: fleet.farm_id.clone(),
            sha256s: vec![sha256(&photo), "cd".repeat(32)],
        })
        .await
        .unwrap()
        .into_inner()
        .known_sha256s;
    assert_eq!(known, vec![sha256(&photo)]);
    cloud.stop().await;
}

#[tokio::test]
async fn retention_deletes_old_originals_and_keeps_thumbnails_and_metadata() {
    let data = CloudData::new(Backend::Sqlite).await;
    // Retention counts from the later of capture and receipt, so the photo captured hours ago goes once it has been
    // here two seconds, and one captured now stays for those two seconds.
    let config = "[images]\nretention = \"2s\"\nsweep_interval = \"300ms\"\n".to_string();
    let cloud = Cloud::start(&data, CloudOptions { config: Some(config), ..Default::default() }).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "retention", 0).await;
    let camera = fleet.register_camera(&cloud, &key, "camera").await;
    let mut images = images_client(&cloud, &key).await;
    let uploader = images.clone();
    let upload_captured = |name: &'static str, age: Duration| {
        let mut images = uploader.clone();
        let camera = camera.clone();
        async move {
            let photo = fixture(name);
            let mut first = header(name, &camera, &photo, photo.len() as u64, "image/jpeg");
            if let Some(pb::upload_request::Body::Header(header)) = &mut first.body {
                header.upload_id = name.replace('.', "-");
                header.capture_time = Some(smartfarm_core::time::to_timestamp(SystemTime::now() - age));
            }
            upload(&mut images, vec![first, chunk(0, &photo)]).await.expect("upload").image.unwrap()
        }
    };
    let old = upload_captured(FIXTURES[0], Duration::from_secs(3 * 3600)).await;
    let still_there = list(&mut images, &fleet.farm_id).await;
    assert!(still_there[0].original_available, "a photo captured long ago is kept for the retention after receipt");
    let expired = eventually(Duration::from_secs(20), || {
        let mut images = images.clone();
        let farm = fleet.farm_id.clone();
        let old_id = old.id.clone();
        async move {
            list(&mut images, &farm)
                .await
                .iter()
                .any(|image| image.id == old_id && !image.original_available && image.has_thumbnail)
        }
    })
    .await;
    assert!(expired, "the old original was not expired (with its thumbnail kept):\n{}", cloud.log());
    let new = upload_captured(FIXTURES[1], Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let blobs = data.data_dir.path().join("blobs");
    assert_eq!(
        objects_under(&blobs, "images"),
        BTreeSet::from([original_key(&fleet.farm_id, &new.sha256)]),
        "only the recent original is left"
    );
    let status = images
        .get_image(pb::GetImageRequest { image_id: old.id.clone(), variant: pb::ImageVariant::Original as i32 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("deleted by the farm's retention"), "{}", status.message());
    let (_, thumbnail) = fetch(&mut images, &old.id, pb::ImageVariant::Thumbnail).await;
    assert!(thumbnail.starts_with(&[0xff, 0xd8, 0xff]), "the thumbnail stays");
    cloud.stop().await;
}
