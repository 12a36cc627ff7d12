//! PyTorch's objects in a pickle graph, read from an allowlist: `OrderedDict`s and dicts of
//! tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) over storages named by
//! persistent ids (`('storage', torch.FloatStorage, key, location, numel)`) or, in a plain
//! `pickle.dump` of tensors (NVIDIA's network pickles), given inline as
//! `torch.storage._load_from_bytes(b'…')`, whose bytes are PyTorch's legacy format of one
//! storage ([`legacy`]). A call to anything else is refused where a tensor or a dict is
//! expected, naming the global; nothing is run.

use std::collections::HashMap;
use std::ops::Range;

use super::vm::{self, Id, Node, Pickle, kind};

/// Deepest nesting of dicts walked (a memo can make the graph cyclic).
const MAX_DEPTH: usize = 64;

/// An element type PyTorch storages hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// `torch.float32`.
    F32,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.float64`.
    F64,
    /// `torch.int64`.
    I64,
    /// `torch.int32`.
    I32,
    /// `torch.int16`.
    I16,
    /// `torch.int8`.
    I8,
    /// `torch.uint8`.
    U8,
    /// `torch.bool`.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Its name in a safetensors header (`F32`, `BF16`, `BOOL`, …).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// From a storage class name (`FloatStorage`, …).
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
}

/// Where a tensor's storage is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StorageRef {
    /// The storage's key: its file in a zip archive, or its place in the legacy format.
    Key(String),
    /// Inline: bytes `range` of the bytes node `node` (a `_load_from_bytes` argument).
    Inline {
        /// The [`Node::Bytes`] holding a legacy-format storage.
        node: Id,
        /// Where the storage's elements are in those bytes.
        range: Range<usize>,
    },
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Where its storage is.
    pub storage: StorageRef,
    /// Its element type.
    pub dtype: DType,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// The shape.
    pub shape: Vec<usize>,
    /// The strides, in elements.
    pub stride: Vec<usize>,
}

/// Why a pickle is not a state dict.
pub type Refusal = String;

/// The state dict in `p`: every tensor with its dotted name. A checkpoint whose root holds a
/// `state_dict` (SD `.ckpt`, Lightning) is read from there; other entries (step counts,
/// optimizer settings) are left out when they hold no tensor.
pub fn state_dict(p: &Pickle) -> Result<Vec<(String, TensorRef)>, Refusal> {
    let root = match entries(p, p.root)? {
        Some(items) => {
            let inner = items.iter().find_map(|&(k, v)| {
                (str_of(p, k) == Some("state_dict"))
                    .then_some(v)
                    .filter(|&v| entries(p, v).ok().flatten().is_some())
            });
            inner.unwrap_or(p.root)
        }
        None => {
            return Err(format!(
                "the checkpoint holds {}, not a dict of tensors",
                describe(p, p.root)
            ));
        }
    };
    let mut out = Vec::new();
    collect(p, root, "", 0, &mut out)?;
    Ok(out)
}

fn collect(
    p: &Pickle,
    id: Id,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
) -> Result<(), Refusal> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "the state dict nests deeper than {MAX_DEPTH} levels"
        ));
    }
    let Some(items) = entries(p, id)? else {
        return Ok(());
    };
    for (k, v) in items {
        let Some(key) = key_of(p, k) else {
            continue;
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        if let Some(t) = tensor(p, v, depth)? {
            out.push((name, t));
        } else if entries(p, v)?.is_some() {
            collect(p, v, &name, depth + 1, out)?;
        } else if let Some(g) = foreign_call(p, v) {
            return Err(format!(
                "`{name}` is built by `{g}`, which is not a tensor or a dict; Studio reads \
                 only those (nothing was run)"
            ));
        }
    }
    Ok(())
}

/// A dict key as a name: strings as they are, ints written out.
pub(super) fn key_of(p: &Pickle, id: Id) -> Option<String> {
    match p.get(id) {
        Node::Str(s) => Some(s.clone()),
        Node::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(super) fn str_of(p: &Pickle, id: Id) -> Option<&str> {
    match p.get(id) {
        Node::Str(s) => Some(s),
        _ => None,
    }
}

pub(super) fn global_of(p: &Pickle, id: Id) -> Option<(&str, &str)> {
    match p.get(id) {
        Node::Global { module, name } => Some((module, name)),
        _ => None,
    }
}

/// `module.name` of a call that is not on the allowlist.
pub(super) fn foreign_call(p: &Pickle, id: Id) -> Option<String> {
    match p.get(id) {
        Node::Call { callable, .. } => match global_of(p, *callable) {
            Some((m, n)) => Some(format!("{m}.{n}")),
            None => Some("an object that is not a global".to_owned()),
        },
        Node::Global { module, name } => Some(format!("{module}.{name}")),
        _ => None,
    }
}

/// The items of a dict, an `OrderedDict` (`collections.OrderedDict` called with no arguments
/// or a list of pairs, items then set) or NVIDIA's `dnnlib.util.EasyDict` (a dict subclass);
/// `None` for anything else.
pub(super) fn entries(p: &Pickle, id: Id) -> Result<Option<Vec<(Id, Id)>>, Refusal> {
    Ok(match p.get(id) {
        Node::Dict(items) => Some(items.clone()),
        Node::Call {
            callable,
            args,
            items,
            ..
        } if matches!(
            global_of(p, *callable),
            Some(("collections", "OrderedDict") | ("dnnlib.util", "EasyDict"))
        ) =>
        {
            let mut all = Vec::new();
            if let Node::Tuple(a) = p.get(*args)
                && let Some(&first) = a.first()
                && let Node::List(pairs) = p.get(first)
            {
                for &pair in pairs {
                    match p.get(pair) {
                        Node::Tuple(kv) if kv.len() == 2 => all.push((kv[0], kv[1])),
                        other => {
                            return Err(format!(
                                "an OrderedDict is given {} where a pair belongs",
                                kind(other)
                            ));
                        }
                    }
                }
            }
            all.extend(items.iter().copied());
            Some(all)
        }
        _ => None,
    })
}

pub(super) fn describe(p: &Pickle, id: Id) -> String {
    foreign_call(p, id).map_or_else(|| kind(p.get(id)).to_owned(), |g| format!("`{g}`"))
}

fn usize_of(p: &Pickle, id: Id, what: &str) -> Result<usize, Refusal> {
    match p.get(id) {
        Node::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("a tensor's {what} is {}", kind(other))),
    }
}

fn usizes(p: &Pickle, id: Id, what: &str) -> Result<Vec<usize>, Refusal> {
    match p.get(id) {
        Node::Tuple(items) | Node::List(items) => {
            items.iter().map(|&i| usize_of(p, i, what)).collect()
        }
        other => Err(format!("a tensor's {what} is {}", kind(other))),
    }
}

/// The tensor `id` rebuilds, if it is one (`Ok(None)` for other values).
pub(super) fn tensor(p: &Pickle, id: Id, depth: usize) -> Result<Option<TensorRef>, Refusal> {
    if depth > MAX_DEPTH {
        return Err("a tensor is nested too deeply".to_owned());
    }
    let Node::Call { callable, args, .. } = p.get(id) else {
        return Ok(None);
    };
    let Some(("torch._utils", name)) = global_of(p, *callable) else {
        return Ok(None);
    };
    let Node::Tuple(args) = p.get(*args) else {
        return Err(format!(
            "`torch._utils.{name}` is called without an argument tuple"
        ));
    };
    match name {
        "_rebuild_tensor_v2" | "_rebuild_tensor" => {
            if args.len() < 4 {
                return Err(format!(
                    "`torch._utils.{name}` has {} arguments",
                    args.len()
                ));
            }
            let (storage, dtype, view_offset) = storage(p, args[0])?;
            Ok(Some(TensorRef {
                storage,
                dtype,
                offset: usize_of(p, args[1], "storage offset")?
                    .checked_add(view_offset)
                    .ok_or("a storage offset overflows")?,
                shape: usizes(p, args[2], "shape")?,
                stride: usizes(p, args[3], "stride")?,
            }))
        }
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => match args.first() {
            Some(&inner) => tensor(p, inner, depth + 1),
            None => Err(format!("`torch._utils.{name}` has no tensor")),
        },
        other => Err(format!(
            "`torch._utils.{other}` builds a kind of tensor Studio does not read (quantized, \
             sparse or on a meta device)"
        )),
    }
}

/// The storage, element type and view offset (in elements) of a persistent id
/// `('storage', torch.FloatStorage, key, location, numel)` (PyTorch's legacy format adds a
/// sixth part, `None` or `(view_key, offset, size)` for a view into the root storage `key`),
/// or of an inline `torch.storage._load_from_bytes(b'…')`.
fn storage(p: &Pickle, id: Id) -> Result<(StorageRef, DType, usize), Refusal> {
    if let Node::Call { callable, args, .. } = p.get(id)
        && global_of(p, *callable) == Some(("torch.storage", "_load_from_bytes"))
    {
        let node = match p.get(*args) {
            Node::Tuple(a) if a.len() == 1 => a[0],
            _ => return Err("`torch.storage._load_from_bytes` is not given one argument".into()),
        };
        let Node::Bytes(bytes) = p.get(node) else {
            return Err("`torch.storage._load_from_bytes` is not given bytes".into());
        };
        let (dtype, range) = inline_storage(bytes)?;
        return Ok((StorageRef::Inline { node, range }, dtype, 0));
    }
    let (key, dtype, view_offset) = persistent_storage(p, id)?;
    Ok((StorageRef::Key(key), dtype, view_offset))
}

/// [`storage`] of a persistent id.
fn persistent_storage(p: &Pickle, id: Id) -> Result<(String, DType, usize), Refusal> {
    let Node::Persistent(pid) = p.get(id) else {
        return Err(format!(
            "a tensor's storage is {}, not a reference to the archive's data",
            kind(p.get(id))
        ));
    };
    let Node::Tuple(parts) = p.get(*pid) else {
        return Err("a storage reference is not a tuple".to_owned());
    };
    if parts.len() < 3 || str_of(p, parts[0]) != Some("storage") {
        return Err("a persistent id is not a storage reference".to_owned());
    }
    let dtype = match global_of(p, parts[1]) {
        Some(("torch", name)) => DType::from_storage(name)
            .ok_or_else(|| format!("storage type `torch.{name}` is not supported"))?,
        Some((m, n)) => return Err(format!("storage type `{m}.{n}` is not supported")),
        None => return Err("a storage reference has no storage type".to_owned()),
    };
    let key = key_of(p, parts[2]).ok_or("a storage key is not a string")?;
    let view_offset = match parts.get(5).map(|&v| p.get(v)) {
        Some(Node::Tuple(view)) if view.len() == 3 => usize_of(p, view[1], "view offset")?,
        _ => 0,
    };
    Ok((key, dtype, view_offset))
}

/// The element type of every storage the pickle references, by key (the legacy format needs
/// each one's element size to find the next in the file).
pub fn storage_types(p: &Pickle) -> Result<std::collections::HashMap<String, DType>, Refusal> {
    let mut types = std::collections::HashMap::new();
    for (id, node) in p.nodes.iter().enumerate() {
        if let Node::Persistent(_) = node {
            let (key, dtype, _) = persistent_storage(p, id)?;
            types.insert(key, dtype);
        }
    }
    Ok(types)
}

/// The first bytes of PyTorch's legacy format: a pickled magic number (an 80-bit int).
pub const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

/// PyTorch's legacy format, read: the object it holds, and where each storage's elements
/// are in the bytes.
pub struct Legacy {
    /// The saved object's pickle.
    pub object: Pickle,
    /// Each storage by key: its element type and the bytes of its elements.
    pub storages: HashMap<String, (DType, Range<usize>)>,
}

/// Reads PyTorch's legacy format (before 1.6, and what `torch.storage._load_from_bytes`
/// holds): pickles one after another (the magic number, the protocol version, system facts,
/// the object, the storage keys), then each storage as a little-endian element count and its
/// bytes, in the keys' order. Every length is checked against the bytes there are.
pub fn legacy(data: &[u8]) -> Result<Legacy, Refusal> {
    let Some(mut rest) = data.strip_prefix(LEGACY_MAGIC.as_slice()) else {
        return Err("not PyTorch's legacy format (no magic number)".to_owned());
    };
    let mut next = |what: &str| -> Result<Pickle, Refusal> {
        let (p, used) =
            vm::parse_prefix(rest).map_err(|e| format!("the legacy format's {what}: {e}"))?;
        rest = &rest[used..];
        Ok(p)
    };
    next("protocol version")?;
    next("system facts")?;
    let object = next("object")?;
    let keys = next("storage keys")?;
    let key_list: Vec<String> = match keys.get(keys.root) {
        Node::List(ids) => ids
            .iter()
            .map(|&id| match keys.get(id) {
                Node::Str(s) => Ok(s.clone()),
                other => Err(format!("a storage key is {}", kind(other))),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("the storage keys are {}", kind(other))),
    };
    let types = storage_types(&object)?;
    let mut storages = HashMap::new();
    let mut at = data.len() - rest.len();
    for key in key_list {
        let dtype = *types
            .get(&key)
            .ok_or_else(|| format!("storage `{key}` is listed but never used"))?;
        let Some((count, body)) = rest.split_first_chunk::<8>() else {
            return Err(format!("storage `{key}` is truncated"));
        };
        let bytes = usize::try_from(u64::from_le_bytes(*count))
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= body.len())
            .ok_or_else(|| format!("storage `{key}` runs past the end of its data"))?;
        at += 8;
        storages.insert(key, (dtype, at..at + bytes));
        at += bytes;
        rest = &body[bytes..];
    }
    Ok(Legacy { object, storages })
}

/// The element type and element bytes of the one storage an inline legacy blob holds.
fn inline_storage(bytes: &[u8]) -> Result<(DType, Range<usize>), Refusal> {
    let blob = legacy(bytes).map_err(|e| format!("an inline storage: {e}"))?;
    let (key, _, _) = persistent_storage(&blob.object, blob.object.root)
        .map_err(|e| format!("an inline storage: {e}"))?;
    blob.storages
        .get(&key)
        .cloned()
        .ok_or_else(|| format!("an inline storage's data (`{key}`) is missing"))
}
