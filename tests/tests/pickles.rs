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
    write_safetensors(&tensors, &out).expect("write");
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
}
