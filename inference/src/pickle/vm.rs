//! Python's pickle format read as data. The opcodes (protocols 0 to 5, less out-of-band
//! buffers and the extension registry) build an object graph in an arena; nothing is ever
//! called. A `GLOBAL` is only a name, and `REDUCE`, `BUILD`, `NEWOBJ`, `INST` and `OBJ` make
//! inert [`Node::Call`] nodes holding the callable's name and its arguments: what they mean
//! is decided later, from an allowlist ([`super::torch`]).
//!
//! Everything is bounded before use: lengths against the bytes left, memo indices against
//! [`MAX_MEMO`], the arena against [`MAX_NODES`], and walks of the graph (which a memo can
//! make cyclic) against a depth.

use std::collections::HashMap;

/// Index of a node in the arena.
pub type Id = usize;

/// Most nodes one pickle may build (a large checkpoint's `data.pkl` has a few hundred
/// thousand).
pub const MAX_NODES: usize = 1 << 24;
/// Largest memo index accepted (memo slots are only created by `PUT`s, so a larger index is
/// a corrupt or hostile file).
pub const MAX_MEMO: u64 = 1 << 24;

/// A value the pickle built.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Python's `None`.
    None,
    /// A `bool`.
    Bool(bool),
    /// An `int` that fits 64 bits.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// A `tuple`.
    Tuple(Vec<Id>),
    /// A `list` (or a `set` / `frozenset`, kept in order).
    List(Vec<Id>),
    /// A `dict`, items in order.
    Dict(Vec<(Id, Id)>),
    /// A global's name (`module.name`); never imported.
    Global {
        /// The module, such as `torch._utils`.
        module: String,
        /// The name in it, such as `_rebuild_tensor_v2`.
        name: String,
    },
    /// A call the pickle asked for (never made), with what was applied to its result.
    Call {
        /// The callable (a [`Node::Global`] when well formed).
        callable: Id,
        /// Its argument tuple.
        args: Id,
        /// Items set on the result (`SETITEM(S)`, as on an `OrderedDict`).
        items: Vec<(Id, Id)>,
        /// Items appended to the result (`APPEND(S)`).
        appends: Vec<Id>,
        /// The `BUILD` state, if any.
        state: Option<Id>,
    },
    /// A persistent id (`PERSID`/`BINPERSID`): a reference to data outside the pickle, such
    /// as a PyTorch storage.
    Persistent(Id),
}

/// Why a pickle could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError(pub String);

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, PickleError>;

fn err<T>(message: impl Into<String>) -> Result<T> {
    Err(PickleError(message.into()))
}

/// A stack entry: a node, or a `MARK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Node(Id),
    Mark,
}

/// The graph a pickle built and its root.
#[derive(Debug)]
pub struct Pickle {
    /// Every node; ids index it.
    pub nodes: Vec<Node>,
    /// What `STOP` returned.
    pub root: Id,
}

impl Pickle {
    /// The node `id`.
    pub fn get(&self, id: Id) -> &Node {
        &self.nodes[id]
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return err(format!(
                "the pickle ends inside an opcode's argument (at byte {} of {})",
                self.pos,
                self.data.len()
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length, checked against the bytes left.
    fn len(&mut self, n: u64) -> Result<usize> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return err(format!(
                "an argument of {n} bytes is longer than the {left} bytes left"
            ));
        }
        Ok(n as usize)
    }

    /// A text line (protocol 0 arguments), without its newline.
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return err("the pickle ends inside a text argument");
        };
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end])
            .map_err(|_| PickleError("a text argument is not UTF-8".into()))
    }
}

/// Reads one pickle (up to its `STOP`) from `data`.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    parse_prefix(data).map(|(p, _)| p)
}

/// Reads the pickle at the start of `data` and says how many bytes it took (PyTorch's legacy
/// format writes several pickles one after another, then raw storage bytes).
pub fn parse_prefix(data: &[u8]) -> Result<(Pickle, usize)> {
    let mut vm = Vm {
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let mut r = Reader { data, pos: 0 };
    loop {
        let op = r.byte()?;
        if let Some(root) = vm.step(op, &mut r)? {
            return Ok((
                Pickle {
                    nodes: vm.nodes,
                    root,
                },
                r.pos,
            ));
        }
    }
}

struct Vm {
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u64, Id>,
}

impl Vm {
    fn push(&mut self, node: Node) -> Result<()> {
        if self.nodes.len() >= MAX_NODES {
            return err(format!("the pickle builds more than {MAX_NODES} objects"));
        }
        self.nodes.push(node);
        self.stack.push(Slot::Node(self.nodes.len() - 1));
        Ok(())
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Slot::Node(id)) => Ok(id),
            Some(Slot::Mark) => err("a MARK where an object was expected"),
            None => err("the pickle pops an empty stack"),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Slot::Node(id)) => Ok(*id),
            Some(Slot::Mark) => err("a MARK where an object was expected"),
            None => err("the pickle reads an empty stack"),
        }
    }

    /// The objects above the topmost `MARK`, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(at) = self.stack.iter().rposition(|s| *s == Slot::Mark) else {
            return err("the pickle has no MARK to pop to");
        };
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        items
            .into_iter()
            .map(|s| match s {
                Slot::Node(id) => Ok(id),
                Slot::Mark => err("nested MARK"),
            })
            .collect()
    }

    fn put(&mut self, key: u64) -> Result<()> {
        if key > MAX_MEMO {
            return err(format!("memo index {key} is out of range"));
        }
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn get(&mut self, key: u64) -> Result<()> {
        let Some(&id) = self.memo.get(&key) else {
            return err(format!("memo index {key} was never stored"));
        };
        self.stack.push(Slot::Node(id));
        Ok(())
    }

    fn append(&mut self, target: Id, items: Vec<Id>) -> Result<()> {
        match &mut self.nodes[target] {
            Node::List(list) => list.extend(items),
            Node::Call { appends, .. } => appends.extend(items),
            other => return err(format!("APPEND on {}", kind(other))),
        }
        Ok(())
    }

    fn set_items(&mut self, target: Id, flat: &[Id]) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            return err("SETITEMS with an odd number of objects");
        }
        let pairs = flat.chunks(2).map(|p| (p[0], p[1]));
        match &mut self.nodes[target] {
            Node::Dict(d) => d.extend(pairs),
            Node::Call { items, .. } => items.extend(pairs),
            other => return err(format!("SETITEM on {}", kind(other))),
        }
        Ok(())
    }

    fn call(&mut self, callable: Id, args: Id) -> Result<()> {
        self.push(Node::Call {
            callable,
            args,
            items: Vec::new(),
            appends: Vec::new(),
            state: None,
        })
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        self.push(Node::Global {
            module: module.to_owned(),
            name: name.to_owned(),
        })
    }

    fn int_from_le(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > 8 {
            return err(format!("an integer of {} bytes is too large", bytes.len()));
        }
        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let mut a = [if negative { 0xff } else { 0 }; 8];
        a[..bytes.len()].copy_from_slice(bytes);
        self.push(Node::Int(i64::from_le_bytes(a)))
    }

    fn str_node(&mut self, b: &[u8]) -> Result<()> {
        let s = std::str::from_utf8(b).map_err(|_| PickleError("a string is not UTF-8".into()))?;
        self.push(Node::Str(s.to_owned()))
    }

    /// Runs one opcode; `Some(root)` at `STOP`.
    #[allow(clippy::too_many_lines)] // one arm per opcode
    fn step(&mut self, op: u8, r: &mut Reader<'_>) -> Result<Option<Id>> {
        match op {
            0x80 => {
                let proto = r.byte()?;
                if proto > 5 {
                    return err(format!("pickle protocol {proto} is not supported (0 to 5)"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: a size hint
            }
            b'.' => return Ok(Some(self.pop()?)),
            b'(' => self.stack.push(Slot::Mark),
            b'0' => {
                self.stack.pop();
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let id = self.top()?;
                self.stack.push(Slot::Node(id));
            }
            b'N' => self.push(Node::None)?,
            0x88 => self.push(Node::Bool(true))?,
            0x89 => self.push(Node::Bool(false))?,
            b'J' => {
                let v = r.u32()? as i32;
                self.push(Node::Int(i64::from(v)))?;
            }
            b'K' => {
                let v = r.byte()?;
                self.push(Node::Int(i64::from(v)))?;
            }
            b'M' => {
                let v = r.u16()?;
                self.push(Node::Int(i64::from(v)))?;
            }
            0x8a => {
                let n = usize::from(r.byte()?);
                let b = r.take(n)?;
                self.int_from_le(b)?;
            }
            0x8b => {
                let n = u64::from(r.u32()?);
                let n = r.len(n)?;
                let b = r.take(n)?;
                self.int_from_le(b)?;
            }
            b'I' | b'L' => {
                let text = r.line()?.trim_end_matches('L');
                let node = match text {
                    "00" => Node::Bool(false),
                    "01" => Node::Bool(true),
                    t => Node::Int(
                        t.parse()
                            .map_err(|_| PickleError(format!("`{t}` is not a 64-bit integer")))?,
                    ),
                };
                self.push(node)?;
            }
            b'G' => {
                let b = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.push(Node::Float(f64::from_be_bytes(a)))?;
            }
            b'F' => {
                let t = r.line()?;
                let v = t
                    .parse()
                    .map_err(|_| PickleError(format!("`{t}` is not a float")))?;
                self.push(Node::Float(v))?;
            }
            b'X' => {
                let n = u64::from(r.u32()?);
                let n = r.len(n)?;
                let b = r.take(n)?;
                self.str_node(b)?;
            }
            0x8c => {
                let n = usize::from(r.byte()?);
                let b = r.take(n)?;
                self.str_node(b)?;
            }
            0x8d => {
                let n = r.u64()?;
                let n = r.len(n)?;
                let b = r.take(n)?;
                self.str_node(b)?;
            }
            b'V' => {
                let t = r.line()?.to_owned();
                self.push(Node::Str(t))?;
            }
            b'U' | b'C' => {
                let n = usize::from(r.byte()?);
                let b = r.take(n)?.to_vec();
                self.push(if op == b'U' {
                    Node::Str(String::from_utf8_lossy(&b).into_owned())
                } else {
                    Node::Bytes(b)
                })?;
            }
            b'T' | b'B' => {
                let n = u64::from(r.u32()?);
                let n = r.len(n)?;
                let b = r.take(n)?.to_vec();
                self.push(if op == b'T' {
                    Node::Str(String::from_utf8_lossy(&b).into_owned())
                } else {
                    Node::Bytes(b)
                })?;
            }
            0x8e | 0x96 => {
                let n = r.u64()?;
                let n = r.len(n)?;
                let b = r.take(n)?.to_vec();
                self.push(Node::Bytes(b))?;
            }
            b'S' => {
                let t = r.line()?;
                let t = t.trim_matches(|c| c == '\'' || c == '"').to_owned();
                self.push(Node::Str(t))?;
            }
            b')' => self.push(Node::Tuple(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Node::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Node::Tuple(items))?;
            }
            b']' | 0x8f => self.push(Node::List(Vec::new()))?,
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))?;
            }
            b'a' => {
                let item = self.pop()?;
                let list = self.top()?;
                self.append(list, vec![item])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                let list = self.top()?;
                self.append(list, items)?;
            }
            b'}' => self.push(Node::Dict(Vec::new()))?,
            b'd' => {
                let flat = self.pop_mark()?;
                self.push(Node::Dict(Vec::new()))?;
                let d = self.top()?;
                self.set_items(d, &flat)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                self.set_items(d, &[k, v])?;
            }
            b'u' => {
                let flat = self.pop_mark()?;
                let d = self.top()?;
                self.set_items(d, &flat)?;
            }
            b'q' => {
                let k = u64::from(r.byte()?);
                self.put(k)?;
            }
            b'r' => {
                let k = u64::from(r.u32()?);
                self.put(k)?;
            }
            b'p' => {
                let t = r.line()?;
                let k = t
                    .parse()
                    .map_err(|_| PickleError(format!("`{t}` is not a memo index")))?;
                self.put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.put(k)?;
            }
            b'h' => {
                let k = u64::from(r.byte()?);
                self.get(k)?;
            }
            b'j' => {
                let k = u64::from(r.u32()?);
                self.get(k)?;
            }
            b'g' => {
                let t = r.line()?;
                let k = t
                    .parse()
                    .map_err(|_| PickleError(format!("`{t}` is not a memo index")))?;
                self.get(k)?;
            }
            b'c' => {
                let module = r.line()?.to_owned();
                let name = r.line()?.to_owned();
                self.global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (&self.nodes[module], &self.nodes[name]) {
                    (Node::Str(m), Node::Str(n)) => {
                        let (m, n) = (m.clone(), n.clone());
                        self.global(&m, &n)?;
                    }
                    _ => return err("STACK_GLOBAL with a module or name that is not a string"),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            b'i' => {
                let module = r.line()?.to_owned();
                let name = r.line()?.to_owned();
                let items = self.pop_mark()?;
                self.global(&module, &name)?;
                let callable = self.pop()?;
                self.push(Node::Tuple(items))?;
                let args = self.pop()?;
                self.call(callable, args)?;
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return err("OBJ without a class");
                }
                let callable = items.remove(0);
                self.push(Node::Tuple(items))?;
                let args = self.pop()?;
                self.call(callable, args)?;
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.top()?;
                match &mut self.nodes[obj] {
                    Node::Call { state: s, .. } => *s = Some(state),
                    other => return err(format!("BUILD on {}", kind(other))),
                }
            }
            b'P' => {
                let t = r.line()?.to_owned();
                self.push(Node::Str(t))?;
                let id = self.pop()?;
                self.push(Node::Persistent(id))?;
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Node::Persistent(id))?;
            }
            0x82..=0x84 => return err("the pickle uses the extension registry (EXT1/2/4)"),
            0x97 | 0x98 => return err("the pickle uses out-of-band buffers (protocol 5)"),
            other => return err(format!("unknown pickle opcode 0x{other:02x}")),
        }
        Ok(None)
    }
}

/// What a node is, for messages.
pub fn kind(n: &Node) -> &'static str {
    match n {
        Node::None => "None",
        Node::Bool(_) => "a bool",
        Node::Int(_) => "an int",
        Node::Float(_) => "a float",
        Node::Str(_) => "a string",
        Node::Bytes(_) => "bytes",
        Node::Tuple(_) => "a tuple",
        Node::List(_) => "a list",
        Node::Dict(_) => "a dict",
        Node::Global { .. } => "a global",
        Node::Call { .. } => "an object",
        Node::Persistent(_) => "a persistent id",
    }
}
