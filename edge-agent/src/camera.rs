//! The camera service: takes photos from each configured camera's source and puts them in the spool's image area,
//! from where the image uplink sends them. Sources: a directory another program drops complete files into (taken
//! as they appear), an HTTP snapshot URL (most IP cameras) or a command whose standard output is the photo
//! (`libcamera-still -n -o -` on a Pi camera, `fswebcam -` or `v4l2-ctl` on a V4L2 webcam), the last two on a
//! schedule. Raw frames (PNG) can be re-encoded to JPEG; JPEG and WebP photos are kept as they come unless told
//! otherwise, since re-encoding an already compressed photo can make it larger and always loses detail.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use smartfarm_core::media::{describe_non_image, sniff_image};

use crate::config::{CameraConfig, EdgeConfig, Reencode};
use crate::image_spool::ImageSpool;
use crate::ingest::LocalAlert;

/// Names a writer gives a file it has not finished; such files are left alone until renamed.
const UNFINISHED_SUFFIXES: &[&str] = &[".tmp", ".part", ".partial", ".crdownload", ".swp"];
/// The largest photo a source may deliver.
const MAX_PHOTO_BYTES: u64 = 64 << 20;

/// Why a capture did not produce a spooled photo.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("not an image ({0}); accepted: JPEG, PNG, WebP")]
    NotAnImage(String),
    #[error("cannot re-encode the photo: {0}")]
    Reencode(String),
    #[error("the source failed: {0}")]
    Source(String),
    #[error("cannot write the photo to the spool: {0}")]
    Spool(std::io::Error),
    /// The spool will never take this photo (too large for it): trying again does not help.
    #[error("the spool refuses the photo: {0}")]
    Refused(String),
}

/// What the capture tasks share.
#[derive(Clone)]
pub struct Cameras {
    spool: Arc<ImageSpool>,
    reencode: Reencode,
    quality: u8,
    reencode_jpeg: bool,
    /// Wakes the image uplink when a photo arrives.
    pub photo_spooled: Arc<Notify>,
    alerts: mpsc::UnboundedSender<LocalAlert>,
    /// Where new photos go for diagnosis on the farm, when the agent diagnoses (a full queue skips one): the
    /// camera, the capture time (as uploaded, so the farm's and the cloud's alerts on the photo are one) and the bytes.
    pub diagnosis: Option<mpsc::Sender<(Uuid, SystemTime, Vec<u8>)>>,
}

impl Cameras {
    pub fn new(config: &EdgeConfig, spool: Arc<ImageSpool>, alerts: mpsc::UnboundedSender<LocalAlert>) -> Cameras {
        Cameras {
            spool,
            reencode: config.reencode,
            quality: config.reencode_quality,
            reencode_jpeg: config.reencode_jpeg,
            photo_spooled: Arc::new(Notify::new()),
            alerts,
            diagnosis: None,
        }
    }

    /// Checks, maybe re-encodes, and spools one photo. Returns whether it was new.
    pub async fn accept(
        &self,
        device_id: Uuid,
        capture_time: SystemTime,
        bytes: Vec<u8>,
    ) -> Result<bool, CaptureError> {
        let content_type = sniff_image(&bytes).ok_or_else(|| CaptureError::NotAnImage(describe_non_image(&bytes)))?;
        let this = self.clone();
        let for_diagnosis = self.diagnosis.as_ref().map(|_| bytes.clone());
        let put = tokio::task::spawn_blocking(move || {
            let (content_type, bytes) = this.maybe_reencode(content_type, bytes)?;
            this.spool.put(device_id, capture_time, content_type, &bytes).map_err(|error| match error.kind() {
                std::io::ErrorKind::InvalidInput => CaptureError::Refused(error.to_string()),
                _ => CaptureError::Spool(error),
            })
        })
        .await
        .map_err(|error| CaptureError::Source(format!("the capture worker failed: {error}")))??;
        if !put.dropped.is_empty() {
            metrics::counter!("smartfarm_edge_images_dropped_total").increment(put.dropped.len() as u64);
            let bytes = put.dropped.iter().map(|photo| photo.size_bytes).sum();
            tracing::error!(dropped = put.dropped.len(), bytes, "image spool over its cap: dropped the oldest photos");
            let _ =
                self.alerts.send(LocalAlert::ImageSpoolOverflow { dropped_photos: put.dropped.len() as u64, bytes });
        }
        if put.stored {
            metrics::counter!("smartfarm_edge_images_captured_total").increment(1);
            self.photo_spooled.notify_one();
            if let (Some(diagnosis), Some(bytes)) = (&self.diagnosis, for_diagnosis)
                && diagnosis.try_send((device_id, capture_time, bytes)).is_err()
            {
                metrics::counter!("smartfarm_edge_photos_not_diagnosed_total").increment(1);
                tracing::warn!(%device_id, "the diagnosis queue is full: this photo is not diagnosed on the farm");
            }
        }
        Ok(put.stored)
    }

    fn maybe_reencode(
        &self,
        content_type: &'static str,
        bytes: Vec<u8>,
    ) -> Result<(&'static str, Vec<u8>), CaptureError> {
        let wanted = match (self.reencode, content_type) {
            (Reencode::Keep, _) => false,
            (Reencode::Jpeg, "image/png") => true,
            (Reencode::Jpeg, _) => self.reencode_jpeg,
        };
        if !wanted {
            return Ok((content_type, bytes));
        }
        let format = match content_type {
            "image/png" => image::ImageFormat::Png,
            "image/webp" => image::ImageFormat::WebP,
            _ => image::ImageFormat::Jpeg,
        };
        let decoded = image::ImageReader::with_format(Cursor::new(&bytes), format)
            .decode()
            .map_err(|error| CaptureError::Reencode(error.to_string()))?
            .into_rgb8();
        let mut encoded = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, self.quality)
            .encode_image(&decoded)
            .map_err(|error| CaptureError::Reencode(error.to_string()))?;
        Ok(("image/jpeg", encoded))
    }

    /// Runs one camera's source until `stopping` turns true.
    pub async fn run(self, camera: CameraConfig, poll_interval: Duration, mut stopping: watch::Receiver<bool>) {
        let device_id = camera.device_id;
        if let Some(dir) = &camera.dir {
            if let Err(error) = std::fs::create_dir_all(dir) {
                tracing::error!(%device_id, dir = %dir.display(), %error, "cannot create the camera directory");
            }
            let mut ticks = tokio::time::interval(poll_interval);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopping.wait_for(|stop| *stop) => return,
                }
                if let Err(error) = self.take_dir(device_id, dir, poll_interval).await {
                    tracing::warn!(%device_id, dir = %dir.display(), %error, "camera directory scan failed");
                }
            }
        }
        let mut ticks = tokio::time::interval(camera.interval);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let capture_time = SystemTime::now();
            let bytes = match (&camera.http_url, &camera.command) {
                (Some(url), _) => http_snapshot(url).await,
                (None, Some(command)) => run_command(command).await,
                (None, None) => return,
            };
            let result = match bytes {
                Ok(bytes) => self.accept(device_id, capture_time, bytes).await.map(drop),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                metrics::counter!("smartfarm_edge_image_captures_failed_total").increment(1);
                tracing::warn!(%device_id, %error, "capture failed; trying again at the next interval");
            }
        }
    }

    /// Takes every complete file in a camera directory: spooled ones are removed from it, non-images are moved to
    /// its `rejected/` subdirectory.
    async fn take_dir(&self, device_id: Uuid, dir: &Path, settle: Duration) -> std::io::Result<()> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || UNFINISHED_SUFFIXES.iter().any(|suffix| name.ends_with(suffix)) {
                continue;
            }
            let metadata = entry.metadata()?;
            if !metadata.is_file() {
                continue;
            }
            let modified = metadata.modified()?;
            // A file written in place (not renamed in) is left until it has not changed for a poll interval.
            if SystemTime::now().duration_since(modified).unwrap_or_default() < settle {
                continue;
            }
            files.push((modified, entry.path(), metadata.len()));
        }
        files.sort();
        for (modified, path, size) in files {
            if size > MAX_PHOTO_BYTES {
                self.reject(&path, &format!("{size} bytes is over the {MAX_PHOTO_BYTES}-byte limit"));
                continue;
            }
            let bytes = tokio::fs::read(&path).await?;
            match self.accept(device_id, modified, bytes).await {
                Ok(_) => tokio::fs::remove_file(&path).await?,
                Err(CaptureError::Spool(error)) => return Err(error),
                Err(error) => self.reject(&path, &error.to_string()),
            }
        }
        Ok(())
    }

    fn reject(&self, path: &Path, reason: &str) {
        metrics::counter!("smartfarm_edge_images_rejected_total").increment(1);
        let target = path.parent().map(|dir| dir.join("rejected")).unwrap_or_else(|| PathBuf::from("rejected"));
        let moved = std::fs::create_dir_all(&target)
            .and_then(|()| std::fs::rename(path, target.join(path.file_name().unwrap_or_default())));
        match moved {
            Ok(()) => tracing::warn!(file = %path.display(), reason, "camera file rejected; moved to rejected/"),
            Err(error) => {
                tracing::error!(file = %path.display(), reason, %error, "camera file rejected and cannot be moved")
            }
        }
    }
}

/// Runs a capture command; its standard output is the photo, at most [`MAX_PHOTO_BYTES`]: a command that streams
/// (a video device read without a frame count) is stopped there instead of filling the Pi's memory.
async fn run_command(command: &[String]) -> Result<Vec<u8>, CaptureError> {
    run_command_within(command, Duration::from_secs(60), MAX_PHOTO_BYTES).await
}

async fn run_command_within(command: &[String], limit: Duration, max_bytes: u64) -> Result<Vec<u8>, CaptureError> {
    /// What is kept of the command's standard error, for the log.
    const MAX_STDERR_BYTES: usize = 4096;
    let (program, arguments) = command.split_first().ok_or_else(|| CaptureError::Source("empty command".into()))?;
    let mut child = tokio::process::Command::new(program)
        .args(arguments)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| CaptureError::Source(format!("cannot run {program}: {error}")))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(CaptureError::Source(format!("{program}: no output pipes")));
    };
    // The standard error is read to its end (a command blocked on a full pipe would never finish), but only its
    // start is kept; the task ends when the command does.
    let errors = tokio::spawn(async move {
        let (mut kept, mut chunk) = (Vec::new(), [0u8; 4096]);
        while let Ok(read @ 1..) = stderr.read(&mut chunk).await {
            let room = MAX_STDERR_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..read.min(room)]);
        }
        kept
    });
    let run = async {
        let mut photo = Vec::new();
        stdout
            .take(max_bytes + 1)
            .read_to_end(&mut photo)
            .await
            .map_err(|error| CaptureError::Source(format!("cannot read what {program} printed: {error}")))?;
        if photo.len() as u64 > max_bytes {
            return Err(CaptureError::Source(format!("{program} printed more than the {max_bytes}-byte limit")));
        }
        let status =
            child.wait().await.map_err(|error| CaptureError::Source(format!("{program} did not finish: {error}")))?;
        if !status.success() {
            let errors = errors.await.unwrap_or_default();
            let errors = String::from_utf8_lossy(&errors);
            return Err(CaptureError::Source(format!("{program} failed ({status}): {}", errors.trim())));
        }
        Ok(photo)
    };
    // Past the limit, or over the size, the command is killed as its handle is dropped.
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| CaptureError::Source(format!("{program} took longer than {} s", limit.as_secs())))?
}

/// Fetches a snapshot over plain HTTP/1.0 (what IP cameras on a farm's LAN speak; HTTP/1.0 means no chunked
/// bodies and the connection closes at the end). Basic credentials may be given as `http://user:pass@host/path`.
async fn http_snapshot(url: &str) -> Result<Vec<u8>, CaptureError> {
    let source = |reason: String| CaptureError::Source(reason);
    let rest = url.strip_prefix("http://").ok_or_else(|| source(format!("{url} is not an http:// URL")))?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let (credentials, host) = match authority.rsplit_once('@') {
        Some((credentials, host)) => (Some(credentials), host),
        None => (None, authority),
    };
    let address = if host.contains(':') { host.to_string() } else { format!("{host}:80") };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&address).await?;
        let mut request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: smartfarm-edge\r\n");
        if let Some(credentials) = credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(MAX_PHOTO_BYTES + 64 * 1024).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| source(format!("{host} did not answer within 30 s")))?
        .map_err(|error| source(format!("{host}: {error}")))?;
    let end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| source(format!("{host} sent no HTTP headers")))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(source(format!("{host} answered {status:?}")));
    }
    let body = &response[end + 4..];
    if body.len() as u64 > MAX_PHOTO_BYTES {
        return Err(source(format!("{host} sent a snapshot over the {MAX_PHOTO_BYTES}-byte limit")));
    }
    let declared = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
    });
    if let Some(declared) = declared
        && declared != body.len()
    {
        return Err(source(format!("{host} sent {} of the {declared} bytes it announced", body.len())));
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 80]));
        let mut bytes = Vec::new();
        image.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        bytes
    }

    fn cameras(dir: &Path, reencode: Reencode) -> (Cameras, mpsc::UnboundedReceiver<LocalAlert>) {
        let (alerts, receiver) = mpsc::unbounded_channel();
        let config = EdgeConfig { reencode, ..Default::default() };
        (Cameras::new(&config, Arc::new(ImageSpool::open(dir, 1 << 30, true).unwrap()), alerts), receiver)
    }

    /// A capture command's output is its photo, up to the size limit: one that prints more (a stream) is stopped
    /// there with the reason, and a failing one reports its standard error.
    #[tokio::test]
    async fn capture_commands_are_held_to_the_size_limit() {
        let command = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let photo = run_command_within(&command("printf photo"), Duration::from_secs(10), 1000).await.unwrap();
        assert_eq!(photo, b"photo");
        let started = std::time::Instant::now();
        let error = run_command_within(&command("yes"), Duration::from_secs(10), 1000).await.unwrap_err();
        assert!(error.to_string().contains("more than the 1000-byte limit"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5), "stopped at the limit, not at the timeout");
        let error = run_command_within(&command("echo no camera >&2; exit 3"), Duration::from_secs(10), 1000)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no camera"), "{error}");
    }

    #[tokio::test]
    async fn raw_frames_are_reencoded_and_jpegs_kept_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let (cameras, _alerts) = cameras(dir.path(), Reencode::Jpeg);
        let camera = Uuid::now_v7();
        let raw = png(320, 240);
        assert!(cameras.accept(camera, SystemTime::now(), raw.clone()).await.unwrap());
        let spooled = cameras.spool.pending().unwrap();
        assert_eq!(spooled[0].content_type, "image/jpeg");
        let jpeg = cameras.spool.read(&spooled[0]).unwrap().unwrap();
        assert_eq!(sniff_image(&jpeg), Some("image/jpeg"));
        assert!(cameras.accept(camera, SystemTime::now(), jpeg.clone()).await.is_ok());
        let kept = cameras.spool.pending().unwrap();
        assert!(kept.iter().any(|photo| photo.sha256 == hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&jpeg))));
        let error = cameras.accept(camera, SystemTime::now(), b"not a photo".to_vec()).await.unwrap_err();
        assert!(error.to_string().contains("not an image (text)"), "{error}");
    }

    #[tokio::test]
    async fn a_camera_directory_yields_complete_files_and_rejects_the_rest() {
        let spool_dir = tempfile::tempdir().unwrap();
        let drop_dir = tempfile::tempdir().unwrap();
        let (cameras, _alerts) = cameras(spool_dir.path(), Reencode::Keep);
        let camera = Uuid::now_v7();
        std::fs::write(drop_dir.path().join("a.png"), png(8, 8)).unwrap();
        std::fs::write(drop_dir.path().join("b.png.part"), png(9, 9)).unwrap();
        std::fs::write(drop_dir.path().join(".hidden.png"), png(10, 10)).unwrap();
        std::fs::write(drop_dir.path().join("notes.txt"), "hello").unwrap();
        cameras.take_dir(camera, drop_dir.path(), Duration::ZERO).await.unwrap();
        assert_eq!(cameras.spool.pending().unwrap().len(), 1);
        assert!(!drop_dir.path().join("a.png").exists(), "taken");
        assert!(drop_dir.path().join("b.png.part").exists(), "unfinished: left alone");
        assert!(drop_dir.path().join(".hidden.png").exists(), "hidden: left alone");
        assert!(drop_dir.path().join("rejected/notes.txt").exists(), "not an image: set aside");
    }

    #[tokio::test]
    async fn http_snapshots_are_fetched_with_basic_credentials() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let photo = png(4, 4);
        let body = photo.clone();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n").await.unwrap();
            stream.write_all(&body).await.unwrap();
            request
        });
        let bytes = http_snapshot(&format!("http://farmer:secret@{address}/snapshot.png")).await.unwrap();
        assert_eq!(bytes, photo);
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /snapshot.png HTTP/1.0\r\n"), "{request}");
        assert!(request.contains("Authorization: Basic ZmFybWVyOnNlY3JldA=="), "{request}");
        let error = http_snapshot("https://camera/snapshot").await.unwrap_err();
        assert!(error.to_string().contains("not an http:// URL"), "{error}");

        // A connection that drops mid-photo is not a photo.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let _ = stream.read(&mut request).await.unwrap();
            stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5000\r\n\r\n").await.unwrap();
            stream.write_all(&photo[..100]).await.unwrap();
        });
        let error = http_snapshot(&format!("http://{address}/snapshot.png")).await.unwrap_err();
        assert!(error.to_string().contains("sent 100 of the 5000 bytes it announced"), "{error}");
    }

    #[tokio::test]
    async fn simulated_camera_shots_are_distinct_photos() {
        let dir = tempfile::tempdir().unwrap();
        let (cameras, _alerts) = cameras(dir.path(), Reencode::Jpeg);
        let camera = Uuid::now_v7();
        for shot in [0, 41, 123] {
            assert!(cameras.accept(camera, SystemTime::now(), crate::sim::camera_shot(shot)).await.unwrap());
        }
        assert_eq!(cameras.spool.pending().unwrap().len(), 3, "shots alike in light differ in their number");
    }

    #[tokio::test]
    async fn capture_commands_deliver_their_output() {
        let bytes = run_command(&["printf".into(), "\\377\\330\\377\\340".into()]).await.unwrap();
        assert_eq!(sniff_image(&bytes), Some("image/jpeg"));
        let error = run_command(&["false".into()]).await.unwrap_err();
        assert!(error.to_string().contains("false failed"), "{error}");
    }
}
