//! A PyTorch checkpoint's tensors where they lie, for the loaders: [`PickleTensors`].
//!
//! - The zip format (`torch.save` since PyTorch 1.6): `data.pkl` is read, the file is mapped,
//!   and each contiguous tensor is a slice of the mapping (its storage is stored uncompressed in
//!   the archive), so a 4 GB `.ckpt` is not read into memory before the model copies it; a
//!   non-contiguous view is gathered into its own buffer.
//! - The legacy format and pickles with inline storages (NVIDIA's networks): the file is read
//!   into memory and each tensor gathered from it.
//!
//! Every size, offset and stride is checked against the bytes there are before anything is
//! read or allocated.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::torch::{self, DType, StorageRef, TensorRef};
use super::{network, vm};
use crate::error::{Error, Result};

/// Largest `data.pkl` read (a large checkpoint's is a few MiB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Largest file read whole (the legacy format, NVIDIA's network pickles).
const MAX_WHOLE_FILE_BYTES: u64 = 16 << 30;

/// Where a tensor's bytes are.
enum Data {
    /// In file `file`'s mapping.
    Mapped { file: usize, range: Range<usize> },
    /// Gathered into memory.
    Owned(Vec<u8>),
}

/// One tensor of a checkpoint.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

/// The tensors of one checkpoint (one file, or the shards of one), read as data.
pub struct PickleTensors {
    /// The first file (for messages).
    path: PathBuf,
    /// Each mapped zip file (`None` for a file read whole).
    maps: Vec<Option<memmap2::Mmap>>,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// An NVIDIA network's settings (what the converter writes beside its safetensors).
    settings: Option<serde_json::Value>,
}

/// One tensor, borrowed from a [`PickleTensors`].
#[derive(Debug, Clone, Copy)]
pub struct TensorData<'a> {
    /// Its name in the state dict.
    pub name: &'a str,
    /// Its element type.
    pub dtype: DType,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its elements, row-major, little-endian.
    pub data: &'a [u8],
    /// Whether `data` is part of a file mapping (so its pages can be released once copied).
    pub mapped: bool,
}

pub(super) fn corrupt(path: &Path, message: impl Into<String>) -> Error {
    Error::CorruptWeights {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl PickleTensors {
    /// Reads the checkpoint in `files` (one file, or every shard of a sharded
    /// `pytorch_model.bin`); a name in two shards is an error.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let Some(first) = files.first() else {
            return Err(Error::InvalidParameter("no checkpoint file given".into()));
        };
        let mut all = Self {
            path: first.clone(),
            maps: Vec::new(),
            entries: Vec::new(),
            index: HashMap::new(),
            settings: None,
        };
        for path in files {
            all.read_file(path)?;
        }
        if all.entries.is_empty() {
            return Err(corrupt(
                first,
                "it holds no tensors: not a PyTorch checkpoint or network Studio can read",
            ));
        }
        Ok(all)
    }

    /// The first file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An NVIDIA network's settings (`{"class_name", "init_kwargs", …}`), if the file was one.
    pub fn settings(&self) -> Option<&serde_json::Value> {
        self.settings.as_ref()
    }

    /// Every tensor, in the checkpoint's order.
    pub fn iter(&self) -> impl Iterator<Item = TensorData<'_>> + Clone {
        self.entries.iter().map(|e| self.view(e))
    }

    /// Tensor `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<TensorData<'_>> {
        self.index.get(name).map(|&i| self.view(&self.entries[i]))
    }

    /// How many tensors there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none (never, for an opened checkpoint).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn view<'a>(&'a self, e: &'a Entry) -> TensorData<'a> {
        let (data, mapped) = match &e.data {
            Data::Mapped { file, range } => match &self.maps[*file] {
                Some(map) => (&map[range.clone()], true),
                None => (&[][..], false),
            },
            Data::Owned(bytes) => (bytes.as_slice(), false),
        };
        TensorData {
            name: &e.name,
            dtype: e.dtype,
            shape: &e.shape,
            data,
            mapped,
        }
    }

    fn push(
        &mut self,
        path: &Path,
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        data: Data,
    ) -> Result<()> {
        if self.index.contains_key(&name) {
            return Err(corrupt(path, format!("`{name}` appears twice")));
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry {
            name,
            dtype,
            shape,
            data,
        });
        Ok(())
    }

    fn read_file(&mut self, path: &Path) -> Result<()> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n < 4 {
            return Err(corrupt(path, "the file is too short to be a checkpoint"));
        }
        if magic == *b"PK\x03\x04" {
            return self.read_zip(path);
        }
        if magic[0] != 0x80 {
            return Err(corrupt(
                path,
                "not a PyTorch checkpoint (no zip archive and no pickle header)",
            ));
        }
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len > MAX_WHOLE_FILE_BYTES {
            return Err(corrupt(
                path,
                format!(
                    "a {len}-byte pickle in PyTorch's legacy format is more than Studio reads \
                     into memory ({MAX_WHOLE_FILE_BYTES} bytes)"
                ),
            ));
        }
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if data.starts_with(&torch::LEGACY_MAGIC) {
            self.read_legacy(path, &data)
        } else {
            self.read_inline(path, data)
        }
    }

    /// The zip format: the storages stay in the file, mapped.
    fn read_zip(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| corrupt(path, format!("the zip archive: {e}")))?;
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
        let pickle =
            vm::parse(&pickle_bytes).map_err(|e| corrupt(path, format!("{pkl_name}: {e}")))?;
        let refs =
            torch::state_dict(&pickle).map_err(|e| corrupt(path, format!("refused: {e}")))?;
        // Where each storage's bytes are in the file.
        let mut storages: HashMap<String, Range<usize>> = HashMap::new();
        for (name, t) in &refs {
            let StorageRef::Key(key) = &t.storage else {
                return Err(corrupt(
                    path,
                    format!("`{name}`: an inline storage inside a zip checkpoint"),
                ));
            };
            if storages.contains_key(key) {
                continue;
            }
            let entry_name = format!("{prefix}data/{key}");
            let entry = zip
                .by_name(&entry_name)
                .map_err(|e| corrupt(path, format!("`{entry_name}`: {e}")))?;
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(corrupt(
                    path,
                    format!(
                        "`{entry_name}` is compressed; PyTorch stores checkpoint entries \
                         uncompressed"
                    ),
                ));
            }
            let start = entry
                .data_start()
                .ok_or_else(|| corrupt(path, format!("`{entry_name}` has no data offset")))?;
            let end = start
                .checked_add(entry.size())
                .filter(|&end| end <= file_len)
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!("`{entry_name}` runs past the end of the {file_len}-byte file"),
                    )
                })?;
            let range = usize::try_from(start)
                .map_err(|_| corrupt(path, "the file is too large"))?
                ..usize::try_from(end).map_err(|_| corrupt(path, "the file is too large"))?;
            storages.insert(key.clone(), range);
        }
        drop(zip);
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; Studio never writes to a checkpoint while it
        // is loaded. A file changed on disk by another program while mapped is outside what we
        // can guard against (the same contract as every mmap-based loader). Every range read
        // from the mapping was checked against the file's length above.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if (map.len() as u64) < file_len {
            return Err(corrupt(path, "the file shrank while it was read"));
        }
        let file_index = self.maps.len();
        for (name, t) in refs {
            let StorageRef::Key(key) = &t.storage else {
                continue;
            };
            let range = storages[key].clone();
            let data = match contiguous_range(range.len(), &t)
                .map_err(|e| corrupt(path, format!("`{name}`: {e}")))?
            {
                Some(r) => Data::Mapped {
                    file: file_index,
                    range: range.start + r.start..range.start + r.end,
                },
                None => Data::Owned(
                    gather(&map[range], &t).map_err(|e| corrupt(path, format!("`{name}`: {e}")))?,
                ),
            };
            self.push(path, name, t.dtype, t.shape, data)?;
        }
        self.maps.push(Some(map));
        Ok(())
    }

    /// PyTorch's legacy format, read whole.
    fn read_legacy(&mut self, path: &Path, data: &[u8]) -> Result<()> {
        let legacy = torch::legacy(data).map_err(|e| corrupt(path, e))?;
        let refs = torch::state_dict(&legacy.object)
            .map_err(|e| corrupt(path, format!("refused: {e}")))?;
        for (name, t) in refs {
            let bytes = match &t.storage {
                StorageRef::Key(key) => legacy.storages.get(key).map(|(_, r)| &data[r.clone()]),
                StorageRef::Inline { .. } => None,
            }
            .ok_or_else(|| corrupt(path, format!("`{name}`: its storage is missing")))?;
            let gathered =
                gather(bytes, &t).map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
            self.push(path, name, t.dtype, t.shape, Data::Owned(gathered))?;
        }
        Ok(())
    }

    /// A plain pickle whose storages are inline: NVIDIA's network pickles (`G_ema` is read),
    /// or a `pickle.dump` of a state dict.
    fn read_inline(&mut self, path: &Path, data: Vec<u8>) -> Result<()> {
        let pickle = vm::parse(&data).map_err(|e| corrupt(path, e.to_string()))?;
        // The graph holds its own copy of every byte string: the file can go.
        drop(data);
        let refs = if network::is_network(&pickle) {
            let source = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let net = network::read(&pickle, &source).map_err(|e| corrupt(path, e))?;
            self.settings = Some(net.settings);
            net.tensors
        } else {
            torch::state_dict(&pickle).map_err(|e| corrupt(path, format!("refused: {e}")))?
        };
        for (name, t) in refs {
            let bytes = match &t.storage {
                StorageRef::Inline { node, range } => match pickle.get(*node) {
                    vm::Node::Bytes(b) => b.get(range.clone()),
                    _ => None,
                },
                StorageRef::Key(_) => None,
            }
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("`{name}`: its storage is not in the pickle (a bare pickle refers to storages only inline)"),
                )
            })?;
            let gathered =
                gather(bytes, &t).map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
            self.push(path, name, t.dtype, t.shape, Data::Owned(gathered))?;
        }
        Ok(())
    }
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

/// The elements of a view, checked against a storage of `storage_bytes`: `Ok(None)` when the
/// view is not contiguous, else where its bytes are in the storage.
fn contiguous_range(
    storage_bytes: usize,
    t: &TensorRef,
) -> std::result::Result<Option<Range<usize>>, String> {
    let (numel, _) = check_view(storage_bytes, t)?;
    if !is_contiguous(t) {
        return Ok(None);
    }
    let es = t.dtype.size();
    if numel == 0 {
        return Ok(Some(0..0));
    }
    Ok(Some(t.offset * es..(t.offset + numel) * es))
}

/// Checks a view against its storage: the element count and the last element read.
fn check_view(storage_bytes: usize, t: &TensorRef) -> std::result::Result<(usize, usize), String> {
    if t.shape.len() != t.stride.len() {
        return Err(format!(
            "shape {:?} and stride {:?} disagree",
            t.shape, t.stride
        ));
    }
    let es = t.dtype.size();
    let elements = storage_bytes / es;
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the shape overflows")?;
    if numel == 0 {
        return Ok((0, elements));
    }
    // A view larger than its storage (an expanded tensor) would be built element by element
    // into memory the file does not bound: refused.
    if numel.checked_mul(es).is_none_or(|b| b > storage_bytes) {
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
    Ok((numel, elements))
}

fn is_contiguous(t: &TensorRef) -> bool {
    let mut expect = 1;
    for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
        if d > 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

/// The tensor's elements from its storage, row-major; every index checked.
pub(super) fn gather(storage: &[u8], t: &TensorRef) -> std::result::Result<Vec<u8>, String> {
    let (numel, _) = check_view(storage.len(), t)?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let es = t.dtype.size();
    if is_contiguous(t) {
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
