//! Winograd F(m×m, 3×3) convolution for 3×3, stride-1, pad-1 layers (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each `m × m` output tile comes from an `n × n` input tile (`n = m + 2`):
//! `Y = Aᵀ [U ⊙ V] A` with `U = G g Gᵀ` (the weights, transformed once at load) and
//! `V = Bᵀ d B` (the input tile). Summed over input channels, the `n²` element-wise products
//! become `n²` independent matrix products (tiles × in) · (in × out), run by the packed
//! micro-kernels of [`super::conv`] as one batch. F(2×2, 3×3) does 16 multiplications per 4
//! outputs instead of 36 (2.25× fewer), F(4×4, 3×3) 36 per 16 (4× fewer) with larger
//! transform constants (a little more rounding).
//!
//! The map is processed in strips of tile rows sized so the transformed input and the
//! products of a strip stay within a few MiB. A per-input-channel scale (StyleGAN2's style)
//! rides along the input transform, and the [`Epilogue`] (with a per-output-channel scale:
//! the demodulation) along the output transform.
#![allow(unsafe_code)]
// The transforms index small matrices by row and column; index loops read clearer here.
#![allow(clippy::needless_range_loop)]
// The transforms must inline into their lane loops to vectorize (measured: without it the
// input transform took as long as the matrix products).
#![allow(clippy::inline_always)]

use rayon::prelude::*;

use super::conv::{ConvGeom, Epilogue, PackedWeights, conv};
use super::{FeatureMap, KernelPath};
use crate::error::{Error, Result};

/// Channels transformed together (one vector register's worth on AVX-512).
const LANES: usize = 16;
/// Floats the transformed input and products of one strip may take.
const STRIP_FLOATS: usize = 2 << 20;

const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const G4: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The output tile: F(2×2, 3×3) or F(4×4, 3×3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2×2, 3×3): 2×2 output tiles from 4×4 input tiles (2.25× fewer multiplications).
    F2,
    /// F(4×4, 3×3): 4×4 output tiles from 6×6 input tiles (4× fewer multiplications, a little
    /// more rounding).
    F4,
}

impl WinogradTile {
    /// Output tile side `m`.
    pub fn m(self) -> usize {
        match self {
            WinogradTile::F2 => 2,
            WinogradTile::F4 => 4,
        }
    }

    /// Input tile side `n = m + 2`.
    pub fn n(self) -> usize {
        self.m() + 2
    }
}

/// `G g Gᵀ` of every (out, in) pair, packed as `n²` matrices for the micro-kernels.
#[derive(Debug, Clone)]
pub struct WinogradWeights {
    tile: WinogradTile,
    packed: PackedWeights,
}

fn transform_weights<const N: usize>(
    g: &[[f32; 3]; N],
    packed: &mut PackedWeights,
    cout: usize,
    cin: usize,
    weight: &(impl Fn(usize, usize, usize, usize) -> f32 + Sync),
) -> Result<()> {
    packed.pack_batch(N * N, cout, cin, 1, |xi, o, i, _| {
        let (a, b) = (xi / N, xi % N);
        let mut s = 0f32;
        for p in 0..3 {
            for q in 0..3 {
                s += g[a][p] * weight(o, i, p, q) * g[b][q];
            }
        }
        s
    })
}

impl WinogradWeights {
    /// Transforms `cout × cin` 3×3 kernels, `weight(o, i, ky, kx)` giving each (a
    /// correlation, as candle's and PyTorch's `conv2d`), into `packed` (its path and storage
    /// kept, its allocation reused).
    pub fn new(
        mut packed: PackedWeights,
        tile: WinogradTile,
        cout: usize,
        cin: usize,
        weight: impl Fn(usize, usize, usize, usize) -> f32 + Sync,
    ) -> Result<Self> {
        match tile {
            WinogradTile::F2 => transform_weights(&G2, &mut packed, cout, cin, &weight)?,
            WinogradTile::F4 => transform_weights(&G4, &mut packed, cout, cin, &weight)?,
        }
        Ok(Self { tile, packed })
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.packed.cin()
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.packed.cout()
    }

    /// The kernel path the transformed weights are packed for.
    pub fn path(&self) -> KernelPath {
        self.packed.path()
    }
}

/// The transformed input and the products of one strip, reused between calls.
#[derive(Debug, Default)]
pub struct WinogradScratch {
    v: Vec<f32>,
    m: Vec<f32>,
}

/// A buffer written by the threads of one transform, each tile by one thread.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: each tile's values are written by the one thread that owns the tile, at offsets
// inside the buffer (checked by the callers' sizes).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// F(2, 3)'s `Bᵀ x` on 4 values.
#[inline(always)]
fn bt2(x: [f32; 4]) -> [f32; 4] {
    [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3]]
}

/// F(2, 3)'s `Aᵀ x`.
#[inline(always)]
fn at2(x: [f32; 4]) -> [f32; 2] {
    [x[0] + x[1] + x[2], x[1] - x[2] - x[3]]
}

/// F(4, 3)'s `Bᵀ x` on 6 values (Lavin & Gray's Bᵀ, factored).
#[inline(always)]
fn bt4(x: [f32; 6]) -> [f32; 6] {
    [
        4.0 * x[0] - 5.0 * x[2] + x[4],
        -4.0 * (x[1] + x[2]) + x[3] + x[4],
        4.0 * (x[1] - x[2]) + x[4] - x[3],
        2.0 * (x[3] - x[1]) + x[4] - x[2],
        2.0 * (x[1] - x[3]) + x[4] - x[2],
        4.0 * x[1] - 5.0 * x[3] + x[5],
    ]
}

/// F(4, 3)'s `Aᵀ x` (Lavin & Gray's Aᵀ, factored).
#[inline(always)]
fn at4(x: [f32; 6]) -> [f32; 4] {
    let (s12, d12, s34, d34) = (x[1] + x[2], x[1] - x[2], x[3] + x[4], x[3] - x[4]);
    [
        x[0] + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + x[5],
    ]
}

/// `T d Tᵀ` of an `n × n` tile of `LANES`-wide cells (flat: cell `(i, j)` at
/// `(i·N + j)·LANES`), with `f` the 1-D transform `x ↦ T x`: along the rows, then down the
/// columns. Each lane loop is straight-line code over constant strides, so it vectorizes.
#[inline(always)]
fn transform_2d<const N: usize, const R: usize>(
    f: impl Fn([f32; N]) -> [f32; R],
    d: &[f32],
    out: &mut [f32],
) {
    let mut t = [0f32; 36 * LANES];
    assert!(d.len() >= N * N * LANES && out.len() >= R * R * LANES && N * R <= 36);
    for i in 0..N {
        for l in 0..LANES {
            let y = f(std::array::from_fn(|j| d[(i * N + j) * LANES + l]));
            for (b, v) in y.into_iter().enumerate() {
                t[(i * R + b) * LANES + l] = v;
            }
        }
    }
    for b in 0..R {
        for l in 0..LANES {
            let y = f(std::array::from_fn(|i| t[(i * R + b) * LANES + l]));
            for (a, v) in y.into_iter().enumerate() {
                out[(a * R + b) * LANES + l] = v;
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, inlined as one vector move for a whole chunk of lanes (a call
/// to `memmove` per 64 bytes was most of the 5% a UNet step's profile spent in `memmove`).
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; LANES]>::try_from(&mut *dst),
        <&[f32; LANES]>::try_from(src),
    ) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => dst.copy_from_slice(src),
    }
}

/// Where a strip's tiles are. Tile rows are counted through the batch: row `r` is row
/// `r % th` of map `r / th`.
struct Strip {
    /// First tile row.
    r0: usize,
    /// Tile rows per map.
    th: usize,
    /// Tiles per row.
    tw: usize,
    /// Tiles in the strip.
    tiles: usize,
}

/// Transforms the input tiles of a strip into `v` (`[n²][tiles][cin]`).
fn transform_strip_input<const M: usize, const N: usize>(
    bt: impl Fn([f32; N]) -> [f32; N] + Sync,
    input: &FeatureMap,
    in_scale: Option<&[f32]>,
    strip: &Strip,
    v: &mut [f32],
) {
    let cin = input.c;
    let (ph, pw) = (input.h + 2 * input.pad, input.w + 2 * input.pad);
    let row = input.row_stride();
    let tiles = strip.tiles;
    assert!(v.len() >= N * N * tiles * cin);
    let shared = Shared(v.as_mut_ptr());
    let map_len = input.map_len();
    (0..tiles).into_par_iter().for_each(|t| {
        let (r, tx) = (strip.r0 + t / strip.tw, t % strip.tw);
        let (base, ty) = ((r / strip.th) * map_len, r % strip.th);
        // Padded coordinates of the tile's corner (the convolution's padding is 1).
        let (y0, x0) = (ty * M + input.pad - 1, tx * M + input.pad - 1);
        // Zeroed once per tile: the cells past the map's edge stay zero for every chunk of
        // channels, the others are overwritten (lanes past a short chunk's end hold stale
        // values whose results are never copied out).
        let mut d = [0f32; 36 * LANES];
        let mut vt = [0f32; 36 * LANES];
        for c0 in (0..cin).step_by(LANES) {
            let cb = LANES.min(cin - c0);
            let mut lanes = [1f32; LANES];
            if let Some(s) = in_scale {
                lanes[..cb].copy_from_slice(&s[c0..c0 + cb]);
            }
            for i in 0..N {
                if y0 + i >= ph {
                    break;
                }
                for j in 0..N {
                    if x0 + j >= pw {
                        break;
                    }
                    let at = base + (y0 + i) * row + (x0 + j) * cin + c0;
                    let cell = &mut d[(i * N + j) * LANES..][..LANES];
                    for ((c, &x), &s) in cell.iter_mut().zip(&input.data[at..at + cb]).zip(&lanes) {
                        *c = x * s;
                    }
                }
            }
            transform_2d(&bt, &d, &mut vt);
            for ab in 0..N * N {
                let at = (ab * tiles + t) * cin + c0;
                // SAFETY: `at + cb ≤ N²·tiles·cin ≤ v.len()` (asserted above); tile `t` is
                // written by this thread only.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(at), cb) };
                copy_lanes(dst, &vt[ab * LANES..ab * LANES + cb]);
            }
        }
    });
}

/// Transforms a strip's products (`[n²][tiles][cout]`) back into output pixels.
fn transform_strip_output<const M: usize, const N: usize>(
    at: impl Fn([f32; N]) -> [f32; M] + Sync,
    mm: &[f32],
    strip: &Strip,
    out: &mut FeatureMap,
    epi: &Epilogue<'_>,
) {
    let cout = out.c;
    let (h, w) = (out.h, out.w);
    let tiles = strip.tiles;
    assert!(mm.len() >= N * N * tiles * cout);
    let (row, pad) = (out.row_stride(), out.pad);
    let (len, map_len) = (out.data.len(), out.map_len());
    let shared = Shared(out.data.as_mut_ptr());
    (0..tiles).into_par_iter().for_each(|t| {
        let (r, tx) = (strip.r0 + t / strip.tw, t % strip.tw);
        let (base, ty) = ((r / strip.th) * map_len, r % strip.th);
        // Once per tile (lanes past a short chunk's end hold stale values, never copied out).
        let mut m = [0f32; 36 * LANES];
        let mut y = [0f32; 16 * LANES];
        for c0 in (0..cout).step_by(LANES) {
            let cb = LANES.min(cout - c0);
            for ab in 0..N * N {
                let src = (ab * tiles + t) * cout + c0;
                copy_lanes(&mut m[ab * LANES..ab * LANES + cb], &mm[src..src + cb]);
            }
            transform_2d(&at, &m, &mut y);
            for p in 0..M {
                let oy = ty * M + p;
                if oy >= h {
                    break;
                }
                for q in 0..M {
                    let ox = tx * M + q;
                    if ox >= w {
                        break;
                    }
                    let o = base + (oy + pad) * row + (ox + pad) * cout + c0;
                    assert!(o + cb <= len);
                    // SAFETY: inside the map (asserted); pixel (oy, ox) belongs to tile `t`,
                    // which this thread alone writes.
                    let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(o), cb) };
                    copy_lanes(dst, &y[(p * M + q) * LANES..][..cb]);
                }
            }
        }
        // The epilogue over each pixel's channels at once, while the tile is in cache.
        for p in 0..M.min(h.saturating_sub(ty * M)) {
            for q in 0..M.min(w.saturating_sub(tx * M)) {
                let (oy, ox) = (ty * M + p, tx * M + q);
                let o = base + (oy + pad) * row + (ox + pad) * cout;
                assert!(o + cout <= len);
                // SAFETY: as above.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(o), cout) };
                epi.apply(dst, oy * w + ox, 0);
            }
        }
    });
}

/// A 3×3, stride-1, pad-1 convolution of `input` (border ≥ 1) into `out` (already shaped
/// `h × w × cout`, any border, as many maps as `input`): each input channel is first multiplied
/// by `in_scale`, then the epilogue is applied. The maps of a batch share the matrix products,
/// so the transformed weights stream from memory once for all of them.
pub fn winograd_conv3x3(
    w: &WinogradWeights,
    input: &FeatureMap,
    in_scale: Option<&[f32]>,
    out: &mut FeatureMap,
    scratch: &mut WinogradScratch,
    epi: &Epilogue<'_>,
) -> Result<()> {
    let (cin, cout) = (w.cin(), w.cout());
    if input.c != cin
        || out.c != cout
        || out.h != input.h
        || out.w != input.w
        || out.n != input.n
        || input.pad < 1
        || input.data.len() < input.n * input.map_len()
        || out.data.len() < out.n * out.map_len()
    {
        return Err(Error::InvalidParameter(format!(
            "a {cin}→{cout} 3×3 convolution given {} {}×{}×{} maps (border {}) and {} {}×{}×{} \
             outputs",
            input.n, input.h, input.w, input.c, input.pad, out.n, out.h, out.w, out.c
        )));
    }
    if in_scale.is_some_and(|s| s.len() < cin) || !epi.fits(out.h * out.w, cout) {
        return Err(Error::InvalidParameter(
            "a scale, noise or bias shorter than the convolution".into(),
        ));
    }
    let (m, n) = (w.tile.m(), w.tile.n());
    let (th, tw) = (input.h.div_ceil(m), input.w.div_ceil(m));
    // Tile rows of the whole batch, in strips of even size.
    let rows = th * input.n;
    if rows == 0 || tw == 0 {
        return Ok(());
    }
    let most = (STRIP_FLOATS / (n * n * tw * (cin + cout)).max(1)).clamp(1, rows);
    let rows_per = rows.div_ceil(rows.div_ceil(most));
    for r0 in (0..rows).step_by(rows_per) {
        let strip = Strip {
            r0,
            th,
            tw,
            tiles: rows_per.min(rows - r0) * tw,
        };
        let tiles = strip.tiles;
        scratch.v.resize(n * n * tiles * cin, 0.0);
        scratch.m.resize(n * n * tiles * cout, 0.0);
        match w.tile {
            WinogradTile::F2 => {
                transform_strip_input::<2, 4>(bt2, input, in_scale, &strip, &mut scratch.v);
            }
            WinogradTile::F4 => {
                transform_strip_input::<4, 6>(bt4, input, in_scale, &strip, &mut scratch.v);
            }
        }
        let geom = ConvGeom {
            taps: &[0],
            batch: n * n,
            in_batch: tiles * cin,
            out_batch: tiles * cout,
            out_h: 1,
            out_w: tiles,
            in_base: 0,
            in_row: 0,
            in_pix: cin,
            out_base: 0,
            out_row: 0,
            out_pix: cout,
        };
        conv(
            &w.packed,
            &scratch.v,
            &geom,
            &mut scratch.m,
            &Epilogue::NONE,
        )?;
        match w.tile {
            WinogradTile::F2 => {
                transform_strip_output::<2, 4>(at2, &scratch.m, &strip, out, epi);
            }
            WinogradTile::F4 => {
                transform_strip_output::<4, 6>(at4, &scratch.m, &strip, out, epi);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{map_from_nhwc, values};

    #[test]
    fn winograd_matches_direct_convolution_on_awkward_shapes() {
        // (h, w, cin, cout): odd sizes (edge tiles), 1×1, channels off the lane width.
        let cases = [
            (5, 7, 3, 5),
            (1, 1, 17, 33),
            (9, 4, 70, 20),
            (8, 8, 16, 16),
            (6, 11, 33, 65),
        ];
        for path in KernelPath::available_paths() {
            for tile in [WinogradTile::F2, WinogradTile::F4] {
                for (k, &(h, w, cin, cout)) in cases.iter().enumerate() {
                    let x = values(h * w * cin, k as u64 + 1);
                    let wt = values(cout * cin * 9, k as u64 + 50);
                    let scale = values(cin, k as u64 + 99);
                    let map = map_from_nhwc(&x, h, w, cin, 1);
                    // Reference: direct sums in f64 over the zero-padded input.
                    let mut mag_max = 0f64;
                    let mut want = vec![0f64; h * w * cout];
                    for oy in 0..h {
                        for ox in 0..w {
                            for o in 0..cout {
                                let (mut s, mut a) = (0f64, 0f64);
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let (iy, ix) = (oy + ky, ox + kx);
                                        if iy < 1 || ix < 1 || iy > h || ix > w {
                                            continue;
                                        }
                                        for i in 0..cin {
                                            let p = f64::from(x[((iy - 1) * w + ix - 1) * cin + i])
                                                * f64::from(scale[i])
                                                * f64::from(wt[((o * cin + i) * 3 + ky) * 3 + kx]);
                                            s += p;
                                            a += p.abs();
                                        }
                                    }
                                }
                                want[(oy * w + ox) * cout + o] = s;
                                mag_max = mag_max.max(a);
                            }
                        }
                    }
                    let ww = WinogradWeights::new(
                        PackedWeights::new(path),
                        tile,
                        cout,
                        cin,
                        |o, i, ky, kx| wt[((o * cin + i) * 3 + ky) * 3 + kx],
                    )
                    .expect("weights");
                    let mut out = FeatureMap::default();
                    out.reset(h, w, cout, 1).expect("out");
                    let mut scratch = WinogradScratch::default();
                    winograd_conv3x3(
                        &ww,
                        &map,
                        Some(&scale),
                        &mut out,
                        &mut scratch,
                        &Epilogue::NONE,
                    )
                    .expect("conv");
                    let mut worst = 0f64;
                    for oy in 0..h {
                        for ox in 0..w {
                            for o in 0..cout {
                                let got = f64::from(out.data[out.at(oy, ox) + o]);
                                worst = worst.max((got - want[(oy * w + ox) * cout + o]).abs());
                            }
                        }
                    }
                    let rel = worst / mag_max.max(1e-3);
                    // F(4,3)'s transforms scale values by up to ~10², so its rounding is larger.
                    let bound = if tile == WinogradTile::F2 { 2e-6 } else { 2e-5 };
                    assert!(
                        rel < bound,
                        "{path} {tile:?} case {k}: relative error {rel:e}"
                    );
                    assert!(
                        out.data[..out.row_stride()].iter().all(|&v| v == 0.0),
                        "border"
                    );
                }
            }
        }
    }
}
