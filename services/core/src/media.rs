//! The photo formats smartfarm stores, told from a file's first bytes (never from a name or a declared type): the
//! edge agent uses this to take or reject what a camera delivers, the cloud to check what an upload declares.

/// The media types smartfarm stores.
pub const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/webp"];

/// Bytes needed to tell the stored types apart.
pub const SNIFF_BYTES: usize = 12;

/// The stored media type the bytes start like, if any.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// What bytes that are not a stored image look like, for error messages: "empty", "text", or their first bytes.
pub fn describe_non_image(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "empty".into();
    }
    if bytes.iter().take(64).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) {
        return "text".into();
    }
    let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("bytes starting {head}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_first_bytes() {
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some("image/png"));
        assert_eq!(sniff_image(&[0xff, 0xd8, 0xff, 0xe0, 0, 0]), Some("image/jpeg"));
        assert_eq!(sniff_image(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_image(b"GIF89a"), None);
        assert_eq!(describe_non_image(b"hello, world"), "text");
        assert_eq!(describe_non_image(&[0, 1, 2, 3]), "bytes starting 00010203");
        assert_eq!(describe_non_image(b""), "empty");
    }
}
