//! A linear weight from a GGUF file for the CPU models: Studio's own kernel ([`crate::quant`])
//! when this CPU has one for the tensor's format, else candle's `QMatMul`; the fallbacks are
//! collected per load and logged once ([`Fallbacks::log`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::models::tensors::TensorData;
use crate::quant::{KernelPath, QWeight, QuantFormat, preferred};

/// A 2-D weight: Studio's kernel, or candle's `QMatMul` where Studio has none.
pub(crate) enum Linear {
    Studio(Arc<QWeight>),
    Candle(QMatMul),
}

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Studio(w) => w.forward(x),
            Linear::Candle(m) => Ok(m.forward(x)?),
        }
    }

    /// `x (m × cols) · Wᵀ` as `m × rows` values.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self {
            Linear::Studio(w) => {
                let mut y = vec![0f32; m * w.rows()];
                w.matmul(x, m, &mut y)?;
                Ok(y)
            }
            Linear::Candle(q) => {
                let x = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                Ok(q.forward(&x)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            }
        }
    }

    pub(crate) fn is_studio(&self) -> bool {
        matches!(self, Linear::Studio(_))
    }

    pub(crate) fn studio(&self) -> Option<&QWeight> {
        match self {
            Linear::Studio(w) => Some(w),
            Linear::Candle(_) => None,
        }
    }
}

/// The format Studio's kernels run a weight of ggml type `ggml_type` and shape `dims` with on
/// this CPU (`None`: candle's kernels run it).
pub(crate) fn studio_format(ggml_type: u32, dims: &[usize]) -> Option<QuantFormat> {
    let f = QuantFormat::from_ggml_type(ggml_type)?;
    (dims.len() == 2
        && dims[1].is_multiple_of(f.block_size())
        && preferred(f, KernelPath::detect()))
    .then_some(f)
}

/// Whether Studio's kernels run `tensor` on this CPU.
pub(crate) fn studio_kernel(tensor: &QTensor) -> Option<QuantFormat> {
    let f = QuantFormat::from_ggml(tensor.dtype())?;
    studio_format(f.ggml_type(), tensor.shape().dims())
}

/// Records which tensors run through candle's kernels instead of Studio's.
#[derive(Default)]
pub(crate) struct Fallbacks(BTreeMap<String, Vec<String>>);

impl Fallbacks {
    pub(crate) fn linear(&mut self, name: &str, tensor: QTensor) -> Result<Linear> {
        if studio_kernel(&tensor).is_some() {
            Ok(Linear::Studio(Arc::new(QWeight::from_qtensor(
                name, &tensor,
            )?)))
        } else {
            self.0
                .entry(format!("{:?}", tensor.dtype()))
                .or_default()
                .push(name.to_owned());
            Ok(Linear::Candle(QMatMul::from_qtensor(tensor)?))
        }
    }

    /// As [`Fallbacks::linear`] for a tensor read by Studio's own reader (which also reads the
    /// formats only Studio's kernels run).
    pub(crate) fn data(&mut self, name: &str, mut t: TensorData) -> Result<Linear> {
        if studio_format(t.ggml_type, &t.dims).is_some() {
            name.clone_into(&mut t.name);
            return Ok(Linear::Studio(Arc::new(t.into_qweight()?)));
        }
        let tensor = t.to_qtensor()?;
        self.linear(name, tensor)
    }

    /// Records `name` as running on candle's kernels and builds candle's `QMatMul` over
    /// `tensor`, which may also serve elsewhere (a tied embedding table).
    pub(crate) fn candle(&mut self, name: &str, tensor: Arc<QTensor>) -> Result<QMatMul> {
        self.0
            .entry(format!("{:?}", tensor.dtype()))
            .or_default()
            .push(name.to_owned());
        Ok(QMatMul::from_arc(tensor)?)
    }

    /// `format: name, name…` per format that fell back, logged once (a warning) for the
    /// model `what`; empty when Studio's kernels run every weight.
    pub(crate) fn log(self, what: &str) -> Vec<String> {
        let list: Vec<String> = self
            .0
            .iter()
            .map(|(format, names)| format!("{format}: {}", names.join(", ")))
            .collect();
        if !list.is_empty() {
            log::warn!(
                "{what}: no Studio kernel on this CPU ({}) for these weights, candle's kernels \
                 run them: {}",
                KernelPath::detect(),
                list.join("; ")
            );
        }
        list
    }
}

/// How many of `weights` run on Studio's kernels.
pub(crate) fn studio_count<'a>(weights: impl IntoIterator<Item = &'a Linear>) -> usize {
    weights.into_iter().filter(|w| w.is_studio()).count()
}
