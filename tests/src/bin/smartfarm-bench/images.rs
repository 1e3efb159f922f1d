//! The photo benchmarks of `smartfarm-bench images`:
//!
//! - throughput: MB/s of photos from a full edge image area to committed, stored photos (real agent, real cloud on
//!   PostgreSQL, s3s-fs behind it), against plain S3 PutObject calls of the same files to the same server, one at
//!   a time as the agent sends them, run before and after the pipeline in the same process;
//! - storage: bytes stored per photo for a day of hourly photos from many cameras (half deliver raw PNG frames the
//!   agent re-encodes to JPEG, half JPEGs it keeps; some photos are delivered twice, as a camera program that
//!   restarts does), against the bytes the cameras produced: dedup, thumbnails and re-encoding together.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet};
use smartfarm_e2e::{Backend, Bearer, Cloud, CloudData, CloudOptions, TestS3, bootstrap_admin_key};
use smartfarm_edge::image_spool::ImageSpool;
use smartfarm_proto::device::v1::{DeviceKind, RegisterDeviceRequest};
use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_client::ImageServiceClient;
use smartfarm_store::blob;

use crate::{emit, machine};

type Images = ImageServiceClient<InterceptedService<Channel, Bearer>>;

/// A camera-sized photo of random pixels (incompressible, so every byte is real work), JPEG at quality 90.
fn noise_jpeg(seed: u64, width: u32, height: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let image = image::RgbImage::from_fn(width, height, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).expect("encode");
    bytes
}

async fn register_cameras(cloud: &Cloud, key: &str, farm_id: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let mut devices = cloud.device_client(key).await;
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        let device = devices
            .register_device(RegisterDeviceRequest {
                farm_id: farm_id.into(),
                name: format!("camera {index}"),
                kind: DeviceKind::Camera as i32,
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .device
            .ok_or_else(|| anyhow::anyhow!("no device in the answer"))?;
        ids.push(device.id);
    }
    Ok(ids)
}

/// Every photo of the farm, through all pages.
async fn list_all(images: &mut Images, farm_id: &str) -> anyhow::Result<Vec<pb::Image>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = images
            .list_images(pb::ListImagesRequest {
                farm_id: farm_id.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        all.extend(page.images);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// Bytes of the objects under `prefix` in s3s-fs's bucket directory (its own metadata files left out).
fn stored_bytes(bucket_dir: &Path, prefix: &str) -> u64 {
    let mut total = 0;
    let mut pending = vec![bucket_dir.join(prefix)];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.to_string_lossy();
            if path.is_dir() {
                pending.push(path);
            } else if !name.contains(".s3s") && !name.ends_with(".metadata.json") {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// A cloud on PostgreSQL storing photos in a fresh s3s-fs bucket, with a farm.
async fn cloud_on_s3(name: &str) -> anyhow::Result<(TestS3, CloudData, Cloud, Fleet, String, Images)> {
    let s3 = TestS3::start().await;
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(
        &data,
        CloudOptions { env: vec![("SMARTFARM_BLOB_URL".into(), s3.url.clone())], ..Default::default() },
    )
    .await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, name, 0).await;
    let images = ImageServiceClient::with_interceptor(cloud.channel().await, Bearer::new(&key))
        .max_decoding_message_size(64 << 20);
    Ok((s3, data, cloud, fleet, key, images))
}

pub async fn images(photos: usize, cameras: usize, hours: usize) -> anyhow::Result<()> {
    if photos > 0 {
        throughput(photos).await?;
    }
    if cameras > 0 && hours > 0 {
        storage(cameras, hours).await?;
    }
    Ok(())
}

async fn throughput(photos: usize) -> anyhow::Result<()> {
    let (s3, data, cloud, fleet, key, mut images) = cloud_on_s3("photo throughput bench").await?;
    let camera = register_cameras(&cloud, &key, &fleet.farm_id, 1).await?.remove(0);
    let files: Vec<Vec<u8>> = (0..photos).map(|seed| noise_jpeg(seed as u64 + 1, 1600, 1200)).collect();
    let total_bytes: usize = files.iter().map(Vec::len).sum();
    let megabytes = total_bytes as f64 / 1e6;

    // Baseline: one PutObject per photo into the same bucket, under a prefix of its own.
    let (base, query) = s3.url.split_once('?').expect("the test S3 url has a query");
    let plain = blob::open(&format!("{base}/baseline?{query}")).await?;
    let put_all = |round: usize| {
        let plain = plain.clone();
        let files = &files;
        async move {
            let started = Instant::now();
            for bytes in files {
                let key = format!("round-{round}/{}", hex::encode(Sha256::digest(bytes)));
                plain.put(&key, bytes).await?;
            }
            anyhow::Ok(megabytes / started.elapsed().as_secs_f64())
        }
    };
    let baseline_before = put_all(1).await?;

    // The pipeline: the agent starts with every photo already in its image area.
    let spool_dir = data.data_dir.path().join("spool");
    {
        let spool = ImageSpool::open(&spool_dir, 64 << 30, true)?;
        let camera_id: uuid::Uuid = camera.parse()?;
        for (index, bytes) in files.iter().enumerate() {
            spool.put(camera_id, SystemTime::now() - Duration::from_secs(index as u64), "image/jpeg", bytes)?;
        }
    }
    let started = Instant::now();
    let edge = Edge::start(&EdgeOptions::new(&cloud, &fleet, spool_dir)).await;
    loop {
        let stored = list_all(&mut images, &fleet.farm_id).await?.len();
        if stored >= photos {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "only {stored} of {photos} photos in 10 min");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pipeline = megabytes / started.elapsed().as_secs_f64();
    edge.stop().await;
    // The cloud makes thumbnails once the burst is stored; the second baseline runs after them, not beside them.
    while !list_all(&mut images, &fleet.farm_id).await?.iter().all(|image| image.has_thumbnail) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "thumbnails not made within 15 min");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline_after = put_all(2).await?;
    let baseline = (baseline_before + baseline_after) / 2.0;
    emit(serde_json::json!({
        "benchmark": "image_upload", "machine": machine(), "photos": photos, "megabytes": (megabytes * 10.0).round() / 10.0,
        "pipeline_mb_per_second": (pipeline * 10.0).round() / 10.0,
        "put_object_mb_per_second": (baseline * 10.0).round() / 10.0,
        "put_object_before": (baseline_before * 10.0).round() / 10.0,
        "put_object_after": (baseline_after * 10.0).round() / 10.0,
        "ratio": (pipeline / baseline * 100.0).round() / 100.0,
    }));
    cloud.stop().await;
    Ok(())
}

/// A camera's view at an hour: one of the leaf photos, scaled to 640x480, lit by the time of day, with sensor
/// noise, so that every hour's frame differs as a real camera's does.
fn frame(leaves: &[image::RgbImage], camera: usize, hour: usize) -> image::RgbImage {
    let leaf = &leaves[camera % leaves.len()];
    let scaled = image::imageops::resize(leaf, 640, 480, image::imageops::FilterType::Triangle);
    let light = 0.35 + 0.65 * (std::f64::consts::PI * (hour as f64 + 0.5) / 24.0).sin().max(0.0);
    let mut state = ((camera * 131 + hour) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    image::RgbImage::from_fn(640, 480, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 9) as f64 - 4.0;
        let pixel = scaled.get_pixel(x, y);
        image::Rgb(pixel.0.map(|channel| (channel as f64 * light + noise).clamp(0.0, 255.0) as u8))
    })
}

async fn storage(cameras: usize, hours: usize) -> anyhow::Result<()> {
    let (s3, data, cloud, fleet, key, mut images) = cloud_on_s3("photo storage bench").await?;
    let camera_ids = register_cameras(&cloud, &key, &fleet.farm_id, cameras).await?;
    let leaves: Vec<image::RgbImage> = smartfarm_edge::sim::PHOTO_FIXTURES
        .iter()
        .map(|(_, bytes)| Ok(image::load_from_memory(bytes)?.into_rgb8()))
        .collect::<anyhow::Result<_>>()?;

    let mut config = String::from("camera_poll_interval = \"500ms\"\n");
    let camera_dirs: Vec<_> = (0..cameras).map(|index| data.data_dir.path().join(format!("camera-{index}"))).collect();
    for (id, dir) in camera_ids.iter().zip(&camera_dirs) {
        std::fs::create_dir_all(dir)?;
        config.push_str(&format!("[[cameras]]\ndevice_id = \"{id}\"\ndir = \"{}\"\n", dir.display()));
    }
    let edge =
        Edge::start(&EdgeOptions { config, ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool")) })
            .await;

    // The day: every camera, every hour. Even cameras deliver JPEG (kept), odd ones raw PNG (re-encoded); one
    // photo in twenty is delivered twice.
    let mut produced_bytes = 0u64;
    let mut delivered = 0usize;
    let mut by_format: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let started = Instant::now();
    for hour in 0..hours {
        for (camera, dir) in camera_dirs.iter().enumerate() {
            let pixels = frame(&leaves, camera, hour);
            let (format, extension) =
                if camera % 2 == 0 { (image::ImageFormat::Jpeg, "jpg") } else { (image::ImageFormat::Png, "png") };
            let mut bytes = Vec::new();
            match format {
                image::ImageFormat::Jpeg => {
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92).encode_image(&pixels)?
                }
                _ => pixels.write_to(&mut Cursor::new(&mut bytes), format)?,
            }
            let copies = if (camera + hour) % 20 == 0 { 2 } else { 1 };
            for copy in 0..copies {
                let name = format!("h{hour:02}-{copy}.{extension}");
                smartfarm_edge::sim::drop_photos(dir, &[(&name, &bytes)])?;
                produced_bytes += bytes.len() as u64;
                delivered += 1;
                let entry = by_format.entry(extension).or_default();
                entry.0 += 1;
                entry.1 += bytes.len() as u64;
            }
        }
    }
    let unique = cameras * hours;
    loop {
        let listed = list_all(&mut images, &fleet.farm_id).await?;
        if listed.len() >= unique && listed.iter().all(|image| image.has_thumbnail) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "only {} of {unique} photos stored (with thumbnails) in 15 min",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    edge.stop().await;
    let listed = list_all(&mut images, &fleet.farm_id).await?;
    let originals = stored_bytes(&s3.bucket_dir, "images");
    let thumbnails = stored_bytes(&s3.bucket_dir, "thumbnails");
    let stored = originals + thumbnails;
    emit(serde_json::json!({
        "benchmark": "image_storage", "machine": machine(), "cameras": cameras, "hours": hours,
        "photos_delivered": delivered, "photos_stored": listed.len(),
        "produced_bytes": produced_bytes,
        "produced_jpeg": by_format.get("jpg"), "produced_png": by_format.get("png"),
        "stored_original_bytes": originals, "stored_thumbnail_bytes": thumbnails,
        "bytes_per_photo_produced": produced_bytes / delivered as u64,
        "bytes_per_photo_stored": stored / listed.len().max(1) as u64,
        "stored_to_produced_ratio": (stored as f64 / produced_bytes as f64 * 1000.0).round() / 1000.0,
        "seconds": elapsed.as_secs(),
    }));
    cloud.stop().await;
    Ok(())
}
