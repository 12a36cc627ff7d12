//! Bad model files give clear errors, never a crash and never an unpickle.

use std::path::Path;

use candle_core::Device;
use studio_inference::llm::loader::{self, Architecture};
use studio_tests::{Gpt2Naming, TinyGpt2, write_gpt2};

fn load_err(path: &Path) -> String {
    match loader::load(path, &Device::Cpu, &mut |_, _| {}) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn tiny(dir: &Path) {
    write_gpt2(dir, TinyGpt2::default(), Gpt2Naming::Hub, 1);
}

#[test]
fn every_naming_style_loads_through_the_real_loader() {
    for naming in [
        Gpt2Naming::Hub,
        Gpt2Naming::SavePretrained { lm_head: true },
        Gpt2Naming::SavePretrained { lm_head: false },
    ] {
        let tmp = tempfile::tempdir().expect("tmp");
        write_gpt2(tmp.path(), TinyGpt2::default(), naming, 3);
        let mut fractions = Vec::new();
        let m =
            loader::load(tmp.path(), &Device::Cpu, &mut |f, _| fractions.push(f)).expect("loads");
        assert_eq!(m.info.architecture, Architecture::Gpt2);
        assert_eq!(m.info.context_length, 128);
        assert!(!m.eos_token_ids.is_empty());
        assert_eq!(fractions.last().copied(), Some(1.0));
        // Also via the weights file itself.
        loader::load(
            &tmp.path().join("model.safetensors"),
            &Device::Cpu,
            &mut |_, _| {},
        )
        .expect("loads from the file path");
    }
}

#[test]
fn missing_path_says_so() {
    let e = load_err(Path::new("/nonexistent/studio/model"));
    assert!(e.contains("no such file"), "{e}");
}

#[test]
fn truncated_and_corrupt_weights_are_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    tiny(tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = load_err(tmp.path());
    assert!(e.contains("corrupt or truncated"), "{e}");

    std::fs::write(&weights, b"not a safetensors file at all").expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("corrupt or truncated"), "{e}");

    std::fs::write(&weights, b"").expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn missing_and_mismatched_tensors_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    tiny(tmp.path());
    // A config that asks for more layers than the file has.
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg["n_layer"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("missing tensor `h.2.ln_1.weight`"), "{e}");

    cfg["n_layer"] = 2.into();
    cfg["n_embd"] = 64.into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("wte.weight") && e.contains("shape"), "{e}");
}

#[test]
fn bad_config_and_unsupported_architecture() {
    let tmp = tempfile::tempdir().expect("tmp");
    tiny(tmp.path());
    let cfg_path = tmp.path().join("config.json");
    std::fs::write(&cfg_path, "{ this is not json").expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("config.json does not parse"), "{e}");

    std::fs::write(
        &cfg_path,
        r#"{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}"#,
    )
    .expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("unsupported model architecture `mamba`"), "{e}");

    std::fs::write(
        &cfg_path,
        r#"{"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 1, "vocab_size": 320}"#,
    )
    .expect("write");
    let e = load_err(tmp.path());
    assert!(e.contains("multiple of n_head"), "{e}");
}

/// Pickles are read as data: a hostile one is refused naming the global it calls (never
/// run), a broken one is a clear error.
#[test]
fn hostile_and_broken_pickles_are_refused_and_nothing_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let canary = Path::new("/tmp/studio-pickle-canary-reduce");
    let _ = std::fs::remove_file(canary);
    let dir = tmp.path().join("old-model");
    std::fs::create_dir(&dir).expect("dir");
    std::fs::copy(
        fixtures.join("gpt2-tiny/config.json"),
        dir.join("config.json"),
    )
    .expect("cfg");
    studio_tests::write_word_level_tokenizer(&dir, 97);
    std::fs::copy(
        fixtures.join("pickles/hostile_reduce.pth"),
        dir.join("pytorch_model.bin"),
    )
    .expect("copy");
    let e = load_err(&dir);
    assert!(
        e.contains("posix.system") && e.contains("nothing was run"),
        "{e}"
    );
    assert!(!canary.exists(), "the pickle ran");
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x04cos\nsystem\n").expect("write");
    let e = load_err(&dir);
    assert!(e.contains("pytorch_model.bin"), "{e}");
    std::fs::write(dir.join("pytorch_model.bin"), b"text, not a pickle").expect("write");
    let e = load_err(&dir);
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
}

#[test]
fn empty_folder_and_missing_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let e = load_err(tmp.path());
    assert!(e.contains("no model found"), "{e}");
    tiny(tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).expect("rm");
    let e = load_err(tmp.path());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn hugging_face_cache_layout_is_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snapshot = tmp
        .path()
        .join("models--openai-community--gpt2/snapshots/abc123");
    tiny(&snapshot);
    let other = tmp.path().join("models--state-spaces--mamba/snapshots/def");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("config.json"), r#"{"model_type": "mamba"}"#).expect("w");
    std::fs::write(other.join("model.safetensors"), b"").expect("w");
    let found = studio_inference::llm::hf_cache::scan(tmp.path());
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].repo, "openai-community/gpt2");
    assert_eq!(found[0].support.as_deref(), Ok("GPT-2"));
    assert_eq!(found[0].path, snapshot);
    assert!(found[1].support.is_err());
    // The repo folder itself loads (newest snapshot).
    let m = loader::load(
        &tmp.path().join("models--openai-community--gpt2"),
        &Device::Cpu,
        &mut |_, _| {},
    )
    .expect("loads");
    assert_eq!(m.info.name, "openai-community/gpt2");
}

/// Absurd sizes and scalars in `config.json` (the issue's SIGABRT, capacity-overflow and
/// divide-by-zero cases) are refused with the field named, before anything is allocated.
#[test]
fn absurd_config_values_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().expect("tmp");
    tiny(tmp.path());
    let cfg_path = tmp.path().join("config.json");
    for (key, value) in [
        ("n_layer", serde_json::json!(1_000_000_000_000_u64)),
        ("n_layer", serde_json::json!(1_u64 << 62)),
        ("n_positions", serde_json::json!(1_000_000_000_000_u64)),
        ("layer_norm_epsilon", serde_json::json!(-1.0)),
    ] {
        let mut cfg = serde_json::json!({
            "model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1,
            "vocab_size": 320, "n_positions": 64
        });
        cfg[key] = value;
        std::fs::write(&cfg_path, cfg.to_string()).expect("write");
        let e = load_err(tmp.path());
        assert!(e.contains(key), "{key}: {e}");
    }

    let dir = tmp.path().join("family");
    for family in ["llama", "mistral", "qwen2"] {
        studio_tests::families::write_family(&dir, family, 3);
        let cfg_path = dir.join("config.json");
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
        for (key, value, expect) in [
            (
                "num_hidden_layers",
                serde_json::json!(1_000_000_000_000_u64),
                "num_hidden_layers",
            ),
            (
                "max_position_embeddings",
                serde_json::json!(1_000_000_000_000_u64),
                "max_position_embeddings",
            ),
            (
                "num_attention_heads",
                serde_json::json!(0),
                "num_attention_heads",
            ),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "num_key_value_heads",
            ),
            ("rope_theta", serde_json::json!(-1.0), "rope_theta"),
            ("rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps"),
        ] {
            let mut cfg = base.clone();
            cfg[key] = value;
            std::fs::write(&cfg_path, cfg.to_string()).expect("write");
            let e = load_err(&dir);
            assert!(e.contains(expect), "{family} {key}: {e}");
        }
        // More layers than the files hold (within the bounds): refused with both counts.
        let mut cfg = base.clone();
        let layers = base["num_hidden_layers"].as_u64().expect("layers");
        cfg["num_hidden_layers"] = serde_json::json!(layers + 500);
        std::fs::write(&cfg_path, cfg.to_string()).expect("write");
        let e = load_err(&dir);
        assert!(
            e.contains(&format!("{layers} layers")) && e.contains(&(layers + 500).to_string()),
            "{family}: {e}"
        );
    }
}

/// A shard index naming files outside the model folder, or anything but a safetensors file,
/// is refused before anything is opened.
#[test]
fn shard_index_paths_outside_the_folder_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    tiny(&dir);
    std::fs::rename(
        dir.join("model.safetensors"),
        dir.join("model-1.safetensors"),
    )
    .expect("mv");
    // A real file outside the folder, which must never be opened.
    std::fs::write(tmp.path().join("secret.safetensors"), b"x").expect("write");
    let index = dir.join("model.safetensors.index.json");
    for name in [
        "../secret.safetensors",
        "/etc/passwd",
        "sub/model-1.safetensors",
        "pytorch_model.bin",
        "model-1.gguf",
    ] {
        let text = serde_json::json!({ "weight_map": { "wte.weight": name } }).to_string();
        std::fs::write(&index, text).expect("write");
        let e = load_err(&dir);
        assert!(e.contains("refused") && e.contains(name), "{name}: {e}");
    }
    let text = serde_json::json!({ "weight_map": { "wte.weight": "model-1.safetensors" } });
    std::fs::write(&index, text.to_string()).expect("write");
    loader::load(&dir, &Device::Cpu, &mut |_, _| {}).expect("a plain shard name loads");
}

/// A model bigger than the machine's memory is refused with the estimate before its weights are
/// read: a GGUF whose file (sparse, so it takes no disk) is 8 TiB, and a folder whose weights
/// hold an 8 TiB tensor beside the real ones.
#[test]
fn a_model_larger_than_the_machines_memory_is_refused_with_the_estimate() {
    use studio_tests::gguf_writer::{GgufOptions, write_family_gguf};
    const HUGE: u64 = 8 << 40;
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = write_family_gguf(tmp.path(), "llama", 1, &GgufOptions::default());
    loader::prepare(&gguf, &Device::Cpu).expect("the real file is fine");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&gguf)
        .expect("open");
    if file.set_len(HUGE).is_err() {
        eprintln!("skipped: this filesystem has no 8 TiB sparse files");
        return;
    }
    drop(file);
    let e = load_err(&gguf);
    assert!(
        e.contains("GiB of memory") && e.contains("this machine has"),
        "{e}"
    );
    assert!(e.contains("9011.2 GiB"), "names the estimate: {e}");

    // The folder: the tiny model's tensors plus a huge one, in a sparse safetensors file.
    let dir = tmp.path().join("folder");
    std::fs::create_dir_all(&dir).expect("dir");
    studio_tests::families::write_family(&dir, "llama", 1);
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let data = &bytes[8 + header_len..];
    let side = 1u64 << 20; // 2^20 x 2^20 f32 = 4 TiB
    header["extra.weight"] = serde_json::json!({
        "dtype": "F32",
        "shape": [side, side],
        "data_offsets": [data.len() as u64, data.len() as u64 + side * side * 4],
    });
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(&weights, &out).expect("write");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .expect("open");
    file.set_len(out.len() as u64 + side * side * 4)
        .expect("sparse");
    drop(file);
    let e = load_err(&dir);
    assert!(
        e.contains("parameters as F32") && e.contains("this machine has"),
        "{e}"
    );
}

/// Found by the `config` fuzz target: Gemma 3's loader divides by `sliding_window_pattern`,
/// and Llama's unwraps a mis-shaped tensor. Both give a clear error (the first from the config
/// check, the second from the loader's panic guard), and loading never aborts.
#[test]
fn config_values_that_made_candle_panic_give_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let rewrite = |dir: &Path, key: &str, value: serde_json::Value| {
        let path = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).expect("write");
    };
    let gemma = tmp.path().join("gemma3");
    studio_tests::families::write_family(&gemma, "gemma3_text", 1);
    rewrite(&gemma, "sliding_window_pattern", serde_json::json!(0));
    let e = load_err(&gemma);
    assert!(e.contains("sliding_window_pattern"), "{e}");

    let llama = tmp.path().join("llama");
    studio_tests::families::write_family(&llama, "llama", 1);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama.join("config.json")).expect("read"))
            .expect("json");
    // As many KV heads as query heads: the files' k_proj is half the shape this asks for.
    rewrite(
        &llama,
        "num_key_value_heads",
        cfg["num_attention_heads"].clone(),
    );
    let e = load_err(&llama);
    assert!(e.contains("k_proj") && e.contains("shape"), "{e}");
}
