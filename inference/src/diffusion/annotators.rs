//! ControlNet control-image preprocessors ("annotators"), computed as the SD web UI's ControlNet
//! extension (sd-webui-controlnet, `scripts/processor.py` and `annotator/`) computes them with
//! OpenCV, in plain Rust:
//!
//! - [`canny`]: `cv2.Canny` on the RGB image, bit for bit (3×3 Sobel with replicated borders,
//!   L1 magnitude, the strongest channel per pixel, OpenCV's integer non-maximum suppression,
//!   8-connected hysteresis);
//! - [`scribble_xdog`]: the extension's difference of Gaussians (`cv2.GaussianBlur` with sigma
//!   0.5 and 5.0 on the float image), thresholded as the extension does;
//! - [`invert`]: "invert (from white bg & black line)", `255 − value`.
//!
//! [`Preprocessor`] names them as the extension's module names and applies one. The results are
//! white on black, the same in all three channels (the extension stacks its single-channel
//! maps to three). The resize to the processor resolution is not done here: the caller sizes
//! the image first.
//!
//! Memory is bounded by the image: the outputs, one byte per pixel of edge map for Canny (and
//! its hysteresis stack), and a few rows of gradients or blurred rows, never a full float copy.

use super::imaging::RgbImage;

/// A ControlNet preprocessor as the extension's module list names it, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocessor {
    /// `"none"`: the image is the control image, unchanged.
    None,
    /// `"canny"`: [`canny`] edges with hysteresis thresholds `low` and `high`
    /// (the extension's defaults: 100 and 200).
    Canny {
        /// Lower hysteresis threshold (on `|gx| + |gy|` of the 3×3 Sobel gradient).
        low: f64,
        /// Upper hysteresis threshold: edges start at gradients above it.
        high: f64,
    },
    /// `"scribble_xdog"`: [`scribble_xdog`] lines (the extension's default threshold: 32).
    ScribbleXdog {
        /// The XDoG threshold (the extension's `thr_a`); lower keeps more lines.
        threshold: f64,
    },
    /// `"invert"`: [`invert`], for a scribble drawn dark on white.
    Invert,
}

impl Preprocessor {
    /// The extension's module name: `"none"`, `"canny"`, `"scribble_xdog"` or `"invert"`.
    pub fn name(&self) -> &'static str {
        match self {
            Preprocessor::None => "none",
            Preprocessor::Canny { .. } => "canny",
            Preprocessor::ScribbleXdog { .. } => "scribble_xdog",
            Preprocessor::Invert => "invert",
        }
    }

    /// The preprocessor of an extension module name (case-insensitive, surrounding spaces
    /// ignored), with the extension's default settings: Canny 100 / 200, XDoG threshold 32.
    /// `None` for a name not listed in [`Preprocessor::name`].
    pub fn parse(s: &str) -> Option<Preprocessor> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(Preprocessor::None),
            "canny" => Some(Preprocessor::Canny {
                low: 100.0,
                high: 200.0,
            }),
            "scribble_xdog" => Some(Preprocessor::ScribbleXdog { threshold: 32.0 }),
            "invert" => Some(Preprocessor::Invert),
            _ => None,
        }
    }

    /// Runs the preprocessor on `img` (the image unchanged for [`Preprocessor::None`]).
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        match *self {
            Preprocessor::None => img.clone(),
            Preprocessor::Canny { low, high } => canny(img, low, high),
            Preprocessor::ScribbleXdog { threshold } => scribble_xdog(img, threshold),
            Preprocessor::Invert => invert(img),
        }
    }
}

/// An empty (0×0) image: the result for an image whose pixel buffer does not match its size.
fn empty() -> RgbImage {
    RgbImage {
        width: 0,
        height: 0,
        pixels: Vec::new(),
    }
}

/// A white-on-black RGB image from a one-byte-per-pixel map (`true` = white).
fn from_map(width: u32, height: u32, on: impl Iterator<Item = bool>) -> RgbImage {
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for v in on {
        let b = if v { 255 } else { 0 };
        pixels.extend_from_slice(&[b, b, b]);
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// The extension's "invert (from white bg & black line)": `255 − value` in every channel, for
/// a user's scribble drawn dark on white. An image whose pixel buffer does not match its size
/// gives an empty (0×0) image.
pub fn invert(img: &RgbImage) -> RgbImage {
    if img.check().is_err() {
        return empty();
    }
    RgbImage {
        width: img.width,
        height: img.height,
        pixels: img.pixels.iter().map(|v| 255 - v).collect(),
    }
}

/// `tan(22.5°)` in OpenCV's Canny fixed point (15 fractional bits).
const TG22: i32 = 13573;

/// The 3×3 Sobel gradient of source row `y` (borders replicated, as `cv::Canny` asks of
/// `cv::Sobel`), reduced to the channel of largest `|gx| + |gy|` per pixel (the first on
/// ties, as OpenCV). Writes `mag[x + 1]` (the ends of `mag` stay 0), `gx[x]` and `gy[x]`.
fn gradient_row(img: &RgbImage, y: usize, mag: &mut [i32], gx: &mut [i16], gy: &mut [i16]) {
    let (w, h) = (img.width as usize, img.height as usize);
    let row = |r: usize| &img.pixels[r * w * 3..(r + 1) * w * 3];
    let (above, here, below) = (row(y.saturating_sub(1)), row(y), row((y + 1).min(h - 1)));
    let p = |r: &[u8], x: usize, c: usize| i32::from(r[x * 3 + c]);
    for x in 0..w {
        let (xl, xr) = (x.saturating_sub(1), (x + 1).min(w - 1));
        let mut best = (-1, 0, 0);
        for c in 0..3 {
            let dx = p(above, xr, c) - p(above, xl, c)
                + 2 * (p(here, xr, c) - p(here, xl, c))
                + p(below, xr, c)
                - p(below, xl, c);
            let dy = p(below, xl, c) - p(above, xl, c)
                + 2 * (p(below, x, c) - p(above, x, c))
                + p(below, xr, c)
                - p(above, xr, c);
            let m = dx.abs() + dy.abs();
            if m > best.0 {
                best = (m, dx, dy);
            }
        }
        mag[x + 1] = best.0;
        // |dx|, |dy| ≤ 4 × 255: they fit in i16, as OpenCV's CV_16S derivatives.
        gx[x] = best.1 as i16;
        gy[x] = best.2 as i16;
    }
}

/// Canny edges exactly as `cv2.Canny(img, low, high)` computes them on the 8-bit RGB image
/// (aperture 3, `L2gradient = false`): the 3×3 Sobel gradients of each channel with replicated
/// borders, at each pixel the channel of largest `|gx| + |gy|`, OpenCV's non-maximum
/// suppression (its fixed-point `tan 22.5°` sector test, ties broken as OpenCV breaks them),
/// thresholds `⌊low⌋` / `⌊high⌋` (swapped if `low > high`), and hysteresis over 8-connected
/// neighbours. White (255) edges on black, in all three channels.
///
/// An image whose pixel buffer does not match its size gives an empty (0×0) image.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> RgbImage {
    if img.check().is_err() {
        return empty();
    }
    let (w, h) = (img.width as usize, img.height as usize);
    if w == 0 || h == 0 {
        return from_map(img.width, img.height, std::iter::empty());
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // cvFloor; the `as` conversion saturates (and takes NaN to 0).
    let (low, high) = (low.floor() as i32, high.floor() as i32);

    // The edge map with a one-pixel frame: 1 = not an edge (and the frame), 0 = a candidate
    // (a local maximum above `low`), 2 = an edge.
    let step = w + 2;
    let mut map = vec![1u8; step * (h + 2)];
    let mut stack: Vec<usize> = Vec::new();

    // Three rows of magnitudes (previous, current, next), each with a zero at both ends, and
    // the current and next rows' gradients.
    let mut mag_p = vec![0i32; w + 2];
    let mut mag_a = vec![0i32; w + 2];
    let mut mag_n = vec![0i32; w + 2];
    let (mut gx_a, mut gy_a) = (vec![0i16; w], vec![0i16; w]);
    let (mut gx_n, mut gy_n) = (vec![0i16; w], vec![0i16; w]);
    gradient_row(img, 0, &mut mag_n, &mut gx_n, &mut gy_n);

    for y in 0..h {
        // Scroll: the next row becomes the current one.
        std::mem::swap(&mut mag_p, &mut mag_a);
        std::mem::swap(&mut mag_a, &mut mag_n);
        std::mem::swap(&mut gx_a, &mut gx_n);
        std::mem::swap(&mut gy_a, &mut gy_n);
        if y + 1 < h {
            gradient_row(img, y + 1, &mut mag_n, &mut gx_n, &mut gy_n);
        } else {
            mag_n.fill(0);
        }
        let map_row = (y + 1) * step + 1;
        for x in 0..w {
            let j = x + 1; // index into the magnitude rows
            let m = mag_a[j];
            if m <= low {
                continue; // stays 1
            }
            let (xs, ys) = (i32::from(gx_a[x]), i32::from(gy_a[x]));
            let ax = xs.abs();
            let ay = ys.abs() << 15;
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                // Near horizontal gradient: compare left and right.
                m > mag_a[j - 1] && m >= mag_a[j + 1]
            } else {
                let tg67x = tg22x + (ax << 16);
                if ay > tg67x {
                    // Near vertical gradient: compare above and below.
                    m > mag_p[j] && m >= mag_n[j]
                } else if (xs ^ ys) < 0 {
                    // Diagonal, signs differ: above-right and below-left.
                    m > mag_p[j + 1] && m > mag_n[j - 1]
                } else {
                    // Diagonal, same signs: above-left and below-right.
                    m > mag_p[j - 1] && m > mag_n[j + 1]
                }
            };
            if is_max {
                let at = map_row + x;
                if m > high {
                    map[at] = 2;
                    stack.push(at);
                } else {
                    map[at] = 0;
                }
            }
        }
    }

    // Hysteresis: every candidate 8-connected to an edge becomes an edge. The frame is 1, so
    // the neighbours of a pixel inside it are always in the map.
    while let Some(at) = stack.pop() {
        for n in [
            at - step - 1,
            at - step,
            at - step + 1,
            at - 1,
            at + 1,
            at + step - 1,
            at + step,
            at + step + 1,
        ] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }

    from_map(
        img.width,
        img.height,
        (0..h).flat_map(|y| {
            let row = &map[(y + 1) * step + 1..(y + 1) * step + 1 + w];
            row.iter().map(|&v| v == 2)
        }),
    )
}

/// `cv::getGaussianKernel(n, sigma, CV_32F)` for `sigma > 0`: `exp(−x² / 2σ²)` normalized in
/// double precision, then rounded to `f32`. Returns the centre and one side (`k[0]` is the
/// centre weight, `k[i]` the weight at distance `i`).
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    // cv::GaussianBlur's size for a float image: round(sigma × 4 × 2 + 1) | 1.
    let n = (((sigma * 8.0 + 1.0).round() as i64) | 1).max(1) as usize;
    let half = (n - 1) / 2;
    let scale = -0.5 / (sigma * sigma);
    let side: Vec<f64> = (1..=half).map(|d| ((d * d) as f64 * scale).exp()).collect();
    let sum = 1.0 + 2.0 * side.iter().sum::<f64>();
    let mul = 1.0 / sum;
    std::iter::once(mul)
        .chain(side.iter().map(|v| v * mul))
        .map(|v| v as f32)
        .collect()
}

/// `cv::BORDER_REFLECT_101` (`gfedcb|abcdefgh|gfedcba`, cv::GaussianBlur's default border):
/// the source index of `p` in `0..len`.
fn reflect101(mut p: isize, len: usize) -> usize {
    let n = len as isize;
    if n == 1 {
        return 0;
    }
    while p < 0 || p >= n {
        p = if p < 0 { -p } else { 2 * n - 2 - p };
    }
    p as usize
}

/// A separable Gaussian blur of a 3-channel image as `f32`, as `cv::GaussianBlur`'s own filter
/// does it on a `CV_32FC3` image (a horizontal pass into `f32` rows, then a vertical pass, each
/// adding mirrored pairs of taps), one output row at a time: it keeps only as many
/// horizontally filtered rows as the kernel is tall.
struct RowBlur<'a> {
    img: &'a RgbImage,
    kernel: Vec<f32>,
    /// Horizontally filtered rows, slot `r % rows.len()` holding source row `tags[slot]`.
    rows: Vec<Vec<f32>>,
    tags: Vec<Option<usize>>,
    /// Scratch: one source row with reflected borders, as `f32`.
    padded: Vec<f32>,
}

impl<'a> RowBlur<'a> {
    fn new(img: &'a RgbImage, sigma: f64) -> RowBlur<'a> {
        let kernel = gaussian_kernel(sigma);
        // The rows one output row needs all lie in a window of `2 × half + 1` consecutive
        // source rows (reflections included), so that many slots never collide.
        let slots = (2 * kernel.len() - 1).min(img.height as usize);
        RowBlur {
            img,
            kernel,
            rows: vec![Vec::new(); slots],
            tags: vec![None; slots],
            padded: Vec::new(),
        }
    }

    /// Horizontal pass of source row `r` into its slot.
    fn fill(&mut self, r: usize) {
        let slot = r % self.rows.len();
        if self.tags[slot] == Some(r) {
            return;
        }
        let w = self.img.width as usize;
        let half = self.kernel.len() - 1;
        let src = &self.img.pixels[r * w * 3..(r + 1) * w * 3];
        // The row with its reflected borders, as f32.
        self.padded.clear();
        for x in 0..w + 2 * half {
            let sx = reflect101(x as isize - half as isize, w) * 3;
            self.padded
                .extend(src[sx..sx + 3].iter().map(|&v| f32::from(v)));
        }
        let out = &mut self.rows[slot];
        out.clear();
        out.resize(w * 3, 0.0);
        let k = &self.kernel;
        let p = &self.padded;
        for (i, o) in out.iter_mut().enumerate() {
            let centre = i + half * 3;
            let mut s = p[centre] * k[0];
            for (d, &kv) in k.iter().enumerate().skip(1) {
                s += (p[centre - d * 3] + p[centre + d * 3]) * kv;
            }
            *o = s;
        }
        self.tags[slot] = Some(r);
    }

    /// Output row `y` (`width × 3` values) into `out`.
    fn row(&mut self, y: usize, out: &mut [f32]) {
        let h = self.img.height as usize;
        let half = self.kernel.len() as isize - 1;
        for d in -half..=half {
            self.fill(reflect101(y as isize + d, h));
        }
        let n = self.rows.len();
        let src = |d: isize| &self.rows[reflect101(y as isize + d, h) % n];
        let k = &self.kernel;
        let centre = src(0);
        for (o, &v) in out.iter_mut().zip(centre) {
            *o = v * k[0];
        }
        for (i, &kv) in k.iter().enumerate().skip(1) {
            let (up, down) = (src(-(i as isize)), src(i as isize));
            for ((o, &a), &b) in out.iter_mut().zip(up).zip(down) {
                *o += (a + b) * kv;
            }
        }
    }
}

/// The extension's `scribble_xdog` (thr_a = `threshold`, 32 by default): the image blurred
/// with `cv2.GaussianBlur` at sigma 0.5 and 5.0 (`f32`, kernel sizes 5 and 41, reflected
/// borders), `dog = clip(255 − min over channels of (blur5 − blur0.5), 0, 255)` truncated to a
/// byte, and a line where `2 × (255 − dog) > threshold` computed as the extension does it on
/// `uint8` arrays, i.e. modulo 256 (so a difference of 128 to 144 levels, very strong and
/// rare, is not a line there, and not here). White (255) lines on black, in all three
/// channels.
///
/// The blurs are `f32` sums: OpenCV computes them with its SIMD filters or Intel IPP (which
/// it uses for Gaussian blurs where available), whose rounding differs in the last bits, so a
/// pixel whose difference lands within rounding of a threshold may differ (none did in the
/// tests). An image whose pixel buffer does not match its size gives an empty (0×0) image.
pub fn scribble_xdog(img: &RgbImage, threshold: f64) -> RgbImage {
    if img.check().is_err() {
        return empty();
    }
    let (w, h) = (img.width as usize, img.height as usize);
    if w == 0 || h == 0 {
        return from_map(img.width, img.height, std::iter::empty());
    }
    let mut fine = RowBlur::new(img, 0.5);
    let mut coarse = RowBlur::new(img, 5.0);
    let (mut g1, mut g2) = (vec![0f32; w * 3], vec![0f32; w * 3]);
    let mut lines = Vec::with_capacity(w * h);
    for y in 0..h {
        fine.row(y, &mut g1);
        coarse.row(y, &mut g2);
        for (a, b) in g1.chunks_exact(3).zip(g2.chunks_exact(3)) {
            let m = (b[0] - a[0]).min(b[1] - a[1]).min(b[2] - a[2]);
            // astype(np.uint8) of the clipped value: truncation.
            let dog = (255.0 - m).clamp(0.0, 255.0) as u8;
            let v = (255 - dog).wrapping_mul(2);
            lines.push(f64::from(v) > threshold);
        }
    }
    from_map(img.width, img.height, lines.into_iter())
}
