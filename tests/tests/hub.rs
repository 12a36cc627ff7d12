//! Studio's Hub client against the loopback Hub (`studio_tests::hub_server`): downloads into
//! the standard cache layout, resume after a cut connection and after a stop, SHA-256 and
//! length verification, gated and missing repositories, hostile file names, paged search, and
//! offline mode. Nothing reaches the internet.

use std::ops::ControlFlow;
use std::path::Path;

use studio_inference::hub::HubConfig;
use studio_inference::hub::api::{repo_info, search, search_page};
use studio_inference::hub::cache;
use studio_inference::hub::download::{download_file, hash_file};
use studio_tests::hub_server::{FakeFile, FakeHub, FakeRepo, Fault};

fn weights(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn config(hub: &FakeHub, cache: &Path) -> HubConfig {
    HubConfig::new(&hub.url, None, false, cache.to_path_buf())
}

fn go(_: &studio_inference::hub::download::Progress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// A download pinned to a commit (as a starter entry pins one) asks for that commit, lands in
/// its snapshot and writes no branch ref; a revision the repository lacks is a clear 404.
#[test]
fn a_commit_pinned_download_lands_in_that_snapshot_and_an_unknown_revision_is_refused() {
    let file = FakeFile::lfs("net.pkl", weights(5_000, 4));
    let hub = FakeHub::start(vec![FakeRepo::new("org/nets", vec![file])]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let commit = repo_info(&cfg, "org/nets", "main").expect("info").commit;
    let info = repo_info(&cfg, "org/nets", &commit).expect("pinned info");
    assert_eq!(info.commit, commit);
    let done = download_file(&cfg, &info, &commit, &info.files[0], &mut go)
        .expect("download")
        .expect("not stopped");
    let repo = tmp.path().join("models--org--nets");
    assert_eq!(
        done.path,
        repo.join("snapshots").join(&commit).join("net.pkl")
    );
    assert!(
        !repo.join("refs").join(&commit).exists(),
        "a commit needs no ref"
    );
    assert_eq!(
        cache::resolve(tmp.path(), "org/nets:net.pkl", &commit),
        Some(done.path.clone())
    );
    assert!(
        hub.seen()
            .iter()
            .filter(|s| !s.cdn && s.line.contains("/resolve/"))
            .all(|s| s.line.contains(&format!("/resolve/{commit}/"))),
        "{:?}",
        hub.seen()
    );
    let e = repo_info(&cfg, "org/nets", "0123456789abcdef0123456789abcdef01234567")
        .expect_err("unknown revision")
        .to_string();
    assert!(e.contains("404") && e.contains("revision"), "{e}");
}

#[test]
fn a_download_lands_in_the_standard_cache_layout_verified() {
    let gguf = FakeFile::lfs("tiny-Q4_K_M.gguf", weights(300_000, 1));
    let want = gguf.sha256();
    let hub = FakeHub::start(vec![FakeRepo::new(
        "org/tiny-GGUF",
        vec![gguf, FakeFile::small("README.md", "# tiny")],
    )]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let info = repo_info(&cfg, "org/tiny-GGUF", "main").expect("info");
    assert_eq!(info.files.len(), 2);
    assert_eq!(info.license.as_deref(), Some("apache-2.0"));
    let file = info
        .files
        .iter()
        .find(|f| f.name == "tiny-Q4_K_M.gguf")
        .expect("gguf");
    assert_eq!(file.sha256.as_deref(), Some(want.as_str()));
    let mut reports = 0;
    let done = download_file(&cfg, &info, "main", file, &mut |p| {
        reports += 1;
        assert!(p.done <= 300_000 && p.total == Some(300_000));
        ControlFlow::Continue(())
    })
    .expect("download")
    .expect("not stopped");
    assert!(reports >= 2);
    assert_eq!(done.sha256, want);
    assert!(!done.already);
    let repo = tmp.path().join("models--org--tiny-GGUF");
    let snapshot = repo
        .join("snapshots")
        .join(&info.commit)
        .join("tiny-Q4_K_M.gguf");
    assert_eq!(done.path, snapshot);
    assert!(
        snapshot
            .symlink_metadata()
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_link(&snapshot).expect("target"),
        Path::new("../../blobs").join(&want)
    );
    assert_eq!(hash_file(&snapshot).expect("hash"), want);
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).expect("ref"),
        info.commit
    );
    // The small file too, named by its ETag; and `REPO[:FILE]` resolves from the cache.
    let readme = info
        .files
        .iter()
        .find(|f| f.name == "README.md")
        .expect("readme");
    download_file(&cfg, &info, "main", readme, &mut go).expect("readme");
    assert_eq!(
        cache::resolve(tmp.path(), "org/tiny-GGUF", "main"),
        Some(snapshot.clone())
    );
    assert_eq!(
        cache::resolve(tmp.path(), "org/tiny-GGUF:README.md", "main"),
        Some(repo.join("snapshots").join(&info.commit).join("README.md"))
    );
    assert_eq!(cache::resolve(tmp.path(), "org/other", "main"), None);
    // The existing cache scan lists it.
    let scanned = studio_inference::llm::hf_cache::scan(tmp.path());
    assert!(scanned.iter().any(|m| m.path == snapshot), "{scanned:?}");
    // A second download finds it there and fetches nothing.
    let before = hub.seen().len();
    let again = download_file(&cfg, &info, "main", file, &mut go)
        .expect("again")
        .expect("done");
    assert!(again.already);
    assert_eq!(hub.seen().len(), before);
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let mut file = FakeFile::lfs("model.safetensors", weights(500_000, 2));
    file.fault = Fault::CutOnceAfter(123_457);
    let want = file.sha256();
    let hub = FakeHub::start(vec![FakeRepo::new("org/cut", vec![file])]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let info = repo_info(&cfg, "org/cut", "main").expect("info");
    let done = download_file(&cfg, &info, "main", &info.files[0], &mut go)
        .expect("download")
        .expect("done");
    assert_eq!(done.sha256, want);
    // The first CDN request had no range; the second resumed where the cut left off.
    let ranges: Vec<Option<String>> = hub
        .seen()
        .into_iter()
        .filter(|s| s.cdn)
        .map(|s| s.range)
        .collect();
    assert_eq!(ranges, [None, Some("bytes=123457-".to_owned())]);
}

#[test]
fn a_stopped_download_keeps_its_part_and_resumes_next_time() {
    let file = FakeFile::lfs("model.safetensors", weights(2_000_000, 3));
    let want = file.sha256();
    let hub = FakeHub::start(vec![FakeRepo::new("org/stop", vec![file])]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let info = repo_info(&cfg, "org/stop", "main").expect("info");
    let stopped = download_file(&cfg, &info, "main", &info.files[0], &mut |p| {
        if p.done > 300_000 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .expect("no error");
    assert!(stopped.is_none());
    let partial = tmp
        .path()
        .join("models--org--stop/blobs")
        .join(format!("{want}.incomplete"));
    let kept = std::fs::metadata(&partial).expect("partial kept").len();
    assert!(kept > 300_000 && kept < 2_000_000, "{kept}");
    // Nothing points at an incomplete file.
    assert!(
        !tmp.path()
            .join("models--org--stop/snapshots")
            .join(&info.commit)
            .join("model.safetensors")
            .exists()
    );
    let done = download_file(&cfg, &info, "main", &info.files[0], &mut go)
        .expect("resume")
        .expect("done");
    assert_eq!(done.resumed_from, kept);
    assert_eq!(done.sha256, want);
    assert!(!partial.exists());
}

#[test]
fn a_wrong_hash_or_length_is_refused_and_the_partial_removed() {
    let mut wrong = FakeFile::lfs("wrong.safetensors", weights(10_000, 4));
    wrong.fault = Fault::WrongBytes;
    let mut long = FakeFile::lfs("long.safetensors", weights(10_000, 5));
    long.fault = Fault::ExtraBytes;
    let hub = FakeHub::start(vec![FakeRepo::new("org/bad", vec![wrong, long])]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let info = repo_info(&cfg, "org/bad", "main").expect("info");
    for (file, needle) in [(&info.files[0], "SHA-256"), (&info.files[1], "more than")] {
        let e = download_file(&cfg, &info, "main", file, &mut go).expect_err("refused");
        let message = e.to_string();
        assert!(
            message.contains(needle) && message.contains("removed"),
            "{message}"
        );
    }
    let blobs: Vec<_> = std::fs::read_dir(tmp.path().join("models--org--bad/blobs"))
        .expect("blobs")
        .flatten()
        .collect();
    assert!(blobs.is_empty(), "{blobs:?}");
}

#[test]
fn missing_gated_and_hostile_repositories_get_clear_errors() {
    let mut gated = FakeRepo::new(
        "org/gated",
        vec![FakeFile::lfs("m.safetensors", weights(1000, 6))],
    );
    gated.gated = true;
    let mut hostile = FakeRepo::new("org/hostile", vec![]);
    hostile.listed_only = vec!["../../escape.safetensors".to_owned()];
    let hub = FakeHub::start(vec![gated, hostile]);
    hub.set_token("secret-token");
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());

    let e = repo_info(&cfg, "org/nothing", "main")
        .expect_err("404")
        .to_string();
    assert!(e.contains("no such repository") && e.contains("404"), "{e}");
    let e = repo_info(&cfg, "org/gated", "main")
        .expect_err("401")
        .to_string();
    assert!(
        e.contains("gated") && e.contains(&format!("{}/org/gated", hub.url)),
        "{e}"
    );
    assert!(!e.contains("secret"));
    let e = repo_info(&cfg, "org/hostile", "main")
        .expect_err("../")
        .to_string();
    assert!(
        e.contains("../../escape.safetensors") && e.contains("refused"),
        "{e}"
    );
    let e = repo_info(&cfg, "../etc", "main")
        .expect_err("bad id")
        .to_string();
    assert!(e.contains("not a repository id"), "{e}");

    // With the token: the Hub gets it, the CDN (another host) never does.
    let with_token = HubConfig::new(
        &hub.url,
        Some("secret-token".into()),
        false,
        tmp.path().into(),
    );
    let info = repo_info(&with_token, "org/gated", "main").expect("with the token");
    download_file(&with_token, &info, "main", &info.files[0], &mut go)
        .expect("download")
        .expect("done");
    let seen = hub.seen();
    assert!(seen.iter().any(|s| !s.cdn && s.token));
    assert!(seen.iter().any(|s| s.cdn));
    assert!(seen.iter().filter(|s| s.cdn).all(|s| !s.token), "{seen:?}");
    assert!(!format!("{with_token:?}").contains("secret"));
}

#[test]
fn search_is_paged_and_offline_mode_makes_no_request() {
    let hub = FakeHub::start(Vec::new());
    hub.set_catalog((0..250).map(|i| format!("org/model-{i:03}")).collect());
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let mut page = search(&cfg, "model", Some("gguf"), 100).expect("search");
    let mut all = page.hits.clone();
    while let Some(next) = page.next.clone() {
        page = search_page(&cfg, &next).expect("next page");
        all.extend(page.hits.clone());
    }
    assert_eq!(all.len(), 250);
    assert_eq!(all[249].id, "org/model-249");
    assert!(search_page(&cfg, "http://elsewhere.example/api/models").is_err());

    let offline = HubConfig::new(&hub.url, None, true, tmp.path().into());
    let before = hub.seen().len();
    let e = repo_info(&offline, "org/model-001", "main")
        .expect_err("offline")
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(search(&offline, "x", None, 10).is_err());
    assert_eq!(hub.seen().len(), before, "no request was made");
}

/// A full disk: the write fails with a clear error naming the file and the disk's answer, and
/// the cache stays consistent (no snapshot link to an incomplete file). The partial file is
/// `/dev/full` here, which answers every write with "no space left on device".
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_the_cache_consistent() {
    let file = FakeFile::lfs("model.safetensors", weights(100_000, 9));
    let sha = file.sha256();
    let hub = FakeHub::start(vec![FakeRepo::new("org/full", vec![file])]);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(&hub, tmp.path());
    let info = repo_info(&cfg, "org/full", "main").expect("info");
    let blobs = tmp.path().join("models--org--full/blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{sha}.incomplete"))).expect("link");
    let e = download_file(&cfg, &info, "main", &info.files[0], &mut go)
        .expect_err("a full disk")
        .to_string();
    assert!(e.contains("could not write") && e.contains("space"), "{e}");
    assert!(
        !tmp.path()
            .join("models--org--full/snapshots")
            .join(&info.commit)
            .join("model.safetensors")
            .exists()
    );
    assert!(!blobs.join(&sha).exists());
}

/// The cache listing names image pipelines, SD checkpoints and GAN networks too, each with the
/// panel kind that opens it.
#[test]
fn the_cache_listing_covers_every_panel() {
    use studio_inference::llm::hf_cache::{CachedKind, scan};
    let tmp = tempfile::tempdir().expect("tmp");
    let snap = |repo: &str| {
        let dir = tmp.path().join(format!("models--{repo}/snapshots/abc"));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    };
    std::fs::write(snap("org--sd").join("model_index.json"), "{}").expect("write");
    std::fs::write(snap("org--old-sd").join("v1-5.ckpt"), b"PK").expect("write");
    std::fs::write(snap("org--gan").join("ffhq.pkl"), b"\x80\x04").expect("write");
    let found = scan(tmp.path());
    let kinds: Vec<(&str, CachedKind)> = found.iter().map(|m| (m.repo.as_str(), m.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("org/gan/ffhq.pkl", CachedKind::Gan),
            ("org/old-sd/v1-5.ckpt", CachedKind::Diffusion),
            ("org/sd", CachedKind::Diffusion),
        ]
    );
}
