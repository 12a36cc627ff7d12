//! Latent noise: where a seed's noise comes from, and variation seeds.
//!
//! - [`NoiseSource::Studio`]: Studio's own generator (a seeded `StdRng` through Box–Muller),
//!   the same on every device.
//! - [`NoiseSource::TorchCpu`]: the values `torch.randn(shape, generator=torch.Generator()
//!   .manual_seed(seed))` gives on the CPU, which ComfyUI draws its latent noise with and the
//!   SD web UI with its RNG source set to "CPU". Same seed, sampler, steps and model then give
//!   the same image as those tools. PyTorch draws a 32-bit Mersenne Twister (seeded with the
//!   seed's low 32 bits); for 16 values or more it fills 24-bit uniform floats and turns each
//!   block of 16 into normals with single-precision Box–Muller (values `j` and `j + 8` from one
//!   pair; a length that is not a multiple of 16 draws its last 16 again), and below 16 it uses
//!   a double-precision Box–Muller that keeps its second value for the next draw. The float
//!   path matches to the last bit or two: PyTorch's vectorised `log`/`sin`/`cos` round a little
//!   differently from the C library's (checked against `torch.randn` values in
//!   `tests/fixtures/torch_noise`).
//!
//! - [`NoiseSource::TorchCuda`]: the values `torch.randn(shape, device="cuda")` gives after
//!   `torch.manual_seed(seed)`, computed on the CPU as the SD web UI's "NV" RNG source does:
//!   PyTorch's CUDA generator is Philox 4×32 with 10 rounds, keyed by the 64-bit seed, with
//!   counter `(offset, 0, i, 0)` for the `i`-th value of a call (the offset grows by one per
//!   call) and the value from the first two outputs by the first half of Box–Muller. The
//!   web UI's reading keeps the single-precision constants and does the rest in double
//!   precision; so does Studio, so "RNG: NV" images reproduce (the GPU's own single-precision
//!   `logf`/`sinf` differ from these by up to 4e-7). Checked against the values the web UI
//!   documents for `torch.randn((3, 4), device="cuda")` with seed 0, and Philox against
//!   Random123's known answers.
//!
//! The sampler's later noise (ancestral samplers) goes on drawing from the same stream, as the
//! SD web UI's per-image generator does.
//!
//! A variation seed ([`Variation`], the web UI's "Variation seed" and "Variation seed
//! strength") blends the seed's first noise towards another seed's by spherical interpolation,
//! exactly as the web UI's `slerp` does on a `(channels, height, width)` noise: norms over the
//! height axis, per channel and column, and a linear blend (with the two weights swapped, as
//! the web UI has them) when the two are almost parallel.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

/// Where the latent noise of a seed comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NoiseSource {
    /// Studio's own generator.
    #[default]
    Studio,
    /// PyTorch's CPU generator (ComfyUI; the SD web UI's "CPU" RNG source).
    TorchCpu,
    /// PyTorch's CUDA generator, computed on the CPU (the SD web UI's "NV" RNG source).
    TorchCuda,
}

impl NoiseSource {
    /// Every source, for menus.
    pub const ALL: [NoiseSource; 3] = [
        NoiseSource::Studio,
        NoiseSource::TorchCpu,
        NoiseSource::TorchCuda,
    ];

    /// The value of the `RNG` field in the PNG parameters (the SD web UI writes `CPU`).
    pub fn name(self) -> &'static str {
        match self {
            NoiseSource::Studio => "Studio",
            NoiseSource::TorchCpu => "CPU",
            NoiseSource::TorchCuda => "NV",
        }
    }

    /// For menus.
    pub fn label(self) -> &'static str {
        match self {
            NoiseSource::Studio => "Studio",
            NoiseSource::TorchCpu => "PyTorch CPU (ComfyUI, SD web UI \"CPU\")",
            NoiseSource::TorchCuda => "PyTorch CUDA (SD web UI \"NV\", its default on NVIDIA)",
        }
    }

    /// Reads an `RNG` field or a command-line value: `Studio`, `CPU` (also `torch-cpu`), `NV`
    /// (also `cuda`, `torch-cuda`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "studio" => Some(NoiseSource::Studio),
            "cpu" | "torch-cpu" | "torch_cpu" | "pytorch-cpu" => Some(NoiseSource::TorchCpu),
            "nv" | "cuda" | "torch-cuda" | "torch_cuda" | "pytorch-cuda" => {
                Some(NoiseSource::TorchCuda)
            }
            _ => None,
        }
    }
}

/// A variation seed: the first noise moves towards this seed's by `strength` (0 to 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variation {
    /// The other seed (image `i` of a batch uses `seed + i`).
    pub seed: u64,
    /// 0: the seed's own noise; 1: the other seed's.
    pub strength: f64,
}

/// One image's stream of standard-normal noise.
pub struct NoiseStream {
    inner: Stream,
}

enum Stream {
    Studio(Box<StdRng>),
    Torch(TorchCpuRng),
    Cuda(TorchCudaRng),
}

impl NoiseStream {
    /// The stream a seed starts.
    pub fn new(source: NoiseSource, seed: u64) -> Self {
        let inner = match source {
            NoiseSource::Studio => Stream::Studio(Box::new(StdRng::seed_from_u64(seed))),
            NoiseSource::TorchCpu => Stream::Torch(TorchCpuRng::new(seed)),
            NoiseSource::TorchCuda => Stream::Cuda(TorchCudaRng::new(seed)),
        };
        Self { inner }
    }

    /// The next `n` values (one tensor's worth).
    pub fn draw(&mut self, n: usize) -> Vec<f32> {
        match &mut self.inner {
            Stream::Studio(rng) => studio_normals(rng, n),
            Stream::Torch(t) => t.randn(n),
            Stream::Cuda(t) => t.randn(n),
        }
    }
}

fn studio_normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        v.push((r * a.cos()) as f32);
        v.push((r * a.sin()) as f32);
    }
    v.truncate(n);
    v
}

/// The 32-bit Mersenne Twister (MT19937) as PyTorch's CPU generator runs it.
struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            // i < 624 always fits.
            #[allow(clippy::cast_possible_truncation)]
            let index = i as u32;
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(index);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        for k in 0..624 {
            let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator().manual_seed(seed)` and the `torch.randn` calls made with it.
pub struct TorchCpuRng {
    mt: Mt19937,
    /// The double-precision Box–Muller's second value, kept for the next scalar draw.
    cached: Option<f64>,
}

impl TorchCpuRng {
    /// `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        // PyTorch seeds the twister with the seed's low 32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let low = seed as u32;
        Self {
            mt: Mt19937::new(low),
            cached: None,
        }
    }

    /// A uniform float in [0, 1) from 24 bits, as `uniform_real_distribution<float>`.
    fn uniform_f32(&mut self) -> f32 {
        // 24 bits convert exactly.
        #[allow(clippy::cast_precision_loss)]
        let v = (self.mt.next_u32() & 0x00ff_ffff) as f32;
        v * (1.0 / 16_777_216.0)
    }

    /// A uniform double in [0, 1) from 53 bits of two draws.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.mt.next_u32());
        let lo = u64::from(self.mt.next_u32());
        // 53 bits convert exactly.
        #[allow(clippy::cast_precision_loss)]
        let v = (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64;
        v * (1.0 / 9_007_199_254_740_992.0)
    }

    fn scalar_normal(&mut self) -> f64 {
        if let Some(v) = self.cached.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = std::f64::consts::TAU * u1;
        self.cached = Some(r * theta.sin());
        r * theta.cos()
    }

    /// The values of one `torch.randn` call with `n` elements (float32, contiguous).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            // The scalar path rounds its doubles to float.
            #[allow(clippy::cast_possible_truncation)]
            return (0..n).map(|_| self.scalar_normal() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// `torch.manual_seed(seed)` and the `torch.randn(…, device="cuda")` calls after it, as the
/// SD web UI's "NV" source computes them on the CPU.
pub struct TorchCudaRng {
    key: [u32; 2],
    /// Calls made so far: the first counter word of the next.
    offset: u32,
}

impl TorchCudaRng {
    /// Keyed by the whole 64-bit seed (low word first).
    pub fn new(seed: u64) -> Self {
        #[allow(clippy::cast_possible_truncation)]
        let key = [seed as u32, (seed >> 32) as u32];
        Self { key, offset: 0 }
    }

    /// The values of one call with `n` elements.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        // Single-precision constants, as the reference has them; the rest in doubles.
        let inv = f64::from(2.328_306_4e-10_f32);
        #[allow(clippy::cast_possible_truncation)]
        let inv_2pi = f64::from((2.328_306_4e-10_f64 * 6.283_185_5) as f32);
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                // The counter's third word is the element's index (32 bits, as the reference).
                #[allow(clippy::cast_possible_truncation)]
                let out = philox4x32_10([offset, 0, i as u32, 0], self.key);
                let u = f64::from(out[0]) * inv + inv / 2.0;
                let v = f64::from(out[1]) * inv_2pi + inv_2pi / 2.0;
                #[allow(clippy::cast_possible_truncation)]
                let r = ((-2.0 * u.ln()).sqrt() * v.sin()) as f32;
                r
            })
            .collect()
    }
}

/// Philox 4×32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = u64::from(c[0]) * M0;
        let p1 = u64::from(c[2]) * M1;
        #[allow(clippy::cast_possible_truncation)]
        let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Single-precision Box–Muller over 16 uniforms: `j` and `j + 8` from one pair.
fn box_muller_16(data: &mut [f32]) {
    const TWO_PI: f32 = std::f32::consts::TAU;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = TWO_PI * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

/// The SD web UI's `slerp(strength, low, high)` on noises of shape `(channels, height,
/// width)`: norms over the height axis for each channel and column.
///
/// # Panics
/// When the slices do not hold `channels × height × width` values (a caller's bug).
pub fn slerp_variation(
    strength: f64,
    low: &[f32],
    high: &[f32],
    (channels, height, width): (usize, usize, usize),
) -> Vec<f32> {
    let n = channels * height * width;
    assert!(
        low.len() == n && high.len() == n,
        "slerp_variation: shape mismatch"
    );
    let at = |c: usize, y: usize, x: usize| (c * height + y) * width + x;
    let val = strength as f32;
    // Per (channel, column): the dot product of the normalised columns.
    let mut dots = vec![0f32; channels * width];
    for c in 0..channels {
        for x in 0..width {
            let (mut nl, mut nh) = (0f32, 0f32);
            for y in 0..height {
                nl += low[at(c, y, x)].powi(2);
                nh += high[at(c, y, x)].powi(2);
            }
            let (nl, nh) = (nl.sqrt(), nh.sqrt());
            let mut dot = 0f32;
            for y in 0..height {
                dot += (low[at(c, y, x)] / nl) * (high[at(c, y, x)] / nh);
            }
            dots[c * width + x] = dot;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let mean = dots.iter().sum::<f32>() / dots.len().max(1) as f32;
    let mut out = vec![0f32; n];
    if mean > 0.9995 {
        // The web UI's shortcut, weights as it has them.
        for (o, (l, h)) in out.iter_mut().zip(low.iter().zip(high)) {
            *o = l * val + h * (1.0 - val);
        }
        return out;
    }
    for c in 0..channels {
        for x in 0..width {
            let omega = dots[c * width + x].clamp(-1.0, 1.0).acos();
            let so = omega.sin();
            let wl = ((1.0 - val) * omega).sin() / so;
            let wh = (val * omega).sin() / so;
            for y in 0..height {
                let i = at(c, y, x);
                out[i] = wl * low[i] + wh * high[i];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_twister_gives_the_reference_sequence() {
        // MT19937's published check: the 10000th output for seed 5489 is 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn philox_gives_random123s_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn cuda_noise_gives_torch_cuda_values() {
        // `torch.manual_seed(0); torch.randn((3, 4), device="cuda")`, as the SD web UI's
        // `modules/rng_philox.py` documents it (8 significant digits). The GPU computes
        // Box–Muller in single precision with its own `log`/`sin`; the web UI's reading (and
        // Studio's) in double precision: they agree within 4e-7.
        let want = [
            -0.924_662_59,
            -0.425_344_15,
            -2.643_845_7,
            0.145_183_88,
            -0.120_866_47,
            -0.579_725_64,
            -0.622_851_22,
            -0.328_387_09,
            -1.074_542_31,
            -0.363_144_07,
            -1.671_050_67,
            2.265_504_97,
        ];
        let mut g = TorchCudaRng::new(0);
        let got = g.randn(12);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(*g) - w).abs() < 4e-7, "value {i}: {g} vs {w}");
        }
        // The next call continues at the next offset: other values.
        assert_ne!(g.randn(12), got);
        // The stream behind NoiseSource::TorchCuda is the same.
        assert_eq!(NoiseStream::new(NoiseSource::TorchCuda, 0).draw(12), got);
    }

    #[test]
    fn sources_round_trip_their_names() {
        for s in NoiseSource::ALL {
            assert_eq!(NoiseSource::parse(s.name()), Some(s));
        }
        assert_eq!(NoiseSource::parse("GPU"), None);
    }

    #[test]
    fn a_full_strength_variation_is_the_other_seed() {
        let mut a = NoiseStream::new(NoiseSource::TorchCpu, 1);
        let mut b = NoiseStream::new(NoiseSource::TorchCpu, 2);
        let (low, high) = (a.draw(4 * 8 * 8), b.draw(4 * 8 * 8));
        let v = slerp_variation(1.0, &low, &high, (4, 8, 8));
        for (x, y) in v.iter().zip(&high) {
            assert!((x - y).abs() < 1e-5);
        }
        let v = slerp_variation(0.0, &low, &high, (4, 8, 8));
        for (x, y) in v.iter().zip(&low) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
