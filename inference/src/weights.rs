//! Reading checkpoint tensors by their real names, with errors that name the tensor.
//!
//! Weights are memory-mapped (single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`), so loading never holds a second copy of the file in memory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::Storage;

/// Memory-maps safetensors files (one file or the shards of one checkpoint), checking that
/// each is long enough to hold a header; a corrupt header is a [`Error::CorruptWeights`].
pub fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    let path = files.first().cloned().unwrap_or_default();
    for file in files {
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        if meta.len() < 8 {
            return Err(Error::CorruptWeights {
                path: file.clone(),
                message: format!("the file is only {} bytes long", meta.len()),
            });
        }
    }
    // SAFETY: the files are mapped read-only; Studio never writes to a model file while it
    // is loaded. A file changed on disk by another program while mapped is outside what we
    // can guard against (the same contract as every mmap-based loader).
    #[allow(unsafe_code)]
    let mapped = unsafe { MmapedSafetensors::multi(files) };
    mapped.map_err(|e| Error::CorruptWeights {
        path,
        message: e.to_string(),
    })
}

/// A [`MmapedSafetensors`] as a `VarBuilder` backend that releases each tensor's pages of the
/// mapping once it has been copied out ([`crate::sys::release_mapped_pages`]), so building a
/// model never holds the file and the model in memory at once. For loaders that copy every
/// tensor (the CPU ones: candle copies out of the mapping, the native kernels pack).
pub struct ReleasingMmap(pub MmapedSafetensors);

impl candle_nn::var_builder::SimpleBackend for ReleasingMmap {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = candle_nn::var_builder::SimpleBackend::get(&self.0, s, name, h, dtype, dev)?;
        self.release(name);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = candle_nn::var_builder::SimpleBackend::get_unchecked(&self.0, name, dtype, dev)?;
        self.release(name);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.0, name)
    }
}

impl ReleasingMmap {
    fn release(&self, name: &str) {
        if let Ok(view) = self.0.get(name) {
            crate::sys::release_mapped_pages(view.data());
        }
    }
}

/// How the native kernels keep a checkpoint's weights: in the dtype most of them (by element
/// count) are stored in where the kernels take it (f16, bf16), f32 otherwise (see
/// [`crate::nn::with_weight_storage`]).
pub fn stored_storage(st: &MmapedSafetensors) -> Storage {
    use safetensors::Dtype;
    let (mut f16, mut bf16, mut other) = (0usize, 0usize, 0usize);
    for (_, view) in st.tensors() {
        let n = view.shape().iter().product::<usize>();
        match view.dtype() {
            Dtype::F16 => f16 += n,
            Dtype::BF16 => bf16 += n,
            _ => other += n,
        }
    }
    if f16 > bf16.max(other) {
        Storage::F16
    } else if bf16 > other {
        Storage::Bf16
    } else {
        Storage::F32
    }
}

/// A checkpoint's tensors, looked up by name.
pub struct Weights {
    path: PathBuf,
    files: MmapedSafetensors,
    names: BTreeSet<String>,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Maps the given safetensors files (one file, or every shard of a sharded checkpoint).
    pub fn open(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let path = files.first().cloned().unwrap_or_default();
        let files_mapped = mmap(files)?;
        let names = files_mapped
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        Ok(Self {
            path,
            files: files_mapped,
            names,
            device: device.clone(),
            dtype,
        })
    }

    /// The checkpoint file (the first shard for sharded checkpoints).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Total number of values in every tensor of the checkpoint.
    pub fn parameter_count(&self) -> usize {
        self.files
            .tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum()
    }

    /// Whether any of the files holds a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Every tensor name, in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Loads tensor `name`, checks its shape and converts it to the model's dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_owned(),
            });
        }
        let view = self.files.get(name).map_err(|e| self.corrupt(&e))?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let tensor = self
            .files
            .load(name, &self.device)
            .map_err(|e| self.corrupt(&e))?;
        Ok(tensor.to_dtype(self.dtype)?)
    }

    fn corrupt(&self, e: &candle_core::Error) -> Error {
        Error::CorruptWeights {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}
