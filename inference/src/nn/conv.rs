//! The convolution driver, the weight packing, the portable micro-kernel, the epilogue and the
//! FIR filter. See the module docs of [`super`].
#![allow(unsafe_code)]

use rayon::prelude::*;

use super::KernelPath;
use crate::error::{Error, Result};

/// Bytes of packed weights one input-channel chunk of one output block may take (the panel the
/// micro-kernel streams for every tile of a strip; sized for L1).
pub(super) const PANEL_BYTES: usize = 32 << 10;
/// Bytes of input one strip of output pixels should read per chunk (sized for L2).
const STRIP_BYTES: usize = 256 << 10;
/// Bytes of output one work item may accumulate into while it walks the input channels
/// chunk by chunk (each chunk reads and writes them again; sized for L2).
const OUT_BYTES: usize = 512 << 10;
/// Re-reading a buffer of at most this many bytes costs a quarter of reading it from memory
/// (it is in the last-level cache); weights of at most this many bytes are cut by the plain
/// rule.
const CACHED_BYTES: usize = 4 << 20;
/// Operations below this many flops are cut by the simple rule (the search costs more than it
/// saves; attention runs thousands of them per layer).
const SEARCH_FLOPS: usize = 1 << 24;
/// The largest register tile of any path.
pub(super) const MAX_MR: usize = 6;
pub(super) const MAX_NR: usize = 64;

/// Register tile of a path: `(pixels, output channels)`.
pub(super) const fn tile(path: KernelPath) -> (usize, usize) {
    match path {
        KernelPath::Avx512Vnni => (6, 64),
        KernelPath::Avx2 => (6, 16),
        KernelPath::Scalar => (4, 16),
    }
}

/// How packed weights are stored. The micro-kernels compute in f32; half-precision panels are
/// widened into a per-thread f32 buffer once per strip (reused by every register tile of the
/// strip), so a checkpoint's f16 or bf16 weights keep their size in memory at a cost that
/// vanishes with the number of pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// Full precision, 4 bytes per value.
    #[default]
    F32,
    /// IEEE half precision, 2 bytes per value.
    F16,
    /// bfloat16, 2 bytes per value.
    Bf16,
}

impl Storage {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The storage for a checkpoint's dtype: kept for f16 and bf16, f32 for every other.
    pub fn for_dtype(dtype: candle_core::DType) -> Self {
        match dtype {
            candle_core::DType::F16 => Self::F16,
            candle_core::DType::BF16 => Self::Bf16,
            _ => Self::F32,
        }
    }
}

#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }
}

thread_local! {
    /// The f32 copy of a half-precision panel (one per worker thread, reused).
    static WIDE_PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fills `data` (blocks of `block_len`, `blocks` per matrix) in the packed order, converting
/// each value with `to`.
fn fill<T: Send + Copy>(
    data: &mut [T],
    block_len: usize,
    blocks: usize,
    (cout, cin, taps, nr, cc): (usize, usize, usize, usize, usize),
    weight: &(impl Fn(usize, usize, usize, usize) -> f32 + Sync),
    to: impl Fn(f32) -> T + Sync,
) {
    data.par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(bb, dst)| {
            let (b, blk) = (bb / blocks, bb % blocks);
            let mut at = 0;
            for c0 in (0..cin).step_by(cc) {
                let cl = cc.min(cin - c0);
                for t in 0..taps {
                    for c in 0..cl {
                        for lane in 0..nr {
                            let o = blk * nr + lane;
                            dst[at] = to(if o < cout {
                                weight(b, o, c0 + c, t)
                            } else {
                                0.0
                            });
                            at += 1;
                        }
                    }
                }
            }
        });
}

/// Weights in the order the micro-kernel of one [`KernelPath`] reads them: output channels in
/// blocks of `NR` (the last one zero-padded); inside a block, input channels in chunks of `cc`;
/// inside a chunk, `[tap][input channel][NR lanes]`.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    path: KernelPath,
    cout: usize,
    cin: usize,
    taps: usize,
    nr: usize,
    cc: usize,
    /// Independent matrices packed one after the other (Winograd's transform positions).
    batch: usize,
    data: Values,
}

impl PackedWeights {
    /// Empty, for `path` (which must be available on this CPU, see [`KernelPath::available`]),
    /// stored as f32.
    pub fn new(path: KernelPath) -> Self {
        Self::with_storage(path, Storage::F32)
    }

    /// Empty, for `path`, stored as `storage`.
    pub fn with_storage(path: KernelPath, storage: Storage) -> Self {
        Self {
            path,
            cout: 0,
            cin: 0,
            taps: 0,
            nr: tile(path).1,
            cc: 1,
            batch: 1,
            data: match storage {
                Storage::F32 => Values::F32(Vec::new()),
                Storage::F16 => Values::F16(Vec::new()),
                Storage::Bf16 => Values::Bf16(Vec::new()),
            },
        }
    }

    /// The kernel path the weights are packed for.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// How the values are stored.
    pub fn storage(&self) -> Storage {
        match self.data {
            Values::F32(_) => Storage::F32,
            Values::F16(_) => Storage::F16,
            Values::Bf16(_) => Storage::Bf16,
        }
    }

    /// Output channels (0 until packed).
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Input channels (0 until packed).
    pub fn cin(&self) -> usize {
        self.cin
    }

    fn blocks(&self) -> usize {
        self.cout.div_ceil(self.nr)
    }

    fn block_len(&self) -> usize {
        self.taps * self.cin * self.nr
    }

    /// Values per matrix of a batch.
    fn matrix_len(&self) -> usize {
        self.blocks() * self.block_len()
    }

    /// Number of matrices packed one after the other (1 unless [`Self::pack_batch`] said more).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// (Re)packs `cout × cin × taps` weights, `weight(o, i, t)` giving each; the allocation
    /// is reused. Blocks are filled in parallel.
    pub fn pack(
        &mut self,
        cout: usize,
        cin: usize,
        taps: usize,
        weight: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Result<()> {
        self.pack_batch(1, cout, cin, taps, |_, o, i, t| weight(o, i, t))
    }

    /// [`Self::pack`] for `batch` independent matrices, `weight(b, o, i, t)`.
    pub fn pack_batch(
        &mut self,
        batch: usize,
        cout: usize,
        cin: usize,
        taps: usize,
        weight: impl Fn(usize, usize, usize, usize) -> f32 + Sync,
    ) -> Result<()> {
        if cout == 0 || cin == 0 || taps == 0 || batch == 0 {
            return Err(Error::InvalidParameter(format!(
                "a convolution needs channels and taps (out {cout}, in {cin}, taps {taps})"
            )));
        }
        let nr = self.nr;
        let len = cout
            .div_ceil(nr)
            .checked_mul(nr * cin)
            .and_then(|n| n.checked_mul(taps))
            .and_then(|n| n.checked_mul(batch))
            .ok_or_else(|| {
                Error::InvalidParameter(format!("{cout}×{cin}×{taps} weights are too many"))
            })?;
        let cc = (PANEL_BYTES / (taps * nr * 4)).max(4).min(cin);
        (self.cout, self.cin, self.taps, self.cc, self.batch) = (cout, cin, taps, cc, batch);
        let (block_len, blocks) = (self.block_len(), self.blocks());
        let shape = (cout, cin, taps, nr, cc);
        match &mut self.data {
            Values::F32(d) => {
                d.resize(len, 0.0);
                fill(d, block_len, blocks, shape, &weight, |v| v);
            }
            Values::F16(d) => {
                d.resize(len, half::f16::ZERO);
                fill(d, block_len, blocks, shape, &weight, half::f16::from_f32);
            }
            Values::Bf16(d) => {
                d.resize(len, half::bf16::ZERO);
                fill(d, block_len, blocks, shape, &weight, half::bf16::from_f32);
            }
        }
        Ok(())
    }

    /// Calls `f` with values `at..at + len` as f32: in place, or widened into this thread's
    /// panel buffer.
    fn with_panel<R>(&self, at: usize, len: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        fn widened<R>(
            widen: impl FnOnce(&mut [f32]),
            len: usize,
            f: impl FnOnce(&[f32]) -> R,
        ) -> R {
            WIDE_PANEL.with_borrow_mut(|buf| {
                buf.resize(len, 0.0);
                widen(buf);
                f(buf)
            })
        }
        use half::slice::HalfFloatSliceExt;
        match &self.data {
            Values::F32(d) => f(&d[at..at + len]),
            Values::F16(d) => widened(|buf| d[at..at + len].convert_to_f32_slice(buf), len, f),
            Values::Bf16(d) => widened(|buf| d[at..at + len].convert_to_f32_slice(buf), len, f),
        }
    }
}

/// Where a convolution reads and writes, as offsets into flat buffers (channels contiguous
/// at every pixel).
///
/// Output pixel `(y, x)` reads input channel `i` of tap `t` at
/// `in_base + y·in_row + x·in_pix + taps[t] + i`, and writes channel `o` at
/// `out_base + y·out_row + x·out_pix + o`. A batch of `batch` convolutions (with the
/// matrices of a batched [`PackedWeights`], or the one matrix of an unbatched one for every
/// item) moves both by `in_batch` and `out_batch` per item.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeom<'a> {
    /// Offset of each tap's first input channel from a pixel's input position, one per packed tap.
    pub taps: &'a [usize],
    /// Number of convolutions in the batch (0 does nothing).
    pub batch: usize,
    /// Input offset from one batch item to the next.
    pub in_batch: usize,
    /// Output offset from one batch item to the next.
    pub out_batch: usize,
    /// Output rows.
    pub out_h: usize,
    /// Output pixels per row.
    pub out_w: usize,
    /// Input offset of output pixel `(0, 0)`.
    pub in_base: usize,
    /// Input offset from one output row to the next.
    pub in_row: usize,
    /// Input offset from one output pixel to the next in a row.
    pub in_pix: usize,
    /// Output offset of pixel `(0, 0)`.
    pub out_base: usize,
    /// Output offset from one row to the next.
    pub out_row: usize,
    /// Output offset from one pixel to the next in a row (at least the output channels).
    pub out_pix: usize,
}

/// What is applied to each output once its sum is complete, in this order: `× scale[channel]`,
/// `+ noise[pixel]` (pixel `y·out_w + x`), `+ bias[channel]`, leaky ReLU with `slope`,
/// `× gain`, clamp to `±clamp`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per-output-channel factor.
    pub scale: Option<&'a [f32]>,
    /// Per-pixel value added to every channel (`out_h × out_w` values, row by row).
    pub noise: Option<&'a [f32]>,
    /// Per-output-channel value added.
    pub bias: Option<&'a [f32]>,
    /// Leaky ReLU's slope for negative values (`Some(0.0)` is ReLU; `None`: no activation).
    pub slope: Option<f32>,
    /// Factor applied after the activation (1 = none).
    pub gain: f32,
    /// Outputs are clamped to `±clamp` last (`None`: no clamp).
    pub clamp: Option<f32>,
}

impl Epilogue<'_> {
    /// The plain sum.
    pub const NONE: Epilogue<'static> = Epilogue {
        scale: None,
        noise: None,
        bias: None,
        slope: None,
        gain: 1.0,
        clamp: None,
    };

    fn is_none(&self) -> bool {
        self.scale.is_none()
            && self.noise.is_none()
            && self.bias.is_none()
            && self.slope.is_none()
            && (self.gain - 1.0).abs() == 0.0
            && self.clamp.is_none()
    }

    /// Whether the per-pixel and per-channel values cover `pixels` and `channels`.
    pub(super) fn fits(&self, pixels: usize, channels: usize) -> bool {
        self.noise.is_none_or(|n| n.len() >= pixels)
            && self.bias.is_none_or(|b| b.len() >= channels)
            && self.scale.is_none_or(|s| s.len() >= channels)
    }

    /// Applies to the `values` of output channels `co..` of pixel `pixel`: one simple loop
    /// per step, so each vectorizes.
    #[inline]
    pub(super) fn apply(&self, values: &mut [f32], pixel: usize, co: usize) {
        let len = values.len();
        if let Some(s) = self.scale {
            for (v, &s) in values.iter_mut().zip(&s[co..co + len]) {
                *v *= s;
            }
        }
        let n = self.noise.map_or(0.0, |n| n[pixel]);
        match self.bias {
            Some(b) => {
                for (v, &b) in values.iter_mut().zip(&b[co..co + len]) {
                    *v += n + b;
                }
            }
            None if n != 0.0 => values.iter_mut().for_each(|v| *v += n),
            None => {}
        }
        let g = self.gain;
        match (self.slope, self.clamp) {
            (Some(s), Some(c)) => {
                // max/min, not f32::clamp: a negative clamp from a config must not panic.
                for v in values.iter_mut() {
                    let x = if *v < 0.0 { *v * s } else { *v };
                    *v = (x * g).max(-c).min(c);
                }
            }
            (Some(s), None) => {
                for v in values.iter_mut() {
                    let x = if *v < 0.0 { *v * s } else { *v };
                    *v = x * g;
                }
            }
            (None, Some(c)) => {
                for v in values.iter_mut() {
                    *v = (*v * g).max(-c).min(c);
                }
            }
            (None, None) if (g - 1.0).abs() > 0.0 => values.iter_mut().for_each(|v| *v *= g),
            (None, None) => {}
        }
    }
}

/// A mutable buffer shared by the threads of one operation, each writing places no other
/// thread touches.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the pointer is only dereferenced at offsets the operation's bounds check admitted,
// and the work split gives every output element to exactly one thread.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the whole `Shared`, which is `Sync`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One register tile's worth of work, as the micro-kernels take it.
pub(super) struct TileArgs<'a> {
    /// Input buffer; pixel `m` reads `inp + in_offs[m] + taps[t] + c`.
    pub inp: *const f32,
    pub in_offs: &'a [usize],
    pub taps: &'a [usize],
    /// Input channels of this chunk.
    pub cl: usize,
    /// The packed panel: `[tap][cl][NR]`.
    pub w: *const f32,
    /// Pixel `m` writes `NR` lanes at `out + out_offs[m]`.
    pub out: *mut f32,
    pub out_offs: &'a [usize],
    /// Start from zero (first chunk) or from what the output holds.
    pub first: bool,
}

/// The portable micro-kernel: `M ≤ 4` pixels × 16 lanes.
///
/// # Safety
/// Every address `args` names (inputs for all taps and chunk channels, the `16·taps·cl`
/// panel, 16 output lanes per pixel) must be inside its buffer.
unsafe fn tile_scalar<const M: usize>(args: &TileArgs<'_>) {
    const NR: usize = 16;
    let mut acc = [[0f32; NR]; M];
    for (m, row) in acc.iter_mut().enumerate() {
        if !args.first {
            // SAFETY: the caller guarantees the 16 output lanes of each pixel.
            let out = unsafe { std::slice::from_raw_parts(args.out.add(args.out_offs[m]), NR) };
            row.copy_from_slice(out);
        }
    }
    let mut w = args.w;
    for &t in args.taps {
        for c in 0..args.cl {
            // SAFETY: the caller guarantees the panel.
            let b = unsafe { std::slice::from_raw_parts(w, NR) };
            for (m, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller guarantees every tap and chunk channel of each pixel.
                let a = unsafe { *args.inp.add(args.in_offs[m] + t + c) };
                for (r, &bv) in row.iter_mut().zip(b) {
                    *r += a * bv;
                }
            }
            // SAFETY: still inside the panel (or one past its end after the last step).
            w = unsafe { w.add(NR) };
        }
    }
    for (m, row) in acc.iter().enumerate() {
        // SAFETY: as above; no other thread writes these lanes.
        let out = unsafe { std::slice::from_raw_parts_mut(args.out.add(args.out_offs[m]), NR) };
        out.copy_from_slice(row);
    }
}

/// Runs the micro-kernel of `path` on `m` pixels.
///
/// # Safety
/// As [`tile_scalar`], and `path` must be available on this CPU.
pub(super) unsafe fn run_tile(path: KernelPath, m: usize, args: &TileArgs<'_>) {
    macro_rules! by_m {
        ($f:ident, $($n:literal),*) => {
            match m {
                // SAFETY: forwarded from the caller.
                $($n => unsafe { $f::<$n>(args) },)*
                _ => unreachable!("tile of {m} pixels"),
            }
        };
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni => {
            use super::x86::tile_avx512;
            by_m!(tile_avx512, 1, 2, 3, 4, 5, 6);
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => {
            use super::x86::tile_avx2;
            by_m!(tile_avx2, 1, 2, 3, 4, 5, 6);
        }
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx512Vnni | KernelPath::Avx2 => {
            unreachable!("{path} kernels on a CPU without them")
        }
        KernelPath::Scalar => by_m!(tile_scalar, 1, 2, 3, 4),
    }
}

fn too_small(what: &str, need: usize, len: usize) -> Error {
    Error::InvalidParameter(format!(
        "convolution {what} buffer holds {len} values but the geometry reaches {need}"
    ))
}

/// The last offset (exclusive) a `h × w` grid of `c`-channel pixels reaches.
fn reach(base: usize, h: usize, w: usize, row: usize, pix: usize, c: usize) -> Option<usize> {
    base.checked_add((h - 1).checked_mul(row)?)?
        .checked_add((w - 1).checked_mul(pix)?)?
        .checked_add(c)
}

/// Convolves: every output pixel of `geom` gets, for every output channel `o`,
/// `Σ_t Σ_i w(o, i, t) · input[pixel + taps[t] + i]`, then the epilogue.
///
/// Bounds are checked once here (an error, never a panic or a stray read); the micro-kernels
/// then run unchecked. Output pixels must not overlap.
pub fn conv(
    w: &PackedWeights,
    input: &[f32],
    geom: &ConvGeom<'_>,
    out: &mut [f32],
    epi: &Epilogue<'_>,
) -> Result<()> {
    let g = geom;
    let path = w.path;
    if !path.available() {
        return Err(Error::InvalidParameter(format!(
            "the {path} convolution kernels cannot run on this CPU"
        )));
    }
    if g.batch != w.batch && w.batch != 1 {
        return Err(Error::InvalidParameter(format!(
            "a batch of {} convolutions given weights for {}",
            g.batch, w.batch
        )));
    }
    if g.taps.len() != w.taps || w.data.len() == 0 {
        return Err(Error::InvalidParameter(format!(
            "{} taps given for weights packed with {}",
            g.taps.len(),
            w.taps
        )));
    }
    if g.batch == 0 || g.out_h == 0 || g.out_w == 0 {
        return Ok(());
    }
    let max_tap = g.taps.iter().copied().max().unwrap_or(0);
    let last = g.batch - 1;
    let in_need = reach(g.in_base, g.out_h, g.out_w, g.in_row, g.in_pix, w.cin)
        .and_then(|n| n.checked_add(max_tap))
        .and_then(|n| n.checked_add(last.checked_mul(g.in_batch)?))
        .unwrap_or(usize::MAX);
    if in_need > input.len() {
        return Err(too_small("input", in_need, input.len()));
    }
    let out_need = reach(g.out_base, g.out_h, g.out_w, g.out_row, g.out_pix, w.cout)
        .and_then(|n| n.checked_add(last.checked_mul(g.out_batch)?))
        .unwrap_or(usize::MAX);
    if out_need > out.len() {
        return Err(too_small("output", out_need, out.len()));
    }
    let one_len = g.out_h.saturating_sub(1) * g.out_row + g.out_w * g.out_pix;
    if g.out_pix < w.cout
        || (g.out_h > 1 && g.out_row < g.out_w * g.out_pix)
        || (g.batch > 1 && g.out_batch < one_len)
    {
        return Err(Error::InvalidParameter(
            "convolution output pixels overlap".into(),
        ));
    }
    let pixels = g.out_h * g.out_w;
    if !epi.fits(pixels, w.cout) {
        return Err(Error::InvalidParameter(
            "the epilogue's noise or bias is shorter than the output".into(),
        ));
    }

    let (mr, nr) = tile(path);
    let blocks = w.blocks();
    // Weights shared by every item of the batch: the items' pixels are cut as one range, so
    // each strip reads the weights once for all of them.
    let shared_weights = w.batch == 1;
    let (units, total) = if shared_weights {
        (1, g.batch * pixels)
    } else {
        (g.batch, pixels)
    };
    let split = Split::choose(
        &Work {
            units,
            pixels: total,
            blocks,
            chunks: w.cin.div_ceil(w.cc),
            weight_bytes: w.matrix_len() * w.storage().bytes(),
            // Input per output pixel: its channels, times the stride along a row.
            pixel_bytes: w.cin * 4 * (g.in_pix / w.cin.max(1)).max(1),
            // Input of one chunk per output pixel, counted twice (the taps of neighbouring
            // pixels overlap; Winograd's products share the cache with their transforms) but
            // once for a single 1×1 product (a linear layer): its strips then stay twice as
            // long, so large weights stream half as often (measured on AVX2's 16-wide blocks,
            // whose chunks are 4× deeper: 1280→10240 over 128 rows 126 → 155 GFLOP/s on 2
            // cores; Winograd's products lost 5–10% with it).
            chunk_pixel_bytes: w.cc
                * 4
                * (g.in_pix / w.cin.max(1)).max(1)
                * if w.taps == 1 && units == 1 { 1 } else { 2 },
            flops_per_pixel_block: 2 * nr * w.cin * w.taps,
        },
        (mr, nr),
        path,
        rayon::current_num_threads().max(1),
    );
    let Split {
        strip,
        strips,
        per_group,
        groups,
    } = split;
    let chunks = w.cin.div_ceil(w.cc);
    let shared = Shared(out.as_mut_ptr());
    (0..units * strips * groups)
        .into_par_iter()
        .for_each(|item| {
            let (unit, item) = (item / (strips * groups), item % (strips * groups));
            let (s, grp) = (item / groups, item % groups);
            let (p0, p1) = (s * strip, ((s + 1) * strip).min(total));
            let (b0, b1) = (grp * per_group, ((grp + 1) * per_group).min(blocks));
            // Item `b` of the batch and pixel `q` inside it, for pixel `p` of this unit.
            let locate = |p: usize| {
                if shared_weights {
                    (p / pixels, p % pixels)
                } else {
                    (unit, p)
                }
            };
            let mut in_offs = [0usize; MAX_MR];
            let mut out_offs = [0usize; MAX_MR];
            let mut pix = [0usize; MAX_MR];
            let mut scratch = [0f32; MAX_MR * MAX_NR];
            let scratch_offs: [usize; MAX_MR] = std::array::from_fn(|m| m * nr);
            for chunk in 0..chunks {
                let c0 = chunk * w.cc;
                let cl = w.cc.min(w.cin - c0);
                let last = chunk + 1 == chunks;
                for blk in b0..b1 {
                    let at = unit * w.matrix_len() + blk * w.block_len() + c0 * w.taps * nr;
                    w.with_panel(at, w.taps * cl * nr, |panel| {
                        let co = blk * nr;
                        let valid = nr.min(w.cout - co);
                        let mut p = p0;
                        while p < p1 {
                            let m = mr.min(p1 - p);
                            for i in 0..m {
                                let (b, q) = locate(p + i);
                                let (y, x) = (q / g.out_w, q % g.out_w);
                                pix[i] = q;
                                in_offs[i] =
                                    b * g.in_batch + g.in_base + y * g.in_row + x * g.in_pix + c0;
                                out_offs[i] = b * g.out_batch
                                    + g.out_base
                                    + y * g.out_row
                                    + x * g.out_pix
                                    + co;
                            }
                            let partial = valid < nr;
                            if partial && chunk > 0 {
                                for i in 0..m {
                                    // SAFETY: `valid` lanes of each pixel are inside the output
                                    // (checked above); this thread owns them.
                                    let src = unsafe {
                                        std::slice::from_raw_parts(
                                            shared.ptr().add(out_offs[i]),
                                            valid,
                                        )
                                    };
                                    scratch[i * nr..i * nr + valid].copy_from_slice(src);
                                }
                            }
                            let args = TileArgs {
                                inp: input.as_ptr(),
                                in_offs: &in_offs[..m],
                                taps: g.taps,
                                cl,
                                w: panel.as_ptr(),
                                out: if partial {
                                    scratch.as_mut_ptr()
                                } else {
                                    shared.ptr()
                                },
                                out_offs: if partial {
                                    &scratch_offs[..m]
                                } else {
                                    &out_offs[..m]
                                },
                                first: chunk == 0,
                            };
                            // SAFETY: the bounds check above covers every input tap and channel of
                            // these pixels and `cout` lanes of their outputs; the panel holds
                            // `taps·cl·NR` values; a partial block writes the scratch tile instead;
                            // the path is available.
                            unsafe { run_tile(path, m, &args) };
                            for i in 0..m {
                                if !partial && (!last || epi.is_none()) {
                                    continue;
                                }
                                // SAFETY: as above: inside the output, owned by this thread.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        shared.ptr().add(out_offs[i]),
                                        valid,
                                    )
                                };
                                if partial {
                                    dst.copy_from_slice(&scratch[i * nr..i * nr + valid]);
                                }
                                if last {
                                    epi.apply(dst, pix[i], co);
                                }
                            }
                            p += m;
                        }
                    });
                }
            }
        });
    Ok(())
}

/// The shape of one [`conv`] call, as its work split sees it.
struct Work {
    /// Independent products (a batch of distinct matrices), each over `pixels` pixels.
    units: usize,
    pixels: usize,
    /// Output blocks of `NR` channels.
    blocks: usize,
    /// Chunks of input channels the micro-kernel walks.
    chunks: usize,
    /// Bytes of one unit's packed weights.
    weight_bytes: usize,
    /// Bytes of input per output pixel, all channels, and for one chunk.
    pixel_bytes: usize,
    chunk_pixel_bytes: usize,
    /// Flops of one pixel × one output block.
    flops_per_pixel_block: usize,
}

/// How a [`conv`] call's work is cut into items for the thread pool: strips of output pixels
/// times groups of output blocks (per unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Split {
    strip: usize,
    strips: usize,
    per_group: usize,
    groups: usize,
}

impl Split {
    /// The split with the least estimated time: the slowest thread's flops plus the memory
    /// traffic, where every strip reads all the weights of its unit and every group all of
    /// its input. Deep layers (large weights, few pixels) get one strip and several groups,
    /// so their weights stream from memory once; shallow ones many strips. Strips stay small
    /// enough for their input chunk (`STRIP_BYTES`) and output (`OUT_BYTES`) to stay cached.
    /// Small operations, and those whose weights fit in the cache, take the plain rule.
    fn choose(work: &Work, (mr, nr): (usize, usize), path: KernelPath, threads: usize) -> Self {
        let strip_cap = |per_group: usize| {
            let mut cap = STRIP_BYTES / work.chunk_pixel_bytes.max(1);
            if work.chunks > 1 {
                cap = cap.min(OUT_BYTES / (per_group * nr * 4).max(1));
            }
            (cap / mr * mr).max(mr)
        };
        let make = |strips: usize, per_group: usize| {
            let strip = work.pixels.div_ceil(strips.max(1)).div_ceil(mr) * mr;
            Self {
                strip,
                strips: work.pixels.div_ceil(strip),
                per_group,
                groups: work.blocks.div_ceil(per_group),
            }
        };
        let total_flops = work
            .units
            .saturating_mul(work.pixels)
            .saturating_mul(work.blocks)
            .saturating_mul(work.flops_per_pixel_block);
        // Weights that stay cached are cheap to read again: the plain rule, whose small strips
        // keep each strip's input in L1 and L2 (measured faster there), holds.
        let all_weights = work.units.saturating_mul(work.weight_bytes);
        if total_flops < SEARCH_FLOPS || all_weights <= CACHED_BYTES {
            // About four strips per thread; groups only when strips are too few.
            let strip = (work.pixels / (4 * threads))
                .min(STRIP_BYTES / work.chunk_pixel_bytes.max(1))
                .max(mr)
                .div_ceil(mr)
                * mr;
            let strips = work.pixels.div_ceil(strip);
            let groups = work
                .blocks
                .min((2 * threads).div_ceil(strips * work.units))
                .max(1);
            let per_group = work.blocks.div_ceil(groups);
            return Self {
                strip,
                strips,
                per_group,
                groups: work.blocks.div_ceil(per_group),
            };
        }
        // Flops a thread does in the time memory delivers one byte to the whole machine.
        let byte_flops = match path {
            KernelPath::Avx512Vnni => 3.0,
            KernelPath::Avx2 => 1.5,
            KernelPath::Scalar => 0.3,
        };
        // Bytes moved by reading `all` bytes `times` times.
        let reads = |all: usize, times: usize| {
            let again = if all <= CACHED_BYTES { 0.25 } else { 1.0 };
            all as f64 * (1.0 + again * times.saturating_sub(1) as f64)
        };
        let all_input = work.units * work.pixels * work.pixel_bytes;
        let cost = |split: &Self| {
            let items = work.units * split.strips * split.groups;
            let item_flops = split.strip * split.per_group * work.flops_per_pixel_block;
            let compute = items.div_ceil(threads) as f64 * item_flops as f64;
            let traffic = reads(all_weights, split.strips) + reads(all_input, split.groups);
            // A little per item: its scheduling, and its partial tiles at the edges.
            compute + byte_flops * traffic + items as f64 * 20_000.0
        };
        let mut best = make(work.pixels.div_ceil(strip_cap(work.blocks)), work.blocks);
        let mut best_cost = cost(&best);
        let mut last_per_group = 0;
        for groups in 1..=work.blocks.min(4 * threads) {
            let per_group = work.blocks.div_ceil(groups);
            if per_group == last_per_group {
                continue;
            }
            last_per_group = per_group;
            // More strips than it takes to give every thread about eight items only add
            // traffic: the search stays near 8·threads·ln(threads) candidates, so it costs
            // microseconds even on many-core machines.
            let least = work.pixels.div_ceil(strip_cap(per_group));
            let enough = (8 * threads).div_ceil(work.units * work.blocks.div_ceil(per_group));
            let most = work.pixels.div_ceil(mr).min(least.max(enough));
            for strips in least..=most {
                let split = make(strips, per_group);
                let c = cost(&split);
                if c < best_cost {
                    (best, best_cost) = (split, c);
                }
            }
        }
        best
    }
}

/// A 1×1 "convolution" over `rows` rows of `cin` values into rows of `cout` values (a matrix
/// product by the packed weights: a linear layer over tokens), then the epilogue.
pub fn rows_product(
    w: &PackedWeights,
    input: &[f32],
    rows: usize,
    out: &mut [f32],
    epi: &Epilogue<'_>,
) -> Result<()> {
    let geom = ConvGeom {
        taps: &[0],
        batch: 1,
        in_batch: 0,
        out_batch: 0,
        out_h: 1,
        out_w: rows,
        in_base: 0,
        in_row: 0,
        in_pix: w.cin(),
        out_base: 0,
        out_row: 0,
        out_pix: w.cout(),
    };
    conv(w, input, &geom, out, epi)
}

/// Filters every channel of a map with a 2-D kernel (correlation, `kh × kw`, row-major):
/// output pixel `(y, x)` channel `ch` is
/// `Σ_a Σ_b kernel[a·kw + b] · input[in_base + (y + a)·in_row + (x + b)·c + ch]`,
/// written at `out_base + y·out_row + x·out_pix + ch`, then the epilogue. This is the FIR step
/// of `upfirdn2d` once the input is up-sampled and padded.
#[allow(clippy::too_many_arguments)]
pub fn fir(
    input: &[f32],
    in_base: usize,
    in_row: usize,
    c: usize,
    kernel: &[f32],
    kh: usize,
    kw: usize,
    out_h: usize,
    out_w: usize,
    out: &mut [f32],
    out_base: usize,
    out_row: usize,
    out_pix: usize,
    epi: &Epilogue<'_>,
) -> Result<()> {
    if out_h == 0 || out_w == 0 || c == 0 {
        return Ok(());
    }
    if kernel.len() != kh * kw || kh == 0 || kw == 0 {
        return Err(Error::InvalidParameter(format!(
            "a {kh}×{kw} filter needs {} taps, found {}",
            kh * kw,
            kernel.len()
        )));
    }
    let in_need =
        reach(in_base, out_h + kh - 1, out_w + kw - 1, in_row, c, c).unwrap_or(usize::MAX);
    if in_need > input.len() {
        return Err(too_small("input", in_need, input.len()));
    }
    let out_need = reach(out_base, out_h, out_w, out_row, out_pix, c).unwrap_or(usize::MAX);
    if out_need > out.len() {
        return Err(too_small("output", out_need, out.len()));
    }
    if out_pix < c || (out_h > 1 && out_row < out_w * out_pix) {
        return Err(Error::InvalidParameter(
            "filter output pixels overlap".into(),
        ));
    }
    if !epi.fits(out_h * out_w, c) {
        return Err(Error::InvalidParameter(
            "the epilogue's noise or bias is shorter than the output".into(),
        ));
    }
    let shared = Shared(out.as_mut_ptr());
    (0..out_h).into_par_iter().for_each(|y| {
        for x in 0..out_w {
            // SAFETY: inside the output (checked above); row `y` belongs to this thread only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    shared.ptr().add(out_base + y * out_row + x * out_pix),
                    c,
                )
            };
            // Sixteen channels at a time, summed over the taps in registers.
            for c0 in (0..c).step_by(16) {
                let cb = 16.min(c - c0);
                let mut acc = [0f32; 16];
                for a in 0..kh {
                    let row = in_base + (y + a) * in_row + x * c + c0;
                    for b in 0..kw {
                        let k = kernel[a * kw + b];
                        let at = row + b * c;
                        if cb == 16 {
                            let src: &[f32; 16] =
                                input[at..at + 16].try_into().unwrap_or(&[0.0; 16]);
                            for l in 0..16 {
                                acc[l] += k * src[l];
                            }
                        } else {
                            for (d, &s) in acc.iter_mut().zip(&input[at..at + cb]) {
                                *d += k * s;
                            }
                        }
                    }
                }
                dst[c0..c0 + cb].copy_from_slice(&acc[..cb]);
            }
            epi.apply(dst, y * out_w + x, 0);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_values::{map_from_nhwc, values};

    /// Plain convolution over a zero-padded NHWC input: `k × k` taps, `stride`, `pad`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        h: usize,
        w: usize,
        cin: usize,
        wt: &[f32],
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        let mut y = vec![0f32; oh * ow * cout];
        let mut mag = vec![0f32; oh * ow * cout];
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..cout {
                    let (mut s, mut a) = (0f64, 0f64);
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            for i in 0..cin {
                                let xv = x[((iy as usize) * w + ix as usize) * cin + i];
                                let p = f64::from(xv * wt[((o * cin + i) * k + ky) * k + kx]);
                                s += p;
                                a += p.abs();
                            }
                        }
                    }
                    y[(oy * ow + ox) * cout + o] = s as f32;
                    mag[(oy * ow + ox) * cout + o] = a as f32;
                }
            }
        }
        (y, mag, oh, ow)
    }

    #[test]
    fn convolution_matches_the_plain_reference_on_awkward_shapes() {
        // (h, w, cin, cout, k, stride, pad): odd sizes, channels off the vector widths, 1×1
        // spatial, several input chunks (cin 300 with 9 taps), stride 2.
        let cases = [
            (5, 7, 3, 5, 3, 1, 1),
            (1, 1, 17, 33, 3, 1, 1),
            (9, 4, 300, 70, 3, 1, 1),
            (8, 8, 16, 16, 1, 1, 0),
            (11, 6, 8, 65, 3, 2, 1),
            (4, 4, 1029, 3, 1, 1, 0),
        ];
        for path in KernelPath::available_paths() {
            for (n, &(h, w, cin, cout, k, stride, pad)) in cases.iter().enumerate() {
                let x = values(h * w * cin, n as u64 + 1);
                let wt = values(cout * cin * k * k, n as u64 + 100);
                let (want, mag, oh, ow) = reference(&x, h, w, cin, &wt, cout, k, stride, pad);
                let map = map_from_nhwc(&x, h, w, cin, pad);
                let mut packed = PackedWeights::new(path);
                packed
                    .pack(cout, cin, k * k, |o, i, t| wt[(o * cin + i) * k * k + t])
                    .expect("pack");
                let row = map.row_stride();
                let taps: Vec<usize> = (0..k * k).map(|t| (t / k) * row + (t % k) * cin).collect();
                // Output with a 1-pixel border, to exercise the strides.
                let (orow, opix) = ((ow + 2) * cout, cout);
                let mut out = vec![f32::NAN; (oh + 2) * orow];
                let geom = ConvGeom {
                    taps: &taps,
                    batch: 1,
                    in_batch: 0,
                    out_batch: 0,
                    out_h: oh,
                    out_w: ow,
                    in_base: 0,
                    in_row: stride * row,
                    in_pix: stride * cin,
                    out_base: orow + opix,
                    out_row: orow,
                    out_pix: opix,
                };
                conv(&packed, &map.data, &geom, &mut out, &Epilogue::NONE).expect("conv");
                let mut worst = 0f32;
                for oy in 0..oh {
                    for ox in 0..ow {
                        for o in 0..cout {
                            let got = out[(oy + 1) * orow + (ox + 1) * opix + o];
                            let at = (oy * ow + ox) * cout + o;
                            // Error relative to the sum of the products' magnitudes.
                            worst = worst.max((got - want[at]).abs() / mag[at].max(1e-3));
                        }
                    }
                }
                // f32 sums of up to 1029 products: a few ulps of the magnitude.
                assert!(worst < 2e-6, "{path} case {n}: relative error {worst}");
                // The border is untouched.
                assert!(out[..orow].iter().all(|v| v.is_nan()), "{path} case {n}");
            }
        }
    }

    /// A batch convolved with one set of weights (its pixels cut as one range) equals each
    /// item convolved alone: stride 1 and 2, several input chunks, output blocks off the vector
    /// widths, an epilogue with noise and bias; the last case's weights (over 4 MiB) take the
    /// cost search, the others the plain rule.
    #[test]
    fn a_batch_sharing_its_weights_matches_each_item() {
        for (h, w, cin, cout, k, stride, pad) in [
            (7, 9, 200, 90, 3, 1, 1),
            (12, 10, 96, 130, 3, 2, 1),
            (4, 5, 640, 200, 3, 1, 1),
        ] {
            let batch = 3usize;
            let wt = values(cout * cin * k * k, 7);
            let bias = values(cout, 8);
            let (oh, ow) = (
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            );
            let noise = values(oh * ow, 9);
            let items: Vec<Vec<f32>> = (0..batch)
                .map(|b| values(h * w * cin, 20 + b as u64))
                .collect();
            let maps: Vec<crate::nn::FeatureMap> = items
                .iter()
                .map(|x| map_from_nhwc(x, h, w, cin, pad))
                .collect();
            let stacked: Vec<f32> = maps.iter().flat_map(|m| m.data.iter().copied()).collect();
            let row = maps[0].row_stride();
            let taps: Vec<usize> = (0..k * k).map(|t| (t / k) * row + (t % k) * cin).collect();
            let epi = Epilogue {
                noise: Some(&noise),
                bias: Some(&bias),
                ..Epilogue::NONE
            };
            for path in KernelPath::available_paths() {
                let mut packed = PackedWeights::new(path);
                packed
                    .pack(cout, cin, k * k, |o, i, t| wt[(o * cin + i) * k * k + t])
                    .expect("pack");
                let mut out = vec![f32::NAN; batch * oh * ow * cout];
                let geom = ConvGeom {
                    taps: &taps,
                    batch,
                    in_batch: maps[0].data.len(),
                    out_batch: oh * ow * cout,
                    out_h: oh,
                    out_w: ow,
                    in_base: 0,
                    in_row: stride * row,
                    in_pix: stride * cin,
                    out_base: 0,
                    out_row: ow * cout,
                    out_pix: cout,
                };
                conv(&packed, &stacked, &geom, &mut out, &epi).expect("conv");
                for (b, x) in items.iter().enumerate() {
                    let (want, mag, ..) = reference(x, h, w, cin, &wt, cout, k, stride, pad);
                    let got = &out[b * oh * ow * cout..][..oh * ow * cout];
                    for (at, (&g, (&y, &m))) in got.iter().zip(want.iter().zip(&mag)).enumerate() {
                        let y = y + noise[at / cout] + bias[at % cout];
                        let err = (g - y).abs() / m.max(1e-3);
                        assert!(err < 2e-6, "{path} item {b} value {at}: {g} vs {y}");
                    }
                }
            }
        }
    }

    /// The work split covers every pixel and block, in register-tile multiples; a deep layer
    /// (8×8 maps of 1280 channels, batch 2: 59 MB of weights for 128 pixels) reads its weights
    /// once, with the blocks cut among the threads; a shallow one (64×64, 320 channels) is
    /// cut into strips.
    #[test]
    fn the_work_split_streams_large_weights_once() {
        let (mr, nr) = (6, 64);
        let work = |pixels: usize, cin: usize, cout: usize, taps: usize| {
            let cc = (PANEL_BYTES / (taps * nr * 4)).max(4).min(cin);
            Work {
                units: 1,
                pixels,
                blocks: cout.div_ceil(nr),
                chunks: cin.div_ceil(cc),
                weight_bytes: cout.div_ceil(nr) * nr * cin * taps * 4,
                pixel_bytes: cin * 4,
                chunk_pixel_bytes: cc * 8,
                flops_per_pixel_block: 2 * nr * cin * taps,
            }
        };
        let deep = work(2 * 64, 1280, 1280, 9);
        let shallow = work(2 * 64 * 64, 320, 320, 9);
        for threads in [1, 2, 4, 8, 16] {
            for (name, w) in [("deep", &deep), ("shallow", &shallow)] {
                let s = Split::choose(w, (mr, nr), KernelPath::Avx512Vnni, threads);
                assert!(
                    s.strip.is_multiple_of(mr) && s.strip * s.strips >= w.pixels,
                    "{name} {s:?}"
                );
                assert!(
                    s.strip * (s.strips - 1) < w.pixels,
                    "{name} {s:?}: an empty strip"
                );
                assert!(s.per_group * s.groups >= w.blocks, "{name} {s:?}");
                assert!(
                    s.per_group * (s.groups - 1) < w.blocks,
                    "{name} {s:?}: an empty group"
                );
            }
            let d = Split::choose(&deep, (mr, nr), KernelPath::Avx512Vnni, threads);
            assert_eq!(d.strips, 1, "{threads} threads: {d:?}");
            assert!(
                d.per_group <= deep.blocks.div_ceil(threads),
                "{threads} threads: {d:?}"
            );
            let s = Split::choose(&shallow, (mr, nr), KernelPath::Avx512Vnni, threads);
            assert!(s.strips >= 4, "{threads} threads: {s:?}");
        }
    }

    #[test]
    fn the_epilogue_adds_noise_and_bias_then_activates_and_clamps() {
        let e = Epilogue {
            scale: None,
            noise: Some(&[0.5, -4.0]),
            bias: Some(&[1.0, 2.0, -3.0]),
            slope: Some(0.2),
            gain: 2.0,
            clamp: Some(5.0),
        };
        let mut v = [1.0f32, -10.0, 0.0];
        e.apply(&mut v, 1, 0);
        // (1 − 4 + 1)·0.2·2, (−10 − 4 + 2)·0.2·2 → −4.8, (0 − 4 − 3)·0.2·2 = −2.8
        let want = [-0.8f32, -4.8, -2.8];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{v:?}");
        }
        let mut big = [100.0f32];
        e.apply(&mut big[..], 0, 2);
        assert!((big[0] - 5.0).abs() < 1e-6, "clamped: {big:?}");
    }

    #[test]
    fn bad_geometry_is_an_error_not_a_stray_read() {
        let mut packed = PackedWeights::new(KernelPath::Scalar);
        packed.pack(4, 4, 1, |_, _, _| 1.0).expect("pack");
        let input = vec![0f32; 16];
        let mut out = vec![0f32; 16];
        let geom = ConvGeom {
            taps: &[0],
            batch: 1,
            in_batch: 0,
            out_batch: 0,
            out_h: 2,
            out_w: 2,
            in_base: 4,
            in_row: 8,
            in_pix: 4,
            out_base: 0,
            out_row: 8,
            out_pix: 4,
        };
        let err =
            conv(&packed, &input, &geom, &mut out, &Epilogue::NONE).expect_err("past the end");
        assert!(err.to_string().contains("input"), "{err}");
        let overlap = ConvGeom {
            in_base: 0,
            out_pix: 2,
            ..geom
        };
        assert!(conv(&packed, &input, &overlap, &mut out, &Epilogue::NONE).is_err());
        // Items of a batch sharing the weights must not overlap either; an empty batch is
        // nothing to do.
        let items = ConvGeom {
            in_base: 0,
            out_row: 4,
            batch: 2,
            in_batch: 0,
            out_batch: 8,
            out_h: 1,
            ..geom
        };
        assert!(conv(&packed, &input, &items, &mut out, &Epilogue::NONE).is_ok());
        let overlapping = ConvGeom {
            out_batch: 4,
            ..items
        };
        assert!(conv(&packed, &input, &overlapping, &mut out, &Epilogue::NONE).is_err());
        let empty = ConvGeom { batch: 0, ..items };
        assert!(conv(&packed, &input, &empty, &mut out, &Epilogue::NONE).is_ok());
    }
}
