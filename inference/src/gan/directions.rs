//! GANSpace-style editing directions: principal components of the W latents.
//!
//! [`Directions::compute`] samples `N` latents `z` from a seeded normal generator, maps each
//! to one `w` (the mapping network's output before it is broadcast to the synthesis layers,
//! without truncation), and takes the mean and the top-`k` principal components of the
//! `(N, w_dim)` matrix: the sample covariance (divisor `N − 1`, accumulated in f64) and its
//! leading eigenvectors. Small matrices (`w_dim ≤ 128`) are diagonalized completely with
//! cyclic Jacobi rotations; larger ones (512 for real networks) by subspace iteration with a
//! Rayleigh–Ritz step (Jacobi on the small projected matrix) until the residuals of the
//! wanted pairs vanish, which takes well under a second at 512.
//!
//! Each component is a unit vector whose largest-magnitude entry is positive (a stable sign
//! convention); `stddev[i]` is the standard deviation of the data projected on it, so a
//! slider in σ units moves `w` by `amount · stddev[i] · component[i]` ([`apply`], on a chosen
//! range of W rows, as GANSpace edits a layer range). Everything is plain `Vec<f32>` data
//! with serde, so directions and slider settings save as a JSON preset ([`DirectionsPreset`]).

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{NumpyRandomState, StyleGan2};
use crate::error::{Error, Result};

/// Latents mapped per call while sampling W.
const MAP_BATCH: usize = 1000;

/// How to sample the latents that PCA is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcaConfig {
    /// Number of sampled latents `N` (GANSpace and NVIDIA use 10⁴–10⁶).
    pub samples: usize,
    /// Number of principal components `k` to keep (at most `w_dim`).
    pub components: usize,
    /// Seed of the latent sampler (numpy's `RandomState(seed).randn(N, z_dim)`).
    pub seed: u64,
}

impl Default for PcaConfig {
    fn default() -> Self {
        Self {
            samples: 10_000,
            components: 32,
            seed: 0,
        }
    }
}

/// Principal directions of W.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directions {
    /// Length of a `w` (of `mean` and of every component).
    pub w_dim: usize,
    /// How many latents the statistics came from, and the sampler's seed.
    pub samples: usize,
    /// Seed of the sampler (0 from [`Directions::from_samples`], which is given the data).
    pub seed: u64,
    /// Mean `w` of the samples (`w_dim`).
    pub mean: Vec<f32>,
    /// `k` unit vectors of `w_dim` values, by decreasing variance.
    pub components: Vec<Vec<f32>>,
    /// Standard deviation of the samples along each component (`k`, non-increasing).
    pub stddev: Vec<f32>,
    /// Share of the total variance each component explains (`k`, sums to at most 1).
    pub explained_variance_ratio: Vec<f32>,
}

impl Directions {
    /// Samples `config.samples` latents from `gan`, maps them to W and runs PCA.
    pub fn compute(gan: &StyleGan2, config: &PcaConfig) -> Result<Self> {
        let info = gan.info();
        let (n, z_dim, w_dim) = (config.samples, info.z_dim, info.w_dim);
        check_sizes(n, w_dim, config.components)?;
        if z_dim == 0 {
            return Err(Error::InvalidParameter(
                "PCA directions need a network with a z input".into(),
            ));
        }
        let seed = (config.seed as u32) ^ ((config.seed >> 32) as u32);
        let mut rng = NumpyRandomState::new(seed);
        let mut data = Vec::with_capacity(n * w_dim);
        let mut done = 0;
        while done < n {
            let b = MAP_BATCH.min(n - done);
            let z: Vec<f32> = rng.randn(b * z_dim).into_iter().map(|v| v as f32).collect();
            let z = Tensor::from_vec(z, (b, z_dim), gan.device())?;
            let w = gan
                .map(&z, None, 1.0, None)?
                .narrow(1, 0, 1)?
                .squeeze(1)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            data.extend_from_slice(&w);
            done += b;
        }
        let mut dirs = Self::from_samples(&data, n, w_dim, config.components)?;
        dirs.seed = config.seed;
        Ok(dirs)
    }

    /// PCA of `n` row vectors of `dim` values (`data`, row-major), keeping `k` components.
    pub fn from_samples(data: &[f32], n: usize, dim: usize, k: usize) -> Result<Self> {
        check_sizes(n, dim, k)?;
        if data.len() != n * dim {
            return Err(Error::InvalidParameter(format!(
                "{} values given for {n} samples of {dim}",
                data.len()
            )));
        }
        let x = Tensor::from_slice(data, (n, dim), &Device::Cpu)?.to_dtype(DType::F64)?;
        let mean = (x.sum_keepdim(0)? / n as f64)?;
        let centered = x.broadcast_sub(&mean)?;
        let cov = (centered.t()?.matmul(&centered)? / (n - 1) as f64)?;
        let cov_v: Vec<f64> = cov.flatten_all()?.to_vec1()?;
        let trace: f64 = (0..dim).map(|i| cov_v[i * dim + i]).sum();
        let (values, mut vectors) = top_eigenpairs(&cov, &cov_v, dim, k)?;
        for v in &mut vectors {
            let (mut big, mut sign) = (0.0f64, 1.0f64);
            for &e in v.iter() {
                if e.abs() > big {
                    big = e.abs();
                    sign = e.signum();
                }
            }
            for e in v.iter_mut() {
                *e *= sign;
            }
        }
        let values: Vec<f64> = values.into_iter().map(|l| l.max(0.0)).collect();
        Ok(Self {
            w_dim: dim,
            samples: n,
            seed: 0,
            mean: mean.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            components: vectors
                .iter()
                .map(|v| v.iter().map(|&e| e as f32).collect())
                .collect(),
            stddev: values.iter().map(|l| l.sqrt() as f32).collect(),
            explained_variance_ratio: values
                .iter()
                .map(|l| if trace > 0.0 { (l / trace) as f32 } else { 0.0 })
                .collect(),
        })
    }

    /// Number of components.
    pub fn len(&self) -> usize {
        self.components.len()
    }

    /// Whether there are no components.
    pub fn is_empty(&self) -> bool {
        self.components.is_empty()
    }

    /// Writes the directions to `path` as pretty-printed JSON (the file is replaced atomically).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        save_json(self, path)
    }

    /// Reads directions written by [`Self::save_json`].
    pub fn load_json(path: &Path) -> Result<Self> {
        load_json(path)
    }
}

fn check_sizes(n: usize, dim: usize, k: usize) -> Result<()> {
    if n < 2 {
        return Err(Error::InvalidParameter(format!(
            "PCA needs at least 2 samples, got {n}"
        )));
    }
    if k == 0 || k > dim {
        return Err(Error::InvalidParameter(format!(
            "{k} components asked for; choose 1 to {dim} (the W dimension)"
        )));
    }
    Ok(())
}

/// One slider: move `component` by `sigma` standard deviations in the W rows `layers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionEdit {
    /// Index into [`Directions::components`].
    pub component: usize,
    /// How far to move, in standard deviations along that component (0 = no edit; may be
    /// negative).
    pub sigma: f64,
    /// The W rows to edit, a half-open range within `num_ws`.
    pub layers: Range<usize>,
}

/// Directions plus slider settings, saved together as a preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionsPreset {
    /// The principal directions the edits refer to.
    pub directions: Directions,
    /// The sliders' settings.
    pub edits: Vec<DirectionEdit>,
}

impl DirectionsPreset {
    /// Writes the preset to `path` as pretty-printed JSON (the file is replaced atomically).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        save_json(self, path)
    }

    /// Reads a preset written by [`Self::save_json`].
    pub fn load_json(path: &Path) -> Result<Self> {
        load_json(path)
    }

    /// `(component, sigma, layers)` triples for [`apply`].
    pub fn edit_tuples(&self) -> Vec<(usize, f64, Range<usize>)> {
        self.edits
            .iter()
            .map(|e| (e.component, e.sigma, e.layers.clone()))
            .collect()
    }
}

fn save_json<T: Serialize>(value: &T, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidParameter(format!("cannot serialize directions: {e}")))?;
    crate::sys::write_atomic(path, text.as_bytes(), false).map_err(|e| Error::io(path, e))
}

fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::InvalidParameter(format!(
            "{}: not a Studio directions file: {e}",
            path.display()
        ))
    })
}

/// Edits `ws` `(n, num_ws, w_dim)`: for each `(component, sigma, layers)`, adds
/// `sigma · stddev[component] · components[component]` to the W rows in `layers`.
/// Rows outside every range are returned unchanged.
pub fn apply(
    ws: &Tensor,
    directions: &Directions,
    edits: &[(usize, f64, Range<usize>)],
) -> Result<Tensor> {
    let (_, num_ws, w_dim) = ws.dims3()?;
    if w_dim != directions.w_dim {
        return Err(Error::InvalidParameter(format!(
            "the directions are for W of {} values but ws has {w_dim}",
            directions.w_dim
        )));
    }
    let mut delta = vec![0f32; num_ws * w_dim];
    for (component, sigma, layers) in edits {
        let dir = directions.components.get(*component).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "component {component} does not exist: there are {}",
                directions.len()
            ))
        })?;
        if layers.start > layers.end || layers.end > num_ws {
            return Err(Error::InvalidParameter(format!(
                "layer range {layers:?} is outside the {num_ws} W rows"
            )));
        }
        let scale = (*sigma * f64::from(directions.stddev[*component])) as f32;
        for row in layers.clone() {
            for (d, &v) in delta[row * w_dim..(row + 1) * w_dim].iter_mut().zip(dir) {
                *d += scale * v;
            }
        }
    }
    let delta = Tensor::from_vec(delta, (1, num_ws, w_dim), ws.device())?.to_dtype(ws.dtype())?;
    Ok(ws.broadcast_add(&delta)?)
}

/// The `k` largest eigenvalues (descending) and unit eigenvectors of the symmetric `dim × dim`
/// matrix `cov` (also given as row-major `cov_v`).
fn top_eigenpairs(
    cov: &Tensor,
    cov_v: &[f64],
    dim: usize,
    k: usize,
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let p = (k + k.max(16)).min(dim);
    if dim <= 128 || p >= dim {
        let (values, vectors) = jacobi_eigen(cov_v.to_vec(), dim);
        return Ok((values[..k].to_vec(), vectors[..k].to_vec()));
    }
    subspace_iteration(cov, dim, k, p)
}

/// Subspace iteration on `p ≥ k` vectors with a Rayleigh–Ritz step every few iterations.
fn subspace_iteration(
    cov: &Tensor,
    dim: usize,
    k: usize,
    p: usize,
) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let mut rng = NumpyRandomState::new(0x5eed);
    let mut q: Vec<f64> = rng.randn(p * dim);
    orthonormalize(&mut q, p, dim);
    let mut values = vec![0f64; p];
    // The loop always ends on a Rayleigh–Ritz step (iteration 399 is one), so the values are
    // the Rayleigh quotients of the returned vectors even if the tolerance was not reached.
    for iter in 0..400 {
        // Rows of q are the basis vectors; q·C (C symmetric) applies C to every one.
        let qt = Tensor::from_slice(&q, (p, dim), &Device::Cpu)?;
        let qc = qt.matmul(cov)?;
        if iter % 4 == 3 {
            // Rayleigh–Ritz: diagonalize T = Q C Qᵀ and rotate the basis to its Ritz vectors.
            let t: Vec<f64> = qc.matmul(&qt.t()?)?.flatten_all()?.to_vec1()?;
            let (ritz, s) = jacobi_eigen(t, p);
            let s = Tensor::from_vec(s.concat(), (p, p), &Device::Cpu)?;
            let rotated = s.matmul(&qt)?;
            let rotated_c = s.matmul(&qc)?;
            q = rotated.flatten_all()?.to_vec1()?;
            let qc_v: Vec<f64> = rotated_c.flatten_all()?.to_vec1()?;
            values = ritz;
            let scale = values[0].abs().max(f64::MIN_POSITIVE);
            let converged = (0..k).all(|i| {
                let r: f64 = (0..dim)
                    .map(|j| {
                        let e = qc_v[i * dim + j] - values[i] * q[i * dim + j];
                        e * e
                    })
                    .sum();
                r.sqrt() <= 1e-7 * scale
            });
            if converged {
                break;
            }
            continue;
        }
        q = qc.flatten_all()?.to_vec1()?;
        orthonormalize(&mut q, p, dim);
    }
    let vectors = (0..k).map(|i| q[i * dim..(i + 1) * dim].to_vec()).collect();
    Ok((values[..k].to_vec(), vectors))
}

/// Modified Gram–Schmidt (twice, for stability) on the `rows` row vectors of `q`; a vector
/// that collapses is replaced by a unit axis orthogonalized against the rest.
fn orthonormalize(q: &mut [f64], rows: usize, dim: usize) {
    for i in 0..rows {
        for _pass in 0..2 {
            for j in 0..i {
                let (head, tail) = q.split_at_mut(i * dim);
                let qi = &mut tail[..dim];
                let qj = &head[j * dim..(j + 1) * dim];
                let dot: f64 = qi.iter().zip(qj).map(|(a, b)| a * b).sum();
                for (a, b) in qi.iter_mut().zip(qj) {
                    *a -= dot * b;
                }
            }
        }
        let qi = &mut q[i * dim..(i + 1) * dim];
        let norm = qi.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-300 {
            for a in qi.iter_mut() {
                *a /= norm;
            }
        } else {
            qi.fill(0.0);
            qi[i % dim] = 1.0;
        }
    }
}

/// Cyclic Jacobi eigendecomposition of a symmetric row-major `n × n` matrix: eigenvalues in
/// descending order and the matching unit eigenvectors.
fn jacobi_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| ((p + 1)..n).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q] * a[p * n + q])
            .sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..n {
                    let (arp, arq) = (a[r * n + p], a[r * n + q]);
                    a[r * n + p] = c * arp - s * arq;
                    a[r * n + q] = s * arp + c * arq;
                }
                for r in 0..n {
                    let (apr, aqr) = (a[p * n + r], a[q * n + r]);
                    a[p * n + r] = c * apr - s * aqr;
                    a[q * n + r] = s * apr + c * aqr;
                }
                for r in 0..n {
                    let (vrp, vrq) = (v[r * n + p], v[r * n + q]);
                    v[r * n + p] = c * vrp - s * vrq;
                    v[r * n + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let vectors = order
        .iter()
        .map(|&i| (0..n).map(|r| v[r * n + i]).collect())
        .collect();
    (values, vectors)
}
