//! `studio pull`, `studio models` and `--model ORG/NAME[:FILE]` as a script would run them,
//! against the loopback Hub (`studio_tests::hub_server`) and a cache in a temporary folder.
//! Nothing reaches the internet.

use std::path::Path;
use std::process::{Command, Output};

use studio_tests::hub_server::{FakeFile, FakeHub, FakeRepo};

mod cli_common;
use cli_common::{failed, ok, path};

/// `studio` with the Hub at `hub` and the cache in `cache`.
fn studio(hub: &FakeHub, cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", cache.join("no-home"))
        .output()
        .expect("run studio")
}

/// A tiny real StyleGAN2 (the parity fixture) in a repository, with its settings JSON.
fn gan_repo() -> FakeRepo {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stylegan2");
    let read = |n: &str| std::fs::read(fixtures.join(n)).expect("fixture");
    FakeRepo::new(
        "nvlabs/tiny-stylegan2",
        vec![
            FakeFile::lfs("skip.safetensors", read("skip.safetensors")),
            FakeFile::small(
                "skip.json",
                &String::from_utf8(read("skip.json")).expect("utf-8"),
            ),
            FakeFile::lfs("network.pkl", read("skip.pkl")),
            FakeFile::small("README.md", "# tiny"),
        ],
    )
}

#[test]
fn pull_downloads_into_the_cache_and_prints_json_progress() {
    let hub = FakeHub::start(vec![gan_repo()]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("hub");
    let out = ok(&studio(
        &hub,
        &cache,
        &["pull", "nvlabs/tiny-stylegan2", "--json"],
    ));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let last = lines.last().expect("lines");
    assert_eq!(last["done"], true);
    let model = last["path"].as_str().expect("path").to_owned();
    assert!(model.ends_with("skip.safetensors"), "{model}");
    assert_eq!(last["sha256"].as_str().map(str::len), Some(64));
    assert!(
        lines
            .iter()
            .any(|l| l["file"] == "skip.safetensors" && l["downloaded"] == l["total"]),
        "{out}"
    );
    // The pickle is listed but not fetched by default; the settings came along.
    let snapshot = Path::new(&model).parent().expect("snapshot");
    assert!(snapshot.join("skip.json").exists());
    assert!(!snapshot.join("network.pkl").exists());
    assert!(!snapshot.join("README.md").exists());

    // `--model ORG/NAME[:FILE]` resolves from the cache; the image is the fixture's.
    let a = tmp.path().join("a.png");
    let b = tmp.path().join("b.png");
    ok(&studio(
        &hub,
        &cache,
        &[
            "gan",
            "--model",
            "nvlabs/tiny-stylegan2:skip.safetensors",
            "--seed",
            "3",
            "--out",
            path(&a),
        ],
    ));
    ok(&studio(
        &hub,
        &cache,
        &["gan", "--model", &model, "--seed", "3", "--out", path(&b)],
    ));
    assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));

    // `studio models` lists it.
    let listed = ok(&studio(&hub, &cache, &["models", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .any(|m| m["repo"] == "nvlabs/tiny-stylegan2/skip.safetensors" && m["kind"] == "gan"),
        "{listed}"
    );
}

#[test]
fn model_from_the_hub_needs_pull_and_named_pickles_are_fetched() {
    let hub = FakeHub::start(vec![gan_repo()]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("hub");
    let out = tmp.path().join("x.png");
    let args = [
        "gan",
        "--model",
        "nvlabs/tiny-stylegan2:network.pkl",
        "--seed",
        "1",
        "--out",
        path(&out),
    ];
    let e = failed(&studio(&hub, &cache, &args));
    assert!(
        e.contains("studio pull nvlabs/tiny-stylegan2") && e.contains("--pull"),
        "{e}"
    );
    assert!(
        hub.seen().is_empty(),
        "nothing was asked of the Hub without --pull"
    );
    let mut with_pull = args.to_vec();
    with_pull.push("--pull");
    ok(&studio(&hub, &cache, &with_pull));
    assert!(out.exists());

    let e = failed(&studio(&hub, &cache, &["pull", "nvlabs/missing"]));
    assert!(e.contains("no such repository"), "{e}");
    let e = failed(&studio(
        &hub,
        &cache,
        &["pull", "nvlabs/tiny-stylegan2", "--file", "nope.gguf"],
    ));
    assert!(
        e.contains("no file `nope.gguf`") && e.contains("skip.safetensors"),
        "{e}"
    );
}

/// On a terminal, `pull` draws a progress line (rewritten in place) on stderr. The terminal is
/// util-linux's `script`; without it the test says so and skips.
#[test]
fn pull_draws_a_progress_line_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` (a pseudo-terminal) is not installed");
        return;
    }
    let hub = FakeHub::start(vec![gan_repo()]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("hub");
    let line = format!(
        "{} pull nvlabs/tiny-stylegan2",
        env!("CARGO_BIN_EXE_studio")
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HOME", cache.join("no-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\rskip.safetensors") && text.contains("MB/s"),
        "{text:?}"
    );
    assert!(text.contains("got skip.safetensors"), "{text}");
}
