//! `studio train shapes-data` and `shapes-check` as a script would run them: the scenes it
//! writes pass their own check, and an image that does not match its caption fails it.

mod cli_common;
use cli_common::{ok, path, studio};

#[track_caller]
fn assert_files(dir: &std::path::Path, names: &[&str]) {
    for f in names {
        assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
    }
}

#[test]
fn shape_scenes_are_written_and_graded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("shapes");
    let said = ok(&studio(&[
        "train",
        "shapes-data",
        "--out",
        path(&dir),
        "--count",
        "12",
        "--seed",
        "5",
    ]));
    assert!(said.contains("wrote 12 scenes of 64x64"), "{said}");
    let report = ok(&studio(&[
        "train",
        "shapes-check",
        "--dir",
        path(&dir),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    assert_eq!(
        (report["images"].as_u64(), report["passed"].as_u64()),
        (Some(12), Some(12))
    );

    // Swap two images: their captions no longer match (unless the scenes happen to agree).
    let captions = std::fs::read_to_string(dir.join("captions.jsonl")).expect("captions");
    let lines: Vec<serde_json::Value> = captions
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    let (a, b) = (dir.join("000000.png"), dir.join("000001.png"));
    let tmp_png = dir.join("swap.png");
    std::fs::rename(&a, &tmp_png).expect("mv");
    std::fs::rename(&b, &a).expect("mv");
    std::fs::rename(&tmp_png, &b).expect("mv");
    let report = ok(&studio(&[
        "train",
        "shapes-check",
        "--dir",
        path(&dir),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    if lines[0]["caption"] != lines[1]["caption"] {
        assert_eq!(report["passed"].as_u64(), Some(10), "{report}");
        assert_eq!(report["failures"][0]["file"], "000000.png");
    }
}

#[test]
fn cartoon_faces_are_written_and_read_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("faces");
    ok(&studio(&[
        "train",
        "faces-data",
        "--out",
        path(&dir),
        "--count",
        "10",
        "--seed",
        "2",
    ]));
    let report = ok(&studio(&[
        "train",
        "faces-check",
        "--dir",
        path(&dir),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    assert_eq!(
        (report["images"].as_u64(), report["faces"].as_u64()),
        (Some(10), Some(10))
    );
    // The factor counts are the ones the data set was written with.
    let written = std::fs::read_to_string(dir.join("factors.jsonl")).expect("factors");
    let smiles = written.matches("smile").count() as u64;
    assert_eq!(report["factors"]["smile"].as_u64().unwrap_or(0), smiles);
}

#[test]
fn python_sources_become_lm_data_and_a_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let lib = tmp.path().join("python3.99");
    std::fs::create_dir_all(lib.join("pkg")).expect("dir");
    // Enough files for the split by file to hold some out (3 of these 81).
    for i in 0..80 {
        std::fs::write(
            lib.join(format!("mod{i}.py")),
            format!(
                "def f{i}(x):\n    \"\"\"Return x plus {i}, as a number.\"\"\"\n    y = x + {i}\n    return y\n"
            ),
        )
        .expect("write");
    }
    std::fs::write(lib.join("pkg/__init__.py"), "VALUE = 1\n").expect("write");
    let out = tmp.path().join("lm");
    let card = ok(&studio(&[
        "train",
        "lm-data",
        "--out",
        path(&out),
        "--python-lib",
        path(&lib),
        "--vocab",
        "400",
    ]));
    assert!(card.contains("81 source files"), "{card}");
    assert!(card.contains("held out: 3 files"), "{card}");
    assert_files(
        &out,
        &[
            "train.jsonl",
            "held_out.jsonl",
            "fim.jsonl",
            "tokenizer.json",
            "DATA.md",
        ],
    );
    let train = std::fs::read_to_string(out.join("train.jsonl")).expect("train");
    assert!(train.contains("What does `mod"), "chat turns");
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).expect("read"))
            .expect("json");
    let added: Vec<&str> = tokenizer["added_tokens"]
        .as_array()
        .expect("added tokens")
        .iter()
        .filter_map(|t| t["content"].as_str())
        .collect();
    assert!(
        added.contains(&"<|fim_middle|>") && added.contains(&"<|im_start|>"),
        "{added:?}"
    );

    // A few steps of training make a model folder Studio loads and runs.
    let model = tmp.path().join("model");
    let card = ok(&studio(&[
        "train",
        "lm",
        "--data",
        path(&out),
        "--out",
        path(&model),
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq",
        "16",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
    ]));
    assert!(card.contains("6 steps of 2 × 16 tokens"), "{card}");
    assert_files(
        &model,
        &[
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "MODEL.md",
            "loss.jsonl",
        ],
    );
    let log = std::fs::read_to_string(model.join("loss.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 6);
    let quality: serde_json::Value = serde_json::from_str(&ok(&studio(&[
        "train",
        "lm-eval",
        "--model",
        path(&model),
        "--data",
        path(&out),
        "--fim",
        "3",
        "--json",
    ])))
    .expect("json");
    let loss = quality["held_out_loss"].as_f64().expect("loss");
    // Six steps leave the loss near a uniform guess over the vocabulary (ln 400 ≈ 6).
    assert!(loss > 1.0 && loss < 8.0, "{quality}");
    assert!(
        quality["held_out_tokens"].as_u64().expect("tokens") > 0,
        "{quality}"
    );
    let held_out_lines = std::fs::read_to_string(out.join("fim.jsonl"))
        .expect("fim")
        .lines()
        .count();
    assert_eq!(quality["fim_cases"], held_out_lines.min(3), "{quality}");
    let generated = ok(&studio(&[
        "generate",
        "--model",
        path(&model),
        "--prompt",
        "def f1(x):",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]));
    assert!(
        generated
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"done\":true")),
        "{generated}"
    );
}

/// `studio train sd` writes a diffusers folder (with its model card) that `sd-eval` loads through
/// Studio's own pipeline and grades on captions outside the training set.
#[test]
fn a_tiny_text_to_image_run_is_written_and_graded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (train, held, model) = (
        tmp.path().join("train"),
        tmp.path().join("held"),
        tmp.path().join("sd"),
    );
    for (dir, seed) in [(&train, "1"), (&held, "2")] {
        ok(&studio(&[
            "train",
            "shapes-data",
            "--out",
            path(dir),
            "--count",
            "6",
            "--seed",
            seed,
        ]));
    }
    // `studio train sd` on the training scenes into `out`, at the test's small widths.
    let train_sd = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "sd",
            "--data",
            path(&train),
            "--out",
            path(out),
            "--batch",
            "2",
            "--text-width",
            "32",
            "--vae-channels",
            "8",
        ];
        args.extend_from_slice(extra);
        studio(&args)
    };
    let card = ok(&train_sd(
        &model,
        &[
            "--vae-steps",
            "2",
            "--unet-steps",
            "2",
            "--unet-channels",
            "16",
            "--min-snr-gamma",
            "5",
            "--unet-cooldown",
            "1",
            "--offset-noise",
            "0.1",
        ],
    ));
    assert!(
        card.contains("2 VAE steps, 0 decoder steps, then 2 UNet"),
        "{card}"
    );
    // The card's command repeats the UNet's loss weighting, cool-down and offset noise.
    assert!(
        card.contains("--min-snr-gamma 5 --unet-cooldown 1 --offset-noise 0.1`"),
        "{card}"
    );
    let refused = train_sd(&tmp.path().join("unused"), &["--min-snr-gamma", "0"]);
    assert!(!refused.status.success(), "γ = 0 would zero every weight");
    assert_files(
        &model,
        &[
            "model_index.json",
            "MODEL.md",
            "loss.jsonl",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ],
    );
    let log = std::fs::read_to_string(model.join("loss.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 4, "{log}");
    // A step logged after the last checkpoint (a run stopped between checkpoints) is
    // dropped from the log when the run resumes, which does that step again.
    let mut stale = log.clone();
    stale.push_str("{\"phase\":\"unet\",\"step\":99,\"loss\":1.0,\"seconds\":1.0}\n");
    std::fs::write(model.join("loss.jsonl"), stale).expect("stale line");
    // Resumed for one more UNet step, the card still names the VAE's last loss (from the
    // log) and says no decoder step was ever run.
    let card = ok(&train_sd(
        &model,
        &[
            "--vae-steps",
            "2",
            "--unet-steps",
            "3",
            "--unet-channels",
            "16",
        ],
    ));
    assert!(
        !card.contains("VAE reconstruction none") && card.contains("decoder none"),
        "{card}"
    );
    let log = std::fs::read_to_string(model.join("loss.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 5, "{log}");
    assert!(!log.contains("\"step\":99"), "{log}");

    // `sd-eval` of two held-out captions, writing its images into `out`.
    let sd_eval = |extra: &str, out: &std::path::Path| -> serde_json::Value {
        let report = ok(&studio(&[
            "train",
            "sd-eval",
            "--model",
            path(&model),
            "--data",
            path(&held),
            "--train",
            path(&train),
            "--count",
            "2",
            extra,
            "--out",
            path(out),
            "--json",
        ]));
        serde_json::from_str(&report).expect("json")
    };
    let out = tmp.path().join("eval");
    let report = sd_eval("--steps=2", &out);
    assert_eq!(report["prompts"].as_u64(), Some(2), "{report}");
    // The model's own size: 64 px scenes, so a UNet `sample_size` of 8.
    assert_eq!(report["size"].as_u64(), Some(64), "{report}");
    let passed = report["passed"].as_u64().expect("passed");
    assert_eq!(
        report["failures"].as_array().map(Vec::len),
        Some(2 - usize::try_from(passed).expect("small"))
    );
    assert_files(&out, &["0000.png", "0001.png", "captions.jsonl"]);

    // The VAE's ceiling: the held-out images' own round trips, graded.
    let round_trips = tmp.path().join("round-trips");
    let report = sd_eval("--reconstruct", &round_trips);
    assert_eq!(report["reconstruct"].as_bool(), Some(true), "{report}");
    assert_eq!(report["prompts"].as_u64(), Some(2), "{report}");
    let first =
        studio_inference::diffusion::imaging::decode_image_file(&round_trips.join("0000.png"))
            .expect("a round trip");
    assert_eq!((first.image.width, first.image.height), (64, 64));

    // A run from the trained folder, with its shapes: no VAE steps, the decoder alone, then
    // the UNet.
    let tuned = tmp.path().join("tuned");
    let card = ok(&train_sd(
        &tuned,
        &[
            "--init",
            path(&model),
            "--vae-steps",
            "0",
            "--decoder-steps",
            "2",
            "--unet-steps",
            "1",
            "--unet-channels",
            "16",
        ],
    ));
    assert!(card.contains("starting from the weights of"), "{card}");
    assert!(card.contains("VAE reconstruction none"), "{card}");
    assert!(
        card.contains("0 VAE steps, 2 decoder steps, then 1 UNet"),
        "{card}"
    );
    let log = std::fs::read_to_string(tuned.join("loss.jsonl")).expect("log");
    let phases: Vec<String> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["phase"].as_str().expect("phase").to_owned()
        })
        .collect();
    assert_eq!(phases, ["decoder", "decoder", "unet"]);
    // A folder of another shape is refused with the tensor's name.
    let refused = train_sd(
        &tmp.path().join("wider"),
        &[
            "--init",
            path(&model),
            "--vae-steps",
            "0",
            "--unet-steps",
            "1",
            "--unet-channels",
            "24",
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("shape mismatch"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Every prompt of the training set is seen: nothing is left to grade.
    let refused = studio(&[
        "train",
        "sd-eval",
        "--model",
        path(&model),
        "--data",
        path(&train),
        "--train",
        path(&train),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no captions outside the training set")
    );
}
