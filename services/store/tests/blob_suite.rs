//! The behaviour every [`BlobStore`] backend must have, written once and run on `file://` and on a real
//! S3-compatible server (s3s-fs, started per test).

use smartfarm_core::Error;
use smartfarm_store::blob::{self, BlobStore};
use smartfarm_store::testing::TestS3;

async fn objects_round_trip(store: &dyn BlobStore) {
    assert!(!store.exists("images/ab/abcdef").await.unwrap());
    store.put("images/ab/abcdef", b"first").await.unwrap();
    assert!(store.exists("images/ab/abcdef").await.unwrap());
    assert_eq!(store.get("images/ab/abcdef").await.unwrap(), b"first");
    store.put("images/ab/abcdef", b"second").await.unwrap();
    assert_eq!(store.get("images/ab/abcdef").await.unwrap(), b"second");
    store.put("models/plant/1", b"weights").await.unwrap();
    assert_eq!(store.list("images/").await.unwrap(), vec!["images/ab/abcdef".to_string()]);
    assert_eq!(store.list("").await.unwrap().len(), 2);
    // A prefix that ends inside a name, and one that names a directory: only keys that start with it.
    store.put("uploads/ab/photo-1/000", b"part").await.unwrap();
    store.put("uploads/ac/photo-2/000", b"part").await.unwrap();
    assert_eq!(store.list("uploads/ab/").await.unwrap(), vec!["uploads/ab/photo-1/000".to_string()]);
    assert_eq!(store.list("uploads/a").await.unwrap().len(), 2);
    assert_eq!(store.list("uploads/ab/photo-1/0").await.unwrap(), vec!["uploads/ab/photo-1/000".to_string()]);
    store.delete("uploads/ab/photo-1/000").await.unwrap();
    store.delete("uploads/ac/photo-2/000").await.unwrap();
    store.delete("images/ab/abcdef").await.unwrap();
    store.delete("images/ab/abcdef").await.unwrap();
    assert!(matches!(store.get("images/ab/abcdef").await, Err(Error::NotFound { .. })));
}

async fn bad_keys_are_refused(store: &dyn BlobStore) {
    for key in ["", "../escape", "a//b", "/absolute", "a/./b", "spaces are bad", "a/"] {
        let error = store.put(key, b"x").await.unwrap_err();
        assert!(matches!(error, Error::InvalidArgument { .. }), "{key:?}: {error:?}");
    }
}

macro_rules! blob_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn objects_round_trip() {
                let (store, _guard) = $open.await;
                super::objects_round_trip(&*store).await;
            }

            #[tokio::test]
            async fn bad_keys_are_refused() {
                let (store, _guard) = $open.await;
                super::bad_keys_are_refused(&*store).await;
            }
        }
    };
}

async fn file_store() -> (std::sync::Arc<dyn BlobStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (blob::open(&format!("file://{}", dir.path().display())).await.unwrap(), dir)
}

async fn s3_store() -> (std::sync::Arc<dyn BlobStore>, TestS3) {
    let server = TestS3::start().await;
    (blob::open(&server.url).await.unwrap(), server)
}

async fn s3_store_with_prefix() -> (std::sync::Arc<dyn BlobStore>, TestS3) {
    let server = TestS3::start().await;
    let (base, query) = server.url.split_once('?').unwrap();
    (blob::open(&format!("{base}/farm-a/blobs?{query}")).await.unwrap(), server)
}

blob_suite!(file, file_store());

/// A temporary file that a write cut by a crash left is removed when the store opens again; one of a write that may
/// still be going on is left alone.
#[tokio::test]
async fn file_store_removes_what_interrupted_writes_left() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    blob::open(&url).await.unwrap();
    let (abandoned, recent) = (dir.path().join(".tmp/abandoned"), dir.path().join(".tmp/recent"));
    for path in [&abandoned, &recent] {
        std::fs::write(path, b"half a photo").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&abandoned).unwrap().set_modified(two_hours_ago).unwrap();
    let store = blob::open(&url).await.unwrap();
    assert!(!abandoned.exists(), "the abandoned temporary file is gone");
    assert!(recent.exists(), "a recent one may belong to a write in progress");
    assert!(store.list("").await.unwrap().is_empty(), "temporary files are never objects");
}
blob_suite!(s3, s3_store());
blob_suite!(s3_prefixed, s3_store_with_prefix());

#[tokio::test]
async fn s3_objects_live_under_the_prefix_byte_for_byte() {
    let server = TestS3::start().await;
    let (base, query) = server.url.split_once('?').unwrap();
    let store = blob::open(&format!("{base}/farm-a?{query}")).await.unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    store.put("images/ab/cdef", &bytes).await.unwrap();
    assert_eq!(std::fs::read(server.bucket_dir.join("farm-a/images/ab/cdef")).unwrap(), bytes);
    assert_eq!(store.get("images/ab/cdef").await.unwrap(), bytes);
}

#[tokio::test]
async fn s3_refuses_a_missing_bucket_a_wrong_secret_and_an_unreachable_endpoint() {
    let server = TestS3::start().await;
    let missing = server.url.replace(&format!("@{}", server.bucket), "@no-such-bucket");
    let error = blob::open(&missing).await.err().unwrap().to_string();
    assert!(error.contains("bucket \"no-such-bucket\" does not exist"), "{error}");

    let wrong_secret = server.url.replace("smartfarm-test-secret", "wrong");
    let error = blob::open(&wrong_secret).await.err().unwrap().to_string();
    assert!(error.contains("refused the credentials"), "{error}");

    let unreachable = "s3://k:s@some-bucket?endpoint=http://127.0.0.1:9";
    let error = blob::open(unreachable).await.err().unwrap();
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn s3_presigns_urls_and_changes_storage_classes_in_place() {
    let server = TestS3::start().await;
    let store = blob::open(&server.url).await.unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    store.put("images/ab/photo", &bytes).await.unwrap();

    let url = store.presigned_url("images/ab/photo", std::time::Duration::from_secs(60)).await.unwrap().unwrap();
    assert!(url.starts_with(&server.endpoint) && url.contains("X-Amz-Signature="), "{url}");
    assert_eq!(plain_get(&url).await, bytes, "anyone holding the URL reads the object");

    store.set_storage_class("images/ab/photo", "STANDARD_IA").await.unwrap();
    assert_eq!(store.get("images/ab/photo").await.unwrap(), bytes, "the object is unchanged by its new class");
}

#[tokio::test]
async fn local_files_have_no_presigned_urls_or_storage_classes() {
    let (store, _dir) = file_store().await;
    store.put("images/ab/photo", b"x").await.unwrap();
    assert_eq!(store.presigned_url("images/ab/photo", std::time::Duration::from_secs(60)).await.unwrap(), None);
    let error = store.set_storage_class("images/ab/photo", "GLACIER_IR").await.unwrap_err();
    assert!(matches!(error, Error::FailedPrecondition(_)), "{error:?}");
}

/// A plain HTTP GET of a URL on 127.0.0.1, as a browser holding a presigned URL would make it.
async fn plain_get(url: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    response[end + 4..].to_vec()
}

#[tokio::test]
async fn unknown_blob_urls_are_refused_with_a_reason() {
    let error = blob::open("ftp://x").await.err().unwrap().to_string();
    assert!(error.contains("not a blob url"), "{error}");
    let error = blob::open("file://").await.err().unwrap().to_string();
    assert!(error.contains("needs a directory"), "{error}");
}
