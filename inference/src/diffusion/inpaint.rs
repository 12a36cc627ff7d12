//! Inpainting as the SD web UI does it, beyond repainting the whole picture:
//!
//! - **Only masked** ([`InpaintArea::OnlyMasked`]): the mask's bounding box plus `padding`
//!   pixels, widened to the working size's aspect ratio ([`crop_region`], the web UI's
//!   `get_crop_region` + `expand_crop_region`), is cut out, scaled to the working size and
//!   repainted there at full resolution, then scaled back and pasted with the blurred mask; the
//!   rest of the image is untouched, to the bit.
//! - **Masked content** ([`MaskedContent`]): what the masked area starts from. `original` (the
//!   image), `fill` (the surrounding colours spread in, [`fill`]: blurs of the kept pixels from
//!   coarse to fine composited over one another, as the web UI's `masking.fill`), `latent
//!   noise` (the seed's noise in the masked latents) or `latent nothing` (zeros there).

use serde::{Deserialize, Serialize};

use super::imaging::{Mask, RgbImage};

/// Which part of the image inpainting works on (the web UI's "Inpaint area").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InpaintArea {
    /// The whole image, at the request's size.
    #[default]
    WholePicture,
    /// The masked region plus padding, at the request's size, pasted back.
    OnlyMasked,
}

impl InpaintArea {
    /// Both, for menus.
    pub const ALL: [InpaintArea; 2] = [InpaintArea::WholePicture, InpaintArea::OnlyMasked];

    /// As the web UI names and writes it.
    pub fn name(self) -> &'static str {
        match self {
            InpaintArea::WholePicture => "Whole picture",
            InpaintArea::OnlyMasked => "Only masked",
        }
    }

    /// Reads [`Self::name`] (any case) or `whole` / `masked`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "whole picture" | "whole" => Some(InpaintArea::WholePicture),
            "only masked" | "masked" | "only-masked" => Some(InpaintArea::OnlyMasked),
            _ => None,
        }
    }
}

/// What the masked area starts from (the web UI's "Masked content").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MaskedContent {
    /// The surrounding colours spread into the masked area.
    Fill,
    /// The image as it is.
    #[default]
    Original,
    /// The seed's noise in the masked latents (wants a strength near 1).
    LatentNoise,
    /// Zeros in the masked latents (wants a strength near 1).
    LatentNothing,
}

impl MaskedContent {
    /// All four, for menus.
    pub const ALL: [MaskedContent; 4] = [
        MaskedContent::Fill,
        MaskedContent::Original,
        MaskedContent::LatentNoise,
        MaskedContent::LatentNothing,
    ];

    /// As the web UI names and writes it.
    pub fn name(self) -> &'static str {
        match self {
            MaskedContent::Fill => "fill",
            MaskedContent::Original => "original",
            MaskedContent::LatentNoise => "latent noise",
            MaskedContent::LatentNothing => "latent nothing",
        }
    }

    /// Reads [`Self::name`] (any case; `-` or `_` for the space).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase().replace(['-', '_'], " ");
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// How inpainting works (used by [`super::pipeline::ImageMode::Inpaint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InpaintOptions {
    /// The whole picture or only the masked region.
    pub area: InpaintArea,
    /// Only masked: pixels of context around the mask's bounding box.
    pub padding: u32,
    /// What the masked area starts from.
    pub content: MaskedContent,
}

impl Default for InpaintOptions {
    /// The web UI's defaults: the whole picture, 32 pixels of padding, the original content.
    fn default() -> Self {
        Self {
            area: InpaintArea::WholePicture,
            padding: 32,
            content: MaskedContent::Original,
        }
    }
}

/// A rectangle `[x0, x1) × [y0, y1)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Left column (inclusive).
    pub x0: u32,
    /// Top row (inclusive).
    pub y0: u32,
    /// Right column (exclusive).
    pub x1: u32,
    /// Bottom row (exclusive).
    pub y1: u32,
}

impl Region {
    /// Width.
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }
    /// Height.
    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }
}

/// The region "only masked" works on: the bounding box of the mask's non-zero pixels plus
/// `padding`, clamped to the image, then grown along one axis (centred, shifted back inside
/// the image, clamped) until its aspect ratio is `work_w : work_h`. `None` for an empty mask.
pub fn crop_region(mask: &Mask, padding: u32, work_w: u32, work_h: u32) -> Option<Region> {
    let (w, h) = (mask.width, mask.height);
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for y in 0..h {
        for x in 0..w {
            if mask.values[(y * w + x) as usize] > 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    if x0 == u32::MAX {
        return None;
    }
    let mut r = [
        i64::from(x0.saturating_sub(padding)),
        i64::from(y0.saturating_sub(padding)),
        i64::from(x1.saturating_add(padding).min(w)),
        i64::from(y1.saturating_add(padding).min(h)),
    ];
    let ratio_crop = (r[2] - r[0]) as f64 / (r[3] - r[1]) as f64;
    let ratio_work = f64::from(work_w) / f64::from(work_h.max(1));
    // Grow one axis: (low index, high index, image size along it, desired length).
    let (lo, hi, size, desired) = if ratio_crop > ratio_work {
        (1, 3, i64::from(h), (r[2] - r[0]) as f64 / ratio_work)
    } else {
        (0, 2, i64::from(w), (r[3] - r[1]) as f64 * ratio_work)
    };
    // Truncated as the web UI's int() does.
    #[allow(clippy::cast_possible_truncation)]
    let diff = (desired - (r[hi] - r[lo]) as f64) as i64;
    r[lo] -= diff / 2;
    r[hi] += diff - diff / 2;
    if r[hi] >= size {
        let over = r[hi] - size;
        r[hi] -= over;
        r[lo] -= over;
    }
    if r[lo] < 0 {
        r[hi] -= r[lo];
        r[lo] = 0;
    }
    r[hi] = r[hi].min(size);
    // Clamped to the image, so each fits in u32.
    let c = |v: i64| u32::try_from(v.max(0)).unwrap_or(0);
    Some(Region {
        x0: c(r[0]),
        y0: c(r[1]),
        x1: c(r[2]).max(c(r[0]) + 1),
        y1: c(r[3]).max(c(r[1]) + 1),
    })
}

/// The mask cut to `r`.
pub fn crop_mask(mask: &Mask, r: Region) -> Mask {
    let w = mask.width as usize;
    let mut values = Vec::with_capacity((r.width() * r.height()) as usize);
    for y in r.y0..r.y1 {
        let start = y as usize * w + r.x0 as usize;
        values.extend_from_slice(&mask.values[start..start + r.width() as usize]);
    }
    Mask {
        width: r.width(),
        height: r.height(),
        values,
    }
}

/// `patch` (exactly `r`'s size) written into a copy of `base` at `r`.
pub fn paste(base: &RgbImage, patch: &RgbImage, r: Region) -> RgbImage {
    let mut out = base.clone();
    let (bw, pw) = (base.width as usize, patch.width as usize);
    for y in 0..patch.height as usize {
        let dst = ((r.y0 as usize + y) * bw + r.x0 as usize) * 3;
        out.pixels[dst..dst + pw * 3].copy_from_slice(&patch.pixels[y * pw * 3..(y + 1) * pw * 3]);
    }
    out
}

/// A box blur of `radius` (running sums, edges excluded) over `planes` (`channels` planes of
/// `w × h`), three times over: close to a Gaussian, in time independent of the radius.
fn box_blur3(planes: &mut [f32], channels: usize, w: usize, h: usize, radius: usize) {
    let mut line = Vec::new();
    let mut pass = |data: &mut [f32], len: usize, stride: usize, count: usize, step: usize| {
        for i in 0..count {
            line.clear();
            line.extend((0..len).map(|k| data[i * step + k * stride]));
            let mut prefix = Vec::with_capacity(len + 1);
            prefix.push(0f64);
            for v in &line {
                prefix.push(prefix.last().copied().unwrap_or(0.0) + f64::from(*v));
            }
            for k in 0..len {
                let a = k.saturating_sub(radius);
                let b = (k + radius + 1).min(len);
                // Sums over at most a few thousand values.
                #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
                let mean = ((prefix[b] - prefix[a]) / (b - a) as f64) as f32;
                data[i * step + k * stride] = mean;
            }
        }
    };
    for c in 0..channels {
        let plane = &mut planes[c * w * h..(c + 1) * w * h];
        for _ in 0..3 {
            pass(plane, w, 1, h, w);
            pass(plane, h, w, w, 1);
        }
    }
}

/// The web UI's "fill": the masked pixels (mask ≥ 128) replaced by the kept pixels' colours
/// spread in, from blurs of decreasing radius composited over one another (each blur's colour
/// normalised by how much kept area it saw, its alpha that share).
pub fn fill(image: &RgbImage, mask: &Mask) -> RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    let keep: Vec<bool> = mask.values.iter().map(|&v| v < 128).collect();
    if keep.iter().all(|&k| !k) || keep.iter().all(|&k| k) {
        return image.clone();
    }
    let mut out = vec![0f32; 3 * w * h];
    for (radius, repeats) in [(256usize, 1), (64, 1), (16, 2), (4, 4), (2, 2)] {
        // Premultiplied colour and alpha of the kept pixels, blurred together.
        let mut planes = vec![0f32; 4 * w * h];
        for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            for c in 0..3 {
                planes[c * w * h + i] = f32::from(image.pixels[i * 3 + c]);
            }
            planes[3 * w * h + i] = 1.0;
        }
        // Three boxes of half-width r blur about as a Gaussian of σ = r does.
        box_blur3(&mut planes, 4, w, h, radius.min(w.max(h)));
        for _ in 0..repeats {
            for i in 0..w * h {
                let a = planes[3 * w * h + i];
                if a <= 1e-6 {
                    continue;
                }
                for c in 0..3 {
                    let colour = planes[c * w * h + i] / a;
                    out[c * w * h + i] = colour * a + out[c * w * h + i] * (1.0 - a);
                }
            }
        }
    }
    let mut pixels = image.pixels.clone();
    for (i, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
        for c in 0..3 {
            // Colours stay within 0–255: convex blends of pixel values.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = out[c * w * h + i].round().clamp(0.0, 255.0) as u8;
            pixels[i * 3 + c] = v;
        }
    }
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_with_box(w: u32, h: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> Mask {
        let mut m = Mask::new_filled(w, h, 0);
        for y in y0..y1 {
            for x in x0..x1 {
                m.values[(y * w + x) as usize] = 255;
            }
        }
        m
    }

    #[test]
    fn the_crop_region_pads_the_box_and_takes_the_working_aspect() {
        let m = mask_with_box(200, 100, 90, 40, 110, 60);
        // A square working size: the 20×20 box plus 10 each side, already square.
        let r = crop_region(&m, 10, 64, 64).expect("region");
        assert_eq!(
            r,
            Region {
                x0: 80,
                y0: 30,
                x1: 120,
                y1: 70
            }
        );
        // A 2:1 working size widens it to 80×40, centred.
        let r = crop_region(&m, 10, 128, 64).expect("region");
        assert_eq!((r.width(), r.height()), (80, 40));
        assert_eq!((r.x0, r.y0), (60, 30));
        // Near an edge it is shifted back inside the image.
        let m = mask_with_box(200, 100, 0, 0, 10, 10);
        let r = crop_region(&m, 4, 64, 64).expect("region");
        assert_eq!(
            r,
            Region {
                x0: 0,
                y0: 0,
                x1: 14,
                y1: 14
            }
        );
        assert_eq!(crop_region(&Mask::new_filled(8, 8, 0), 4, 64, 64), None);
    }

    #[test]
    fn fill_spreads_the_surrounding_colour_and_keeps_the_rest() {
        let mut img = RgbImage::new_filled(40, 40, [200, 30, 30]);
        // A blue hole to fill, inside a red field.
        for y in 15..25 {
            for x in 15..25 {
                let i = (y * 40 + x) * 3;
                img.pixels[i..i + 3].copy_from_slice(&[0, 0, 255]);
            }
        }
        let m = mask_with_box(40, 40, 15, 15, 25, 25);
        let filled = fill(&img, &m);
        let centre = (20 * 40 + 20) * 3;
        let px = &filled.pixels[centre..centre + 3];
        assert!(
            px[0] > 180 && px[2] < 40,
            "the hole takes the red around it: {px:?}"
        );
        for (i, (a, b)) in img
            .pixels
            .chunks(3)
            .zip(filled.pixels.chunks(3))
            .enumerate()
        {
            if m.values[i] == 0 {
                assert_eq!(a, b, "kept pixel {i} changed");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for c in MaskedContent::ALL {
            assert_eq!(MaskedContent::parse(c.name()), Some(c));
        }
        assert_eq!(
            MaskedContent::parse("latent-noise"),
            Some(MaskedContent::LatentNoise)
        );
        for a in InpaintArea::ALL {
            assert_eq!(InpaintArea::parse(a.name()), Some(a));
        }
    }
}
