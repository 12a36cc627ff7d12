//! The DCGAN generator of Radford et al. as PyTorch's DCGAN tutorial and `pytorch/examples`
//! (`dcgan/main.py`) write it:
//!
//! ```text
//! main = Sequential(
//!     ConvTranspose2d(nz, ngf·2ᴸ⁻², 4, 1, 0, bias=False), BatchNorm2d, ReLU,   # 1×1 → 4×4
//!     ConvTranspose2d(…, …/2, 4, 2, 1, bias=False), BatchNorm2d, ReLU,          # ×2
//!     …
//!     ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), Tanh)                       # ×2
//! ```
//!
//! Weights come from a safetensors file holding the module's `state_dict()`: `main.0.weight`,
//! `main.1.{weight,bias,running_mean,running_var}`, `main.3.weight`, … (`num_batches_tracked`
//! is ignored), with or without the `module.` prefix `DataParallel` adds. `nz`, `ngf`, `nc` and
//! the number of transposed convolutions `L` (so the resolution `4·2ᴸ⁻¹`: 32, 64, 128, …) are
//! read from the tensor names and shapes. BatchNorm runs in inference mode (running
//! statistics, ε = 1e-5).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::NumpyRandomState;
use crate::error::{Error, Result};
use crate::nn::{ConvTranspose2d, Epilogue};
use crate::weights::{self, Weights};

/// PyTorch's default `BatchNorm2d` epsilon.
const BN_EPS: f64 = 1e-5;

/// The most transposed convolutions accepted (resolution 4·2¹¹ = 8192).
const MAX_LAYERS: usize = 12;

/// What a DCGAN file turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcganInfo {
    /// Latent size (`nz`).
    pub nz: usize,
    /// Feature maps of the last hidden layer (`ngf`).
    pub ngf: usize,
    /// Image channels (`nc`).
    pub nc: usize,
    /// Output height and width.
    pub resolution: usize,
    /// Number of transposed convolutions.
    pub layers: usize,
    /// The tensor-name prefix found in the file: `""` or `"module."`.
    pub prefix: String,
}

/// One block: a transposed convolution, then (except for the last) BatchNorm folded into a
/// per-channel scale and shift, and ReLU; the last one ends in tanh.
enum Block {
    /// On candle's ops (GPUs, aarch64): the weight `(in, out, 4, 4)`, and `(scale, shift)`
    /// each `(1, C, 1, 1)`.
    Candle {
        weight: Tensor,
        stride: usize,
        padding: usize,
        norm: Option<(Tensor, Tensor)>,
    },
    /// On Studio's CPU kernels, the scale, shift and ReLU fused into the convolution.
    Native {
        conv: ConvTranspose2d,
        norm: Option<(Vec<f32>, Vec<f32>)>,
    },
}

/// A DCGAN generator ready to run.
pub struct Dcgan {
    info: DcganInfo,
    blocks: Vec<Block>,
    device: Device,
}

impl std::fmt::Debug for Dcgan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcgan")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The names and shapes in a file's header.
struct Header {
    path: PathBuf,
    prefix: String,
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
}

impl Header {
    fn name(&self, index: usize, field: &str) -> String {
        format!("{}main.{index}.{field}", self.prefix)
    }

    fn shape(&self, index: usize, field: &str) -> Option<&[usize]> {
        self.shapes.get(&self.name(index, field)).map(Vec::as_slice)
    }

    fn missing(&self, index: usize, field: &str) -> Error {
        Error::MissingTensor {
            path: self.path.clone(),
            name: self.name(index, field),
        }
    }

    fn mismatch(&self, index: usize, field: &str, expected: Vec<usize>, found: &[usize]) -> Error {
        Error::ShapeMismatch {
            path: self.path.clone(),
            name: self.name(index, field),
            expected,
            found: found.to_vec(),
        }
    }
}

/// The architecture from the header: `(nz, channels after each convolution)`.
fn plan(h: &Header) -> Result<(usize, Vec<usize>)> {
    // Convolutions sit at indices 0, 3, 6, …; the last one has no BatchNorm after it and no
    // convolution three places further on.
    // A convolution missing in the middle is then reported by name below.
    let main = format!("{}main.", h.prefix);
    let last_conv = h
        .shapes
        .iter()
        .filter(|(_, shape)| shape.len() == 4)
        .filter_map(|(name, _)| {
            name.strip_prefix(&main)?
                .strip_suffix(".weight")?
                .parse::<usize>()
                .ok()
        })
        .filter(|index| index % 3 == 0)
        .max()
        .unwrap_or(0);
    let layers = last_conv / 3 + 1;
    if layers > MAX_LAYERS {
        return Err(Error::InvalidParameter(format!(
            "{}: {layers} transposed convolutions (at most {MAX_LAYERS} are supported)",
            h.path.display()
        )));
    }
    let first = h.shape(0, "weight").ok_or_else(|| h.missing(0, "weight"))?;
    if first.len() != 4 {
        return Err(h.mismatch(
            0,
            "weight",
            vec![first.first().copied().unwrap_or(0), 0, 4, 4],
            first,
        ));
    }
    let nz = first[0];
    let last_index = 3 * (layers - 1);
    let last = h
        .shape(last_index, "weight")
        .ok_or_else(|| h.missing(last_index, "weight"))?;
    if last.len() != 4 {
        return Err(h.mismatch(last_index, "weight", vec![0, 0, 4, 4], last));
    }
    let (ngf, nc) = (last[0], last[1]);
    if layers == 1 {
        // A single convolution would be 1×1 → 4×4 with no hidden layer: not a DCGAN.
        return Err(h.missing(1, "weight"));
    }
    // Hidden layer i (0-based, i < L−1) has ngf·2^(L−2−i) channels; the last has nc.
    let mut channels: Vec<usize> = (0..layers - 1).map(|i| ngf << (layers - 2 - i)).collect();
    channels.push(nc);
    let mut in_ch = nz;
    for (i, &out_ch) in channels.iter().enumerate() {
        let index = 3 * i;
        let expected = vec![in_ch, out_ch, 4, 4];
        let found = h
            .shape(index, "weight")
            .ok_or_else(|| h.missing(index, "weight"))?;
        if found != expected.as_slice() {
            return Err(h.mismatch(index, "weight", expected, found));
        }
        if i + 1 < layers {
            for field in ["weight", "bias", "running_mean", "running_var"] {
                let found = h
                    .shape(index + 1, field)
                    .ok_or_else(|| h.missing(index + 1, field))?;
                if found != [out_ch] {
                    return Err(h.mismatch(index + 1, field, vec![out_ch], found));
                }
            }
        }
        in_ch = out_ch;
    }
    Ok((nz, channels))
}

impl Dcgan {
    /// Loads a DCGAN generator from a safetensors file holding its `state_dict()` (see the
    /// module docs), or a PyTorch checkpoint of it (`.pt`, `.pth`: read by Studio's own reader,
    /// as data); a missing tensor or one with the wrong shape is an
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming it.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            return Err(Error::NoModel(path.to_path_buf()));
        }
        let mapped = weights::open_checkpoint(&[path.to_path_buf()])?;
        let shapes: std::collections::BTreeMap<String, Vec<usize>> = mapped
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        drop(mapped);
        let prefix = if !shapes.keys().any(|n| n.starts_with("main."))
            && shapes.keys().any(|n| n.starts_with("module.main."))
        {
            "module."
        } else {
            ""
        };
        let header = Header {
            path: path.to_path_buf(),
            prefix: prefix.to_owned(),
            shapes,
        };
        let (nz, channels) = plan(&header)?;
        let layers = channels.len();
        let info = DcganInfo {
            nz,
            ngf: channels[layers - 2],
            nc: channels[layers - 1],
            resolution: 4 << (layers - 1),
            layers,
            prefix: prefix.to_owned(),
        };

        let w = Weights::open(&[path.to_path_buf()], device, DType::F32)?;
        let mut blocks = Vec::with_capacity(layers);
        let mut in_ch = nz;
        for (i, &out_ch) in channels.iter().enumerate() {
            let index = 3 * i;
            let weight = w.get(&header.name(index, "weight"), &[in_ch, out_ch, 4, 4])?;
            let norm = if i + 1 < layers {
                let get = |field: &str| w.get(&header.name(index + 1, field), &[out_ch]);
                let gamma = get("weight")?;
                let beta = get("bias")?;
                let mean = get("running_mean")?;
                let var = get("running_var")?;
                // y = (x − mean)/√(var + ε)·γ + β = x·scale + (β − mean·scale)
                let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
                let shift = (beta - (mean * &scale)?)?;
                Some((
                    scale.reshape((1, out_ch, 1, 1))?,
                    shift.reshape((1, out_ch, 1, 1))?,
                ))
            } else {
                None
            };
            let (stride, padding) = if i == 0 { (1, 0) } else { (2, 1) };
            blocks.push(match ConvTranspose2d::native(&weight, stride, padding)? {
                Some(conv) => Block::Native {
                    conv,
                    norm: match &norm {
                        Some((scale, shift)) => Some((
                            scale.flatten_all()?.to_vec1()?,
                            shift.flatten_all()?.to_vec1()?,
                        )),
                        None => None,
                    },
                },
                None => Block::Candle {
                    weight,
                    stride,
                    padding,
                    norm,
                },
            });
            in_ch = out_ch;
        }
        Ok(Self {
            info,
            blocks,
            device: device.clone(),
        })
    }

    /// What was read from the file: nz, ngf, nc, resolution, layers.
    pub fn info(&self) -> &DcganInfo {
        &self.info
    }

    /// The device the weights are on, where generation runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The latent for `seed`: `np.random.RandomState(seed).randn(1, nz, 1, 1)` (numpy's
    /// legacy MT19937 and polar Box–Muller, computed in f64, then f32), shaped `(1, nz, 1, 1)`.
    /// Seeds above 2³²−1 are refused, as numpy refuses them.
    pub fn z_from_seed(&self, seed: u64) -> Result<Tensor> {
        let seed = u32::try_from(seed).map_err(|_| {
            Error::InvalidParameter(format!(
                "seed {seed} is too large: DCGAN seeds are 0 to {} (numpy's RandomState)",
                u32::MAX
            ))
        })?;
        let nz = self.info.nz;
        let z: Vec<f32> = NumpyRandomState::new(seed)
            .randn(nz)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Ok(Tensor::from_vec(z, (1, nz, 1, 1), &self.device)?)
    }

    /// Images `(n, nc, H, W)` in [−1, 1] for latents `z`, shaped `(n, nz, 1, 1)` or `(n, nz)`.
    pub fn generate(&self, z: &Tensor) -> Result<Tensor> {
        let nz = self.info.nz;
        let n = match z.dims() {
            &[n, c] | &[n, c, 1, 1] if c == nz => n,
            other => {
                return Err(Error::InvalidParameter(format!(
                    "DCGAN latent must be (n, {nz}, 1, 1) or (n, {nz}), got {other:?}"
                )));
            }
        };
        let mut x = z
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .reshape((n, nz, 1, 1))?;
        for block in &self.blocks {
            x = match block {
                Block::Native {
                    conv,
                    norm: Some((scale, shift)),
                } => conv.forward(
                    &x,
                    &Epilogue {
                        scale: Some(scale),
                        bias: Some(shift),
                        slope: Some(0.0),
                        ..Epilogue::NONE
                    },
                )?,
                Block::Native { conv, norm: None } => conv.forward(&x, &Epilogue::NONE)?.tanh()?,
                Block::Candle {
                    weight,
                    stride,
                    padding,
                    norm,
                } => {
                    let y = x.conv_transpose2d(weight, *padding, 0, *stride, 1)?;
                    match norm {
                        Some((scale, shift)) => {
                            y.broadcast_mul(scale)?.broadcast_add(shift)?.relu()?
                        }
                        None => y.tanh()?,
                    }
                }
            };
        }
        Ok(x)
    }
}

/// Whether the file at `path` holds a DCGAN generator (PyTorch's example names,
/// `main.0.weight`, with or without DataParallel's `module.` prefix). Unreadable files are not,
/// nor NVIDIA's network pickles (`.pkl`, not read twice for this).
#[must_use]
pub fn is_dcgan(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pkl"))
    {
        return false;
    }
    crate::weights::open_checkpoint(&[path.to_path_buf()]).is_ok_and(|st| {
        st.tensors()
            .iter()
            .any(|(n, _)| n == "main.0.weight" || n == "module.main.0.weight")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &[(&str, Vec<usize>)]) -> Header {
        Header {
            path: PathBuf::from("g.safetensors"),
            prefix: String::new(),
            shapes: names
                .iter()
                .map(|(n, s)| ((*n).to_owned(), s.clone()))
                .collect(),
        }
    }

    fn tutorial_64(nz: usize, ngf: usize, nc: usize) -> Vec<(String, Vec<usize>)> {
        let chans = [ngf * 8, ngf * 4, ngf * 2, ngf, nc];
        let mut v = Vec::new();
        let mut in_ch = nz;
        for (i, &c) in chans.iter().enumerate() {
            v.push((format!("main.{}.weight", 3 * i), vec![in_ch, c, 4, 4]));
            if i + 1 < chans.len() {
                for f in ["weight", "bias", "running_mean", "running_var"] {
                    v.push((format!("main.{}.{f}", 3 * i + 1), vec![c]));
                }
                v.push((format!("main.{}.num_batches_tracked", 3 * i + 1), vec![]));
            }
            in_ch = c;
        }
        v
    }

    #[test]
    fn plans_the_tutorial_network() {
        let names = tutorial_64(100, 64, 3);
        let refs: Vec<(&str, Vec<usize>)> =
            names.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        let (nz, chans) = plan(&header(&refs)).expect("plan");
        assert_eq!(nz, 100);
        assert_eq!(chans, vec![512, 256, 128, 64, 3]);
    }

    #[test]
    fn a_missing_batchnorm_is_named() {
        let names = tutorial_64(100, 64, 3);
        let refs: Vec<(&str, Vec<usize>)> = names
            .iter()
            .filter(|(n, _)| n != "main.7.running_var")
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        match plan(&header(&refs)) {
            Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "main.7.running_var"),
            other => panic!("expected MissingTensor, got {other:?}"),
        }
    }
}
