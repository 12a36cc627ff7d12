//! *Get models* in the Models panel, driven like a person would, against the loopback Hub
//! (`studio_tests::hub_server`): from an empty cache, a starter model is downloaded with
//! progress, loaded, and chatted with; search finds repositories and lists their files; a
//! download pauses, comes back paused after a restart and resumes; the library deletes a
//! model. Nothing reaches the internet.

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use studio_app::gui::models::downloads::State;
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_inference::hub::HubConfig;
use studio_tests::hub_server::{FakeFile, FakeHub, FakeRepo};
use studio_tests::{TinyGpt2, write_gpt2_readable};

mod common;
use common::{control, go_to, shows_text, step_until};

/// A tiny GPT-2 (safetensors, config, tokenizer) as a Hub repository.
fn gpt2_repo(dir: &Path, id: &str) -> FakeRepo {
    write_gpt2_readable(dir, TinyGpt2::default(), 7);
    let read = |n: &str| std::fs::read(dir.join(n)).expect("read");
    let text = |n: &str| String::from_utf8(read(n)).expect("utf-8");
    FakeRepo::new(
        id,
        vec![
            FakeFile::lfs("model.safetensors", read("model.safetensors")),
            FakeFile::small("config.json", &text("config.json")),
            FakeFile::small("tokenizer.json", &text("tokenizer.json")),
        ],
    )
}

/// Whether some download of the Models panel is in a state `f` accepts.
fn any_download(h: &Harness<'_, StudioApp>, f: impl Fn(&State) -> bool) -> bool {
    h.state().models().hub.downloads.iter().any(|d| f(&d.state))
}

fn presets(dir: &Path, repo: &str) -> PathBuf {
    presets_with(
        dir,
        &serde_json::json!({
            "name": "Tiny GPT-2",
            "repo": repo,
            "panel": "Chat",
            "size_mb": 1,
            "license": "mit",
            "description": "A test model."
        }),
    )
}

/// A presets folder whose starter list is `entry`.
fn presets_with(dir: &Path, entry: &serde_json::Value) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).expect("dir");
    let starter = serde_json::json!({ "models": [entry] });
    std::fs::write(models.join("starter.json"), starter.to_string()).expect("write");
    dir.to_path_buf()
}

fn harness(
    home: &Path,
    presets: &Path,
    hub: &FakeHub,
    cache: &Path,
) -> Harness<'static, StudioApp> {
    let config = AppConfig {
        presets_dir: Some(presets.to_path_buf()),
        hf_cache_dir: Some(cache.to_path_buf()),
        hub: Some(HubConfig::new(&hub.url, None, false, cache.to_path_buf())),
        ..AppConfig::for_tests(home)
    };
    common::harness_sized(&config, egui::vec2(1280.0, 1400.0))
}

#[test]
fn a_starter_model_downloads_loads_and_chats() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = FakeHub::start(vec![gpt2_repo(&tmp.path().join("src"), "tests/tiny-gpt2")]);
    let presets = presets(&tmp.path().join("presets"), "tests/tiny-gpt2");
    let cache = tmp.path().join("hub");
    let mut h = harness(&tmp.path().join("home"), &presets, &hub, &cache);
    h.step();
    go_to(&mut h, Panel::Models);
    assert!(shows_text(&h, "Get models"));
    assert!(shows_text(&h, "Tiny GPT-2"));
    control(&h, "Download").click();
    step_until(&mut h, "the download to finish", |h| {
        any_download(h, |s| matches!(s, State::Done(_)))
    });
    assert!(shows_text(&h, "downloaded and verified"));
    control(&h, "Load in Chat").click();
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    let snapshot = h.state().model().expect("loaded").path.clone();
    assert!(snapshot.starts_with(cache.join("models--tests--tiny-gpt2/snapshots")));
    assert_eq!(h.state().settings().panel, Panel::Chat);
    h.state_mut().chat_mut().input = "t1 t2 t3".to_owned();
    h.state_mut()
        .push_command(studio_app::gui::chat::command::ChatCommand::SendMessage);
    step_until(&mut h, "the reply", |h| {
        !h.state().is_busy()
            && h.state()
                .chat()
                .current()
                .is_some_and(|c| c.active_path().len() == 2)
    });
    // The cache listing shows it.
    go_to(&mut h, Panel::Models);
    step_until(&mut h, "the cache listing", |h| {
        shows_text(h, "tests/tiny-gpt2")
    });
}

/// The Latent Explorer's starter is one of NVIDIA's network pickles, pinned to the commit it
/// was checked at: it is fetched at that commit (only the named file; Studio reads the pickle
/// as data), and *Load in Latent Explorer* renders it in safe mode.
#[test]
fn a_pinned_gan_starter_downloads_its_pickle_and_renders_in_the_explorer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let pkl = std::fs::read(fixtures.join("stylegan2/skip.pkl")).expect("pickle");
    let repo = FakeRepo::new(
        "tests/stylegan2-networks",
        vec![
            FakeFile::lfs("stylegan2-tiny-32x32.pkl", pkl),
            FakeFile::lfs("other-network.pkl", vec![0x80, 0x04, 0x2e]),
        ],
    );
    let commit = repo.commit.clone();
    let hub = FakeHub::start(vec![repo]);
    let presets = presets_with(
        &tmp.path().join("presets"),
        &serde_json::json!({
            "name": "Tiny StyleGAN2",
            "repo": "tests/stylegan2-networks",
            "file": "stylegan2-tiny-32x32.pkl",
            "revision": commit,
            "panel": "Explorer",
            "size_mb": 1,
            "license": "other",
            "description": "A test network."
        }),
    );
    let cache = tmp.path().join("hub");
    let mut h = harness(&tmp.path().join("home"), &presets, &hub, &cache);
    h.step();
    go_to(&mut h, Panel::Models);
    assert!(shows_text(&h, "Tiny StyleGAN2"));
    assert!(shows_text(&h, "Latent Explorer"));
    control(&h, "Download").click();
    step_until(&mut h, "the download to finish", |h| {
        any_download(h, |s| matches!(s, State::Done(_)))
    });
    let seen: Vec<String> = hub
        .seen()
        .into_iter()
        .filter(|s| !s.cdn)
        .map(|s| s.line)
        .collect();
    assert!(
        seen.iter().all(|l| !l.contains("/main")),
        "everything was asked at the pinned commit: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("/revision/{commit}"))),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|l| !l.contains("other-network.pkl")),
        "only the named pickle was fetched: {seen:?}"
    );
    let snapshot = cache
        .join("models--tests--stylegan2-networks/snapshots")
        .join(&commit);
    assert!(snapshot.join("stylegan2-tiny-32x32.pkl").is_file());
    control(&h, "Load in Latent Explorer").click();
    step_until(&mut h, "the network to render", |h| {
        h.state().explorer().model().is_some() && h.state().explorer().image().is_some()
    });
    assert_eq!(h.state().settings().panel, Panel::LatentExplorer);
    let model = h.state().explorer().model().expect("loaded");
    assert!(model.info.from_pickle, "read from the pickle, in safe mode");
    assert_eq!(model.info.resolution, 32);
}

#[test]
fn search_opens_a_repository_and_a_paused_download_resumes_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut big = FakeRepo::new(
        "tests/big-GGUF",
        vec![FakeFile::lfs(
            "big-Q4_K_M.gguf",
            (0..40_000_000u32).map(|i| (i % 251) as u8).collect(),
        )],
    );
    big.license = Some("apache-2.0".into());
    let hub = FakeHub::start(vec![big]);
    hub.set_catalog(vec!["tests/big-GGUF".into(), "tests/other".into()]);
    let presets = presets(&tmp.path().join("presets"), "tests/none");
    let cache = tmp.path().join("hub");
    let home = tmp.path().join("home");
    {
        let mut h = harness(&home, &presets, &hub, &cache);
        h.step();
        go_to(&mut h, Panel::Models);
        h.get_by_label("Search the Hub").focus();
        h.step();
        h.get_by_label("Search the Hub").type_text("big");
        h.step();
        h.step();
        control(&h, "Search").click();
        step_until(&mut h, "the results", |h| shows_text(h, "tests/big-GGUF"));
        h.get_by_label("tests/big-GGUF").click();
        step_until(&mut h, "the repository", |h| {
            shows_text(h, "big-Q4_K_M.gguf")
        });
        assert!(shows_text(&h, "Q4_K_M"));
        let downloads = h.query_all_by_label("Download").count();
        assert!(downloads >= 1);
        control(&h, "Download what Studio loads").click();
        step_until(&mut h, "the download to start", |h| {
            any_download(h, |s| matches!(s, State::Running { .. }))
        });
        control(&h, "Pause").click();
        step_until(&mut h, "the pause", |h| {
            !any_download(h, |s| *s != State::Paused)
        });
    }
    // A restart lists it paused; Resume finishes it from the partial file.
    let mut h = harness(&home, &presets, &hub, &cache);
    h.step();
    go_to(&mut h, Panel::Models);
    assert!(shows_text(&h, "paused (the part downloaded is kept)"));
    control(&h, "Resume").click();
    step_until(&mut h, "the download to finish", |h| {
        any_download(h, |s| matches!(s, State::Done(_)))
    });
    let ranges = hub
        .seen()
        .into_iter()
        .filter(|s| s.cdn && s.range.is_some())
        .count();
    assert!(ranges >= 1, "the download resumed with a Range request");

    // The library deletes it, after asking.
    step_until(&mut h, "the cache listing", |h| {
        shows_text(h, "tests/big-GGUF")
    });
    for _ in 0..5 {
        h.step();
    }
    control(&h, "Delete…").click();
    for _ in 0..3 {
        h.step();
    }
    assert!(shows_text(
        &h,
        "from the cache? Files other snapshots share are kept."
    ));
    h.state_mut()
        .push_command(Command::ShowPanel(Panel::Models));
    control(&h, "Delete").click();
    step_until(&mut h, "the deletion", |_| {
        !cache.join("models--tests--big-GGUF").exists()
    });
}
