//! Studio's pickle reader on checkpoints written by `torch.save` and on hostile pickles
//! (`tools/make_pickle_fixtures.py`). Every hostile file would, if Python's pickle loaded it,
//! create `/tmp/studio-pickle-canary-<name>`: each is refused or read as inert data, and the
//! canary never appears.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use studio_inference::pickle::{PickledTensor, read_checkpoint, write_safetensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pickles")
        .join(name)
}

/// The tensors equal their safetensors twin's, name for name and byte for byte.
fn assert_matches_twin(tensors: &[PickledTensor], twin: &Path) {
    let bytes = std::fs::read(twin).expect("twin");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = st.names();
    want.sort_unstable();
    assert_eq!(names, want);
    for t in tensors {
        let v = st.tensor(&t.name).expect("tensor");
        assert_eq!(
            format!("{:?}", v.dtype()),
            t.dtype.safetensors_name(),
            "{}",
            t.name
        );
        assert_eq!(v.shape(), t.shape.as_slice(), "{}", t.name);
        assert_eq!(v.data(), t.data.as_slice(), "{}", t.name);
    }
}

#[test]
fn torch_save_checkpoints_read_value_for_value() {
    let sd = read_checkpoint(&fixture("state_dict.pth")).expect("state_dict.pth");
    assert_matches_twin(&sd, &fixture("state_dict.safetensors"));
    // Views: transposed, shared storage at offsets, 0-d, empty.
    let get = |n: &str| sd.iter().find(|t| t.name == n).expect(n);
    assert_eq!(get("transposed").shape, vec![4, 6]);
    assert_eq!(get("scalar").shape, Vec::<usize>::new());
    assert!(get("empty").data.is_empty());
    assert_eq!(get("view_b").data[..4], 5f32.to_le_bytes());
    // An SD / Lightning checkpoint: the tensors under `state_dict`, the rest left out.
    let ckpt = read_checkpoint(&fixture("sd_like.ckpt")).expect("sd_like.ckpt");
    assert_matches_twin(&ckpt, &fixture("sd_like.safetensors"));
}

#[test]
fn convert_writes_a_safetensors_file_with_the_same_tensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out.safetensors");
    let tensors = read_checkpoint(&fixture("state_dict.pth")).expect("read");
    write_safetensors(tensors.iter().map(PickledTensor::as_data), &out).expect("write");
    assert_matches_twin(&tensors, &out);
    assert_matches_twin(&tensors, &fixture("state_dict.safetensors"));
}

#[test]
fn hostile_pickles_are_refused_and_nothing_runs() {
    for (name, canary, expect) in [
        ("hostile_reduce.pth", "reduce", "posix.system"),
        ("hostile_inst.pth", "inst", "posix.system"),
        ("hostile_obj.pth", "obj", "posix.system"),
        ("hostile_eval.pth", "eval", "builtins.eval"),
        ("hostile_build.pth", "build", "BUILD"),
        ("hostile_memo.pth", "memo", "never stored"),
        ("hostile_recursive.pth", "recursive", "deeper"),
        ("hostile_storage.pth", "storage", "storage of 4"),
        ("hostile_compressed.pth", "compressed", "compressed"),
    ] {
        let canary = PathBuf::from(format!("/tmp/studio-pickle-canary-{canary}"));
        let _ = std::fs::remove_file(&canary);
        let Err(e) = read_checkpoint(&fixture(name)) else {
            panic!("{name} must be refused");
        };
        let text = e.to_string();
        assert!(text.contains(expect), "{name}: {text}");
        assert!(
            !canary.exists(),
            "{name} ran code: {} exists",
            canary.display()
        );
    }
}

/// PyTorch's pre-1.6 format: pickles in a row, then the raw storages.
#[test]
fn the_legacy_format_reads_value_for_value() {
    let legacy = read_checkpoint(&fixture("legacy.pth")).expect("legacy.pth");
    assert_matches_twin(&legacy, &fixture("legacy.safetensors"));
}

#[test]
fn truncated_and_foreign_files_get_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    for name in ["state_dict.pth", "legacy.pth"] {
        let whole = std::fs::read(fixture(name)).expect("read");
        for cut in [10, whole.len() / 2, whole.len() - 30] {
            let path = tmp.path().join("cut.pth");
            std::fs::write(&path, &whole[..cut]).expect("write");
            assert!(read_checkpoint(&path).is_err(), "{name} cut at {cut}");
        }
    }
    let path = tmp.path().join("plain.pkl");
    std::fs::write(&path, b"\x80\x02}q\x00.").expect("write");
    let e = read_checkpoint(&path).expect_err("a bare pickle");
    assert!(e.to_string().contains("not a PyTorch checkpoint"), "{e}");
    let path = tmp.path().join("notes.ckpt");
    std::fs::write(&path, "just some text, not a checkpoint").expect("write");
    let e = read_checkpoint(&path).expect_err("text");
    assert!(e.to_string().contains("not a PyTorch checkpoint"), "{e}");
    // A zip archive of something else.
    let path = tmp.path().join("photos.ckpt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create"));
    zip.start_file("photo.txt", zip::write::SimpleFileOptions::default())
        .expect("entry");
    std::io::Write::write_all(&mut zip, b"not a tensor").expect("write");
    zip.finish().expect("finish");
    let e = read_checkpoint(&path).expect_err("a zip of something else");
    assert!(e.to_string().contains("no data.pkl"), "{e}");
}

/// The zip format's contiguous tensors are slices of the mapped file (nothing is read into
/// memory before the model copies it); views that are not contiguous are gathered.
#[test]
fn zip_checkpoints_are_read_in_place() {
    use studio_inference::pickle::PickleTensors;
    let t = PickleTensors::open(&[fixture("state_dict.pth")]).expect("open");
    let mapped: Vec<bool> = t
        .iter()
        .filter(|x| !x.data.is_empty())
        .map(|x| x.mapped)
        .collect();
    assert!(
        mapped.iter().any(|&m| m),
        "some tensors are slices of the file"
    );
    assert!(
        mapped.iter().any(|&m| !m),
        "the transposed view is gathered"
    );
    let legacy = PickleTensors::open(&[fixture("legacy.pth")]).expect("legacy");
    assert!(legacy.iter().all(|x| !x.mapped));
}

/// NVIDIA's network pickle (`tools/make_nvidia_pkl_fixtures.py`) gives `G_ema`'s state dict,
/// value for value the safetensors the converter writes, and its init kwargs as the
/// converter's JSON has them; the source code it carries never runs.
#[test]
fn an_nvidia_network_pickle_reads_as_its_conversion() {
    let canary = Path::new("/tmp/studio-pickle-canary-nvidia");
    let _ = std::fs::remove_file(canary);
    let sg2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stylegan2");
    let tensors = read_checkpoint(&sg2.join("skip.pkl")).expect("skip.pkl");
    assert_matches_twin(&tensors, &sg2.join("skip.safetensors"));
    let t = studio_inference::pickle::PickleTensors::open(&[sg2.join("skip.pkl")]).expect("open");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sg2.join("skip.json")).expect("json"))
            .expect("parse");
    let settings = t.settings().expect("settings");
    assert_eq!(settings["init_kwargs"], json["init_kwargs"]);
    assert_eq!(settings["key"], "G_ema");

    // Converting writes the tensors and the settings beside them.
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("skip.safetensors");
    let done = studio_inference::pickle::convert(&sg2.join("skip.pkl"), &out).expect("convert");
    assert!(done.settings);
    assert_eq!(done.tensors, tensors.len());
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("skip.json")).expect("json written"),
    )
    .expect("parse");
    assert_eq!(written["init_kwargs"], json["init_kwargs"]);
    assert!(!canary.exists(), "the pickle's code ran");
}

/// A transformers folder whose weights are `pytorch_model.bin` (one file, or shards with
/// `pytorch_model.bin.index.json`) loads in safe mode and gives the logits the safetensors
/// folder gives.
#[test]
fn pytorch_model_bin_folders_load_as_their_safetensors() {
    use candle_core::Device;
    use studio_inference::llm::loader;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let tmp = tempfile::tempdir().expect("tmp");
    let make = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::copy(
            fixtures.join("gpt2-tiny/config.json"),
            dir.join("config.json"),
        )
        .expect("config");
        studio_tests::write_word_level_tokenizer(&dir, 97);
        dir
    };
    let reference = make("safetensors");
    std::fs::copy(
        fixtures.join("gpt2-tiny/model.safetensors"),
        reference.join("model.safetensors"),
    )
    .expect("weights");
    let single = make("bin");
    std::fs::copy(
        fixture("gpt2_pytorch_model.bin"),
        single.join("pytorch_model.bin"),
    )
    .expect("weights");
    let sharded = make("shards");
    let all =
        candle_core::safetensors::load(fixtures.join("gpt2-tiny/model.safetensors"), &Device::Cpu)
            .expect("load");
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, half) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("pytorch_model-0000{}-of-00002.bin", i + 1);
        let part: std::collections::HashMap<String, candle_core::Tensor> = half
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        studio_tests::torch_writer::save_torch(&part, false, &sharded.join(&file));
        for n in half {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    std::fs::write(
        sharded.join("pytorch_model.bin.index.json"),
        serde_json::json!({ "weight_map": weight_map }).to_string(),
    )
    .expect("index");

    let logits = |dir: &Path| {
        let mut m = loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("load");
        let safe = m.info.notes.iter().any(|n| n.contains("safe mode"));
        let l = m
            .model
            .forward_last(&[1, 5, 9, 2], 0)
            .expect("forward")
            .to_vec1::<f32>()
            .expect("vec");
        (l, safe)
    };
    let (want, safe) = logits(&reference);
    assert!(!safe);
    for dir in [&single, &sharded] {
        let (got, safe) = logits(dir);
        assert!(safe, "{} says it was read in safe mode", dir.display());
        assert_eq!(got, want, "{}", dir.display());
    }
}
