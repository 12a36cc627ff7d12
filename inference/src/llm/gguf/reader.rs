//! The GGUF header: magic, version, metadata and tensor directory, read with every length
//! checked against the file's size before anything is allocated.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};

use crate::error::{Error, Result};

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub(super) struct RawTensor {
    pub(super) name: String,
    /// Row-major dimensions (the file stores them innermost first).
    pub(super) dims: Vec<usize>,
    pub(super) ggml_type: u32,
    /// Offset from the start of the tensor data.
    pub(super) offset: u64,
}

impl RawTensor {
    pub(super) fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The parsed header: metadata and tensor directory.
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) metadata: HashMap<String, Value>,
    pub(super) tensors: Vec<RawTensor>,
    pub(super) data_offset: u64,
    pub(super) file_size: u64,
}

pub(super) const MAX_VALUE_DEPTH: usize = 8;
/// Longest metadata string accepted (chat templates are kilobytes).
pub(super) const MAX_STRING: u64 = 1 << 28;
/// Entries reserved up front at most; counts in a corrupt header must not allocate.
pub(super) const MAX_RESERVE: usize = 1 << 16;
pub(super) const MAX_DIMS: u32 = 4;

/// Reads the header with bounds checks against the file size, so a corrupt length never
/// allocates more than the file holds.
pub(super) struct HeaderReader {
    pub(super) r: BufReader<File>,
    pub(super) pos: u64,
    pub(super) file_size: u64,
    pub(super) version: u32,
}

pub(super) type Parse<T> = std::result::Result<T, String>;

impl HeaderReader {
    pub(super) fn exact(&mut self, buf: &mut [u8]) -> Parse<()> {
        if (buf.len() as u64) > self.file_size.saturating_sub(self.pos) {
            return Err(format!(
                "the file ends inside its header (at byte {} of {}): it is truncated",
                self.pos, self.file_size
            ));
        }
        self.r
            .read_exact(buf)
            .map_err(|e| format!("reading the header: {e}"))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    pub(super) fn bytes<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }

    pub(super) fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    pub(super) fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count or length: u32 in GGUF v1, u64 later.
    pub(super) fn len(&mut self) -> Parse<u64> {
        if self.version == 1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    pub(super) fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    pub(super) fn string(&mut self) -> Parse<String> {
        let n = self.len()?;
        if n > MAX_STRING {
            return Err(format!(
                "a string of {n} bytes at byte {}: the header is corrupt",
                self.pos
            ));
        }
        if n > self.remaining() {
            return Err(format!(
                "a string of {n} bytes at byte {} runs past the end of the file: it is \
                 truncated or corrupt",
                self.pos
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.exact(&mut v)?;
        // Strings should not be NUL-terminated, but some writers do it.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    pub(super) fn value(&mut self, value_type: u32, depth: usize) -> Parse<Value> {
        if depth > MAX_VALUE_DEPTH {
            return Err("metadata arrays are nested too deeply".to_owned());
        }
        Ok(match value_type {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("a boolean has the value {b}")),
            },
            8 => Value::String(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let n = self.len()?;
                let min_size: u64 = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if self.version == 1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => 12,
                    t => return Err(format!("unknown metadata value type {t}")),
                };
                if n.saturating_mul(min_size) > self.remaining() {
                    return Err(format!(
                        "an array of {n} values at byte {} runs past the end of the file: it \
                         is truncated or corrupt",
                        self.pos
                    ));
                }
                let mut items = Vec::with_capacity((n as usize).min(MAX_RESERVE));
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// How a file that is not GGUF starts, for the error message.
pub(super) fn describe_magic(magic: [u8; 4]) -> String {
    if magic[0] == b'{' || magic.starts_with(b"PK") {
        return "a JSON or ZIP file".to_owned();
    }
    if magic.iter().all(u8::is_ascii_graphic) {
        format!("`{}`", String::from_utf8_lossy(&magic))
    } else {
        format!("bytes {magic:02x?}")
    }
}

pub(super) fn read_header(path: &Path) -> Result<Header> {
    let corrupt = |message: String| Error::CorruptWeights {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = HeaderReader {
        r: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        file_size,
        version: 3,
    };
    if file_size < 8 {
        return Err(corrupt(format!(
            "the file is only {file_size} bytes long, too short for a GGUF header"
        )));
    }
    let magic: [u8; 4] = r.bytes().map_err(corrupt)?;
    if &magic != b"GGUF" {
        return Err(corrupt(format!(
            "not a GGUF file: it starts with {} instead of `GGUF`",
            describe_magic(magic)
        )));
    }
    let version = r.u32().map_err(corrupt)?;
    if !(1..=3).contains(&version) {
        return Err(corrupt(format!(
            "GGUF version {version} is not one Studio reads (1 to 3{})",
            if version > 0xffff {
                "; is it a big-endian file?"
            } else {
                ""
            }
        )));
    }
    r.version = version;
    let parse = |r: &mut HeaderReader| -> Parse<(HashMap<String, Value>, Vec<RawTensor>)> {
        let tensor_count = r.len()?;
        let kv_count = r.len()?;
        // Each metadata entry and tensor entry takes at least 13 and 20 bytes.
        if kv_count
            .saturating_mul(13)
            .saturating_add(tensor_count.saturating_mul(20))
            > r.remaining()
        {
            return Err(format!(
                "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
                 more than the file can hold: it is truncated or corrupt"
            ));
        }
        let mut metadata = HashMap::with_capacity((kv_count as usize).min(MAX_RESERVE));
        for _ in 0..kv_count {
            let key = r.string()?;
            let value_type = r.u32()?;
            let value = r
                .value(value_type, 0)
                .map_err(|e| format!("metadata `{key}`: {e}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity((tensor_count as usize).min(MAX_RESERVE));
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has {n_dims} dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.len()?;
                dims.push(
                    usize::try_from(d).map_err(|_| format!("tensor `{name}`: dimension {d}"))?,
                );
            }
            dims.reverse();
            if dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
                return Err(format!(
                    "tensor `{name}` has impossible dimensions {dims:?}"
                ));
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(RawTensor {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        Ok((metadata, tensors))
    };
    let (metadata, tensors) = parse(&mut r).map_err(corrupt)?;
    let alignment = match metadata.get("general.alignment") {
        None => gguf_file::DEFAULT_ALIGNMENT,
        Some(v) => match value_u64(v) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(corrupt(format!("`general.alignment` is {v:?}"))),
        },
    };
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset,
        file_size,
    })
}

// Metadata values

pub(super) fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        // Per-layer arrays whose entries are all equal are as good as one number.
        Value::Array(items) => {
            let first = value_u64(items.first()?)?;
            items
                .iter()
                .all(|i| value_u64(i) == Some(first))
                .then_some(first)
        }
        _ => None,
    }
}

pub(super) fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        other => value_u64(other).map(|x| x as f64),
    }
}

/// Typed access to the metadata, with errors that name the file and the key.
pub(super) struct Meta<'a> {
    pub(super) path: &'a Path,
    pub(super) md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    pub(super) fn corrupt(&self, message: String) -> Error {
        Error::CorruptWeights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    pub(super) fn string(&self, key: &str) -> Option<String> {
        match self.md.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    pub(super) fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("metadata `{key}` is not a count: {v:?}"))),
        }
    }

    pub(super) fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
    }

    pub(super) fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => match value_f64(v) {
                Some(x) if x.is_finite() => Ok(Some(x)),
                Some(x) => Err(self.corrupt(format!("metadata `{key}` is {x}, not finite"))),
                None => Err(self.corrupt(format!("metadata `{key}` is not a number: {v:?}"))),
            },
        }
    }

    pub(super) fn req_f64(&self, key: &str) -> Result<f64> {
        self.f64(key)?
            .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
    }
}
