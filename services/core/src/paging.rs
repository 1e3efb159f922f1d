//! Keyset pagination shared by every List RPC: page sizes and opaque page tokens.
//!
//! A page token carries the sort key of the last item returned and a fingerprint of the request's filters, so a
//! token reused with other filters is rejected instead of silently skipping or repeating items. Page sizes follow
//! Google's AIP-158: 0 means the default, above the maximum is lowered to the maximum, negative is an error.

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Default page size of List RPCs.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of List RPCs; larger requests get this many.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Resolves a request's `page_size`.
pub fn page_size(requested: i32, default: usize, max: usize) -> Result<usize> {
    match requested {
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        0 => Ok(default),
        n => Ok((n as usize).min(max)),
    }
}

/// A page request after validation: where to start and how many items to return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The sort key of the last item of the previous page; `None` for the first page.
    pub after: Option<String>,
    /// How many items to return.
    pub size: usize,
}

impl Page {
    /// Validates `page_size` and `page_token` for a request whose filters are described by `filter_fingerprint`
    /// (any string that changes when the filters change).
    pub fn from_request(page_size_requested: i32, page_token: &str, filter_fingerprint: &str) -> Result<Page> {
        let size = page_size(page_size_requested, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let after = if page_token.is_empty() { None } else { Some(decode(page_token, filter_fingerprint)?) };
        Ok(Page { after, size })
    }

    /// The id to continue after, for lists ordered by UUID.
    pub fn after_id(&self) -> Result<Option<uuid::Uuid>> {
        self.after
            .as_deref()
            .map(|key| {
                uuid::Uuid::try_parse(key)
                    .map_err(|_| Error::invalid("page_token", "is not a token this list returned"))
            })
            .transpose()
    }

    /// The (time, id) to continue after, for lists ordered by a time and then an id (keys made by
    /// [`time_id_key`]).
    pub fn after_time_id(&self) -> Result<Option<(std::time::SystemTime, uuid::Uuid)>> {
        let Some(key) = self.after.as_deref() else { return Ok(None) };
        let invalid = || Error::invalid("page_token", "is not a token this list returned");
        let (micros, id) = key.split_once('|').ok_or_else(invalid)?;
        let micros = micros.parse::<i64>().map_err(|_| invalid())?;
        Ok(Some((crate::time::from_unix_micros(micros), uuid::Uuid::try_parse(id).map_err(|_| invalid())?)))
    }

    /// How many items to fetch: one more than the page holds, to learn whether another page follows.
    pub fn fetch_limit(&self) -> usize {
        self.size + 1
    }

    /// Cuts items fetched with [`Page::fetch_limit`] down to the page and makes the next page's token (empty on
    /// the last page). `key_of` gives an item's sort key.
    pub fn finish<T>(
        &self,
        mut items: Vec<T>,
        key_of: impl Fn(&T) -> String,
        filter_fingerprint: &str,
    ) -> (Vec<T>, String) {
        if items.len() <= self.size {
            return (items, String::new());
        }
        items.truncate(self.size);
        let token = items.last().map(|last| encode(&key_of(last), filter_fingerprint)).unwrap_or_default();
        (items, token)
    }
}

/// The sort key of an item of a list ordered by a time and then an id (see [`Page::after_time_id`]).
pub fn time_id_key(time: std::time::SystemTime, id: uuid::Uuid) -> String {
    format!("{}|{id}", crate::time::to_unix_micros(time))
}

fn fingerprint(filter: &str) -> String {
    hex::encode(&Sha256::digest(filter.as_bytes())[..6])
}

fn encode(last_key: &str, filter: &str) -> String {
    let raw = format!("{}|{}", fingerprint(filter), last_key);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode(token: &str, filter: &str) -> Result<String> {
    let invalid = || Error::invalid("page_token", "is not a token this list returned");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let (print, key) = raw.split_once('|').ok_or_else(invalid)?;
    if print != fingerprint(filter) {
        return Err(Error::invalid("page_token", "was issued for different filters"));
    }
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size(0, 50, 1000).unwrap(), 50);
        assert_eq!(page_size(7, 50, 1000).unwrap(), 7);
        assert_eq!(page_size(1_000_000, 50, 1000).unwrap(), 1000);
        assert!(page_size(-1, 50, 1000).is_err());
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_filters() {
        let page = Page::from_request(2, "", "farm=a").unwrap();
        assert_eq!(page.fetch_limit(), 3);
        let key = |item: &&str| item.to_string();
        let (items, token) = page.finish(vec!["k1", "k2"], key, "farm=a");
        assert_eq!((items.len(), token.as_str()), (2, ""), "no extra item: last page");
        let (items, token) = page.finish(vec!["k1", "k2", "k3"], key, "farm=a");
        assert_eq!(items, vec!["k1", "k2"]);
        let next = Page::from_request(2, &token, "farm=a").unwrap();
        assert_eq!(next.after.as_deref(), Some("k2"));
        let error = Page::from_request(2, &token, "farm=b").unwrap_err();
        assert_eq!(error.to_string(), "page_token: was issued for different filters");
        assert!(Page::from_request(2, "garbage!!", "farm=a").is_err());
    }
}
