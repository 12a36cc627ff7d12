//! Images for the Canvas and the diffusion pipeline: decoding files people drop or open,
//! masks, resizing, and conversion between 8-bit images and the tensors the VAE takes and
//! returns.
//!
//! - Files are decoded with the `image` crate (PNG, JPEG and WebP only), under memory limits;
//!   a side longer than [`MAX_SIDE`] is downscaled on open, keeping the aspect ratio, and the
//!   caller is told so ([`Decoded::downscaled_from`]).
//! - Transparency is **composited over white** (the usual look of a transparent image in a
//!   viewer), so an RGBA image becomes the RGB image a person sees.
//! - Tensors are `(1, 3, H, W)` `f32` in `[-1, 1]`, the VAE's convention.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{ImageDecoder as _, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};
use crate::image_meta::{self, GenerationParameters};

/// The longest side Studio keeps when opening an image; larger images are downscaled.
pub const MAX_SIDE: u32 = 8192;

/// The longest side decoded at all (before downscaling to [`MAX_SIDE`]).
pub const MAX_DECODE_SIDE: u32 = 2 * MAX_SIDE;
/// The most pixels decoded at all: 128 Mpx (a 16,384 × 8,192 panorama).
pub const MAX_DECODE_PIXELS: u64 = 1 << 27;
/// The most memory opening an image may hold: the decoder's buffer plus the RGB copy (1 GiB),
/// checked from the header's size and colour type before any pixel is decoded. The
/// downscale to [`MAX_SIDE`] adds only its output.
const MAX_DECODE_BYTES: u64 = 1 << 30;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, R, G, B for each pixel.
    pub pixels: Vec<u8>,
}

/// An 8-bit single-channel mask, row-major; 255 = repaint, 0 = keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` bytes, one per pixel; values between 0 and 255 blend (a feathered
    /// edge).
    pub values: Vec<u8>,
}

/// An opened image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The pixels, composited over white and downscaled to fit [`MAX_SIDE`] where needed.
    pub image: RgbImage,
    /// The original size, set when the image was downscaled to fit [`MAX_SIDE`] (a notice for
    /// the user).
    pub downscaled_from: Option<(u32, u32)>,
    /// The text of the PNG `parameters` chunk (`tEXt`, `zTXt` or `iTXt`), if any, unchanged;
    /// parse it with [`GenerationParameters::parse`].
    pub parameters: Option<String>,
}

fn not_an_image(detail: impl std::fmt::Display) -> Error {
    Error::InvalidParameter(format!("not an image ({detail})"))
}

/// Decodes a PNG, JPEG or WebP file's bytes.
///
/// Anything else (text, another image format, a truncated file) is an
/// [`Error::InvalidParameter`] saying "not an image (…)". Transparency is composited over
/// white. An image with a side longer than [`MAX_SIDE`] is downscaled (keeping its aspect
/// ratio, averaging source areas) and [`Decoded::downscaled_from`] holds its original size.
/// Decoding is refused, from the header alone, for sides above [`MAX_DECODE_SIDE`], more than
/// [`MAX_DECODE_PIXELS`], or more than 1 GiB held (decompression bombs).
pub fn decode_image_bytes(bytes: &[u8]) -> Result<Decoded> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(not_an_image)?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(other) => {
            return Err(not_an_image(format!(
                "{other:?} files are not supported; Studio opens PNG, JPEG and WebP"
            )));
        }
        None => {
            return Err(not_an_image(
                "the data is not a PNG, JPEG or WebP file".to_owned(),
            ));
        }
    };
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let too_large = |detail: String| {
        not_an_image(format!(
            "the {format:?} image is too large to open: {detail}; Studio opens images up to \
             {MAX_DECODE_SIDE} px a side and {} Mpx",
            MAX_DECODE_PIXELS >> 20
        ))
    };
    let decode_error = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => too_large(l.to_string()),
        other => not_an_image(format!(
            "the {format:?} file is corrupt or truncated: {other}"
        )),
    };
    // The header alone first: the size and colour type bound everything that follows.
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    let held = decoder.total_bytes().saturating_add(pixels * 3);
    if width > MAX_DECODE_SIDE || height > MAX_DECODE_SIDE || pixels > MAX_DECODE_PIXELS {
        return Err(too_large(format!("{width} × {height} px")));
    }
    if held > MAX_DECODE_BYTES {
        return Err(too_large(format!(
            "{width} × {height} px would take {} MiB to decode",
            held >> 20
        )));
    }
    let decoded = image::DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    let (width, height) = (decoded.width(), decoded.height());
    let pixels = if decoded.color().has_alpha() {
        over_white(&decoded.into_rgba8().into_raw())
    } else {
        decoded.into_rgb8().into_raw()
    };
    let mut image = RgbImage {
        width,
        height,
        pixels,
    };
    let mut downscaled_from = None;
    if width > MAX_SIDE || height > MAX_SIDE {
        let scale = f64::from(MAX_SIDE) / f64::from(width.max(height));
        let w = ((f64::from(width) * scale).round() as u32).clamp(1, MAX_SIDE);
        let h = ((f64::from(height) * scale).round() as u32).clamp(1, MAX_SIDE);
        image = image.area_downscaled(w, h);
        downscaled_from = Some((width, height));
    }
    let parameters = if format == ImageFormat::Png {
        png_parameters_text(bytes)
    } else {
        None
    };
    Ok(Decoded {
        image,
        downscaled_from,
        parameters,
    })
}

/// Reads and decodes an image file (see [`decode_image_bytes`]); read errors name the path.
pub fn decode_image_file(path: &Path) -> Result<Decoded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image_bytes(&bytes).map_err(|e| match e {
        Error::InvalidParameter(m) => Error::InvalidParameter(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// RGBA → RGB composited over white.
fn over_white(rgba: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    out
}

/// The raw text of a PNG's `parameters` chunk, without decoding the pixels. Best effort: a PNG
/// whose text cannot be read has none.
fn png_parameters_text(bytes: &[u8]) -> Option<String> {
    crate::image_meta::png_parameters_text(bytes).ok().flatten()
}

/// A mask from an image's luminance (ITU-R BT.601 weights): white = repaint, black = keep.
pub fn mask_from_image(img: &RgbImage) -> Mask {
    let values = img
        .pixels
        .chunks_exact(3)
        .map(|p| {
            let y = 299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]);
            ((y + 500) / 1000) as u8
        })
        .collect();
    Mask {
        width: img.width,
        height: img.height,
        values,
    }
}

impl Mask {
    /// A mask of `width`×`height` filled with `value`.
    pub fn new_filled(width: u32, height: u32, value: u8) -> Mask {
        Mask {
            width,
            height,
            values: vec![value; width as usize * height as usize],
        }
    }

    /// Resized with a triangle (bilinear) filter; edges of a hard mask become soft.
    #[must_use]
    pub fn resized(&self, w: u32, h: u32) -> Mask {
        if (w, h) == (self.width, self.height) {
            return self.clone();
        }
        let w = w.max(1);
        let h = h.max(1);
        let Some(buf) = image::GrayImage::from_raw(self.width, self.height, self.values.clone())
        else {
            return Mask::new_filled(w, h, 0);
        };
        Mask {
            width: w,
            height: h,
            values: image::imageops::resize(&buf, w, h, FilterType::Triangle).into_raw(),
        }
    }

    /// Gaussian blur with standard deviation `radius_px` (the web UI's "mask blur"), separable,
    /// edges extended; a radius of 0 (or less) returns the mask unchanged.
    #[must_use]
    pub fn blurred(&self, radius_px: f32) -> Mask {
        if radius_px.is_nan() || radius_px <= 0.0 || self.values.is_empty() {
            return self.clone();
        }
        // A blur wider than the mask changes nothing more (and an absurd radius would size
        // the kernel): capped at the longer side.
        let sigma = f64::from(radius_px).min(f64::from(self.width.max(self.height)));
        let half = (3.0 * sigma).ceil() as usize;
        let weights: Vec<f64> = (0..=2 * half)
            .map(|i| {
                let d = i as f64 - half as f64;
                (-d * d / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let kernel: Vec<f32> = weights.iter().map(|k| (k / total) as f32).collect();
        let (w, h) = (self.width as usize, self.height as usize);
        let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
        // Horizontal pass.
        let mut tmp = vec![0f32; w * h];
        for y in 0..h {
            let row = &self.values[y * w..(y + 1) * w];
            for x in 0..w {
                let mut acc = 0f32;
                for (k, kv) in kernel.iter().enumerate() {
                    let sx = clamp(x as isize + k as isize - half as isize, w);
                    acc += kv * f32::from(row[sx]);
                }
                tmp[y * w + x] = acc;
            }
        }
        // Vertical pass.
        let mut values = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f32;
                for (k, kv) in kernel.iter().enumerate() {
                    let sy = clamp(y as isize + k as isize - half as isize, h);
                    acc += kv * tmp[sy * w + x];
                }
                values[y * w + x] = acc.round().clamp(0.0, 255.0) as u8;
            }
        }
        Mask {
            width: self.width,
            height: self.height,
            values,
        }
    }

    /// 255 − value for every pixel (the web UI's "invert mask").
    #[must_use]
    pub fn inverted(&self) -> Mask {
        Mask {
            width: self.width,
            height: self.height,
            values: self.values.iter().map(|v| 255 - v).collect(),
        }
    }

    /// Whether no pixel is to be repainted (no value above 0).
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|&v| v == 0)
    }
}

impl RgbImage {
    /// An image of `width`×`height` filled with one colour.
    pub fn new_filled(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage {
            width,
            height,
            pixels: rgb.repeat(width as usize * height as usize),
        }
    }

    /// Resized with a Lanczos (3-lobe) filter; a size of 0 becomes 1.
    #[must_use]
    pub fn resized(&self, w: u32, h: u32) -> RgbImage {
        if (w, h) == (self.width, self.height) {
            return self.clone();
        }
        self.resized_with(w.max(1), h.max(1), FilterType::Lanczos3)
    }

    /// Downscaled to `w × h` (each no larger than the source's) by averaging each output
    /// pixel's source area, one output row at a time: the memory is the output and one row of
    /// sums, whatever the source size (`image`'s filters hold an f32 copy of the source).
    #[must_use]
    pub fn area_downscaled(&self, w: u32, h: u32) -> RgbImage {
        let (sw, sh) = (self.width as usize, self.height as usize);
        let (w, h) = (
            (w as usize).clamp(1, sw.max(1)),
            (h as usize).clamp(1, sh.max(1)),
        );
        if self.pixels.len() != sw * sh * 3 || sw == 0 || sh == 0 {
            return RgbImage::new_filled(w as u32, h as u32, [0, 0, 0]);
        }
        // Output pixel x covers source columns x·sw/w .. (x + 1)·sw/w (at least one).
        let span = |i: usize, n: usize, src: usize| {
            let a = i * src / n;
            (a, ((i + 1) * src / n).max(a + 1))
        };
        let cols: Vec<(usize, usize)> = (0..w).map(|x| span(x, w, sw)).collect();
        let mut sums = vec![0u64; w * 3];
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            let (r0, r1) = span(y, h, sh);
            sums.fill(0);
            for row in self.pixels[r0 * sw * 3..r1 * sw * 3].chunks_exact(sw * 3) {
                for (sum, &(c0, c1)) in sums.chunks_exact_mut(3).zip(&cols) {
                    for px in row[c0 * 3..c1 * 3].chunks_exact(3) {
                        for (s, &v) in sum.iter_mut().zip(px) {
                            *s += u64::from(v);
                        }
                    }
                }
            }
            for (sum, &(c0, c1)) in sums.chunks_exact(3).zip(&cols) {
                let n = ((r1 - r0) * (c1 - c0)) as u64;
                pixels.extend(sum.iter().map(|&s| ((s + n / 2) / n) as u8));
            }
        }
        RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        }
    }

    fn resized_with(&self, w: u32, h: u32, filter: FilterType) -> RgbImage {
        let Some(buf) = image::RgbImage::from_raw(self.width, self.height, self.pixels.clone())
        else {
            return RgbImage::new_filled(w, h, [0, 0, 0]);
        };
        RgbImage {
            width: w,
            height: h,
            pixels: image::imageops::resize(&buf, w, h, filter).into_raw(),
        }
    }

    /// The `w`×`h` rectangle at (`x`, `y`); the part outside the image is cut off, so the
    /// result may be smaller than asked (empty when the rectangle lies outside).
    #[must_use]
    pub fn crop(&self, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
        let x0 = x.min(self.width);
        let y0 = y.min(self.height);
        let x1 = x.saturating_add(w).min(self.width);
        let y1 = y.saturating_add(h).min(self.height);
        let (cw, ch) = (x1 - x0, y1 - y0);
        let mut pixels = Vec::with_capacity(cw as usize * ch as usize * 3);
        for row in y0..y1 {
            let start = (row as usize * self.width as usize + x0 as usize) * 3;
            pixels.extend_from_slice(&self.pixels[start..start + cw as usize * 3]);
        }
        RgbImage {
            width: cw,
            height: ch,
            pixels,
        }
    }

    /// The pixels as RGBA with opaque alpha (what texture uploads and PNG writers take).
    pub fn to_rgba(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pixels.len() / 3 * 4);
        for p in self.pixels.chunks_exact(3) {
            out.extend_from_slice(&[p[0], p[1], p[2], 255]);
        }
        out
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.pixels.len() != self.width as usize * self.height as usize * 3 {
            return Err(Error::InvalidParameter(format!(
                "{} bytes of pixels for a {}x{} RGB image",
                self.pixels.len(),
                self.width,
                self.height
            )));
        }
        Ok(())
    }
}

/// The image as a `(1, 3, H, W)` `f32` tensor in `[-1, 1]` on `device` (what the VAE encoder
/// takes): `v / 127.5 − 1`.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    img.check()?;
    let (w, h) = (img.width as usize, img.height as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = f32::from(p[c]) / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}

/// A `(1, 3, H, W)` or `(3, H, W)` tensor in `[-1, 1]` (the VAE decoder's output, any dtype
/// or device) as an image: `(v + 1) · 127.5`, rounded and clamped.
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let t = match t.dims() {
        [1, 3, _, _] => t.squeeze(0)?,
        [3, _, _] => t.clone(),
        other => {
            return Err(Error::InvalidParameter(format!(
                "an image tensor must be (1, 3, H, W) or (3, H, W), not {other:?}"
            )));
        }
    };
    let (_, h, w) = t.dims3()?;
    let planes = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut pixels = vec![0u8; 3 * w * h];
    for i in 0..w * h {
        for c in 0..3 {
            let v = (planes[c * w * h + i] + 1.0) * 127.5;
            pixels[i * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

/// The mask at latent size as a `(1, 1, latent_h, latent_w)` `f32` tensor in `[0, 1]`, for
/// inpainting: each latent cell is the mean of the mask pixels it covers (an area
/// downsample; ×8 when the mask is at image size). Threshold it if a hard mask is wanted.
pub fn mask_to_latent_tensor(
    mask: &Mask,
    latent_w: usize,
    latent_h: usize,
    device: &Device,
) -> Result<Tensor> {
    let (mw, mh) = (mask.width as usize, mask.height as usize);
    if latent_w == 0 || latent_h == 0 || mw == 0 || mh == 0 || mask.values.len() != mw * mh {
        return Err(Error::InvalidParameter(format!(
            "cannot bring a {mw}x{mh} mask ({} values) to a {latent_w}x{latent_h} latent",
            mask.values.len()
        )));
    }
    let span = |i: usize, n: usize, big: usize| {
        let a = i * big / n;
        let b = ((i + 1) * big / n).max(a + 1).min(big);
        (a.min(big - 1), b)
    };
    let mut data = Vec::with_capacity(latent_w * latent_h);
    for ly in 0..latent_h {
        let (y0, y1) = span(ly, latent_h, mh);
        for lx in 0..latent_w {
            let (x0, x1) = span(lx, latent_w, mw);
            let mut sum = 0u64;
            for y in y0..y1 {
                sum += mask.values[y * mw + x0..y * mw + x1]
                    .iter()
                    .map(|&v| u64::from(v))
                    .sum::<u64>();
            }
            let count = ((y1 - y0) * (x1 - x0)) as f64;
            data.push((sum as f64 / count / 255.0) as f32);
        }
    }
    Ok(Tensor::from_vec(data, (1, 1, latent_h, latent_w), device)?)
}

/// Pastes an inpainted result back: `out = orig·(1 − m) + new·m` with `m = mask / 255`,
/// rounded, so pixels where the mask is 0 are bit-identical to the original (and 255 gives
/// the generated pixel exactly). All three must have the same size.
pub fn composite(original: &RgbImage, generated: &RgbImage, mask: &Mask) -> Result<RgbImage> {
    original.check()?;
    generated.check()?;
    let size = (original.width, original.height);
    if (generated.width, generated.height) != size
        || (mask.width, mask.height) != size
        || mask.values.len() != size.0 as usize * size.1 as usize
    {
        return Err(Error::InvalidParameter(format!(
            "composite needs one size: original {}x{}, generated {}x{}, mask {}x{}",
            original.width,
            original.height,
            generated.width,
            generated.height,
            mask.width,
            mask.height
        )));
    }
    let mut pixels = Vec::with_capacity(original.pixels.len());
    for ((o, n), &m) in original
        .pixels
        .chunks_exact(3)
        .zip(generated.pixels.chunks_exact(3))
        .zip(&mask.values)
    {
        let m = u32::from(m);
        for c in 0..3 {
            let v = (u32::from(o[c]) * (255 - m) + u32::from(n[c]) * m + 127) / 255;
            pixels.push(v as u8);
        }
    }
    Ok(RgbImage {
        width: original.width,
        height: original.height,
        pixels,
    })
}

/// Encodes the image as a PNG, with `parameters` (written exactly as given) in its
/// `parameters` text chunk (`tEXt`, or `iTXt` for non-Latin-1 text) when given.
///
/// With parameters the image is written by [`image_meta::encode_png`] (RGBA, opaque); without,
/// as plain 8-bit RGB with no text chunk.
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    img.check()?;
    if let Some(text) = parameters {
        // A prompt-only `GenerationParameters` renders to exactly `text`.
        let params = GenerationParameters {
            prompt: text.to_owned(),
            ..GenerationParameters::default()
        };
        return image_meta::encode_png(img.width, img.height, &img.to_rgba(), &params);
    }
    let png_error = |e: &dyn std::fmt::Display| Error::InvalidParameter(format!("PNG: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| png_error(&e))?;
        writer
            .write_image_data(&img.pixels)
            .map_err(|e| png_error(&e))?;
        writer.finish().map_err(|e| png_error(&e))?;
    }
    Ok(out)
}
