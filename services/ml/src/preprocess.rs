//! Photo → model input: the one preprocessing function that training, evaluation and serving all call, and the
//! checks that turn bad photos into clear errors before any model sees them.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

use smartfarm_core::media::{describe_non_image, sniff_image};
use smartfarm_core::{Error, Result};

/// The largest photo a model is given, in bytes (the same cap as a stored photo).
pub const MAX_PHOTO_BYTES: usize = 20 * 1024 * 1024;

/// The smallest photo side a diagnosis means anything on.
pub const MIN_PHOTO_SIDE: u32 = 32;

/// The largest decoded photo, in pixels: a small file can decode to gigabytes (a "decompression bomb").
pub const MAX_PHOTO_PIXELS: u64 = 50_000_000;

/// How a photo becomes a model's input tensor. Stored in every model file, so a model is always fed the way it
/// was trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// The input is `size`×`size` pixels, RGB, channels first.
    pub size: u32,
    /// How the photo is brought to that size.
    pub resize: Resize,
    /// Per-channel mean subtracted after scaling to 0..1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after the mean.
    pub std: [f32; 3],
}

/// How a photo is brought to the model's input size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Resize {
    /// The whole photo, scaled to the square (leaf photos are square already; others are squeezed).
    Stretch,
    /// Scale the shorter side to `shorter_side`, then cut the centred `size` square (torchvision's Resize +
    /// CenterCrop; done as centred square, scale, crop, which keeps the same pixels).
    ShorterSideThenCenterCrop {
        /// The shorter side's length before cropping.
        shorter_side: u32,
    },
}

/// ImageNet's channel means, the normalisation most pretrained vision networks expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl InputSpec {
    /// Floats in one input (3 × size × size).
    pub fn len(&self) -> usize {
        3 * (self.size as usize) * (self.size as usize)
    }

    /// Whether the spec describes an empty input (never, for a valid spec).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Rejects specs no model could have been trained with.
    pub fn validate(&self) -> Result<()> {
        if !(8..=1024).contains(&self.size) {
            return Err(Error::invalid("input.size", format!("{} is not between 8 and 1024 pixels", self.size)));
        }
        if let Resize::ShorterSideThenCenterCrop { shorter_side } = self.resize
            && shorter_side < self.size
        {
            return Err(Error::invalid(
                "input.resize.shorter_side",
                format!("{shorter_side} is smaller than the input size {}", self.size),
            ));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::invalid("input.std", "means must be finite and deviations positive"));
        }
        Ok(())
    }
}

/// Decodes a photo for a model, or says what is wrong with it: not an image, too large, too small, corrupt.
/// `field` names the request field in errors.
pub fn decode_photo(field: &str, bytes: &[u8]) -> Result<RgbImage> {
    if bytes.len() > MAX_PHOTO_BYTES {
        return Err(Error::invalid(
            field,
            format!("the photo is {} bytes; at most {MAX_PHOTO_BYTES} are accepted", bytes.len()),
        ));
    }
    if sniff_image(bytes).is_none() {
        return Err(Error::invalid(field, format!("not a JPEG, PNG or WebP photo ({})", describe_non_image(bytes))));
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>> {
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|error| Error::invalid(field, format!("cannot read the photo: {error}")))?;
        let mut limits = Limits::default();
        limits.max_alloc = Some(MAX_PHOTO_PIXELS * 4);
        reader.limits(limits);
        Ok(reader)
    };
    // The size first, from the header: a photo too small or too large is refused before any pixel is decoded.
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|error| Error::invalid(field, format!("cannot read the photo's size: {error}")))?;
    check_dimensions(field, width, height)?;
    let image =
        reader()?.decode().map_err(|error| Error::invalid(field, format!("cannot decode the photo: {error}")))?;
    Ok(image.to_rgb8())
}

fn check_dimensions(field: &str, width: u32, height: u32) -> Result<()> {
    if width < MIN_PHOTO_SIDE || height < MIN_PHOTO_SIDE {
        return Err(Error::invalid(
            field,
            format!(
                "the photo is {width}×{height} pixels; a diagnosis needs at least {MIN_PHOTO_SIDE}×{MIN_PHOTO_SIDE}"
            ),
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_PHOTO_PIXELS {
        return Err(Error::invalid(
            field,
            format!("the photo is {width}×{height} pixels; at most {MAX_PHOTO_PIXELS} pixels are accepted"),
        ));
    }
    Ok(())
}

/// The model input for a decoded photo: resized as the spec says (bilinear), scaled to 0..1, normalised per channel,
/// channels first. Training (after its augmentation), evaluation and serving all go through here.
pub fn model_input(photo: &RgbImage, spec: &InputSpec) -> Vec<f32> {
    let size = spec.size;
    let square = match spec.resize {
        Resize::Stretch => image::imageops::resize(photo, size, size, FilterType::Triangle),
        Resize::ShorterSideThenCenterCrop { shorter_side } => {
            // The centred square first: what the crop keeps lies inside it, and a long thin photo is never scaled
            // whole (a 32×1,500,000 one would become gigabytes).
            let (width, height) = photo.dimensions();
            let side = width.min(height);
            let square =
                image::imageops::crop_imm(photo, (width - side) / 2, (height - side) / 2, side, side).to_image();
            let resized = image::imageops::resize(&square, shorter_side, shorter_side, FilterType::Triangle);
            let offset = (shorter_side - size) / 2;
            image::imageops::crop_imm(&resized, offset, offset, size, size).to_image()
        }
    };
    let plane = (size as usize) * (size as usize);
    let mut input = vec![0.0f32; 3 * plane];
    for (index, pixel) in square.pixels().enumerate() {
        for channel in 0..3 {
            let value = f32::from(pixel[channel]) / 255.0;
            input[channel * plane + index] = (value - spec.mean[channel]) / spec.std[channel];
        }
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(image: &RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn bad_photos_are_refused_with_the_reason() {
        let not_image = decode_photo("image_data", b"hello, this is text").unwrap_err().to_string();
        assert!(not_image.contains("not a JPEG, PNG or WebP photo (text)"), "{not_image}");

        let tiny = encode(&RgbImage::new(1, 1), image::ImageFormat::Png);
        let error = decode_photo("image_data", &tiny).unwrap_err().to_string();
        assert!(error.contains("1×1 pixels"), "{error}");

        let huge = vec![0xffu8; 50 * 1024 * 1024];
        let error = decode_photo("image_data", &huge).unwrap_err().to_string();
        assert!(error.contains("at most 20971520 are accepted"), "{error}");

        let mut truncated = encode(&RgbImage::new(64, 64), image::ImageFormat::Jpeg);
        truncated.truncate(truncated.len() / 3);
        assert!(decode_photo("image_data", &truncated).is_err());
    }

    #[test]
    fn input_is_channels_first_and_normalised() {
        let mut photo = RgbImage::new(40, 40);
        for pixel in photo.pixels_mut() {
            *pixel = image::Rgb([255, 0, 128]);
        }
        let spec = InputSpec { size: 8, resize: Resize::Stretch, mean: [0.5; 3], std: [0.5; 3] };
        let input = model_input(&photo, &spec);
        assert_eq!(input.len(), spec.len());
        assert!((input[0] - 1.0).abs() < 1e-6);
        assert!((input[64] + 1.0).abs() < 1e-6);
        assert!((input[128] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
    }

    #[test]
    fn centre_crop_keeps_the_middle_of_a_wide_photo() {
        let mut photo = RgbImage::new(300, 100);
        for (x, _, pixel) in photo.enumerate_pixels_mut() {
            *pixel = if (100..200).contains(&x) { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) };
        }
        let spec = InputSpec {
            size: 50,
            resize: Resize::ShorterSideThenCenterCrop { shorter_side: 60 },
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let input = model_input(&photo, &spec);
        // The crop is the middle 50 of 180 columns: all white once away from the edges.
        assert!(input[25 * 50 + 25] > 0.99);
    }
}
