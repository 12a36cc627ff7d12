//! Reading checkpoint tensors by their real names, with errors that name the tensor.
//!
//! [`Tensors`] is what every loader reads: safetensors files memory-mapped (one file, or the
//! shards of one checkpoint), so loading never holds a second copy of the file in memory; or a
//! PyTorch checkpoint or NVIDIA network pickle read as data by Studio's own reader
//! ([`crate::pickle`]: the zip format's tensors are slices of the mapped file too).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load as _, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use crate::error::{Error, Result};
use crate::nn::Storage;
use crate::pickle::PickleTensors;
use crate::pickle::torch::DType as PickleDType;

/// A checkpoint's tensors: safetensors files mapped, or a pickle read as data.
pub enum Tensors {
    /// `.safetensors` files, memory-mapped.
    Safetensors(MmapedSafetensors),
    /// A PyTorch checkpoint (`.ckpt`, `.pt`, `.pth`, `pytorch_model*.bin`) or an NVIDIA network
    /// pickle (`.pkl`), read by Studio's own reader (nothing in it runs).
    Pickle(PickleTensors),
}

fn pickle_dtype(d: PickleDType) -> safetensors::Dtype {
    use safetensors::Dtype;
    match d {
        PickleDType::F32 => Dtype::F32,
        PickleDType::F16 => Dtype::F16,
        PickleDType::BF16 => Dtype::BF16,
        PickleDType::F64 => Dtype::F64,
        PickleDType::I64 => Dtype::I64,
        PickleDType::I32 => Dtype::I32,
        PickleDType::I16 => Dtype::I16,
        PickleDType::I8 => Dtype::I8,
        PickleDType::U8 => Dtype::U8,
        PickleDType::Bool => Dtype::BOOL,
    }
}

fn pickle_view(t: crate::pickle::TensorData<'_>) -> candle_core::Result<TensorView<'_>> {
    TensorView::new(pickle_dtype(t.dtype), t.shape.to_vec(), t.data)
        .map_err(|e| candle_core::Error::Msg(format!("`{}`: {e}", t.name)))
}

impl Tensors {
    /// Tensor `name`.
    pub fn get(&self, name: &str) -> candle_core::Result<TensorView<'_>> {
        match self {
            Tensors::Safetensors(st) => st.get(name),
            Tensors::Pickle(p) => match p.get(name) {
                Some(t) => pickle_view(t),
                None => Err(candle_core::Error::CannotFindTensor {
                    path: name.to_owned(),
                }
                .bt()),
            },
        }
    }

    /// Every tensor with its name.
    pub fn tensors(&self) -> Vec<(String, TensorView<'_>)> {
        match self {
            Tensors::Safetensors(st) => st.tensors(),
            Tensors::Pickle(p) => p
                .iter()
                .filter_map(|t| pickle_view(t).ok().map(|v| (t.name.to_owned(), v)))
                .collect(),
        }
    }

    /// Tensor `name` as a candle tensor on `dev`, in its stored dtype.
    pub fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            Tensors::Safetensors(st) => st.load(name, dev),
            Tensors::Pickle(_) => self.get(name)?.load(dev),
        }
    }

    /// An NVIDIA network pickle's settings (what the converter writes as JSON beside its
    /// safetensors), if this is one.
    pub fn settings(&self) -> Option<&serde_json::Value> {
        match self {
            Tensors::Safetensors(_) => None,
            Tensors::Pickle(p) => p.settings(),
        }
    }

    /// Whether the tensors were read from a pickle (in safe mode: as data).
    pub fn is_pickle(&self) -> bool {
        matches!(self, Tensors::Pickle(_))
    }

    /// Releases tensor `name`'s pages of a file mapping once it has been copied out
    /// ([`crate::sys::release_mapped_pages`]); tensors held in memory are left alone.
    fn release(&self, name: &str) {
        match self {
            Tensors::Safetensors(st) => {
                if let Ok(view) = st.get(name) {
                    crate::sys::release_mapped_pages(view.data());
                }
            }
            Tensors::Pickle(p) => {
                if let Some(t) = p.get(name).filter(|t| t.mapped) {
                    crate::sys::release_mapped_pages(t.data);
                }
            }
        }
    }
}

/// `tensor` when it has the shape `expected`, else candle's shape-mismatch error naming it (what
/// a weight backend answers a model that asks for the wrong shape).
pub(crate) fn expect_shape(
    tensor: Tensor,
    expected: candle_core::Shape,
    name: &str,
) -> candle_core::Result<Tensor> {
    if tensor.shape() == &expected {
        return Ok(tensor);
    }
    Err(candle_core::Error::UnexpectedShape {
        msg: format!("shape mismatch for {name}"),
        expected,
        got: tensor.shape().clone(),
    }
    .bt())
}

impl candle_nn::var_builder::SimpleBackend for Tensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self {
            Tensors::Safetensors(st) => {
                candle_nn::var_builder::SimpleBackend::get(st, s, name, h, dtype, dev)
            }
            Tensors::Pickle(_) => expect_shape(self.load(name, dev)?.to_dtype(dtype)?, s, name),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self {
            Tensors::Safetensors(st) => st.get(name).is_ok(),
            Tensors::Pickle(p) => p.get(name).is_some(),
        }
    }
}

/// Opens a checkpoint's files: safetensors files are memory-mapped (one file or the shards of
/// one checkpoint; each checked to be long enough to hold a header, a corrupt header is a
/// [`Error::CorruptWeights`]); pickles (`.ckpt`, `.pt`, `.pth`, `.bin`, `.pkl`) are read by
/// Studio's own reader, as data.
pub fn open_checkpoint(files: &[PathBuf]) -> Result<Tensors> {
    if files
        .first()
        .is_some_and(|f| crate::llm::loader::is_pickle(f))
    {
        return PickleTensors::open(files).map(Tensors::Pickle);
    }
    mmap(files).map(Tensors::Safetensors)
}

/// Memory-maps safetensors files (one file or the shards of one checkpoint), checking that
/// each is long enough to hold a header; a corrupt header is a [`Error::CorruptWeights`].
fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
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

/// [`Tensors`] as a `VarBuilder` backend that releases each tensor's pages of the mapping
/// once it has been copied out ([`crate::sys::release_mapped_pages`]), so building a model
/// never holds the file and the model in memory at once. For loaders that copy every tensor
/// (the CPU ones: candle copies out of the mapping, the native kernels pack).
pub struct ReleasingMmap(pub Tensors);

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
        self.0.release(name);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = candle_nn::var_builder::SimpleBackend::get_unchecked(&self.0, name, dtype, dev)?;
        self.0.release(name);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.0, name)
    }
}

/// How the native kernels keep a checkpoint's weights: in the dtype most of them (by element
/// count) are stored in where the kernels take it (f16, bf16), f32 otherwise (see
/// [`crate::nn::with_weight_storage`]).
pub fn stored_storage(st: &Tensors) -> Storage {
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
    files: Tensors,
    names: BTreeSet<String>,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Opens the given files (one file, or every shard of a sharded checkpoint; safetensors
    /// or a pickle, see [`open_checkpoint`]).
    pub fn open(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let path = files.first().cloned().unwrap_or_default();
        Ok(Self::from_tensors(
            path,
            open_checkpoint(files)?,
            device,
            dtype,
        ))
    }

    /// Over tensors already opened from `path`.
    pub fn from_tensors(path: PathBuf, tensors: Tensors, device: &Device, dtype: DType) -> Self {
        let names = tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        Self {
            path,
            files: tensors,
            names,
            device: device.clone(),
            dtype,
        }
    }

    /// The checkpoint file (the first shard for sharded checkpoints).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint's tensors.
    pub fn tensors(&self) -> &Tensors {
        &self.files
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_of_another_shape_is_refused_naming_it() {
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("zeros");
        assert!(expect_shape(t.clone(), (2, 3).into(), "w").is_ok());
        let e = expect_shape(t, (3, 2).into(), "model.embed_tokens.weight")
            .expect_err("wrong shape")
            .to_string();
        assert!(e.contains("model.embed_tokens.weight"), "{e}");
    }
}
