//! Blobs in an S3-compatible object store (AWS S3, MinIO, Garage, s3s): the backend for several replicas, since
//! every replica sees the same bucket. An object is durable once S3 answers the PUT.
//!
//! URL: `s3://[ACCESS_KEY:SECRET_KEY@]BUCKET[/PREFIX][?endpoint=URL&region=REGION&path_style=true|false]`.
//! Credentials not in the URL come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
//! With a custom `endpoint` (MinIO and the like) path-style addressing is the default; on AWS it is virtual-hosted.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{MetadataDirective, StorageClass};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use smartfarm_core::{Error, Result};

use super::{BlobStore, check_key};

/// Where and how to reach the bucket, as parsed from an `s3://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Prepended to every key, without a trailing slash; empty for the bucket's root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// Parses an `s3://` URL; credentials missing from it are read from the `AWS_*` environment variables.
    pub fn from_url(url: &str) -> Result<S3Settings> {
        let invalid = |reason: String| Error::invalid("blob_url", reason);
        let rest = url.strip_prefix("s3://").ok_or_else(|| invalid("an s3 url starts with s3://".into()))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (credentials, location) = match location.rsplit_once('@') {
            Some((credentials, location)) => (Some(credentials), location),
            None => (None, location),
        };
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(invalid(format!("{bucket:?} is not an s3 bucket name (3 to 63 of a-z, 0-9, '-', '.')")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix).map_err(|_| invalid(format!("{prefix:?} is not a valid key prefix")))?;
        }

        let mut endpoint = None;
        let mut region = None;
        let mut path_style = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "endpoint" => endpoint = Some(value.to_string()),
                "region" => region = Some(value.to_string()),
                "path_style" => {
                    path_style =
                        Some(value.parse::<bool>().map_err(|_| invalid("path_style must be true or false".into()))?)
                }
                other => {
                    return Err(invalid(format!("unknown s3 url parameter {other:?} (endpoint, region, path_style)")));
                }
            }
        }
        if let Some(endpoint) = endpoint.as_ref().filter(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(invalid(format!("endpoint {endpoint:?} must start with http:// or https://")));
        }

        let (access_key_id, secret_access_key, session_token) = match credentials {
            Some(credentials) => {
                let (key, secret) = credentials
                    .split_once(':')
                    .ok_or_else(|| invalid("credentials in an s3 url are ACCESS_KEY:SECRET_KEY@".into()))?;
                (key.to_string(), secret.to_string(), None)
            }
            None => {
                let key = std::env::var("AWS_ACCESS_KEY_ID").ok();
                let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
                match (key, secret) {
                    (Some(key), Some(secret)) => (key, secret, std::env::var("AWS_SESSION_TOKEN").ok()),
                    _ => {
                        return Err(invalid(
                            "s3 needs credentials: put ACCESS_KEY:SECRET_KEY@ in the url or set AWS_ACCESS_KEY_ID and \
                             AWS_SECRET_ACCESS_KEY"
                                .into(),
                        ));
                    }
                }
            }
        };
        Ok(S3Settings {
            bucket: bucket.to_string(),
            prefix,
            path_style: path_style.unwrap_or(endpoint.is_some()),
            endpoint,
            region: region.or_else(|| std::env::var("AWS_REGION").ok()).unwrap_or_else(|| "us-east-1".to_string()),
            access_key_id,
            secret_access_key,
            session_token,
        })
    }
}

/// A bucket (and prefix) of an S3-compatible store.
#[derive(Clone, Debug)]
pub struct S3BlobStore {
    client: Client,
    settings: S3Settings,
}

impl S3BlobStore {
    /// Connects and checks that the bucket exists, so a wrong URL fails at start with a clear message.
    pub async fn connect(settings: S3Settings) -> Result<S3BlobStore> {
        let http_client =
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
                settings.session_token.clone(),
                None,
                "smartfarm-blob-url",
            ))
            .force_path_style(settings.path_style)
            // Checksums only where S3 requires them: several S3-compatible stores reject the newer defaults.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            )
            .http_client(http_client);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint.clone());
        }
        let store = S3BlobStore { client: Client::from_conf(config.build()), settings };
        match store.client.head_bucket().bucket(&store.settings.bucket).send().await {
            Ok(_) => Ok(store),
            Err(SdkError::ServiceError(error)) if error.err().is_not_found() => {
                Err(Error::invalid("blob_url", format!("the s3 bucket {:?} does not exist", store.settings.bucket)))
            }
            Err(SdkError::ServiceError(error)) if matches!(error.raw().status().as_u16(), 401 | 403) => {
                Err(Error::invalid("blob_url", format!("{} refused the credentials", store.describe())))
            }
            Err(error) => Err(store.sdk_error("reach the s3 bucket", error)),
        }
    }

    fn object_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(if self.settings.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.settings.prefix) })
    }

    fn sdk_error<E, R>(&self, context: &str, error: SdkError<E, R>) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        match &error {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                tracing::warn!(store = %self.describe(), error = %aws_sdk_s3::error::DisplayErrorContext(&error), "s3 unreachable");
                Error::Unavailable(format!("the blob store {} cannot be reached ({context})", self.describe()))
            }
            _ => Error::internal(format!("{context} on {}", self.describe()), anyhow_from(error)),
        }
    }
}

/// SDK errors carry their details in a chain that `{}` does not show; keep the whole context for the log.
fn anyhow_from<E, R>(error: SdkError<E, R>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(&error))
}

#[async_trait::async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let object_key = self.object_key(key)?;
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(&object_key)
            .body(ByteStream::from(bytes.to_vec()))
            .send()
            .await
            .map_err(|error| self.sdk_error("put object", error))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let object_key = self.object_key(key)?;
        let output = match self.client.get_object().bucket(&self.settings.bucket).key(&object_key).send().await {
            Ok(output) => output,
            Err(SdkError::ServiceError(error)) if error.err().is_no_such_key() => {
                return Err(Error::not_found("blob", key));
            }
            Err(error) => return Err(self.sdk_error("get object", error)),
        };
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|error| Error::Unavailable(format!("reading blob {key} was cut short: {error}")))?;
        Ok(bytes.into_bytes().to_vec())
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let object_key = self.object_key(key)?;
        match self.client.head_object().bucket(&self.settings.bucket).key(&object_key).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(error)) if error.err().is_not_found() => Ok(false),
            Err(error) => Err(self.sdk_error("head object", error)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let object_key = self.object_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|error| self.sdk_error("delete object", error))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let store_prefix =
            if self.settings.prefix.is_empty() { String::new() } else { format!("{}/", self.settings.prefix) };
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(format!("{store_prefix}{prefix}"))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| self.sdk_error("list objects", error))?;
            for object in page.contents() {
                if let Some(key) = object.key().and_then(|key| key.strip_prefix(&store_prefix)) {
                    keys.push(key.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn presigned_url(&self, key: &str, expires_in: Duration) -> Result<Option<String>> {
        let object_key = self.object_key(key)?;
        let presigning = PresigningConfig::expires_in(expires_in)
            .map_err(|error| Error::invalid("expires_in", format!("cannot presign for {expires_in:?}: {error}")))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(&object_key)
            .presigned(presigning)
            .await
            .map_err(|error| self.sdk_error("presign a get", error))?;
        Ok(Some(request.uri().to_string()))
    }

    async fn set_storage_class(&self, key: &str, storage_class: &str) -> Result<()> {
        let object_key = self.object_key(key)?;
        // S3 changes an object's class by copying it onto itself with the new class.
        self.client
            .copy_object()
            .bucket(&self.settings.bucket)
            .key(&object_key)
            .copy_source(format!("{}/{object_key}", self.settings.bucket))
            .storage_class(StorageClass::from(storage_class))
            .metadata_directive(MetadataDirective::Copy)
            .send()
            .await
            .map_err(|error| self.sdk_error("change storage class", error))?;
        Ok(())
    }

    fn describe(&self) -> String {
        let location = if self.settings.prefix.is_empty() {
            self.settings.bucket.clone()
        } else {
            format!("{}/{}", self.settings.bucket, self.settings.prefix)
        };
        match &self.settings.endpoint {
            Some(endpoint) => format!("s3://{location} at {endpoint}"),
            None => format!("s3://{location} ({})", self.settings.region),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_credentials_endpoint_and_prefix() {
        let settings = S3Settings::from_url(
            "s3://key:secret@farm-photos/prod/images?endpoint=http://127.0.0.1:9000&region=eu-west-3",
        )
        .unwrap();
        assert_eq!(settings.bucket, "farm-photos");
        assert_eq!(settings.prefix, "prod/images");
        assert_eq!(settings.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(settings.region, "eu-west-3");
        assert!(settings.path_style, "a custom endpoint defaults to path-style");
        assert_eq!((settings.access_key_id.as_str(), settings.secret_access_key.as_str()), ("key", "secret"));
        assert!(!format!("{settings:?}").contains("secret\""), "debug output hides the secret");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, expected) in [
            ("s3://k:s@Bad_Bucket", "is not an s3 bucket name"),
            ("s3://k:s@ok-bucket?endpoint=ftp://x", "must start with http"),
            ("s3://k:s@ok-bucket?colour=blue", "unknown s3 url parameter"),
            ("s3://k:s@ok-bucket?path_style=maybe", "path_style must be true or false"),
            ("s3://k:s@ok-bucket/../etc", "not a valid key prefix"),
        ] {
            let error = S3Settings::from_url(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
