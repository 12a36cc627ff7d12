//! Writes tensors as `torch.save` does (PyTorch's zip format: `archive/data.pkl`, a protocol-2
//! pickle of an `OrderedDict` of `torch._utils._rebuild_tensor_v2` calls over persistent
//! storage ids, and one stored `archive/data/<key>` entry per storage), so tests can give the
//! loaders `.ckpt`, `.pth` and `pytorch_model.bin` files of the tiny models they make. Studio's
//! reader is checked against files PyTorch itself wrote (`tests/fixtures/pickles`); this writer
//! only makes inputs.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use candle_core::{DType, Tensor};

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: usize) {
    if let Ok(v) = i32::try_from(v) {
        out.push(b'J');
        out.extend(v.to_le_bytes());
    } else {
        out.extend([0x8a, 8]);
        out.extend((v as u64).to_le_bytes());
    }
}

fn ordered_dict(out: &mut Vec<u8>) {
    out.extend(b"ccollections\nOrderedDict\n)R");
}

fn storage_class(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => panic!("no torch storage for {other:?}"),
    }
}

/// Writes `tensors` (sorted by name) with `torch.save`'s zip format to `out`; with
/// `state_dict`, wrapped as `{"state_dict": …}` as SD and Lightning checkpoints are.
#[allow(clippy::implicit_hasher)] // test helper: callers pass std HashMaps
pub fn save_torch(tensors: &HashMap<String, Tensor>, state_dict: bool, out: &Path) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut pkl = vec![0x80, 2];
    if state_dict {
        pkl.push(b'}');
        unicode(&mut pkl, "state_dict");
    }
    ordered_dict(&mut pkl);
    pkl.push(b'(');
    let mut storages = Vec::new();
    for (key, name) in names.iter().enumerate() {
        let t = tensors[*name].contiguous().expect("contiguous");
        let dims = t.dims().to_vec();
        let mut stride = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * dims[d + 1];
        }
        unicode(&mut pkl, name);
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend(format!("ctorch\n{}\n", storage_class(t.dtype())).as_bytes());
        unicode(&mut pkl, &key.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        pkl.push(b'(');
        for &d in &dims {
            int(&mut pkl, d);
        }
        pkl.push(b't');
        pkl.push(b'(');
        for &s in &stride {
            int(&mut pkl, s);
        }
        pkl.push(b't');
        pkl.push(0x89);
        ordered_dict(&mut pkl);
        pkl.extend(b"tR");
        storages.push(bytes(&t));
    }
    pkl.push(b'u');
    if state_dict {
        pkl.push(b's');
    }
    pkl.push(b'.');
    let file = std::fs::File::create(out).expect("create checkpoint");
    let mut zip = zip::ZipWriter::new(file);
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", stored)
        .expect("data.pkl");
    zip.write_all(&pkl).expect("write data.pkl");
    for (key, data) in storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), stored)
            .expect("storage");
        zip.write_all(data).expect("write storage");
    }
    zip.start_file("archive/version", stored).expect("version");
    zip.write_all(b"3\n").expect("write version");
    zip.finish().expect("finish zip");
}

/// A tensor's elements, little-endian.
fn bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().expect("flatten");
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .expect("f16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .expect("bf16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .expect("f64")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .expect("i64")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>().expect("u8"),
        other => panic!("no torch storage for {other:?}"),
    }
}
