//! A GGUF file's tensors as Studio reads them itself, whatever their type: the directory
//! (ggml type id, row-major dims, offset) and each tensor's bytes read on demand. candle's
//! reader stops at the types candle has; Studio's kernels also run IQ4_NL and IQ4_XS, which
//! only this reader hands over. A tensor of a type candle has can still become a candle
//! `QTensor` (for the weights left on candle's kernels).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{Error, Result};
use crate::quant::{QWeight, QuantFormat};

/// ggml's type id of F32.
const F32_TYPE: u32 = 0;

/// `(values per block, bytes per block)` of a ggml type Studio reads (F32 and every
/// [`QuantFormat`]), `None` for the others.
pub fn type_layout(ggml_type: u32) -> Option<(usize, usize)> {
    if ggml_type == F32_TYPE {
        return Some((1, 4));
    }
    QuantFormat::from_ggml_type(ggml_type).map(|f| (f.block_size(), f.block_bytes()))
}

/// Bytes a tensor of `dims` in `ggml_type` takes (`None`: an unknown type, rows that are not
/// whole blocks, or an overflow).
pub fn data_bytes(ggml_type: u32, dims: &[usize]) -> Option<u64> {
    let (block, bytes) = type_layout(ggml_type)?;
    let row = *dims.last()?;
    if !row.is_multiple_of(block) {
        return None;
    }
    let elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    u64::try_from((elements / block).checked_mul(bytes)?).ok()
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// ggml's type id (as in the file).
    pub ggml_type: u32,
    /// Row-major dimensions (the row length last).
    pub dims: Vec<usize>,
    /// Offset from the start of the tensor data.
    pub offset: u64,
}

/// The tensor directory of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufTensors {
    data_offset: u64,
    infos: HashMap<String, TensorInfo>,
}

/// One tensor's bytes as stored in the file.
#[derive(Debug, Clone)]
pub struct TensorData {
    /// The tensor's name in the file.
    pub name: String,
    /// ggml's type id (as in the file).
    pub ggml_type: u32,
    /// Row-major dimensions (the row length last).
    pub dims: Vec<usize>,
    /// The bytes as stored, in `ggml_type`'s block layout.
    pub bytes: Vec<u8>,
}

impl GgufTensors {
    /// An empty directory for a file whose tensor data starts at `data_offset`.
    pub fn new(data_offset: u64) -> Self {
        Self {
            data_offset,
            infos: HashMap::new(),
        }
    }

    /// Adds `name`'s entry, replacing any earlier one of that name.
    pub fn insert(&mut self, name: String, info: TensorInfo) {
        self.infos.insert(name, info);
    }

    /// The directory candle read (which holds only the types candle has).
    pub fn from_content(ct: &Content) -> Self {
        let mut t = Self::new(ct.tensor_data_offset);
        for (name, info) in &ct.tensor_infos {
            let ggml_type = match info.ggml_dtype {
                GgmlDType::F32 => F32_TYPE,
                other => match QuantFormat::from_ggml(other) {
                    Some(f) => f.ggml_type(),
                    // A type Studio does not read: named by an id no file uses, so reading
                    // it fails with the tensor's name.
                    None => u32::MAX,
                },
            };
            t.insert(
                name.clone(),
                TensorInfo {
                    ggml_type,
                    dims: info.shape.dims().to_vec(),
                    offset: info.offset,
                },
            );
        }
        t
    }

    /// Whether the directory has a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// The entry of tensor `name`, if the directory has it.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos.get(name)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TensorInfo)> {
        self.infos.iter()
    }

    /// Reads tensor `name`'s bytes from `r` (the file), after checking that its type is one
    /// Studio reads and that its data lies inside the file.
    pub fn read<R: Read + Seek>(&self, r: &mut R, name: &str) -> Result<TensorData> {
        let bad = |message: String| Error::BadQuantTensor {
            name: name.to_owned(),
            message,
        };
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| bad("the file has no such tensor".to_owned()))?;
        let len = data_bytes(info.ggml_type, &info.dims).ok_or_else(|| {
            bad(format!(
                "{} (ggml type {}) with dims {:?} is not a tensor Studio can read",
                ggml_type_name(info.ggml_type),
                info.ggml_type,
                info.dims
            ))
        })?;
        let io = |e: std::io::Error| bad(format!("reading its data: {e}"));
        let end = r.seek(SeekFrom::End(0)).map_err(io)?;
        let start = self
            .data_offset
            .checked_add(info.offset)
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= end))
            .ok_or_else(|| {
                bad(format!(
                    "its {len} bytes at offset {} lie past the end of the file ({end} bytes)",
                    info.offset
                ))
            })?;
        r.seek(SeekFrom::Start(start)).map_err(io)?;
        // Bounded by the file's length (checked above).
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| bad("too large".into()))?];
        r.read_exact(&mut bytes).map_err(io)?;
        Ok(TensorData {
            name: name.to_owned(),
            ggml_type: info.ggml_type,
            dims: info.dims.clone(),
            bytes,
        })
    }
}

impl TensorData {
    /// The kernel format of the data (`None` for F32).
    pub fn format(&self) -> Option<QuantFormat> {
        QuantFormat::from_ggml_type(self.ggml_type)
    }

    /// `(rows, cols)` of a 2-D tensor.
    pub fn rows_cols(&self) -> Option<(usize, usize)> {
        match self.dims[..] {
            [rows, cols] => Some((rows, cols)),
            _ => None,
        }
    }

    /// Every value as f32, row-major (norms, biases, dense tables).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let Some(format) = self.format() else {
            return Ok(self
                .bytes
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect());
        };
        let cols = self.dims.last().copied().unwrap_or(0);
        let rows = self.dims.iter().rev().skip(1).product::<usize>();
        let expected = data_bytes(self.ggml_type, &self.dims);
        if cols == 0 || expected != Some(self.bytes.len() as u64) {
            return Err(Error::BadQuantTensor {
                name: self.name.clone(),
                message: format!(
                    "{format} dims {:?} do not match its {} bytes",
                    self.dims,
                    self.bytes.len()
                ),
            });
        }
        let values = crate::quant::dequantize_rows(format, cols, &self.bytes);
        debug_assert_eq!(values.len(), rows * cols);
        Ok(values)
    }

    /// The data as a 2-D Studio weight (stored as this CPU's kernels read it).
    pub fn into_qweight(self) -> Result<QWeight> {
        let Some(format) = self.format() else {
            return Err(Error::BadQuantTensor {
                name: self.name,
                message: "Studio has no kernel for F32 weights".to_owned(),
            });
        };
        let Some((rows, cols)) = self.rows_cols() else {
            return Err(Error::BadQuantTensor {
                message: format!("shape {:?} is not 2-D", self.dims),
                name: self.name,
            });
        };
        QWeight::from_bytes(&self.name, format, rows, cols, self.bytes)
    }

    /// The data as a candle `QTensor` on the CPU; an error naming the tensor for the types
    /// candle does not have (IQ4_NL, IQ4_XS).
    pub fn to_qtensor(&self) -> Result<QTensor> {
        let dtype = match self.format() {
            None => GgmlDType::F32,
            Some(f) => f.to_ggml().ok_or_else(|| Error::BadQuantTensor {
                name: self.name.clone(),
                message: format!("{f} runs only on Studio's CPU kernels, not candle's"),
            })?,
        };
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &self.bytes,
            self.dims.clone(),
            &Device::Cpu,
        )?)
    }
}

/// llama.cpp's name of a ggml tensor type.
pub fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown type {t}"),
    };
    name.to_owned()
}
