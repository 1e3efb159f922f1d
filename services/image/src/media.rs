//! What the service needs to know about image bytes beyond their type (`smartfarm_core::media`): their dimensions
//! from the header alone, and thumbnails.

use std::io::Cursor;

use image::{ImageFormat, ImageReader};

fn format_of(content_type: &str) -> Option<ImageFormat> {
    match content_type {
        "image/jpeg" => Some(ImageFormat::Jpeg),
        "image/png" => Some(ImageFormat::Png),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

/// Width and height, read from the header without decoding the pixels.
pub fn dimensions(bytes: &[u8], content_type: &str) -> Result<(u32, u32), String> {
    let format = format_of(content_type).ok_or_else(|| format!("{content_type} is not a stored type"))?;
    let (width, height) =
        ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(|error| error.to_string())?;
    if width == 0 || height == 0 {
        return Err(format!("the image is {width}x{height} pixels"));
    }
    Ok((width, height))
}

/// A JPEG whose longest side is at most `size` pixels (a photo already that small is re-encoded as is).
pub fn thumbnail(bytes: &[u8], content_type: &str, size: u32) -> Result<Vec<u8>, String> {
    let format = format_of(content_type).ok_or_else(|| format!("{content_type} is not a stored type"))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The stored maximum bounds the bytes; this bounds what a small but hugely compressed file may decode into.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|error| error.to_string())?;
    let small = decoded.thumbnail(size, size).into_rgb8();
    let mut encoded = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 80)
        .encode_image(&small)
        .map_err(|error| error.to_string())?;
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let mut bytes = Vec::new();
        image.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).unwrap();
        bytes
    }

    #[test]
    fn dimensions_and_thumbnails() {
        let bytes = png(640, 480);
        assert_eq!(dimensions(&bytes, "image/png").unwrap(), (640, 480));
        let thumbnail = thumbnail(&bytes, "image/png", 320).unwrap();
        assert_eq!(smartfarm_core::media::sniff_image(&thumbnail), Some("image/jpeg"));
        assert_eq!(dimensions(&thumbnail, "image/jpeg").unwrap(), (320, 240));
        assert!(dimensions(&bytes[..40], "image/png").is_err(), "a truncated header is an error");
        assert!(dimensions(b"\x89PNG\r\n\x1a\n garbage", "image/png").is_err());
    }
}
