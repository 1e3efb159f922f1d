//! The spool's image area: photos waiting to go up, one file each under `SPOOL_DIR/images/`, named
//! `CAPTURE_MICROS-DEVICE-SHA256.EXT` so that the name alone says what the file is and sorting names sorts by
//! capture time. A photo is written to a temporary file, fsynced (unless the fsync policy is `never`), renamed
//! into place and the directory fsynced before its source is let go, the same rule readings follow. A photo leaves
//! only when the cloud has it. Past the size cap the oldest photos are dropped, counted and alerted.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A photo in the image area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledPhoto {
    pub path: PathBuf,
    pub device_id: Uuid,
    pub capture_time: SystemTime,
    pub sha256: String,
    pub content_type: &'static str,
    pub size_bytes: u64,
}

/// What [`ImageSpool::put`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    /// False when the same camera's same photo was already waiting.
    pub stored: bool,
    /// Photos the size cap dropped to make room.
    pub dropped: Vec<SpooledPhoto>,
}

/// The image area.
#[derive(Debug)]
pub struct ImageSpool {
    dir: PathBuf,
    max_bytes: u64,
    fsync: bool,
    /// Serialises writers with the cap's deletions; readers list the directory.
    lock: Mutex<()>,
}

fn extension_of(content_type: &str) -> Option<&'static str> {
    match content_type {
        "image/jpeg" => Some("jpg"),
        "image/png" => Some("png"),
        "image/webp" => Some("webp"),
        _ => None,
    }
}

fn content_type_of(extension: &str) -> Option<&'static str> {
    match extension {
        "jpg" => Some("image/jpeg"),
        "png" => Some("image/png"),
        "webp" => Some("image/webp"),
        _ => None,
    }
}

/// Parses a spooled file's name back into what it describes.
fn parse(path: &Path, size_bytes: u64) -> Option<SpooledPhoto> {
    let name = path.file_name()?.to_str()?;
    let (stem, extension) = name.rsplit_once('.')?;
    let mut parts = stem.splitn(3, '-');
    let micros: u64 = parts.next()?.parse().ok()?;
    let device_id = Uuid::try_parse(parts.next()?).ok()?;
    let sha256 = parts.next()?;
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(SpooledPhoto {
        path: path.to_path_buf(),
        device_id,
        capture_time: SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
        sha256: sha256.to_string(),
        content_type: content_type_of(extension)?,
        size_bytes,
    })
}

impl ImageSpool {
    /// Opens (creating if needed) the image area under `spool_dir`, removing temporary files a crash left.
    pub fn open(spool_dir: &Path, max_bytes: u64, fsync: bool) -> std::io::Result<ImageSpool> {
        let dir = spool_dir.join("images");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(ImageSpool { dir, max_bytes, fsync, lock: Mutex::new(()) })
    }

    /// The photos waiting, oldest capture first.
    pub fn pending(&self) -> std::io::Result<Vec<SpooledPhoto>> {
        let mut photos = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let metadata = match entry.metadata() {
                Ok(metadata) if metadata.is_file() => metadata,
                _ => continue,
            };
            if let Some(photo) = parse(&entry.path(), metadata.len()) {
                photos.push(photo);
            }
        }
        photos.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(photos)
    }

    /// Bytes and count of the photos waiting.
    pub fn stats(&self) -> (u64, usize) {
        let photos = self.pending().unwrap_or_default();
        (photos.iter().map(|photo| photo.size_bytes).sum(), photos.len())
    }

    /// Stores a photo durably. Returns once it is on disk (under the fsync policy).
    pub fn put(
        &self,
        device_id: Uuid,
        capture_time: SystemTime,
        content_type: &str,
        bytes: &[u8],
    ) -> std::io::Result<Put> {
        let extension = extension_of(content_type).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{content_type} is not a spooled type"))
        })?;
        // Kept, it would push every other waiting photo out of the area.
        if bytes.len() as u64 > self.max_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} bytes is more than the whole image area ({} bytes)", bytes.len(), self.max_bytes),
            ));
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let micros = capture_time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros();
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let duplicate = self.pending()?.into_iter().any(|photo| photo.device_id == device_id && photo.sha256 == sha256);
        if duplicate {
            return Ok(Put { stored: false, dropped: Vec::new() });
        }
        let name = format!("{micros:020}-{}-{sha256}.{extension}", device_id.simple());
        let temp = self.dir.join(format!(".tmp-{}", Uuid::now_v7().simple()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(bytes)?;
            if self.fsync {
                file.sync_all()?;
            }
            std::fs::rename(&temp, self.dir.join(&name))?;
            if self.fsync {
                std::fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        };
        if let Err(error) = write() {
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
        let dropped = self.enforce_cap(&name)?;
        Ok(Put { stored: true, dropped })
    }

    /// Drops the oldest photos (never `keep`, the one just written) while the area is over its cap.
    fn enforce_cap(&self, keep: &str) -> std::io::Result<Vec<SpooledPhoto>> {
        let photos = self.pending()?;
        let mut total: u64 = photos.iter().map(|photo| photo.size_bytes).sum();
        let mut dropped = Vec::new();
        for photo in photos {
            if total <= self.max_bytes {
                break;
            }
            if photo.path.file_name().and_then(|name| name.to_str()) == Some(keep) {
                continue;
            }
            std::fs::remove_file(&photo.path)?;
            total -= photo.size_bytes;
            dropped.push(photo);
        }
        Ok(dropped)
    }

    /// Reads a waiting photo; `None` if it is gone (sent, or dropped by the cap meanwhile).
    pub fn read(&self, photo: &SpooledPhoto) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&photo.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Lets go of a photo the cloud has.
    pub fn remove(&self, photo: &SpooledPhoto) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match std::fs::remove_file(&photo.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Moves a photo the cloud refused for good into `images/refused/`, where an operator can look at it.
    pub fn set_aside(&self, photo: &SpooledPhoto) -> std::io::Result<PathBuf> {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let refused = self.dir.join("refused");
        std::fs::create_dir_all(&refused)?;
        let target = refused.join(photo.path.file_name().unwrap_or_default());
        std::fs::rename(&photo.path, &target)?;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JPEG: &[u8] = &[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4];

    #[test]
    fn photos_are_kept_in_capture_order_once_each_and_the_cap_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = ImageSpool::open(dir.path(), 130, true).unwrap();
        let camera = Uuid::now_v7();
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        let photo = |n: u8| [JPEG, &[n; 32]].concat();
        assert!(spool.put(camera, at(20), "image/jpeg", &photo(2)).unwrap().stored);
        assert!(spool.put(camera, at(10), "image/jpeg", &photo(1)).unwrap().stored);
        assert!(!spool.put(camera, at(30), "image/jpeg", &photo(1)).unwrap().stored, "same camera, same bytes");
        assert!(spool.put(Uuid::now_v7(), at(30), "image/jpeg", &photo(1)).unwrap().stored, "another camera");
        let pending = spool.pending().unwrap();
        assert_eq!(pending.iter().map(|p| p.capture_time).collect::<Vec<_>>(), vec![at(10), at(20), at(30)]);
        assert_eq!(pending[0].device_id, camera);
        assert_eq!(pending[0].sha256, hex::encode(Sha256::digest(photo(1))));
        assert_eq!(spool.read(&pending[0]).unwrap().unwrap(), photo(1));

        // Four 40-byte photos are over the 130-byte cap: the oldest goes.
        let put = spool.put(camera, at(40), "image/jpeg", &photo(4)).unwrap();
        assert_eq!(put.dropped.len(), 1);
        assert_eq!(put.dropped[0].capture_time, at(10));
        assert_eq!(spool.pending().unwrap().len(), 3);

        spool.remove(&spool.pending().unwrap()[0]).unwrap();
        spool.remove(&spool.pending().unwrap()[0]).unwrap();
        let left = spool.pending().unwrap();
        assert_eq!(left.len(), 1);
        let aside = spool.set_aside(&left[0]).unwrap();
        assert!(aside.exists());
        assert!(spool.pending().unwrap().is_empty());
        assert!(spool.put(camera, at(1), "text/plain", b"hello").is_err());
    }

    /// A photo larger than the whole area is refused: kept, it would push every other waiting photo out.
    #[test]
    fn a_photo_larger_than_the_area_is_refused_and_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let spool = ImageSpool::open(dir.path(), 130, true).unwrap();
        let camera = Uuid::now_v7();
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        assert!(spool.put(camera, at(1), "image/jpeg", &[JPEG, &[1; 32]].concat()).unwrap().stored);
        let error = spool.put(camera, at(2), "image/jpeg", &[JPEG, &[2; 200]].concat()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("more than the whole image area"), "{error}");
        assert_eq!(spool.pending().unwrap().len(), 1, "the waiting photo stays");
    }
}
