//! NumPy `.npy` files, for latents exchanged with NVIDIA's scripts and other tools
//! (`studio gan --z-file / --w-file`, projection's `--out-w`).
//!
//! The format: the magic `\x93NUMPY`, a version byte pair (1.0: 16-bit header length;
//! 2.0 and 3.0: 32-bit), then a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 512), }` padded with spaces and a
//! newline, then the values. This module reads little-endian `float32` and `float64` arrays in
//! C order (what `np.save` writes for latents) and writes `float32` (version 1.0 when the
//! header fits, else 2.0); anything else is refused with a message saying what the file holds.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::dcgan::Dcgan;
use super::stylegan2::StyleGan2;
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A decoded array: its shape and values (as `f32`, C order).
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first (e.g. `[1, 512]` for one latent).
    pub shape: Vec<usize>,
    /// The values in C (row-major) order; as many as the product of `shape`.
    pub data: Vec<f32>,
}

impl NpyArray {
    /// As a tensor of the same shape.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data.clone(),
            self.shape.as_slice(),
            device,
        )?)
    }

    /// The values of `t` (any float dtype, converted to f32) with its shape.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        Ok(Self {
            shape: t.dims().to_vec(),
            data: t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?,
        })
    }
}

fn bad(what: &str) -> Error {
    Error::InvalidParameter(format!("not a readable .npy file: {what}"))
}

/// The value of `'key':` in the header dict (up to the next top-level comma or brace).
fn header_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let mut found = None;
    for quote in ['\'', '"'] {
        let pat = format!("{quote}{key}{quote}");
        if let Some(i) = header.find(&pat) {
            found = Some(i + pat.len());
            break;
        }
    }
    let start = found.ok_or_else(|| bad(&format!("the header has no `{key}`")))?;
    let rest = header[start..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or_else(|| bad(&format!("malformed `{key}` in the header")))?
        .trim_start();
    if let Some(tuple) = rest.strip_prefix('(') {
        let end = tuple
            .find(')')
            .ok_or_else(|| bad("unterminated shape tuple"))?;
        return Ok(&tuple[..end]);
    }
    for quote in ['\'', '"'] {
        if let Some(s) = rest.strip_prefix(quote) {
            let end = s
                .find(quote)
                .ok_or_else(|| bad(&format!("unterminated `{key}`")))?;
            return Ok(&s[..end]);
        }
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Ok(rest[..end].trim())
}

/// Decodes the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("it does not start with NumPy's `\\x93NUMPY` magic"));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("the file is truncated inside its header"));
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (n as usize, 12)
        }
        _ => {
            return Err(bad(&format!(
                "format version {major}.{minor} (this reads versions 1, 2 and 3)"
            )));
        }
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(bad("the file is truncated inside its header"));
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| bad("the header is not text"))?;

    let descr = header_value(header, "descr")?;
    let item = match descr {
        "<f4" | "=f4" | "f4" => 4,
        "<f8" | "=f8" | "f8" => 8,
        ">f4" | ">f8" => {
            return Err(Error::InvalidParameter(format!(
                ".npy dtype `{descr}` is big-endian; save it as little-endian float32 \
                 (`a.astype('<f4')`)"
            )));
        }
        other => {
            return Err(Error::InvalidParameter(format!(
                ".npy dtype `{other}` is not supported: latents must be float32 or float64 \
                 (`a.astype(np.float32)`)"
            )));
        }
    };
    match header_value(header, "fortran_order")? {
        "False" => {}
        "True" => {
            return Err(Error::InvalidParameter(
                "the .npy array is in Fortran (column-major) order; save a C-ordered copy \
                 (`np.save(path, np.ascontiguousarray(a))`)"
                    .into(),
            ));
        }
        other => return Err(bad(&format!("fortran_order is `{other}`"))),
    }
    let shape = header_value(header, "shape")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| bad(&format!("shape entry `{s}` is not a size")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("the shape is too large"))?;
    let data = &bytes[data_start..];
    let expected = count
        .checked_mul(item)
        .ok_or_else(|| bad("the shape is too large"))?;
    if data.len() < expected {
        return Err(Error::InvalidParameter(format!(
            "the .npy file is truncated: shape {shape:?} of {descr} needs {expected} bytes of \
             data but the file has {}",
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(Error::InvalidParameter(format!(
            "the .npy file has {} unexpected bytes after its {expected} bytes of data",
            data.len() - expected
        )));
    }
    let values = if item == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect()
    };
    Ok(NpyArray {
        shape,
        data: values,
    })
}

/// Encodes `array` as a little-endian float32 `.npy` (version 1.0, or 2.0 for headers over
/// 64 KiB), header padded to a multiple of 64 bytes as numpy does.
pub fn encode(array: &NpyArray) -> Result<Vec<u8>> {
    let count: usize = array.shape.iter().product();
    if count != array.data.len() {
        return Err(Error::InvalidParameter(format!(
            "array of shape {:?} needs {count} values, got {}",
            array.shape,
            array.data.len()
        )));
    }
    let shape = match array.shape.as_slice() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let mut out = Vec::with_capacity(128 + 4 * count);
    out.extend_from_slice(MAGIC);
    // Header length including the trailing newline, padded so the data starts 64-aligned.
    let pad_to = |prefix: usize| {
        let unpadded = prefix + dict.len() + 1;
        dict.len() + 1 + (64 - unpadded % 64) % 64
    };
    let v1_len = pad_to(10);
    if let Ok(len) = u16::try_from(v1_len) {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&len.to_le_bytes());
        push_header(&mut out, &dict, v1_len);
    } else {
        let v2_len = pad_to(12);
        let len = u32::try_from(v2_len).map_err(|_| bad("the header is too large"))?;
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&len.to_le_bytes());
        push_header(&mut out, &dict, v2_len);
    }
    for v in &array.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

fn push_header(out: &mut Vec<u8>, dict: &str, len: usize) {
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + len - dict.len() - 1, b' ');
    out.push(b'\n');
}

/// Reads a `.npy` file (see [`parse`]); errors name the file.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path.to_path_buf())
        } else {
            Error::io(path.to_path_buf(), e)
        }
    })?;
    let array = parse(&bytes).map_err(|e| match e {
        Error::InvalidParameter(m) => Error::InvalidParameter(format!("{}: {m}", path.display())),
        other => other,
    })?;
    // Latents and noise are used as they are: a NaN would silently turn every image black.
    if let Some(at) = array.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidParameter(format!(
            "{}: value {at} is {}; latents and noise must be finite numbers",
            path.display(),
            array.data[at]
        )));
    }
    Ok(array)
}

/// Writes `t` as a float32 `.npy` file.
pub fn write_tensor(path: &Path, t: &Tensor) -> Result<()> {
    let bytes = encode(&NpyArray::from_tensor(t)?)?;
    crate::sys::write_atomic(path, &bytes, false).map_err(|e| Error::io(path.to_path_buf(), e))
}

/// A `z` for `gan` from a `.npy` file: shape `(z_dim,)` or `(1, z_dim)`, returned as
/// `(1, z_dim)`.
pub fn read_z(path: &Path, gan: &StyleGan2) -> Result<Tensor> {
    let a = read(path)?;
    let z_dim = gan.info().z_dim;
    match a.shape.as_slice() {
        [d] | [1, d] if *d == z_dim => Ok(Tensor::from_vec(a.data, (1, z_dim), gan.device())?),
        other => Err(Error::InvalidParameter(format!(
            "{}: z has shape {other:?}; this network takes ({z_dim},) or (1, {z_dim})",
            path.display()
        ))),
    }
}

/// A DCGAN latent from a `.npy` file: every value, as `(1, n, 1, 1)` on `gan`'s device (its
/// [`Dcgan::generate`] refuses an `n` other than its `nz`).
pub fn read_dcgan_z(path: &Path, gan: &Dcgan) -> Result<Tensor> {
    let a = read(path)?;
    let n = a.data.len();
    Ok(Tensor::from_vec(a.data, (1, n, 1, 1), gan.device())?)
}

/// `ws` for `gan` from a `.npy` file: `(1, num_ws, w_dim)` or `(num_ws, w_dim)` (one row per
/// synthesis layer, as NVIDIA's projector saves them), or a single `w` `(w_dim,)` /
/// `(1, w_dim)` repeated for every layer. Returned as `(1, num_ws, w_dim)`.
pub fn read_ws(path: &Path, gan: &StyleGan2) -> Result<Tensor> {
    let a = read(path)?;
    let (num_ws, w_dim) = (gan.info().num_ws, gan.info().w_dim);
    match a.shape.as_slice() {
        [1, n, d] | [n, d] if (*n, *d) == (num_ws, w_dim) => {
            Ok(Tensor::from_vec(a.data, (1, num_ws, w_dim), gan.device())?)
        }
        [d] | [1, d] if *d == w_dim => {
            Ok(Tensor::from_vec(a.data, (1, 1, w_dim), gan.device())?.repeat((1, num_ws, 1))?)
        }
        other => Err(Error::InvalidParameter(format!(
            "{}: w has shape {other:?}; this network takes (1, {num_ws}, {w_dim}), \
             ({num_ws}, {w_dim}) or a single ({w_dim},) row",
            path.display()
        ))),
    }
}
