//! Studio's own CPU kernels for the convolutional networks, in the discipline of the quantized
//! matmul kernels ([`crate::quant`]): one driver, register-tiled micro-kernels per
//! instruction set (AVX-512, AVX2+FMA, portable scalar), chosen at run time by
//! [`KernelPath`] and forced by the same `STUDIO_CPU_PATH` variable.
//!
//! - [`FeatureMap`]: activations in channels-last layout (`h × w × c`, channels contiguous)
//!   with a zero border, kept from layer to layer so no operation converts layouts.
//! - [`conv`]: direct convolution as an implicit GEMM. The output is tiled into `MR` pixels
//!   × `NR` channels held in registers; the micro-kernel walks the taps and the input
//!   channels, broadcasting one input value per pixel and multiplying it by `NR` packed
//!   weights. No im2col buffer exists: each tap of each pixel is read where it lies in the
//!   padded map. The same driver does 3×3 and 1×1 convolutions, strides, and the phases of a
//!   stride-2 transposed convolution (each phase is an ordinary convolution with a subset of
//!   the taps, written to every other output pixel).
//! - [`PackedWeights`]: weights packed into the order the micro-kernel reads (`NR` output
//!   channels contiguous per input channel and tap, in chunks of input channels sized to stay
//!   in L1), filled from any function of `(out, in, tap)`: StyleGAN2 folds its per-sample
//!   style and demodulation into the packing. Stored as f32, or as f16/bf16 ([`Storage`]) for
//!   half-precision checkpoints: a half panel is widened into a per-thread f32 buffer once per
//!   strip of pixels, so the micro-kernels are the same and the weights keep their size.
//! - [`Conv2d`] and [`Linear`]: drop-ins for candle_nn's layers on these kernels (a linear layer
//!   is a 1×1 convolution whose pixels are the rows, [`rows_product`]).
//! - [`ConvTranspose2d`]: PyTorch's transposed convolution (DCGAN) as `s²` phase
//!   convolutions on the same driver, each writing every `s`-th output pixel.
//! - [`Epilogue`]: noise, bias, leaky ReLU, gain and clamp applied to each output tile while it
//!   is still in cache (NVIDIA's `bias_act`).
//! - [`winograd_conv3x3`]: Winograd F(2×2, 3×3) and F(4×4, 3×3) for 3×3 stride-1 layers, its
//!   `n²` matrix products run by the same micro-kernels.
//! - [`attention`]: memory-efficient attention (a block of queries at a time) on the same
//!   micro-kernels.
//! - [`GroupNorm`] (fused with the SiLU after it) and [`geglu`]: one pass over memory each.
//! - [`fir`]: the FIR filter of `upfirdn2d` over a channels-last map, with the same epilogue.
//!
//! The work is split over rayon's pool (persistent, `RAYON_NUM_THREADS` threads) by strips of
//! output pixels and groups of output channels; buffers belong to the caller and are reused
//! from frame to frame, so a steady state allocates nothing.

mod attention;
mod conv;
mod layers;
mod pointwise;
mod transposed;
mod winograd;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{attention, attention_heads};
pub use conv::{ConvGeom, Epilogue, PackedWeights, Storage, conv, fir, rows_product};
pub use layers::{
    Conv2d, Linear, Winograd, default_kernels, linear, with_kernels, with_weight_storage,
};
pub use pointwise::{ChannelAffine, GroupNorm, geglu};
pub use transposed::ConvTranspose2d;
pub use winograd::{WinogradScratch, WinogradTile, WinogradWeights, winograd_conv3x3};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
pub use crate::quant::KernelPath;

/// Activations in channels-last layout with a zero border of `pad` pixels on every side:
/// `(h + 2·pad) × (w + 2·pad) × c` floats per map, `n` maps (a batch) one after the other.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// Interior height in pixels (border excluded).
    pub h: usize,
    /// Interior width in pixels (border excluded).
    pub w: usize,
    /// Channels per pixel (contiguous in `data`).
    pub c: usize,
    /// Width of the zero border on every side, in pixels.
    pub pad: usize,
    /// Number of maps in the batch.
    pub n: usize,
    /// The `n` maps one after the other, [`FeatureMap::map_len`] floats each, border included.
    pub data: Vec<f32>,
}

impl Default for FeatureMap {
    fn default() -> Self {
        Self {
            h: 0,
            w: 0,
            c: 0,
            pad: 0,
            n: 1,
            data: Vec::new(),
        }
    }
}

impl FeatureMap {
    /// Floats of `n` padded `h × w × c` maps, or an error when that overflows.
    fn len_of(n: usize, h: usize, w: usize, c: usize, pad: usize) -> Result<usize> {
        (h + 2 * pad)
            .checked_mul(w + 2 * pad)
            .and_then(|len| len.checked_mul(c))
            .and_then(|len| len.checked_mul(n))
            .ok_or_else(|| Error::InvalidParameter(format!("{n} {h}×{w}×{c} maps are too large")))
    }

    /// Reshapes the map for `h × w × c` with a `pad` border and zeroes it, reusing the
    /// allocation when it is large enough.
    pub fn reset(&mut self, h: usize, w: usize, c: usize, pad: usize) -> Result<()> {
        let len = Self::len_of(1, h, w, c, pad)?;
        (self.h, self.w, self.c, self.pad, self.n) = (h, w, c, pad, 1);
        self.data.clear();
        self.data.resize(len, 0.0);
        Ok(())
    }

    /// [`Self::reset`] for a map whose interior the caller overwrites entirely: only the
    /// border is zeroed (the interior holds stale values until then).
    pub fn reset_border(&mut self, h: usize, w: usize, c: usize, pad: usize) -> Result<()> {
        self.reset_border_batch(1, h, w, c, pad)
    }

    /// [`Self::reset_border`] for a batch of `n` maps.
    pub fn reset_border_batch(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        pad: usize,
    ) -> Result<()> {
        let len = Self::len_of(n, h, w, c, pad)?;
        (self.h, self.w, self.c, self.pad, self.n) = (h, w, c, pad, n);
        self.data.resize(len, 0.0);
        if pad == 0 {
            return Ok(());
        }
        let (row, rows, map_len) = (self.row_stride(), h + 2 * pad, self.map_len());
        for map in self.data.chunks_exact_mut(map_len) {
            map[..pad * row].fill(0.0);
            map[(rows - pad) * row..].fill(0.0);
            for y in pad..rows - pad {
                let r = &mut map[y * row..(y + 1) * row];
                r[..pad * c].fill(0.0);
                r[row - pad * c..].fill(0.0);
            }
        }
        Ok(())
    }

    /// Floats per padded row.
    pub fn row_stride(&self) -> usize {
        (self.w + 2 * self.pad) * self.c
    }

    /// Floats per map of the batch, border included.
    pub fn map_len(&self) -> usize {
        (self.h + 2 * self.pad) * self.row_stride()
    }

    /// Index of channel 0 of interior pixel `(y, x)` of the first map.
    pub fn at(&self, y: usize, x: usize) -> usize {
        (y + self.pad) * self.row_stride() + (x + self.pad) * self.c
    }

    /// The interiors as an `(n, c, h, w)` tensor.
    pub fn to_nchw(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.n * self.c * self.h * self.w];
        self.write_nchw(&mut v);
        Ok(Tensor::from_vec(
            v,
            (self.n, self.c, self.h, self.w),
            device,
        )?)
    }

    /// Writes the interiors planar (`n × c × h × w`) into `dst` (which holds at least that
    /// many). Row by row: each row of a map is read from cache while its channels are
    /// scattered.
    pub fn write_nchw(&self, dst: &mut [f32]) {
        let plane = self.c * self.h * self.w;
        for b in 0..self.n {
            self.write_map_rows(b, &mut dst[b * plane..], self.h, 0);
        }
    }

    /// Writes the interior of the first map as rows `row0..row0 + h` of planar
    /// `c × full_h × w` values.
    pub fn write_nchw_rows(&self, dst: &mut [f32], full_h: usize, row0: usize) {
        self.write_map_rows(0, dst, full_h, row0);
    }

    /// Channels [`CHANNELS_PER_TASK`] at a time in parallel (each task owns those planes),
    /// every row of them a transpose of the map's row.
    fn write_map_rows(&self, b: usize, dst: &mut [f32], full_h: usize, row0: usize) {
        let (h, w, c) = (self.h, self.w, self.c);
        let (base, plane) = (b * self.map_len(), full_h * w);
        dst[..c * plane]
            .par_chunks_mut(CHANNELS_PER_TASK * plane)
            .enumerate()
            .for_each(|(task, planes)| {
                let (c0, cl) = (task * CHANNELS_PER_TASK, planes.len() / plane);
                for y in 0..h {
                    let row = &self.data[base + self.at(y, 0) + c0..];
                    transpose(row, c, &mut planes[(row0 + y) * w..], plane, w, cl);
                }
            });
    }

    /// Fills the map from planar values (`c × h × w`), with a `pad` border.
    pub fn load_planar(
        &mut self,
        src: &[f32],
        c: usize,
        h: usize,
        w: usize,
        pad: usize,
    ) -> Result<()> {
        self.load_planar_band(src, c, h, w, 0..h, pad, None)
    }

    /// Fills the map with rows `rows` of planar values (`c × h × w`) as its interior, and the
    /// rows around them (up to `pad` on each side, where the input has them) in its top and
    /// bottom border: a band of a same-size convolution's input, convolved as if whole. With
    /// `affine`, map `item`'s affine of it (a GroupNorm and SiLU) is applied to the values as
    /// they are loaded (not to the zero border).
    #[allow(clippy::too_many_arguments)]
    pub fn load_planar_band(
        &mut self,
        src: &[f32],
        c: usize,
        h: usize,
        w: usize,
        rows: std::ops::Range<usize>,
        pad: usize,
        affine: Option<(&ChannelAffine, usize)>,
    ) -> Result<()> {
        if src.len() < c * h * w || rows.end > h || rows.is_empty() {
            return Err(Error::InvalidParameter(format!(
                "{} values for rows {rows:?} of a {c}×{h}×{w} map",
                src.len()
            )));
        }
        check_affine(
            affine.map(|(a, _)| a),
            c,
            affine.map_or(0, |(_, item)| item + 1),
        )?;
        self.reset_border(rows.len(), w, c, pad)?;
        self.fill_rows(0, src, h, rows, affine);
        Ok(())
    }

    /// Fills a batch of `n` maps from `n` planar `c × h × w` inputs, with a `pad` border,
    /// applying each map's `affine` (a GroupNorm and SiLU) as the values are loaded.
    pub fn load_planar_batch(
        &mut self,
        src: &[f32],
        [n, c, h, w]: [usize; 4],
        pad: usize,
        affine: Option<&ChannelAffine>,
    ) -> Result<()> {
        let plane = c * h * w;
        if src.len() < n * plane || h == 0 {
            return Err(Error::InvalidParameter(format!(
                "{} values for {n} {c}×{h}×{w} maps",
                src.len()
            )));
        }
        check_affine(affine, c, n)?;
        self.reset_border_batch(n, h, w, c, pad)?;
        for b in 0..n {
            self.fill_rows(b, &src[b * plane..], h, 0..h, affine.map(|a| (a, b)));
        }
        Ok(())
    }

    /// Copies rows `rows` of a planar `c × h × w` input (and up to `pad` rows around them)
    /// into map `b`, whose interior starts at row `rows.start`.
    /// Rows in parallel, each a transpose of the input's `c × w` values of that row, then
    /// map `item`'s affine where one is given.
    fn fill_rows(
        &mut self,
        b: usize,
        src: &[f32],
        h: usize,
        rows: std::ops::Range<usize>,
        affine: Option<(&ChannelAffine, usize)>,
    ) {
        let (w, c, pad) = (self.w, self.c, self.pad);
        let (stride, map_len) = (self.row_stride(), self.map_len());
        let (y0, y1) = (rows.start.saturating_sub(pad), (rows.end + pad).min(h));
        self.data[b * map_len..(b + 1) * map_len]
            .par_chunks_mut(stride)
            .skip(y0 + pad - rows.start)
            .take(y1 - y0)
            .enumerate()
            .for_each(|(i, row)| {
                let y = y0 + i;
                let interior = &mut row[pad * c..(pad + w) * c];
                transpose(&src[y * w..], h * w, interior, c, c, w);
                if let Some((affine, item)) = affine {
                    affine.apply(item, interior);
                }
            });
    }

    /// Fills the interior from a `(1, c, h, w)` (or `(c, h, w)`) tensor, with a `pad` border.
    pub fn load_nchw(&mut self, t: &Tensor, pad: usize) -> Result<()> {
        let (c, h, w) = match t.dims() {
            [1, c, h, w] | [c, h, w] => (*c, *h, *w),
            other => {
                return Err(Error::InvalidParameter(format!(
                    "expected a (1, c, h, w) map, found {other:?}"
                )));
            }
        };
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        with_values(&t, |v| self.load_planar(v, c, h, w, pad))?
    }
}

/// An error unless `affine` (where given) is for `c` channels and holds at least `maps` maps.
fn check_affine(affine: Option<&ChannelAffine>, c: usize, maps: usize) -> Result<()> {
    match affine {
        Some(a) if a.channels() != c || a.maps() < maps => Err(Error::InvalidParameter(format!(
            "a normalization of {} maps of {} channels applied to {maps} of {c}",
            a.maps(),
            a.channels()
        ))),
        _ => Ok(()),
    }
}

/// Channels one task of [`FeatureMap::write_nchw`] writes (a 64-byte line of a pixel).
const CHANNELS_PER_TASK: usize = 16;

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i < rows`, `j < cols`: the copies
/// between planar and channels-last layouts. 8×8 blocks in AVX registers where the CPU has
/// AVX2 (and no narrower path is forced), a plain loop elsewhere; the strided one-value
/// copies it replaces were most of the layout conversions' time.
///
/// # Panics
/// When either slice is too short for its strides (a bug in the caller, not input).
#[allow(unsafe_code)]
pub(crate) fn transpose(
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        (rows - 1) * src_stride + cols <= src.len() && (cols - 1) * dst_stride + rows <= dst.len(),
        "transpose out of bounds"
    );
    let (mut r8, mut c8) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if KernelPath::Avx2.available() {
        (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        for i in (0..r8).step_by(8) {
            for j in (0..c8).step_by(8) {
                // SAFETY: the assert above bounds rows `i..i + 8` × columns `j..j + 8` of
                // both sides; the CPU has AVX.
                unsafe {
                    x86::transpose8x8(
                        src.as_ptr().add(i * src_stride + j),
                        src_stride,
                        dst.as_mut_ptr().add(j * dst_stride + i),
                        dst_stride,
                    );
                }
            }
        }
    }
    // What the blocks left: the columns past `c8` of their rows, then the rows past `r8`.
    for j in c8..cols {
        for i in 0..r8 {
            dst[j * dst_stride + i] = src[i * src_stride + j];
        }
    }
    for j in 0..cols {
        let out = &mut dst[j * dst_stride + r8..j * dst_stride + rows];
        for (i, o) in (r8..rows).zip(out) {
            *o = src[i * src_stride + j];
        }
    }
}

/// Calls `f` with the values of a contiguous f32 tensor on the CPU, without copying them.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::InvalidParameter(
            "the native kernels need tensors on the CPU".into(),
        ));
    };
    let values = cpu.as_slice::<f32>()?;
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        Error::InvalidParameter("the native kernels need contiguous tensors".into())
    })?;
    Ok(f(&values[a..b]))
}

/// Test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_values {
    use super::FeatureMap;

    /// A small deterministic generator (xorshift) of values in [-1, 1).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims(), "shapes differ");
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }

    /// A map with a `pad` border holding `x` (`h × w × c`, channels-last).
    pub fn map_from_nhwc(x: &[f32], h: usize, w: usize, c: usize, pad: usize) -> FeatureMap {
        let mut map = FeatureMap::default();
        map.reset(h, w, c, pad).expect("map");
        for y in 0..h {
            for xx in 0..w {
                let at = map.at(y, xx);
                map.data[at..at + c].copy_from_slice(&x[(y * w + xx) * c..][..c]);
            }
        }
        map
    }
}

#[cfg(test)]
// The layout copies move values unchanged: exact comparisons are the point.
#[allow(clippy::float_cmp)]
mod tests {
    use super::test_values::values;
    use super::{FeatureMap, transpose};

    #[test]
    fn transpose_matches_the_plain_loop_on_awkward_shapes() {
        // Whole 8×8 blocks, block tails on either side, single rows and columns.
        for (rows, cols) in [(1, 1), (8, 8), (9, 17), (16, 40), (3, 64), (40, 3), (23, 8)] {
            let (src_stride, dst_stride) = (cols + 5, rows + 3);
            let src = values(rows * src_stride, 7);
            let mut dst = vec![f32::NAN; cols * dst_stride];
            transpose(&src, src_stride, &mut dst, dst_stride, rows, cols);
            for j in 0..cols {
                for i in 0..rows {
                    assert_eq!(
                        dst[j * dst_stride + i].to_bits(),
                        src[i * src_stride + j].to_bits()
                    );
                }
                // Past `rows` in each destination row nothing is written.
                assert!(
                    dst[j * dst_stride + rows..(j + 1) * dst_stride]
                        .iter()
                        .all(|v| v.is_nan())
                );
            }
        }
    }

    #[test]
    fn planar_maps_go_channels_last_and_back_unchanged() {
        // Channels and widths off the 8-wide blocks; a batch; a band with its border rows.
        for (n, c, h, w, pad) in [
            (1, 3, 5, 7, 1),
            (2, 17, 9, 10, 1),
            (1, 40, 8, 16, 0),
            (3, 8, 1, 1, 2),
        ] {
            let src = values(n * c * h * w, 9);
            let mut map = FeatureMap::default();
            map.load_planar_batch(&src, [n, c, h, w], pad, None)
                .expect("load");
            for b in 0..n {
                for y in 0..h + 2 * pad {
                    for x in 0..w + 2 * pad {
                        for ch in 0..c {
                            let got =
                                map.data[b * map.map_len() + y * map.row_stride() + x * c + ch];
                            let inside = (pad..h + pad).contains(&y) && (pad..w + pad).contains(&x);
                            let want = if inside {
                                src[((b * c + ch) * h + y - pad) * w + x - pad]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "({n},{c},{h},{w}) at {b},{y},{x},{ch}"
                            );
                        }
                    }
                }
            }
            let mut back = vec![0f32; src.len()];
            map.write_nchw(&mut back);
            assert_eq!(back, src);
            if n == 1 && h > 3 {
                // Rows 1..3 as a band: its interior those rows, its border rows 0 and 3.
                map.load_planar_band(&src, c, h, w, 1..3, 1, None)
                    .expect("band");
                let mut rows = vec![0f32; src.len()];
                map.write_nchw_rows(&mut rows, h, 1);
                for ch in 0..c {
                    for y in 0..h {
                        let at = (ch * h + y) * w;
                        let inside = (1..3).contains(&y);
                        let want = |i: usize| if inside { src[i] } else { 0.0 };
                        assert!((at..at + w).all(|i| rows[i] == want(i)));
                    }
                    for y in [0, 3] {
                        for x in 0..w {
                            let got = map.data[y * map.row_stride() + (x + 1) * c + ch];
                            assert_eq!(got, src[(ch * h + y) * w + x]);
                        }
                    }
                }
            }
        }
    }
}
