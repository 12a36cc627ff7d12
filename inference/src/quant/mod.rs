//! Studio's own quantized CPU matrix kernels: `Y = X · Wᵀ` with `W` kept in its GGUF file
//! format (no expansion to f32).
//!
//! - [`QWeight`] holds the raw GGUF bytes of one 2-D weight (`rows` = output features N,
//!   `cols` = K) in its file format: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
//!   Q6_K, IQ4_NL, IQ4_XS, and F16/BF16 kept as 16 bits.
//! - [`QWeight::matmul`] quantizes the activation rows once per call (Q8_0-style blocks of 32
//!   for the 32-block formats and IQ4_XS, Q8_K-style super-blocks of 256 for the other K-quants; F16/BF16 use the f32
//!   activations as they are) into a per-thread scratch buffer reused between calls, then:
//!   - decode (M < 16): register tiles of 1 × 4 weight rows, 4 × 4 for 4 ≤ M < 16, each
//!     weight block decoded once per tile. On the AVX-512 path (and for Q4_0 on the AVX2 path)
//!     the weights are stored as [`WeightLayout::Tiles4`] (reordered in place on load), so a
//!     tile reads its 4 rows as one stream that the hardware prefetchers follow; in file order
//!     (other paths, rows that are not whole tile steps) a software prefetch sweeps the next
//!     tile's rows;
//!   - prefill (M ≥ 16, AVX-512): 16 weight rows at a time are unpacked into a panel (a
//!     per-thread buffer) where one 64-byte vector holds 4 consecutive values of 16 rows, so
//!     one `vpdpbusd` with 4 broadcast activation bytes advances 16 outputs; the panel is built
//!     once and used by every activation row (F16/BF16: rows widened to f32, broadcast FMAs).
//!
//!   The output columns are split across rayon's pool (the same pool, and so the same
//!   `RAYON_NUM_THREADS`, as candle's own kernels); no heap allocation in steady state.
//! - [`KernelPath`] picks the instruction set: AVX-512 with VNNI (and VBMI for the byte
//!   permutes) or AVX2 + FMA + F16C (register tiles; prompts of 16 rows or more on the
//!   32-block formats use panels of 4 transposed weight rows, `x86_avx2_panel.rs`), each for
//!   every format (Q2_K, Q3_K, and IQ4_NL/IQ4_XS decode run the AVX2 kernels on the AVX-512
//!   path), or the portable scalar code. [`KernelPath::detect`] is the best the CPU offers, or the one [`CPU_PATH_ENV`]
//!   forces; [`QWeight::matmul_with`] picks one per call (tests run every path the machine
//!   has).
//!
//! Numbers: weights are used exactly (integer dot products of the quantized values), the
//! activations carry the error of their 8-bit quantization (as in llama.cpp and candle), and
//! the scales are applied in f32.

mod act;
mod kernel;
mod scalar;
pub mod team;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx2_panel;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;
#[cfg(target_arch = "x86_64")]
mod x86_load;

use std::fmt;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

pub use kernel::QuantizedInput;

/// The file formats the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 32 weights per block: f16 scale `d`, 16 bytes of nibbles; value = (q − 8)·d.
    Q4_0,
    /// 32 weights per block: f16 scale `d` and min `m`, 16 bytes of nibbles; value = q·d + m.
    Q4_1,
    /// 32 weights per block: f16 scale `d`, 4 bytes of fifth bits, 16 bytes of nibbles;
    /// value = (q − 16)·d.
    Q5_0,
    /// 32 weights per block: f16 `d` and `m`, fifth bits, nibbles; value = q·d + m.
    Q5_1,
    /// 32 weights per block: f16 scale `d`, 32 signed bytes; value = q·d.
    Q8_0,
    /// 256-weight super-blocks of 16 sub-blocks with 4-bit scales and mins, 2-bit values.
    Q2K,
    /// 256-weight super-blocks of 16 sub-blocks with 6-bit scales, 3-bit values (2 bits and
    /// a high-bit mask).
    Q3K,
    /// 256-weight super-blocks of 8 sub-blocks with 6-bit scales and mins, 4-bit values.
    Q4K,
    /// As Q4_K with a fifth bit per value.
    Q5K,
    /// 256-weight super-blocks of 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6K,
    /// IEEE half precision, one value per 2 bytes.
    F16,
    /// bfloat16, one value per 2 bytes.
    BF16,
    /// 32 weights per block: f16 scale `d`, 16 bytes of nibbles indexing a fixed non-linear
    /// table of 16 signed values ([`IQ4_VALUES`]); value = `table[q]·d`.
    IQ4NL,
    /// 256-weight super-blocks of 8 sub-blocks of 32: f16 `d`, 6-bit sub-block scales
    /// (`scales_h`, `scales_l`), nibbles into [`IQ4_VALUES`]; value = `table[q]·d·(ls − 32)`.
    IQ4XS,
}

/// ggml's `kvalues_iq4nl`: the 16 values an IQ4_NL / IQ4_XS nibble selects.
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl QuantFormat {
    /// Every format, in the order above.
    pub const ALL: [QuantFormat; 14] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
        QuantFormat::F16,
        QuantFormat::BF16,
        QuantFormat::IQ4NL,
        QuantFormat::IQ4XS,
    ];

    /// Weights per block (K must be a multiple of it).
    pub const fn block_size(self) -> usize {
        match self {
            QuantFormat::Q4_0
            | QuantFormat::Q4_1
            | QuantFormat::Q5_0
            | QuantFormat::Q5_1
            | QuantFormat::Q8_0
            | QuantFormat::IQ4NL => 32,
            QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q4K
            | QuantFormat::Q5K
            | QuantFormat::Q6K
            | QuantFormat::IQ4XS => 256,
            QuantFormat::F16 | QuantFormat::BF16 => 1,
        }
    }

    /// Bytes per block in the file.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 | QuantFormat::IQ4NL => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q5_0 => 22,
            QuantFormat::Q5_1 => 24,
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q2K => 84,
            QuantFormat::Q3K => 110,
            QuantFormat::Q4K => 144,
            QuantFormat::Q5K => 176,
            QuantFormat::Q6K => 210,
            QuantFormat::F16 | QuantFormat::BF16 => 2,
            QuantFormat::IQ4XS => 136,
        }
    }

    /// Whether the AVX-512 path reads this format as [`WeightLayout::Tiles4`] (reordered on
    /// load); Q4_1, Q5_0 and Q5_1 have AVX-512 kernels that read the file order, and Q2_K,
    /// Q3_K, IQ4_NL and IQ4_XS run the AVX2 kernels there.
    pub(crate) const fn avx512_tiles(self) -> bool {
        matches!(
            self,
            QuantFormat::Q4_0
                | QuantFormat::Q8_0
                | QuantFormat::Q4K
                | QuantFormat::Q5K
                | QuantFormat::Q6K
                | QuantFormat::F16
                | QuantFormat::BF16
        )
    }

    /// The activations' quantization block: 32 for the 32-block formats and IQ4_XS (whose
    /// sub-blocks of 32 each have a scale), 256 for the other K-quants, 0 (none) for F16/BF16.
    pub const fn activation_block(self) -> usize {
        match self {
            QuantFormat::F16 | QuantFormat::BF16 => 0,
            QuantFormat::IQ4XS => 32,
            other => other.block_size(),
        }
    }

    /// The format of a ggml type id (the GGUF tensor directory's), or `None` when Studio has no
    /// kernel for it (F32 included).
    pub fn from_ggml_type(t: u32) -> Option<Self> {
        Some(match t {
            1 => QuantFormat::F16,
            2 => QuantFormat::Q4_0,
            3 => QuantFormat::Q4_1,
            6 => QuantFormat::Q5_0,
            7 => QuantFormat::Q5_1,
            8 => QuantFormat::Q8_0,
            10 => QuantFormat::Q2K,
            11 => QuantFormat::Q3K,
            12 => QuantFormat::Q4K,
            13 => QuantFormat::Q5K,
            14 => QuantFormat::Q6K,
            20 => QuantFormat::IQ4NL,
            23 => QuantFormat::IQ4XS,
            30 => QuantFormat::BF16,
            _ => return None,
        })
    }

    /// The ggml type id of this format.
    pub const fn ggml_type(self) -> u32 {
        match self {
            QuantFormat::F16 => 1,
            QuantFormat::Q4_0 => 2,
            QuantFormat::Q4_1 => 3,
            QuantFormat::Q5_0 => 6,
            QuantFormat::Q5_1 => 7,
            QuantFormat::Q8_0 => 8,
            QuantFormat::Q2K => 10,
            QuantFormat::Q3K => 11,
            QuantFormat::Q4K => 12,
            QuantFormat::Q5K => 13,
            QuantFormat::Q6K => 14,
            QuantFormat::IQ4NL => 20,
            QuantFormat::IQ4XS => 23,
            QuantFormat::BF16 => 30,
        }
    }

    /// The format of a candle/GGUF dtype, or `None` when Studio has no kernel for it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => QuantFormat::Q4_0,
            GgmlDType::Q4_1 => QuantFormat::Q4_1,
            GgmlDType::Q5_0 => QuantFormat::Q5_0,
            GgmlDType::Q5_1 => QuantFormat::Q5_1,
            GgmlDType::Q8_0 => QuantFormat::Q8_0,
            GgmlDType::Q2K => QuantFormat::Q2K,
            GgmlDType::Q3K => QuantFormat::Q3K,
            GgmlDType::Q4K => QuantFormat::Q4K,
            GgmlDType::Q5K => QuantFormat::Q5K,
            GgmlDType::Q6K => QuantFormat::Q6K,
            GgmlDType::F16 => QuantFormat::F16,
            GgmlDType::BF16 => QuantFormat::BF16,
            _ => return None,
        })
    }

    /// The candle dtype of this format; `None` for the formats candle does not have (IQ4_NL,
    /// IQ4_XS), which only Studio's kernels run.
    pub fn to_ggml(self) -> Option<GgmlDType> {
        Some(match self {
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
            QuantFormat::Q4_1 => GgmlDType::Q4_1,
            QuantFormat::Q5_0 => GgmlDType::Q5_0,
            QuantFormat::Q5_1 => GgmlDType::Q5_1,
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q2K => GgmlDType::Q2K,
            QuantFormat::Q3K => GgmlDType::Q3K,
            QuantFormat::Q4K => GgmlDType::Q4K,
            QuantFormat::Q5K => GgmlDType::Q5K,
            QuantFormat::Q6K => GgmlDType::Q6K,
            QuantFormat::F16 => GgmlDType::F16,
            QuantFormat::BF16 => GgmlDType::BF16,
            QuantFormat::IQ4NL | QuantFormat::IQ4XS => return None,
        })
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantFormat::Q4_0 => "Q4_0",
            QuantFormat::Q4_1 => "Q4_1",
            QuantFormat::Q5_0 => "Q5_0",
            QuantFormat::Q5_1 => "Q5_1",
            QuantFormat::Q8_0 => "Q8_0",
            QuantFormat::Q2K => "Q2_K",
            QuantFormat::Q3K => "Q3_K",
            QuantFormat::Q4K => "Q4_K",
            QuantFormat::Q5K => "Q5_K",
            QuantFormat::Q6K => "Q6_K",
            QuantFormat::F16 => "F16",
            QuantFormat::BF16 => "BF16",
            QuantFormat::IQ4NL => "IQ4_NL",
            QuantFormat::IQ4XS => "IQ4_XS",
        })
    }
}

/// The instruction set a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`) and VBMI (byte permutes).
    Avx512Vnni,
    /// AVX2 with FMA and F16C (`vpmaddubsw`/`vpmaddwd`).
    Avx2,
    /// Portable Rust, any CPU.
    Scalar,
}

/// The environment variable that forces a path (`avx512`, `avx2` or `scalar`): the paths
/// above it are then treated as missing from this CPU, so an AVX-512 machine measures and
/// tests the AVX2 path. Read once; [`KernelPath::from_env`] checks it.
pub const CPU_PATH_ENV: &str = "STUDIO_CPU_PATH";

impl KernelPath {
    /// Every path, fastest first.
    pub const ALL: [KernelPath; 3] = [KernelPath::Avx512Vnni, KernelPath::Avx2, KernelPath::Scalar];

    /// Whether this CPU has the instructions of the path (whatever [`CPU_PATH_ENV`] says).
    pub fn cpu_has(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vbmi")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx512Vnni | KernelPath::Avx2 => false,
        }
    }

    /// Whether the path can run here: the CPU has it and [`CPU_PATH_ENV`] does not cap the
    /// paths below it.
    pub fn available(self) -> bool {
        // Asked on every product: detected once.
        static AVAILABLE: std::sync::OnceLock<[bool; 3]> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            KernelPath::ALL
                .map(|p| p.cpu_has() && forced().is_none_or(|cap| p.rank() >= cap.rank()))
        })[self.rank()]
    }

    /// Position in [`KernelPath::ALL`] (0: fastest).
    fn rank(self) -> usize {
        match self {
            KernelPath::Avx512Vnni => 0,
            KernelPath::Avx2 => 1,
            KernelPath::Scalar => 2,
        }
    }

    /// The path a name of [`CPU_PATH_ENV`] stands for.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx512-vnni" | "avx512vnni" => Some(KernelPath::Avx512Vnni),
            "avx2" => Some(KernelPath::Avx2),
            "scalar" => Some(KernelPath::Scalar),
            _ => None,
        }
    }

    /// The path [`CPU_PATH_ENV`] forces: `None` when it is unset or empty; an error when it
    /// names no path, or one this CPU lacks (which would stop the program with an illegal
    /// instruction). The CLI and the app call this at start and refuse to run on an error.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(value) = std::env::var(CPU_PATH_ENV) else {
            return Ok(None);
        };
        if value.trim().is_empty() {
            return Ok(None);
        }
        let Some(path) = Self::parse(&value) else {
            return Err(Error::InvalidParameter(format!(
                "{CPU_PATH_ENV}={value} names no kernel path: use avx512, avx2 or scalar"
            )));
        };
        if !path.cpu_has() {
            return Err(Error::InvalidParameter(format!(
                "{CPU_PATH_ENV}={value}: this CPU lacks the instructions of the {path} path \
                 (it has: {})",
                Self::ALL
                    .into_iter()
                    .filter(|p| p.cpu_has())
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Some(path))
    }

    /// An error when this CPU cannot run the path.
    fn check(self) -> Result<()> {
        if self.available() {
            Ok(())
        } else {
            Err(Error::InvalidParameter(format!(
                "the {self} kernels need CPU features this machine lacks{}",
                forced().map_or(String::new(), |p| format!(
                    " (or {CPU_PATH_ENV} forces {p})"
                ))
            )))
        }
    }

    /// The fastest path this CPU offers, or the one [`CPU_PATH_ENV`] forces (detected once).
    pub fn detect() -> Self {
        static BEST: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            KernelPath::ALL
                .into_iter()
                .find(|p| p.available())
                .unwrap_or(KernelPath::Scalar)
        })
    }

    /// Every path this CPU can run, fastest first.
    pub fn available_paths() -> Vec<KernelPath> {
        KernelPath::ALL
            .into_iter()
            .filter(|p| p.available())
            .collect()
    }
}

/// The path [`CPU_PATH_ENV`] forces, read once. A bad value is logged and ignored here (the
/// best path runs, never one the CPU lacks); [`KernelPath::from_env`] reports it.
fn forced() -> Option<KernelPath> {
    static FORCED: std::sync::OnceLock<Option<KernelPath>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match KernelPath::from_env() {
        Ok(p) => {
            if let Some(p) = p {
                log::info!("{CPU_PATH_ENV} forces the {p} kernels");
            }
            p
        }
        Err(e) => {
            log::error!("{e}; using the best path this CPU has");
            None
        }
    })
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelPath::Avx512Vnni => "avx512-vnni",
            KernelPath::Avx2 => "avx2",
            KernelPath::Scalar => "scalar",
        })
    }
}

/// Bytes of one row's step in a decode tile: what [`WeightLayout::Tiles4`] interleaves (a
/// block for the formats without AVX-512 tiles, which stay in file order).
pub(crate) const fn tile_unit(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4_0 => 4 * 18,
        QuantFormat::Q8_0 => 2 * 34,
        QuantFormat::F16 | QuantFormat::BF16 => 32,
        _ => format.block_bytes(),
    }
}

/// One unit (see [`tile_unit`]) as [`WeightLayout::Tiles4`] stores it: Q4_0's 4 block scales
/// first, then the 4 blocks' 16 quant bytes (the order the AVX-512 tile reads without byte
/// permutes); the other formats' units as in the file.
fn unit_to_tiled(format: QuantFormat, file: &[u8], tiled: &mut [u8]) {
    if format == QuantFormat::Q4_0 {
        for b in 0..4 {
            tiled[2 * b..2 * b + 2].copy_from_slice(&file[18 * b..18 * b + 2]);
            tiled[8 + 16 * b..24 + 16 * b].copy_from_slice(&file[18 * b + 2..18 * b + 18]);
        }
    } else {
        tiled.copy_from_slice(file);
    }
}

/// The inverse of [`unit_to_tiled`].
fn unit_to_file(format: QuantFormat, tiled: &[u8], file: &mut [u8]) {
    if format == QuantFormat::Q4_0 {
        for b in 0..4 {
            file[18 * b..18 * b + 2].copy_from_slice(&tiled[2 * b..2 * b + 2]);
            file[18 * b + 2..18 * b + 18].copy_from_slice(&tiled[8 + 16 * b..24 + 16 * b]);
        }
    } else {
        file.copy_from_slice(tiled);
    }
}

/// Consecutive weight rows in file order (see [`QWeight::rows_view`]).
pub(crate) struct RowsView<'a> {
    bytes: std::borrow::Cow<'a, [u8]>,
    start: usize,
    rb: usize,
}

impl RowsView<'_> {
    /// Weight row `j` (an index of the whole weight, inside the view's rows).
    pub(crate) fn row(&self, j: usize) -> &[u8] {
        let i = j - self.start;
        &self.bytes[i * self.rb..(i + 1) * self.rb]
    }
}

/// One weight row in either layout, read a block at a time in place: unit `g` of the row
/// starts at `g × stride` of `bytes`.
#[derive(Clone, Copy)]
pub(crate) struct RowUnits<'a> {
    bytes: &'a [u8],
    stride: usize,
    /// Blocks per unit, a power of two (F16/BF16: a block is one value).
    blocks_log2: u32,
    block_bytes: usize,
}

impl<'a> RowUnits<'a> {
    /// Block `b` of the row (F16/BF16: value `b`).
    pub(crate) fn block(&self, b: usize) -> &'a [u8] {
        let mask = (1 << self.blocks_log2) - 1;
        let start = (b >> self.blocks_log2) * self.stride + (b & mask) * self.block_bytes;
        &self.bytes[start..start + self.block_bytes]
    }
}

/// A 2-D weight (`rows` = output features N, `cols` = input features K) in its GGUF bytes.
#[derive(Clone)]
pub struct QWeight {
    name: String,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// The file bytes, or with [`WeightLayout::Tiles4`] the same bytes reordered in place.
    data: Vec<u8>,
    layout: WeightLayout,
}

/// How a [`QWeight`] stores its rows.
///
/// A decode product reads every weight byte once, so its speed is the memory system's. Read
/// as several rows side by side (a register tile of 4 rows shares each activation load), the
/// weight is 4 interleaved streams per thread, which the hardware prefetchers serve poorly;
/// `Tiles4` stores each group of 4 rows as one stream in the order the tile reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Row-major, as in the file.
    Natural,
    /// Each run of 4 rows (`4t..4t + 4`) interleaved by the tile's step (a "unit": Q4_0 4
    /// blocks, Q8_0 2 blocks, a K-quant super-block, 16 F16/BF16 values): unit 0 of the 4
    /// rows, then unit 1 of the 4 rows… The bytes of the 4 rows stay where they were, so a
    /// run of rows is still a contiguous byte range. A Q4_0 unit holds its 4 block scales,
    /// then its 4 × 16 quant bytes. Rows past the last whole run of 4 are stored as in the
    /// file.
    Tiles4,
}

impl WeightLayout {
    /// The layout this CPU's fastest kernels read `format` in place: `Tiles4` for the AVX-512
    /// decode tiles and prefill panels, and for the AVX2 Q4_0 decode tiles (whose 4 block
    /// scales a unit keeps together); file order otherwise.
    fn for_this_cpu(format: QuantFormat) -> Self {
        match KernelPath::detect() {
            KernelPath::Avx512Vnni => WeightLayout::Tiles4,
            KernelPath::Avx2 if format == QuantFormat::Q4_0 => WeightLayout::Tiles4,
            _ => WeightLayout::Natural,
        }
    }
}

impl fmt::Debug for QWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QWeight")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl QWeight {
    /// A weight from its raw file bytes (row-major, `rows` rows of `cols` values each),
    /// stored as this CPU's fastest kernels read it: [`WeightLayout::Tiles4`] on the AVX-512
    /// path and for Q4_0 on the AVX2 path (the other kernels gather rows back into file
    /// order).
    ///
    /// Errors name the tensor when `cols` is not a multiple of the format's block or the
    /// byte count does not match the shape.
    pub fn from_bytes(
        name: &str,
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        Self::from_bytes_in(
            name,
            format,
            rows,
            cols,
            data,
            WeightLayout::for_this_cpu(format),
        )
    }

    /// As [`QWeight::from_bytes`], stored in `layout` (see [`QWeight::with_layout`]).
    fn from_bytes_in(
        name: &str,
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        layout: WeightLayout,
    ) -> Result<Self> {
        let bs = format.block_size();
        if cols == 0 || rows == 0 || !cols.is_multiple_of(bs) {
            return Err(Error::BadQuantTensor {
                name: name.to_owned(),
                message: format!(
                    "shape [{rows}, {cols}]: the row length {cols} is not a positive multiple of \
                     the {format} block size {bs}"
                ),
            });
        }
        let expected = rows * (cols / bs) * format.block_bytes();
        if data.len() != expected {
            return Err(Error::BadQuantTensor {
                name: name.to_owned(),
                message: format!(
                    "{format} shape [{rows}, {cols}] needs {expected} bytes, found {}",
                    data.len()
                ),
            });
        }
        let weight = Self {
            name: name.to_owned(),
            format,
            rows,
            cols,
            data,
            layout: WeightLayout::Natural,
        };
        Ok(weight.with_layout(layout))
    }

    /// The same weight stored in `layout` (the bytes are reordered in place). A weight whose
    /// rows are not whole units (a Q4_0 row of a number of blocks not a multiple of 4…), that
    /// has fewer than 4 rows, or whose format has no AVX-512 tiles (Q4_1, Q5_0, Q5_1, Q2_K,
    /// Q3_K) stays [`WeightLayout::Natural`].
    #[must_use]
    pub fn with_layout(mut self, layout: WeightLayout) -> Self {
        let unit = tile_unit(self.format);
        let rb = self.row_bytes();
        if layout == self.layout
            || !rb.is_multiple_of(unit)
            || self.rows < 4
            || !self.format.avx512_tiles()
        {
            return self;
        }
        let upr = rb / unit;
        let mut tmp = vec![0u8; 4 * rb];
        for tile in self.data.chunks_exact_mut(4 * rb) {
            tmp.copy_from_slice(tile);
            for g in 0..upr {
                for r in 0..4 {
                    let (natural, packed) = (r * rb + g * unit, (g * 4 + r) * unit);
                    match layout {
                        WeightLayout::Tiles4 => unit_to_tiled(
                            self.format,
                            &tmp[natural..natural + unit],
                            &mut tile[packed..packed + unit],
                        ),
                        WeightLayout::Natural => unit_to_file(
                            self.format,
                            &tmp[packed..packed + unit],
                            &mut tile[natural..natural + unit],
                        ),
                    }
                }
            }
        }
        self.layout = layout;
        self
    }

    /// How the rows are stored.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// Rows `0..tiled_rows()` are stored in runs of 4 interleaved rows (none when natural).
    pub(crate) fn tiled_rows(&self) -> usize {
        match self.layout {
            WeightLayout::Natural => 0,
            WeightLayout::Tiles4 => self.rows / 4 * 4,
        }
    }

    /// A weight from a candle `QTensor` of shape `[rows, cols]` (its bytes are copied once),
    /// stored as [`QWeight::from_bytes`] stores it.
    pub fn from_qtensor(name: &str, tensor: &QTensor) -> Result<Self> {
        let layout = QuantFormat::from_ggml(tensor.dtype())
            .map_or(WeightLayout::Natural, WeightLayout::for_this_cpu);
        Self::from_qtensor_in(name, tensor, layout)
    }

    /// As [`QWeight::from_qtensor`], stored in `layout`.
    pub(crate) fn from_qtensor_in(
        name: &str,
        tensor: &QTensor,
        layout: WeightLayout,
    ) -> Result<Self> {
        let dtype = tensor.dtype();
        let Some(format) = QuantFormat::from_ggml(dtype) else {
            return Err(Error::BadQuantTensor {
                name: name.to_owned(),
                message: format!("Studio has no kernel for the {dtype:?} format"),
            });
        };
        let dims = tensor.shape().dims();
        let &[rows, cols] = dims else {
            return Err(Error::BadQuantTensor {
                name: name.to_owned(),
                message: format!("shape {dims:?} is not 2-D"),
            });
        };
        let data = tensor.data()?.into_owned();
        Self::from_bytes_in(name, format, rows, cols, data, layout)
    }

    /// The tensor's name (used in errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quantization format of the stored blocks.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output features N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features K.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes in file order (a copy when the layout is not [`WeightLayout::Natural`]).
    pub fn file_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.layout {
            WeightLayout::Natural => std::borrow::Cow::Borrowed(&self.data),
            WeightLayout::Tiles4 => self.rows_view(0..self.rows).bytes,
        }
    }

    /// Bytes of one weight row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.cols / self.format.block_size() * self.format.block_bytes()
    }

    /// The stored bytes of weight rows `rows` (what a thread reads for its share of a
    /// product; in [`WeightLayout::Tiles4`], the same bytes in the tiles' order when `rows`
    /// starts and ends on multiples of 4).
    pub fn rows_bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[rows.start * rb..rows.end * rb]
    }

    /// Rows `rows` in file order: borrowed when stored so, else gathered once (what the
    /// kernels without tile-order reads work from: the scalar path, the AVX2 path but for Q4_0
    /// decode).
    pub(crate) fn rows_view(&self, rows: std::ops::Range<usize>) -> RowsView<'_> {
        let rb = self.row_bytes();
        let bytes = if rows.start >= self.tiled_rows() {
            std::borrow::Cow::Borrowed(self.rows_bytes(rows.clone()))
        } else {
            let mut out = Vec::with_capacity(rows.len() * rb);
            let mut buf = Vec::new();
            for r in rows.clone() {
                out.extend_from_slice(self.row(r, &mut buf));
            }
            std::borrow::Cow::Owned(out)
        };
        RowsView {
            bytes,
            start: rows.start,
            rb,
        }
    }

    /// Row `r` in place, whatever the layout, a block at a time (the K-quant prefill panels).
    /// Not for Q4_0, whose tiled units keep the block scales apart from the quants.
    pub(crate) fn row_units(&self, r: usize) -> RowUnits<'_> {
        debug_assert!(
            self.format != QuantFormat::Q4_0,
            "Q4_0 blocks are split when tiled"
        );
        let rb = self.row_bytes();
        let unit = tile_unit(self.format);
        let block_bytes = self.format.block_bytes();
        let blocks_log2 = (unit / block_bytes).trailing_zeros();
        let (bytes, stride) = if r < self.tiled_rows() {
            let tile = r / 4 * 4 * rb;
            (&self.data[tile + r % 4 * unit..tile + 4 * rb], 4 * unit)
        } else {
            (&self.data[r * rb..(r + 1) * rb], unit)
        };
        RowUnits {
            bytes,
            stride,
            blocks_log2,
            block_bytes,
        }
    }

    /// One weight row's bytes in file order: borrowed when stored so, else gathered into
    /// `buf` (a row inside a run of 4 interleaved rows).
    pub(crate) fn row<'a>(&'a self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let rb = self.row_bytes();
        if r >= self.tiled_rows() {
            return &self.data[r * rb..(r + 1) * rb];
        }
        let unit = tile_unit(self.format);
        let tile = &self.data[r / 4 * 4 * rb..(r / 4 + 1) * 4 * rb];
        buf.resize(rb, 0);
        for (g, dst) in buf.chunks_exact_mut(unit).enumerate() {
            let at = (g * 4 + r % 4) * unit;
            unit_to_file(self.format, &tile[at..at + unit], dst);
        }
        buf
    }

    /// The whole weight as f32, row-major (`rows × cols`): the reference the kernels are
    /// checked against, and a fallback for code that needs plain floats.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let mut buf = Vec::new();
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            scalar::dequantize_row(self.format, self.row(r, &mut buf), dst);
        }
        out
    }

    /// Row `r` as f32 into `dst` (`cols` values): an embedding lookup that keeps the table in
    /// its file format.
    pub fn row_to_f32(&self, r: usize, dst: &mut [f32]) -> Result<()> {
        if r >= self.rows || dst.len() != self.cols {
            return Err(Error::BadQuantTensor {
                name: self.name.clone(),
                message: format!(
                    "row {r} into {} values: the weight has {} rows of {}",
                    dst.len(),
                    self.rows,
                    self.cols
                ),
            });
        }
        scalar::dequantize_row(self.format, self.row(r, &mut Vec::new()), dst);
        Ok(())
    }

    /// The error of a product (`what`: the whole or which rows) whose sizes do not fit.
    fn shape_error(&self, what: &str, m: usize, x: usize, y: usize) -> Error {
        Error::BadQuantTensor {
            name: self.name.clone(),
            message: format!(
                "{what} of [{m}, {}] by [{}, {}]ᵀ into {y} values: got {x} input values",
                self.cols, self.rows, self.cols
            ),
        }
    }

    /// `y (m × rows) = x (m × cols) · Wᵀ` on the fastest path this CPU offers.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        self.matmul_with(x, m, y, KernelPath::detect())
    }

    /// As [`QWeight::matmul`] on a chosen path; a path this CPU lacks is an error.
    pub fn matmul_with(&self, x: &[f32], m: usize, y: &mut [f32], path: KernelPath) -> Result<()> {
        if x.len() != m * self.cols || y.len() != m * self.rows {
            return Err(self.shape_error("matmul", m, x.len(), y.len()));
        }
        path.check()?;
        if m == 0 {
            return Ok(());
        }
        kernel::matmul(self, x, m, y, path);
        Ok(())
    }

    /// Output features `rows` only: `y (m × rows.len()) = x (m × cols) · W[rows]ᵀ`, on the
    /// calling thread (no pool): what each member of a team of threads runs on its share of one
    /// product. Equals the same columns of [`QWeight::matmul`] on `path`.
    ///
    /// The quantized activations are kept in `input` and reused by the next call with the same
    /// `x` (same slice, length and format layout); call [`QuantizedInput::clear`] after changing
    /// the values of `x` in place.
    pub fn matmul_rows(
        &self,
        input: &mut QuantizedInput,
        x: &[f32],
        m: usize,
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        path: KernelPath,
    ) -> Result<()> {
        if x.len() != m * self.cols
            || rows.start > rows.end
            || rows.end > self.rows
            || y.len() != m * rows.len()
        {
            return Err(self.shape_error(&format!("rows {rows:?}"), m, x.len(), y.len()));
        }
        path.check()?;
        if m == 0 || rows.is_empty() {
            return Ok(());
        }
        kernel::matmul_rows(self, input, x, m, rows, y, path);
        Ok(())
    }

    /// `x · Wᵀ` for a contiguous-or-not f32 tensor `[..., cols]` on the CPU; the result has
    /// the same leading dims and `rows` as the last.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            return Err(Error::BadQuantTensor {
                name: self.name.clone(),
                message: "the input is a scalar".to_owned(),
            });
        };
        if k != self.cols {
            return Err(Error::BadQuantTensor {
                name: self.name.clone(),
                message: format!("input has {k} features, the weight expects {}", self.cols),
            });
        }
        let m: usize = lead.iter().product();
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut y = vec![0f32; m * self.rows];
        self.matmul(&xs, m, &mut y)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }
}

/// Asks the cache for the line holding `s[at]` (into L2 where the CPU has a hint for it; nothing
/// elsewhere).
fn prefetch_l2(s: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    x86_load::prefetch_l2(s, at);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, at);
}

/// Whether `path` has its own kernel for `format` (otherwise that path runs the scalar one).
pub fn has_kernel(format: QuantFormat, path: KernelPath) -> bool {
    kernel::has_kernel(format, path)
}

/// Whether the models should run `format` on Studio's kernel for `path` rather than candle's
/// `QMatMul`. This is the one place that chooses between them:
/// - on x86-64, Studio's kernels wherever it has one (every format, on every path), so a
///   file's layers all run on them and one-token steps on the decode team;
/// - elsewhere (aarch64), candle's kernels for every format candle has: they have NEON code,
///   Studio only portable scalar code there; IQ4_NL and IQ4_XS, which candle lacks, on Studio's
///   scalar kernels.
pub fn preferred(format: QuantFormat, path: KernelPath) -> bool {
    has_kernel(format, path) && (cfg!(target_arch = "x86_64") || format.to_ggml().is_none())
}

/// `bytes` (whole rows of `cols` values in `format`, file order) as f32, read in place: what
/// the loaders make of norms, biases and dense tables.
pub(crate) fn dequantize_rows(format: QuantFormat, cols: usize, bytes: &[u8]) -> Vec<f32> {
    let rb = cols / format.block_size() * format.block_bytes();
    let rows = bytes.len().checked_div(rb).unwrap_or(0);
    let mut out = vec![0f32; rows * cols];
    for (row, dst) in bytes
        .chunks_exact(rb.max(1))
        .zip(out.chunks_exact_mut(cols.max(1)))
    {
        scalar::dequantize_row(format, row, dst);
    }
    out
}

/// The activations of `x` (`m × k`) after the 8-bit quantization the kernels apply for
/// `format` (for F16/BF16: `x` itself): what the reference product is computed with.
pub fn quantize_dequantize_activations(format: QuantFormat, x: &[f32], k: usize) -> Vec<f32> {
    act::round_trip(format, x, k)
}
