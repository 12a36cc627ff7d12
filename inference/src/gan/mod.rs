//! Generative adversarial networks for the Latent Explorer.
//!
//! - [`stylegan2`]: NVIDIA's StyleGAN2 generator (the StyleGAN2-ADA PyTorch code and the
//!   StyleGAN3 repository's `networks_stylegan2.py`), read from safetensors files with the
//!   tensor names of NVIDIA's `G_ema` state dict;
//! - [`dcgan`]: the DCGAN generator of PyTorch's DCGAN tutorial / `pytorch/examples`, read
//!   from its `state_dict()` as safetensors (`main.0.weight`, …, with or without `module.`);
//! - [`NumpyRandomState`]: numpy's legacy `RandomState` (MT19937 and its polar Box–Muller
//!   `randn`), so a seed gives the same latent as NVIDIA's own scripts;
//! - [`upfirdn2d`]: up-sample, pad, FIR-filter (the resampling primitive StyleGAN uses);
//! - [`latent`]: lerp/slerp, fractional seeds, keyframes, style mixing, rendering, and
//!   random-weight generators for benchmarks;
//! - [`npy`]: NumPy `.npy` files for latents (`--z-file`, `--w-file`, `--out-w`);
//! - [`directions`]: GANSpace PCA directions in W;
//! - [`project`]: NVIDIA's projector (W and noise optimized on candle's autograd);
//! - [`perceptual`]: VGG16 features and the LPIPS distance, its perceptual loss.
//! - [`render`]: the Latent Explorer's render requests and rendering (W rows, noise, the
//!   image, layer views, seed grids), which the worker runs between jobs.
//!
//! NVIDIA distributes its networks as Python pickles, which execute code when Python loads
//! them. Studio reads them with its own pickle reader, as data ([`crate::pickle::network`]:
//! `G_ema`'s tensors and init kwargs; the code they carry never runs), or a safetensors file
//! with a JSON of the init kwargs beside it, as `studio convert` and
//! `tools/convert_stylegan_pkl.py` write them.

pub mod dcgan;
pub mod directions;
pub mod latent;
pub mod npy;
pub mod perceptual;
pub mod project;
pub mod render;
pub mod stylegan2;

pub use stylegan2::{Architecture, GanInfo, NoiseMode, StyleGan2};

use candle_core::{Device, Tensor};

use crate::error::Result;

/// numpy's legacy random generator, `np.random.RandomState(seed)`: MT19937 seeded with
/// `init_genrand`, doubles from two 32-bit draws (53 bits), and normals from the polar
/// Box–Muller method with the second value of each pair cached, exactly as numpy's
/// `legacy_gauss`. NVIDIA's tools make latents with `RandomState(seed).randn(1, z_dim)`.
#[derive(Clone)]
pub struct NumpyRandomState {
    mt: Box<[u32; 624]>,
    pos: usize,
    gauss: Option<f64>,
}

impl std::fmt::Debug for NumpyRandomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NumpyRandomState")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl NumpyRandomState {
    const N: usize = 624;
    const M: usize = 397;

    /// `np.random.RandomState(seed)` for an integer seed (numpy accepts 0 ..= 2³²−1).
    pub fn new(seed: u32) -> Self {
        let mut mt = Box::new([0u32; 624]);
        mt[0] = seed;
        for i in 1..Self::N {
            let prev = mt[i - 1];
            mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            mt,
            pos: Self::N,
            gauss: None,
        }
    }

    fn refill(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..Self::N {
            let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % Self::N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.mt[i] = self.mt[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    /// The next tempered 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.pos >= Self::N {
            self.refill();
        }
        let mut y = self.mt[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A double in [0, 1) with 53 random bits (`random_sample`).
    pub fn next_f64(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }

    /// One standard normal value (`randn`'s element generator).
    pub fn next_gauss(&mut self) -> f64 {
        if let Some(g) = self.gauss.take() {
            return g;
        }
        loop {
            let x1 = 2.0 * self.next_f64() - 1.0;
            let x2 = 2.0 * self.next_f64() - 1.0;
            let r2 = x1 * x1 + x2 * x2;
            if r2 < 1.0 && r2 != 0.0 {
                let f = (-2.0 * r2.ln() / r2).sqrt();
                self.gauss = Some(f * x1);
                return f * x2;
            }
        }
    }

    /// `randn(n)`: `n` standard normal values in order.
    pub fn randn(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next_gauss()).collect()
    }
}

/// A resampling filter prepared for [`upfirdn2d`]: 2-D, multiplied by the gain and flipped
/// (upfirdn2d convolves; candle's conv2d correlates), shaped `(1, 1, h, w)`.
#[derive(Debug, Clone)]
pub struct FirFilter {
    kernel: Tensor,
    /// The kernel's values, row-major (for the native kernels).
    values: Vec<f32>,
    height: usize,
    width: usize,
}

impl FirFilter {
    /// From a stored filter (`resample_filter`, already normalized as NVIDIA's
    /// `setup_filter` leaves it): 2-D `(h, w)`, or 1-D taps (separable, expanded to their
    /// outer product). `gain` multiplies the whole 2-D filter.
    pub fn new(filter: &Tensor, gain: f64) -> Result<Self> {
        let f = filter.to_dtype(candle_core::DType::F32)?;
        let f = match f.rank() {
            1 => {
                let n = f.dim(0)?;
                f.reshape((n, 1))?.matmul(&f.reshape((1, n))?)?
            }
            _ => f,
        };
        let (height, width) = f.dims2()?;
        let kernel = (f * gain)?
            .flip(&[0, 1])?
            .reshape((1, 1, height, width))?
            .contiguous()?;
        Ok(Self {
            values: kernel.flatten_all()?.to_vec1::<f32>()?,
            kernel,
            height,
            width,
        })
    }

    /// NVIDIA's default `[1, 3, 3, 1]` filter (outer product, normalized to sum 1).
    pub fn default_taps(device: &Device) -> Result<Tensor> {
        let taps = [1f32, 3., 3., 1.];
        let mut v = Vec::with_capacity(16);
        for a in taps {
            for b in taps {
                v.push(a * b / 64.0);
            }
        }
        Ok(Tensor::from_vec(v, (4, 4), device)?)
    }

    /// Rows of the 2-D filter.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Columns of the 2-D filter.
    pub fn width(&self) -> usize {
        self.width
    }
}

/// Inserts `up − 1` zeros after every pixel along height and width.
pub(crate) fn zero_stuff(x: &Tensor, up: usize) -> Result<Tensor> {
    if up == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let zeros = Tensor::zeros((n, c, h, w, up - 1), x.dtype(), x.device())?;
    let x = Tensor::cat(&[&x.unsqueeze(4)?, &zeros], 4)?.reshape((n, c, h, w * up))?;
    let zeros = Tensor::zeros((n, c, h, up - 1, w * up), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&x.unsqueeze(3)?, &zeros], 3)?.reshape((n, c, h * up, w * up))?)
}

/// Pads (positive) or crops (negative) the last two dimensions:
/// `[x_before, x_after, y_before, y_after]`.
pub(crate) fn pad2d(x: &Tensor, pad: [isize; 4]) -> Result<Tensor> {
    let [x0, x1, y0, y1] = pad;
    let mut x = x.pad_with_zeros(3, x0.max(0) as usize, x1.max(0) as usize)?;
    x = x.pad_with_zeros(2, y0.max(0) as usize, y1.max(0) as usize)?;
    let (_, _, h, w) = x.dims4()?;
    let (cx0, cx1, cy0, cy1) = (
        (-x0).max(0) as usize,
        (-x1).max(0) as usize,
        (-y0).max(0) as usize,
        (-y1).max(0) as usize,
    );
    if cx0 + cx1 > 0 {
        x = x.narrow(3, cx0, w - cx0 - cx1)?;
    }
    if cy0 + cy1 > 0 {
        x = x.narrow(2, cy0, h - cy0 - cy1)?;
    }
    Ok(x)
}

/// NVIDIA's `upfirdn2d` without down-sampling: insert `up − 1` zeros after each pixel, pad
/// (or crop, for negative values) by `pad = [x_before, x_after, y_before, y_after]`, then
/// convolve every channel with the filter (its gain is already applied, see [`FirFilter`]).
pub fn upfirdn2d(x: &Tensor, filter: &FirFilter, up: usize, pad: [isize; 4]) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let x = pad2d(&zero_stuff(x, up)?, pad)?;
    let (_, _, h, w) = x.dims4()?;
    let y = x
        .contiguous()?
        .reshape((n * c, 1, h, w))?
        .conv2d(&filter.kernel, 0, 1, 1, 1)?;
    let (_, _, ho, wo) = y.dims4()?;
    Ok(y.reshape((n, c, ho, wo))?)
}

/// NVIDIA's `upsample2d(x, f, up)`: the padding that makes the output exactly `up` times the
/// input (the filter must carry the gain `up²`).
pub fn upsample2d(x: &Tensor, filter: &FirFilter, up: usize) -> Result<Tensor> {
    let (fw, fh, up_i) = (filter.width as isize, filter.height as isize, up as isize);
    let pad = [
        (fw + up_i - 1) / 2,
        (fw - up_i) / 2,
        (fh + up_i - 1) / 2,
        (fh - up_i) / 2,
    ];
    upfirdn2d(x, filter, up, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_random_state_matches_known_values() {
        // np.random.RandomState(0).random_sample(2) and .randn(2) from a fresh state.
        let mut r = NumpyRandomState::new(0);
        assert!((r.next_f64() - 0.548_813_503_927_325).abs() < 1e-15);
        assert!((r.next_f64() - 0.715_189_366_372_419_7).abs() < 1e-15);
        let mut r = NumpyRandomState::new(0);
        let v = r.randn(2);
        assert!((v[0] - 1.764_052_345_967_664).abs() < 1e-14);
        assert!((v[1] - 0.400_157_208_367_223_3).abs() < 1e-14);
    }

    #[test]
    fn upsample_keeps_a_constant_image_constant_inside() {
        let device = Device::Cpu;
        let f =
            FirFilter::new(&FirFilter::default_taps(&device).expect("taps"), 4.0).expect("filter");
        let x = Tensor::ones((1, 1, 6, 6), candle_core::DType::F32, &device).expect("ones");
        let y = upsample2d(&x, &f, 2).expect("up");
        assert_eq!(y.dims4().expect("dims"), (1, 1, 12, 12));
        let v = y
            .get(0)
            .and_then(|t| t.get(0))
            .and_then(|t| t.get(6))
            .expect("row");
        let v = v.get(6).and_then(|t| t.to_scalar::<f32>()).expect("value");
        assert!((v - 1.0).abs() < 1e-6, "{v}");
    }
}
