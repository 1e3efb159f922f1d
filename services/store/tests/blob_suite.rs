//! The behaviour every [`BlobStore`] backend must have. Only `file://` exists so far; the S3 backend joins this
//! suite when the images capability builds it.

use smartfarm_core::Error;
use smartfarm_store::blob::{self, BlobStore};

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

#[tokio::test]
async fn file_objects_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = blob::open(&format!("file://{}", dir.path().display())).await.unwrap();
    objects_round_trip(&*store).await;
}

#[tokio::test]
async fn file_bad_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = blob::open(&format!("file://{}", dir.path().display())).await.unwrap();
    bad_keys_are_refused(&*store).await;
}

#[tokio::test]
async fn unknown_blob_urls_are_refused_with_a_reason() {
    let error = blob::open("ftp://x").await.err().unwrap().to_string();
    assert!(error.contains("not a blob url"), "{error}");
    let error = blob::open("s3://bucket/prefix").await.err().unwrap().to_string();
    assert!(error.contains("images capability"), "{error}");
}
