//! Dispatch and threads: which kernel runs for a format on a path, the activation layout it
//! wants, and the split of the output columns across rayon's pool.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::act::{Act, Layout};
use super::{KernelPath, QWeight, QuantFormat, scalar};

/// Below this many multiply-adds (about 20 µs of work) a call runs on the calling thread:
/// handing work to the pool costs more than it saves (measured on the 896 × 896 decode).
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// A writable view of the output columns one worker owns.
///
/// Built only by [`matmul`], one per disjoint column range, so two workers never write the
/// same element; `set` checks its indices against that range.
pub(crate) struct OutChunk {
    ptr: *mut f32,
    ld: usize,
    m: usize,
    cols: Range<usize>,
    /// The weight row stored at column 0 of `ptr`'s rows (0 for a whole output; the first
    /// row of the range for [`matmul_rows`]).
    col0: usize,
}

impl OutChunk {
    /// Writes `y[i][j]`.
    #[inline]
    pub(crate) fn set(&mut self, i: usize, j: usize, v: f32) {
        assert!(
            i < self.m && self.cols.contains(&j),
            "output index out of the chunk"
        );
        // SAFETY: `ptr` points to the caller's `m × ld` output, which outlives the parallel
        // region that uses this chunk; `i < m` and `col0 ≤ j < col0 + ld` were checked above
        // and where the chunk was built, and no other chunk covers column `j` (chunks are
        // disjoint column ranges).
        unsafe { *self.ptr.add(i * self.ld + (j - self.col0)) = v };
    }
}

/// The raw output pointer shared by the workers (each one writes only its own columns).
#[derive(Clone, Copy)]
struct OutBase {
    ptr: *mut f32,
    ld: usize,
    m: usize,
}

// SAFETY: workers only write through `OutChunk`s of disjoint column ranges (see `OutChunk`).
unsafe impl Send for OutBase {}
// SAFETY: as above; the pointer itself is never mutated.
unsafe impl Sync for OutBase {}

impl OutBase {
    fn chunk(self, cols: Range<usize>) -> OutChunk {
        assert!(cols.end <= self.ld, "output chunk past the row");
        OutChunk {
            ptr: self.ptr,
            ld: self.ld,
            m: self.m,
            cols,
            col0: 0,
        }
    }
}

/// Whether `path` has its own kernel for `format`.
pub(crate) fn has_kernel(format: QuantFormat, path: KernelPath) -> bool {
    // Every format `QuantFormat` names has one on each path of an x86-64 CPU today.
    let _ = format;
    match path {
        KernelPath::Scalar => true,
        // Both SIMD paths have a kernel for every format (the AVX-512 path runs the formats
        // without tiles of its own on the AVX2 kernels).
        KernelPath::Avx512Vnni | KernelPath::Avx2 => cfg!(target_arch = "x86_64"),
    }
}

/// The path that actually runs `format` when `path` is asked for.
fn effective(format: QuantFormat, path: KernelPath) -> KernelPath {
    if has_kernel(format, path) && path.available() {
        path
    } else {
        KernelPath::Scalar
    }
}

/// The activation layout, weight offset and lanes per block of `format` on `path`
/// (`None`: the kernel reads the f32 activations).
fn plan(format: QuantFormat, path: KernelPath, m: usize) -> Option<(Layout, f32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx512Vnni
        && format.activation_block() == 32
        && super::x86_avx512::use_panel(format, m)
    {
        // The panels hold unsigned values: Q8_0 and the IQ4 table values shifted by 128, Q4_0/Q5_0 as stored (8 and
        // 16 above their value), Q4_1/Q5_1 as stored (their min added with corr, off = 1).
        let off = match format {
            QuantFormat::Q8_0 | QuantFormat::IQ4NL | QuantFormat::IQ4XS => 128.0,
            QuantFormat::Q4_0 => 8.0,
            QuantFormat::Q5_0 => 16.0,
            _ => 1.0,
        };
        return Some((Layout::Natural32, off, 1.0));
    }
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx2 && super::x86_avx2_panel::use_panel(format, m) {
        // Unsigned panels apply the offset or min with `corr` in the 2 lanes of a row;
        // signed ones need no correction.
        return Some(if super::x86_avx2_panel::unsigned(format) {
            (Layout::Natural32, 1.0, 2.0)
        } else {
            (Layout::Natural32, 0.0, 1.0)
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = m;
    Some(match (format, path) {
        (QuantFormat::Q4_0, KernelPath::Scalar) => (Layout::Natural32, 8.0, 1.0),
        (QuantFormat::Q4_0, _) => (Layout::Group4, 8.0, 4.0),
        (QuantFormat::Q8_0, KernelPath::Avx512Vnni) => (Layout::Natural32, 128.0, 8.0),
        // IQ4_NL / IQ4_XS: signed table values against signed activations, a scale per 32
        // (IQ4_XS: per sub-block), as Q8_0 on AVX2.
        (QuantFormat::Q8_0 | QuantFormat::IQ4NL | QuantFormat::IQ4XS, _) => {
            (Layout::Natural32, 0.0, 1.0)
        }
        // The AVX-512 tiles spread a block's correction over its 8 lanes, as Q8_0's.
        (QuantFormat::Q5_0, KernelPath::Avx512Vnni) => (Layout::Natural32, 16.0, 8.0),
        (QuantFormat::Q4_1 | QuantFormat::Q5_1, KernelPath::Avx512Vnni) => {
            (Layout::Natural32, 1.0, 8.0)
        }
        (QuantFormat::Q5_0, _) => (Layout::Natural32, 16.0, 1.0),
        (QuantFormat::Q4_1 | QuantFormat::Q5_1, _) => (Layout::Natural32, 1.0, 1.0),
        (
            QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q4K
            | QuantFormat::Q5K
            | QuantFormat::Q6K,
            _,
        ) => (Layout::Super256, 0.0, 1.0),
        (QuantFormat::F16 | QuantFormat::BF16, _) => return None,
    })
}

thread_local! {
    static SCRATCH: RefCell<Act> = RefCell::new(Act::default());
}

/// `y = x · Wᵀ` (shapes checked by the caller).
pub(crate) fn matmul(w: &QWeight, x: &[f32], m: usize, y: &mut [f32], path: KernelPath) {
    let path = effective(w.format(), path);
    SCRATCH.with(|cell| {
        if let Ok(mut act) = cell.try_borrow_mut() {
            run(w, x, m, y, path, &mut act);
        } else {
            // Re-entered on this thread (a rayon worker waiting in one call picked up
            // another): use a fresh buffer rather than the one in use.
            run(w, x, m, y, path, &mut Act::default());
        }
    });
}

/// What an activation quantization depends on: reused while these match.
#[derive(Clone, Copy, PartialEq)]
struct InputKey {
    /// The address of `x`.
    x: usize,
    len: usize,
    m: usize,
    k: usize,
    plan: Option<(Layout, u32, u32)>,
}

/// Activations quantized once and reused by several products with the same input (a team
/// thread's row shares of q, k and v; the chunks of one product). At most a few layouts are
/// kept (a Q4_K_M layer mixes Q4_K and Q6_K weights).
#[derive(Default)]
pub struct QuantizedInput {
    slots: Vec<(Option<InputKey>, Act)>,
}

impl QuantizedInput {
    /// Forgets the quantized activations: call it whenever the input values change.
    pub fn clear(&mut self) {
        for (key, _) in &mut self.slots {
            *key = None;
        }
    }

    fn get(&mut self, w: &QWeight, x: &[f32], m: usize, path: KernelPath) -> &Act {
        let plan = plan(w.format(), path, m);
        let key = InputKey {
            x: x.as_ptr().addr(),
            len: x.len(),
            m,
            k: w.cols(),
            plan: plan.map(|(l, off, lanes)| (l, off.to_bits(), lanes.to_bits())),
        };
        let at = if let Some(at) = self.slots.iter().position(|(k, _)| *k == Some(key)) {
            at
        } else {
            let at = self
                .slots
                .iter()
                .position(|(k, _)| k.is_none())
                .unwrap_or_else(|| {
                    self.slots.push((None, Act::default()));
                    self.slots.len() - 1
                });
            let (slot_key, act) = &mut self.slots[at];
            if let Some((layout, off, lanes)) = plan {
                act.quantize(x, m, w.cols(), layout, off, lanes);
            }
            *slot_key = Some(key);
            at
        };
        &self.slots[at].1
    }
}

/// `y = x · W[rows]ᵀ` on the calling thread only: `y` is `m × rows.len()` (shapes checked by
/// the caller), with `x` quantized into (or reused from) `input`. A team of threads splitting
/// one product calls this with disjoint `rows`.
pub(crate) fn matmul_rows(
    w: &QWeight,
    input: &mut QuantizedInput,
    x: &[f32],
    m: usize,
    rows: Range<usize>,
    y: &mut [f32],
    path: KernelPath,
) {
    let path = effective(w.format(), path);
    assert!(
        rows.end <= w.rows() && y.len() == m * rows.len(),
        "row range or output size does not fit"
    );
    let mut out = OutChunk {
        ptr: y.as_mut_ptr(),
        ld: rows.len(),
        m,
        cols: rows.clone(),
        col0: rows.start,
    };
    let act = input.get(w, x, m, path);
    run_chunk(w, act, x, m, rows, &mut out, path);
}

fn run(w: &QWeight, x: &[f32], m: usize, y: &mut [f32], path: KernelPath, act: &mut Act) {
    let (n, k) = (w.rows(), w.cols());
    if let Some((layout, off, lanes)) = plan(w.format(), path, m) {
        act.quantize(x, m, k, layout, off, lanes);
    }
    let act: &Act = act;
    let base = OutBase {
        ptr: y.as_mut_ptr(),
        ld: n,
        m,
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS || n < 32 {
        run_chunk(w, act, x, m, 0..n, &mut base.chunk(0..n), path);
        return;
    }
    // Several chunks per thread so a busy core does not hold the others back; chunk edges
    // on multiples of 16 weight rows keep the tiles whole.
    let pieces = threads * 4;
    let step = n.div_ceil(pieces).div_ceil(16) * 16;
    let count = n.div_ceil(step);
    (0..count).into_par_iter().for_each(|c| {
        let cols = c * step..((c + 1) * step).min(n);
        run_chunk(w, act, x, m, cols.clone(), &mut base.chunk(cols), path);
    });
}

fn run_chunk(
    w: &QWeight,
    act: &Act,
    x: &[f32],
    m: usize,
    cols: Range<usize>,
    out: &mut OutChunk,
    path: KernelPath,
) {
    match path {
        KernelPath::Scalar => scalar::chunk(w, act, x, m, cols, out),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni if super::x86_avx512::has_format(w.format(), m) => {
            super::x86_avx512::chunk(w, act, x, m, cols, out);
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 if super::x86_avx2_panel::use_panel(w.format(), m) => {
            super::x86_avx2_panel::chunk(w, act, m, cols, out);
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512Vnni | KernelPath::Avx2 => {
            super::x86_avx2::chunk(w, act, x, m, cols, out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::chunk(w, act, x, m, cols, out),
    }
}
