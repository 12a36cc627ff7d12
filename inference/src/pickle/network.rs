//! NVIDIA's network pickles (`ffhq.pkl` and the like from stylegan2-ada-pytorch and stylegan3):
//! a `pickle.dump` of a dict of networks (`G`, `D`, `G_ema`, …), each a
//! `torch_utils.persistence` object. Such an object pickles as
//! `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds the class's
//! source code (`module_src`), its name and the object's `__dict__` (`state`); Python would
//! run that source. Studio reads only the data: the module tree's `_parameters`, `_buffers` and
//! `_modules`, which give `G_ema`'s state dict with the names `state_dict()` would give, and
//! `_init_kwargs`, the settings NVIDIA's code builds the network from. The source is never
//! run. TensorFlow-era pickles (`dnnlib.tflib.network.Network`) are refused by name.

use serde_json::{Map, Value};

use super::torch::{self, Refusal, TensorRef, entries, global_of, key_of, str_of};
use super::vm::{Id, Node, Pickle, kind};

/// Deepest module tree walked (a memo can make the graph cyclic).
const MAX_DEPTH: usize = 64;

/// The network a pickle holds, as Studio reads it.
pub struct Network {
    /// `G_ema`'s state dict.
    pub tensors: Vec<(String, TensorRef)>,
    /// What `tools/convert_stylegan_pkl.py` writes beside its safetensors:
    /// `{"class_name", "source", "key", "init_kwargs"}`.
    pub settings: Value,
}

/// Whether the pickle's root is a dict of NVIDIA networks (it has `G_ema`), or the tuple of
/// TensorFlow networks older pickles hold.
pub fn is_network(p: &Pickle) -> bool {
    match entries(p, p.root) {
        Ok(Some(items)) => items.iter().any(|&(k, _)| str_of(p, k) == Some("G_ema")),
        _ => tensorflow_network(p, p.root),
    }
}

fn tensorflow_network(p: &Pickle, id: Id) -> bool {
    let items = match p.get(id) {
        Node::Tuple(items) | Node::List(items) => items.clone(),
        _ => vec![id],
    };
    items.iter().any(|&i| match p.get(i) {
        Node::Call { callable, .. } => {
            global_of(p, *callable).is_some_and(|(m, _)| m.starts_with("dnnlib.tflib"))
        }
        _ => false,
    })
}

/// Reads `G_ema` (its state dict and init kwargs) out of an NVIDIA network pickle; `source`
/// names the file in the settings.
pub fn read(p: &Pickle, source: &str) -> Result<Network, Refusal> {
    if tensorflow_network(p, p.root) {
        return Err(
            "this is a TensorFlow-era StyleGAN pickle (`dnnlib.tflib.network.Network`), \
                    which Studio does not read; NVIDIA's stylegan2-ada-pytorch converts it \
                    (`legacy.py`), and tools/convert_stylegan_pkl.py writes the result as \
                    safetensors"
                .to_owned(),
        );
    }
    let items = entries(p, p.root)?.ok_or("the pickle is not a dict of networks")?;
    let g = items
        .iter()
        .find(|&&(k, _)| str_of(p, k) == Some("G_ema"))
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            let keys: Vec<String> = items.iter().filter_map(|&(k, _)| key_of(p, k)).collect();
            format!(
                "the pickle has no `G_ema` network (it has: {})",
                keys.join(", ")
            )
        })?;
    let module = module(p, g)?;
    let mut tensors = Vec::new();
    walk(p, module.state, "", 0, &mut tensors)?;
    if tensors.is_empty() {
        return Err("`G_ema` holds no tensors".to_owned());
    }
    let kwargs = match field(p, module.state, "_init_kwargs")? {
        Some(id) => json(p, id, 0)?,
        None => Value::Object(Map::new()),
    };
    let mut settings = Map::new();
    settings.insert("class_name".into(), Value::String(module.class_name));
    settings.insert("source".into(), Value::String(source.to_owned()));
    settings.insert("key".into(), Value::String("G_ema".into()));
    settings.insert("init_kwargs".into(), kwargs);
    if module.stylegan3 {
        settings.insert("stylegan3".into(), Value::Bool(true));
    }
    Ok(Network {
        tensors,
        settings: Value::Object(settings),
    })
}

/// One module of the tree.
struct Module {
    /// Its `__dict__`.
    state: Id,
    /// Its class, as the pickle names it.
    class_name: String,
    /// Its source defines StyleGAN3's `SynthesisInput`.
    stylegan3: bool,
}

/// A module: a persistent object (`_reconstruct_persistent_obj(meta)`) or a plain
/// `torch.nn` module (its class called with no arguments, then `BUILD` with its `__dict__`).
fn module(p: &Pickle, id: Id) -> Result<Module, Refusal> {
    let Node::Call {
        callable,
        args,
        state,
        ..
    } = p.get(id)
    else {
        return Err(format!("a module is {}", kind(p.get(id))));
    };
    let Some((m, n)) = global_of(p, *callable) else {
        return Err("a module is built by something that is not a global".to_owned());
    };
    if (m, n) == ("torch_utils.persistence", "_reconstruct_persistent_obj") {
        let meta = match p.get(*args) {
            Node::Tuple(a) if a.len() == 1 => a[0],
            _ => return Err("a persistent object is not given one `meta` dict".to_owned()),
        };
        let state = field(p, meta, "state")?.ok_or("a persistent object has no `state`")?;
        let class_name = field(p, meta, "class_name")?
            .and_then(|c| str_of(p, c))
            .unwrap_or("?")
            .to_owned();
        let stylegan3 = field(p, meta, "module_src")?
            .and_then(|s| str_of(p, s))
            .is_some_and(|src| src.contains("class SynthesisInput"));
        return Ok(Module {
            state,
            class_name,
            stylegan3,
        });
    }
    match state {
        Some(state) => Ok(Module {
            state: *state,
            class_name: format!("{m}.{n}"),
            stylegan3: false,
        }),
        None => Err(format!(
            "`{m}.{n}` is not a module Studio can read (nothing was run)"
        )),
    }
}

/// `key` of dict `id`.
fn field(p: &Pickle, id: Id, key: &str) -> Result<Option<Id>, Refusal> {
    let items =
        entries(p, id)?.ok_or_else(|| format!("expected a dict, found {}", kind(p.get(id))))?;
    Ok(items
        .iter()
        .find(|&&(k, _)| str_of(p, k) == Some(key))
        .map(|&(_, v)| v))
}

/// The state dict of the module whose `__dict__` is `state`: its parameters, its persistent
/// buffers, then its children's, as `Module.state_dict()` orders them.
fn walk(
    p: &Pickle,
    state: Id,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
) -> Result<(), Refusal> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "the module tree nests deeper than {MAX_DEPTH} levels"
        ));
    }
    let name = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    let skipped: Vec<String> = match field(p, state, "_non_persistent_buffers_set")? {
        Some(set) => strings(p, set),
        None => Vec::new(),
    };
    for group in ["_parameters", "_buffers"] {
        let Some(dict) = field(p, state, group)? else {
            continue;
        };
        for (k, v) in entries(p, dict)?.unwrap_or_default() {
            let Some(key) = key_of(p, k) else { continue };
            if matches!(p.get(v), Node::None) || skipped.contains(&key) {
                continue;
            }
            let tensor = torch::tensor(p, v, depth)?.ok_or_else(|| {
                format!(
                    "`{}` is {}, not a tensor",
                    name(&key),
                    torch::describe(p, v)
                )
            })?;
            out.push((name(&key), tensor));
        }
    }
    if let Some(children) = field(p, state, "_modules")? {
        for (k, v) in entries(p, children)?.unwrap_or_default() {
            let Some(key) = key_of(p, k) else { continue };
            if matches!(p.get(v), Node::None) {
                continue;
            }
            let child = module(p, v).map_err(|e| format!("`{}`: {e}", name(&key)))?;
            walk(p, child.state, &name(&key), depth + 1, out)?;
        }
    }
    Ok(())
}

/// The strings of a set (a list, or `builtins.set([…])`).
fn strings(p: &Pickle, id: Id) -> Vec<String> {
    let items = match p.get(id) {
        Node::List(items) | Node::Tuple(items) => items.clone(),
        Node::Call { args, appends, .. } => {
            let mut all = appends.clone();
            if let Node::Tuple(a) = p.get(*args)
                && let Some(&first) = a.first()
                && let Node::List(items) = p.get(first)
            {
                all.extend(items);
            }
            all
        }
        _ => Vec::new(),
    };
    items.iter().filter_map(|&i| key_of(p, i)).collect()
}

/// A settings value as JSON: dicts (also `EasyDict`), lists, tuples, numbers, strings,
/// booleans and `None`. Anything else (an object) becomes its description as a string, as
/// the converter's `str(value)` does.
fn json(p: &Pickle, id: Id, depth: usize) -> Result<Value, Refusal> {
    if depth > MAX_DEPTH {
        return Err("the init kwargs nest too deeply".to_owned());
    }
    if let Some(items) = entries(p, id)? {
        let mut map = Map::new();
        for (k, v) in items {
            if let Some(key) = key_of(p, k) {
                map.insert(key, json(p, v, depth + 1)?);
            }
        }
        return Ok(Value::Object(map));
    }
    Ok(match p.get(id) {
        Node::None => Value::Null,
        Node::Bool(b) => Value::Bool(*b),
        Node::Int(i) => Value::from(*i),
        Node::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Node::Str(s) => Value::String(s.clone()),
        Node::Tuple(items) | Node::List(items) => Value::Array(
            items
                .iter()
                .map(|&i| json(p, i, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        _ => Value::String(torch::describe(p, id).replace('`', "")),
    })
}
