//! URLs that fetch a photo without gRPC or a credential, for browsers' `<img src>`: on S3 a presigned URL, on local
//! storage a route of this server whose query carries an expiry and an HMAC-SHA256 signature over the image, the
//! variant and the expiry. The key is the server's URL signing key (kept in the data dir).

use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

use smartfarm_core::{Error, Result};
use smartfarm_proto::image::v1 as pb;

use crate::ImageApi;

/// Which bytes of a photo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Original,
    Thumbnail,
}

impl Variant {
    pub(crate) fn from_proto(value: i32) -> Result<Variant> {
        match pb::ImageVariant::try_from(value) {
            Ok(pb::ImageVariant::Unspecified | pb::ImageVariant::Original) => Ok(Variant::Original),
            Ok(pb::ImageVariant::Thumbnail) => Ok(Variant::Thumbnail),
            Err(_) => Err(Error::invalid("variant", format!("{value} is not an ImageVariant"))),
        }
    }

    pub(crate) fn parse(value: &str) -> Result<Variant> {
        match value {
            "original" => Ok(Variant::Original),
            "thumbnail" => Ok(Variant::Thumbnail),
            _ => Err(Error::invalid("variant", "must be original or thumbnail")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Variant::Original => "original",
            Variant::Thumbnail => "thumbnail",
        }
    }
}

/// Signs and checks content URLs.
#[derive(Clone)]
pub struct UrlSigner {
    key: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner { .. }")
    }
}

impl UrlSigner {
    /// A signer with this key (at least 16 bytes).
    pub fn new(key: &[u8]) -> Result<UrlSigner> {
        if key.len() < 16 {
            return Err(Error::invalid("url_signing_key", "must be at least 16 bytes"));
        }
        Ok(UrlSigner { key: key.into() })
    }

    fn signature(&self, image_id: Uuid, variant: Variant, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("{image_id}|{}|{expires}", variant.as_str()).as_bytes());
        mac
    }

    /// The URL of a variant, valid until `expire_time`; relative to the server when `base` is empty.
    pub fn url(&self, base: &str, image_id: Uuid, variant: Variant, expire_time: SystemTime) -> String {
        let expires = expire_time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let signature = hex::encode(self.signature(image_id, variant, expires).finalize().into_bytes());
        format!(
            "{}/v1/images/{image_id}/content?variant={}&expires={expires}&signature={signature}",
            base.trim_end_matches('/'),
            variant.as_str()
        )
    }

    /// Checks a URL's signature and expiry.
    pub fn verify(
        &self,
        image_id: Uuid,
        variant: Variant,
        expires: &str,
        signature: &str,
        now: SystemTime,
    ) -> Result<()> {
        let denied = || Error::PermissionDenied("the URL's signature is not valid".into());
        let expires: u64 = expires.parse().map_err(|_| Error::invalid("expires", "is not a Unix time"))?;
        let signature = hex::decode(signature).map_err(|_| denied())?;
        self.signature(image_id, variant, expires).verify_slice(&signature).map_err(|_| denied())?;
        let now = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now > expires {
            return Err(Error::PermissionDenied("the URL has expired; ask GetImageUrl for a new one".into()));
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct ContentQuery {
    #[serde(default)]
    variant: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    signature: String,
}

/// The plain HTTP route that serves signed URLs: `GET /v1/images/{id}/content?variant=…&expires=…&signature=…`.
/// It needs no credential (the signature is the authorization), so the gateway mounts it outside authentication.
pub fn content_routes(api: ImageApi) -> axum::Router {
    axum::Router::new().route("/v1/images/{id}/content", axum::routing::get(content)).with_state(api)
}

async fn content(State(api): State<ImageApi>, Path(id): Path<String>, Query(query): Query<ContentQuery>) -> Response {
    match api.signed_content(&id, &query.variant, &query.expires, &query.signature).await {
        Ok((content_type, bytes, reading)) => {
            let length = bytes.len().to_string();
            // The permit goes with the body: the photo is in memory until it went out or the client left.
            let body = tokio_stream::StreamExt::map(tokio_stream::once(axum::body::Bytes::from(bytes)), move |chunk| {
                let _held = &reading;
                Ok::<_, std::convert::Infallible>(chunk)
            });
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CONTENT_LENGTH, length),
                    (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
                ],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
        Err(error) => {
            if matches!(error, Error::Internal { .. } | Error::Unavailable(_)) {
                tracing::error!(%error, "signed image content failed");
            }
            (error.http_status(), format!("{}\n", error.client_message())).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn signatures_bind_the_image_the_variant_and_the_expiry() {
        let signer = UrlSigner::new(&[7; 32]).unwrap();
        let id = Uuid::now_v7();
        let now = SystemTime::now();
        let url = signer.url("https://farm.example.com/", id, Variant::Thumbnail, now + Duration::from_secs(60));
        assert!(url.starts_with(&format!("https://farm.example.com/v1/images/{id}/content?variant=thumbnail&")));
        let query: std::collections::HashMap<_, _> =
            url.split_once('?').unwrap().1.split('&').map(|pair| pair.split_once('=').unwrap()).collect();
        let (expires, signature) = (query["expires"], query["signature"]);
        signer.verify(id, Variant::Thumbnail, expires, signature, now).unwrap();
        assert!(signer.verify(id, Variant::Original, expires, signature, now).is_err(), "another variant");
        assert!(signer.verify(Uuid::now_v7(), Variant::Thumbnail, expires, signature, now).is_err(), "another image");
        let later: u64 = expires.parse::<u64>().unwrap() + 1;
        assert!(signer.verify(id, Variant::Thumbnail, &later.to_string(), signature, now).is_err(), "longer expiry");
        let error =
            signer.verify(id, Variant::Thumbnail, expires, signature, now + Duration::from_secs(120)).unwrap_err();
        assert!(error.to_string().contains("expired"), "{error}");
        assert!(UrlSigner::new(b"short").is_err());
    }
}
