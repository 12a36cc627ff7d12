//! Studio's own reader of PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `pytorch_model.bin`)
//! and NVIDIA's network pickles (`.pkl`), which are Python pickles: read as data, never run.
//!
//! - [`vm`]: the pickle opcodes interpreted into an inert object graph (no global is ever
//!   imported or called);
//! - [`torch`]: the allowlist that reads a state dict of tensors out of that graph, and
//!   PyTorch's legacy format;
//! - [`network`]: NVIDIA's `torch_utils.persistence` networks, read as a module tree (`G_ema`'s
//!   state dict and init kwargs; the source code they carry is never run);
//! - [`tensors`]: the tensors where they lie ([`PickleTensors`]: slices of the mapped zip
//!   archive, or gathered from a file read whole), every size checked against the file before
//!   anything is allocated; what the loaders read pickles through (`weights::Tensors`);
//! - this module: the conversion to safetensors (`studio convert`, *Save as safetensors…*).

pub mod network;
pub mod tensors;
pub mod torch;
pub mod vm;

use std::path::Path;

use tensors::corrupt;
pub use tensors::{PickleTensors, TensorData};
use torch::DType;

use crate::error::{Error, Result};

/// What the panels say about a model whose weights came from a pickle.
pub const SAFE_MODE_NOTE: &str = "Read in safe mode: the weights are a Python pickle, whose \
    data Studio's own reader took out; nothing in the file ran";

/// The PyTorch checkpoint a model path stands for, when it is one: a pickle file itself, or a
/// model folder whose only weights are `pytorch_model.bin`, `model.ckpt` or `model.pt`. What
/// *Save as safetensors…* converts.
pub fn checkpoint_at(path: &Path) -> Option<std::path::PathBuf> {
    if path.is_file() {
        return crate::llm::loader::is_pickle(path).then(|| path.to_path_buf());
    }
    if path.join("model.safetensors").exists() || path.join("model.safetensors.index.json").exists()
    {
        return None;
    }
    ["pytorch_model.bin", "model.ckpt", "model.pt"]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
}

/// Where a conversion goes by default: `model.safetensors` for a folder's `pytorch_model.bin`
/// (so the folder loads), else the checkpoint's name with `.safetensors`.
pub fn converted_path(checkpoint: &Path) -> std::path::PathBuf {
    if checkpoint
        .file_name()
        .is_some_and(|n| n == "pytorch_model.bin")
    {
        checkpoint.with_file_name("model.safetensors")
    } else {
        checkpoint.with_extension("safetensors")
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: usize,
    /// Whether an NVIDIA network's settings were written beside them (`OUT.json`).
    pub settings: bool,
}

/// Converts `checkpoint` to the safetensors file `out` (replaced atomically if it exists),
/// and an NVIDIA network's settings to `out` with `.json`, reading it as data.
pub fn convert(checkpoint: &Path, out: &Path) -> Result<Converted> {
    let tensors = PickleTensors::open(&[checkpoint.to_path_buf()])?;
    write_safetensors(tensors.iter(), out)?;
    if let Some(settings) = tensors.settings() {
        let json = out.with_extension("json");
        let text =
            serde_json::to_vec_pretty(settings).map_err(|e| corrupt(&json, e.to_string()))?;
        crate::sys::write_atomic(&json, &text, false).map_err(|e| Error::io(&json, e))?;
    }
    Ok(Converted {
        tensors: tensors.len(),
        bytes: tensors.iter().map(|t| t.data.len()).sum(),
        settings: tensors.settings().is_some(),
    })
}

/// One tensor read from a checkpoint, its data little-endian and contiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct PickledTensor {
    /// Its name in the state dict (`model.diffusion_model.input_blocks.0.0.weight`).
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub data: Vec<u8>,
}

/// Reads the state dict of the PyTorch checkpoint at `path` into memory.
pub fn read_checkpoint(path: &Path) -> Result<Vec<PickledTensor>> {
    let tensors = PickleTensors::open(&[path.to_path_buf()])?;
    Ok(tensors
        .iter()
        .map(|t| PickledTensor {
            name: t.name.to_owned(),
            dtype: t.dtype,
            shape: t.shape.to_vec(),
            data: t.data.to_vec(),
        })
        .collect())
}

impl PickledTensor {
    /// Borrowed, as [`write_safetensors`] takes it.
    pub fn as_data(&self) -> TensorData<'_> {
        TensorData {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
            mapped: false,
        }
    }
}

/// Writes `tensors` as a safetensors file at `out`, atomically and streamed (the header,
/// then each tensor's bytes as they are), so a conversion holds the tensors once.
pub fn write_safetensors<'a>(
    tensors: impl Iterator<Item = TensorData<'a>> + Clone,
    out: &Path,
) -> Result<()> {
    use std::io::Write as _;
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_owned(),
        serde_json::json!({"converted_by": "Studio (studio convert; the pickle was read as data)"}),
    );
    let mut offset = 0usize;
    for t in tensors.clone() {
        let dtype = t.dtype.safetensors_name();
        let numel: usize = t.shape.iter().product();
        if numel * t.dtype.size() != t.data.len() {
            return Err(corrupt(
                out,
                format!("`{}`: its data does not fill its shape", t.name),
            ));
        }
        let end = offset + t.data.len();
        let entry =
            serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]});
        if header.insert(t.name.to_owned(), entry).is_some() {
            return Err(corrupt(out, format!("`{}` appears twice", t.name)));
        }
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| corrupt(out, e.to_string()))?;
    // The data starts 8-byte aligned, the header padded with spaces.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let io = |e| Error::io(out, e);
    let mut file = crate::sys::AtomicFile::create(out, false).map_err(io)?;
    file.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&json).map_err(io)?;
    for t in tensors {
        file.write_all(t.data).map_err(io)?;
    }
    file.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::tensors::gather;
    use super::torch::{StorageRef, TensorRef};
    use super::*;

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: StorageRef::Key("0".to_owned()),
            dtype: DType::U8,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }
    #[test]
    fn views_are_gathered_in_row_major_order_and_bounded_by_their_storage() {
        let storage: Vec<u8> = (0..12).collect();
        // A 3×4 matrix transposed: 4×3 with strides (1, 4).
        let t = gather(&storage, &view(0, &[4, 3], &[1, 4])).expect("transposed");
        assert_eq!(t, vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert_eq!(
            gather(&storage, &view(5, &[3], &[1])).expect("slice"),
            vec![5, 6, 7]
        );
        let e = gather(&storage, &view(0, &[2], &[20])).expect_err("past the end");
        assert!(e.contains("too short"), "{e}");
        let e = gather(&storage, &view(0, &[2, 3], &[3])).expect_err("rank");
        assert!(e.contains("disagree"), "{e}");
        let e = gather(&storage, &view(0, &[usize::MAX, 3], &[3, 1])).expect_err("overflow");
        assert!(e.contains("overflow") || e.contains("not read"), "{e}");
    }
}
