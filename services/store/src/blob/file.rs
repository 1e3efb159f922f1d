//! Blobs as files under a directory: the embedded default. Writes go to a temporary file in the same directory,
//! are fsynced, then renamed over the final name and the directory is fsynced, so a crash leaves either the old
//! object or the new one, never a torn one.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use smartfarm_core::{Error, Result};

use super::{BlobStore, check_key};

/// Where temporary files are written; never listed as objects.
const TEMP_DIR: &str = ".tmp";

/// A temporary file older than this is what a write cut by a crash left: removed when the store opens. (No write
/// takes this long; another process writing to the same directory is not cut short.)
const ABANDONED_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A directory of blobs.
#[derive(Clone, Debug)]
pub struct FileBlobStore {
    root: PathBuf,
}

impl FileBlobStore {
    /// Opens (creating if needed) the directory, and removes the temporary files that writes cut by a crash left.
    pub async fn open(root: &Path) -> Result<FileBlobStore> {
        let temp = root.join(TEMP_DIR);
        tokio::fs::create_dir_all(&temp)
            .await
            .map_err(|error| Error::Unavailable(format!("cannot create blob directory {}: {error}", root.display())))?;
        let removed = tokio::task::spawn_blocking(move || remove_abandoned(&temp))
            .await
            .map_err(|error| Error::internal("clean the blob directory", error))?;
        if removed > 0 {
            tracing::info!(removed, "removed temporary files left by interrupted blob writes");
        }
        Ok(FileBlobStore { root: root.to_path_buf() })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// Removes the files in `temp` older than [`ABANDONED_TEMP_AGE`]; returns how many. Best effort: what cannot be read
/// or removed stays for the next start.
fn remove_abandoned(temp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp) else { return 0 };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .is_ok_and(|modified| now.duration_since(modified).is_ok_and(|age| age > ABANDONED_TEMP_AGE));
        if old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether the directory at `relative` (below the root) can hold keys that start with `prefix`: the listing walks
/// only those, not the whole store.
fn may_hold(relative: &Path, prefix: &str) -> bool {
    let Some(directory) = relative.to_str() else { return false };
    let directory = format!("{directory}/");
    prefix.starts_with(&directory) || directory.starts_with(prefix)
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |error| Error::internal(context, error)
}

#[async_trait::async_trait]
impl BlobStore for FileBlobStore {
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path_of(key)?;
        let directory = path.parent().expect("a key path is below the root").to_path_buf();
        tokio::fs::create_dir_all(&directory).await.map_err(io_error(format!("create {}", directory.display())))?;
        let temp = self.root.join(TEMP_DIR).join(uuid::Uuid::now_v7().simple().to_string());
        let mut file = tokio::fs::File::create(&temp).await.map_err(io_error(format!("create {}", temp.display())))?;
        file.write_all(bytes).await.map_err(io_error(format!("write {}", temp.display())))?;
        file.sync_all().await.map_err(io_error(format!("sync {}", temp.display())))?;
        drop(file);
        if let Err(error) = tokio::fs::rename(&temp, &path).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(Error::internal(format!("rename into {}", path.display()), error));
        }
        let directory_handle =
            tokio::fs::File::open(&directory).await.map_err(io_error(format!("open {}", directory.display())))?;
        directory_handle.sync_all().await.map_err(io_error(format!("sync {}", directory.display())))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(Error::not_found("blob", key)),
            Err(error) => Err(Error::internal(format!("read {}", path.display()), error)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key)?;
        tokio::fs::try_exists(&path).await.map_err(io_error(format!("stat {}", path.display())))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(Error::internal(format!("delete {}", path.display()), error)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            let mut pending = vec![root.clone()];
            while let Some(directory) = pending.pop() {
                let entries =
                    std::fs::read_dir(&directory).map_err(io_error(format!("list {}", directory.display())))?;
                for entry in entries {
                    let entry = entry.map_err(io_error(format!("list {}", directory.display())))?;
                    let path = entry.path();
                    let relative = path.strip_prefix(&root).expect("entries are below the root");
                    if relative == Path::new(TEMP_DIR) {
                        continue;
                    }
                    let file_type = entry.file_type().map_err(io_error(format!("stat {}", path.display())))?;
                    if file_type.is_dir() {
                        if may_hold(relative, &prefix) {
                            pending.push(path);
                        }
                    } else if let Some(key) = relative.to_str().filter(|key| key.starts_with(&prefix)) {
                        keys.push(key.to_string());
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
        .map_err(|error| Error::internal("list blobs", error))?
    }

    async fn presigned_url(&self, key: &str, _expires_in: std::time::Duration) -> Result<Option<String>> {
        check_key(key)?;
        Ok(None)
    }

    async fn set_storage_class(&self, _key: &str, storage_class: &str) -> Result<()> {
        Err(Error::FailedPrecondition(format!(
            "local blob storage has no storage classes (asked for {storage_class:?}); use an s3:// blob url"
        )))
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}
