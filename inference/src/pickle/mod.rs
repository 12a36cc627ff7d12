//! Studio's own reader of PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `pytorch_model.bin`),
//! which are Python pickles: read as data, never run.
//!
//! - [`vm`]: the pickle opcodes interpreted into an inert object graph (no global is ever
//!   imported or called);
//! - [`torch`]: the allowlist that reads a state dict of tensors out of that graph;
//! - this module: PyTorch's zip archive (`archive/data.pkl` and `archive/data/<key>`
//!   storages), every size checked against the file before anything is allocated, and the
//!   conversion to safetensors (`studio convert`).
//!
//! PyTorch's legacy format (before 1.6: pickles one after another, then the raw storages) is
//! read too. Not read yet (refused with what to do instead): NVIDIA's network pickles
//! (StyleGAN2 `.pkl`), which `tools/convert_stylegan_pkl.py` converts.

pub mod torch;
pub mod vm;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use torch::{DType, TensorRef};

/// The PyTorch checkpoint a model path stands for, when it is one: a pickle file itself, or a
/// model folder whose only weights are `pytorch_model.bin`, `model.ckpt` or `model.pt`. What
/// [`convert_beside`] converts.
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

/// Where [`convert_beside`] writes: `model.safetensors` for a folder's `pytorch_model.bin`
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

/// Converts `checkpoint` to safetensors beside it ([`converted_path`]), reading it as data;
/// an existing file of that name is not replaced. Returns the file written.
pub fn convert_beside(checkpoint: &Path) -> Result<std::path::PathBuf> {
    let out = converted_path(checkpoint);
    if out.exists() {
        return Err(Error::InvalidParameter(format!(
            "{} already exists: open it instead",
            out.display()
        )));
    }
    let tensors = read_checkpoint(checkpoint)?;
    write_safetensors(&tensors, &out)?;
    Ok(out)
}

/// Largest `data.pkl` read (a large checkpoint's is a few MiB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

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

fn corrupt(path: &Path, message: impl Into<String>) -> Error {
    Error::CorruptWeights {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Reads the state dict of the PyTorch checkpoint at `path`.
pub fn read_checkpoint(path: &Path) -> Result<Vec<PickledTensor>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n < 4 {
        return Err(corrupt(path, "the file is too short to be a checkpoint"));
    }
    if magic[0] == 0x80 {
        return read_legacy(path);
    }
    if magic != *b"PK\x03\x04" {
        return Err(corrupt(
            path,
            "not a PyTorch checkpoint (no zip archive and no pickle header)",
        ));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| corrupt(path, format!("the zip archive: {e}")))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).and_then(std::result::Result::ok))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| {
            corrupt(
                path,
                "the zip archive has no data.pkl: it is not a PyTorch checkpoint",
            )
        })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let pickle_bytes = read_entry(&mut zip, &pkl_name, file_len, MAX_PICKLE_BYTES, path)?;
    let pickle = vm::parse(&pickle_bytes).map_err(|e| corrupt(path, format!("{pkl_name}: {e}")))?;
    let refs = torch::state_dict(&pickle).map_err(|e| corrupt(path, format!("refused: {e}")))?;
    if refs.is_empty() {
        return Err(corrupt(path, "the checkpoint holds no tensors"));
    }
    // Each storage is read once and dropped after the last tensor that views it, so a
    // conversion holds at most the storages in use plus the tensors written so far.
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &refs {
        *uses.entry(t.storage.as_str()).or_default() += 1;
    }
    let mut uses: HashMap<String, usize> =
        uses.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, t) in refs {
        if !storages.contains_key(&t.storage) {
            let entry = format!("{prefix}data/{}", t.storage);
            let bytes = read_entry(&mut zip, &entry, file_len, file_len, path)?;
            storages.insert(t.storage.clone(), bytes);
        }
        let storage = &storages[&t.storage];
        let data = gather(storage, &t).map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
        if let Some(n) = uses.get_mut(&t.storage) {
            *n -= 1;
            if *n == 0 {
                storages.remove(&t.storage);
            }
        }
        out.push(PickledTensor {
            name,
            dtype: t.dtype,
            shape: t.shape,
            data,
        });
    }
    Ok(out)
}

/// The first bytes of PyTorch's legacy format: a pickled magic number (an 80-bit int).
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

/// PyTorch's legacy format (before 1.6): pickles one after another (the magic number, the
/// protocol version, system facts, the object, the storage keys), then each storage as a
/// little-endian element count and its bytes, in the keys' order.
fn read_legacy(path: &Path) -> Result<Vec<PickledTensor>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let Some(mut rest) = data.strip_prefix(LEGACY_MAGIC.as_slice()) else {
        return Err(corrupt(
            path,
            "a bare pickle that is not a PyTorch checkpoint (an NVIDIA network pickle, say), \
             which Studio does not read yet; convert NVIDIA networks with \
             tools/convert_stylegan_pkl.py",
        ));
    };
    let mut next = |what: &str| -> Result<vm::Pickle> {
        let (p, used) = vm::parse_prefix(rest)
            .map_err(|e| corrupt(path, format!("the legacy format's {what}: {e}")))?;
        rest = &rest[used..];
        Ok(p)
    };
    next("protocol version")?;
    next("system facts")?;
    let object = next("object")?;
    let keys = next("storage keys")?;
    let key_list: Vec<String> = match keys.get(keys.root) {
        vm::Node::List(ids) => ids
            .iter()
            .map(|&id| match keys.get(id) {
                vm::Node::Str(s) => Ok(s.clone()),
                other => Err(corrupt(
                    path,
                    format!("a storage key is {}", vm::kind(other)),
                )),
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(corrupt(
                path,
                format!("the storage keys are {}", vm::kind(other)),
            ));
        }
    };
    let types =
        torch::storage_types(&object).map_err(|e| corrupt(path, format!("refused: {e}")))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in key_list {
        let dtype = types
            .get(&key)
            .ok_or_else(|| corrupt(path, format!("storage `{key}` is listed but never used")))?;
        let Some((count, body)) = rest.split_first_chunk::<8>() else {
            return Err(corrupt(path, format!("storage `{key}` is truncated")));
        };
        let bytes = usize::try_from(u64::from_le_bytes(*count))
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= body.len())
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("storage `{key}` runs past the end of the file"),
                )
            })?;
        storages.insert(key, body[..bytes].to_vec());
        rest = &body[bytes..];
    }
    let refs = torch::state_dict(&object).map_err(|e| corrupt(path, format!("refused: {e}")))?;
    if refs.is_empty() {
        return Err(corrupt(path, "the checkpoint holds no tensors"));
    }
    refs.into_iter()
        .map(|(name, t)| {
            let storage = storages.get(&t.storage).ok_or_else(|| {
                corrupt(
                    path,
                    format!("`{name}`: storage `{}` is missing", t.storage),
                )
            })?;
            let data = gather(storage, &t).map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
            Ok(PickledTensor {
                name,
                dtype: t.dtype,
                shape: t.shape,
                data,
            })
        })
        .collect()
}

/// The bytes of archive entry `name`: stored (not compressed), at most `max` bytes and no
/// larger than the file.
fn read_entry(
    zip: &mut zip::ZipArchive<File>,
    name: &str,
    file_len: u64,
    max: u64,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut entry = zip
        .by_name(name)
        .map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(corrupt(
            path,
            format!("`{name}` is compressed; PyTorch stores checkpoint entries uncompressed"),
        ));
    }
    let size = entry.size();
    if size > max.min(file_len) {
        return Err(corrupt(
            path,
            format!("`{name}` claims {size} bytes, more than the {file_len}-byte file holds"),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .by_ref()
        .take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(corrupt(path, format!("`{name}` is truncated")));
    }
    Ok(bytes)
}

/// The tensor's elements from its storage, row-major; every index checked.
fn gather(storage: &[u8], t: &TensorRef) -> std::result::Result<Vec<u8>, String> {
    if t.shape.len() != t.stride.len() {
        return Err(format!(
            "shape {:?} and stride {:?} disagree",
            t.shape, t.stride
        ));
    }
    let es = t.dtype.size();
    let elements = storage.len() / es;
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the shape overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // A view larger than its storage (an expanded tensor) would be built element by element
    // into memory the file does not bound: refused.
    if numel.checked_mul(es).is_none_or(|b| b > storage.len()) {
        return Err(format!(
            "a view of {numel} elements over a storage of {elements} (an expanded tensor) is \
             not read"
        ));
    }
    // The furthest element the view reads.
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
        })
        .ok_or("the strides overflow")?;
    if last >= elements {
        return Err(format!(
            "it reads element {last} of a storage of {elements}: the storage is too short"
        ));
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d > 1 && s != expect {
                ok = false;
            }
            expect *= d;
        }
        ok
    };
    if contiguous {
        return Ok(storage[t.offset * es..(t.offset + numel) * es].to_vec());
    }
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[at * es..(at + 1) * es]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

/// Writes `tensors` as a safetensors file at `out`, atomically and streamed (the header,
/// then each tensor's bytes as they are), so a conversion holds the tensors once.
pub fn write_safetensors(tensors: &[PickledTensor], out: &Path) -> Result<()> {
    use std::io::Write as _;
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_owned(),
        serde_json::json!({"converted_by": "Studio (studio convert; the pickle was read as data)"}),
    );
    let mut offset = 0usize;
    for t in tensors {
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
        if header.insert(t.name.clone(), entry).is_some() {
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
        file.write_all(&t.data).map_err(io)?;
    }
    file.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: "0".to_owned(),
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
