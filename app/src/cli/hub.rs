//! Models from the Hugging Face Hub on the command line:
//!
//! - `studio pull REPO [--file NAME]... [--revision REV] [--json]` downloads into the standard
//!   cache (resumed and verified, see `studio_inference::hub`), with a progress line on a
//!   terminal; `--json` prints one progress object per line, then
//!   `{"done": true, "path": …, "sha256": …}` (`path` is what `--model` takes);
//! - `studio models [--json]` lists the models in the cache;
//! - `--model ORG/NAME[:FILE]` (every subcommand) is resolved from the cache, and downloaded
//!   first with `--pull`.

use std::io::{IsTerminal as _, Write as _};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::json;
use studio_inference::hub::api::repo_info;
use studio_inference::hub::download::{Downloaded, Progress, download_file};
use studio_inference::hub::select::{FileKind, kind, pick};
use studio_inference::hub::{HubConfig, cache};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The repository: ORG/NAME.
    pub repo: String,
    /// A file to download (repeat for several). Default: the weights Studio loads (a
    /// diffusers pipeline's components, the safetensors shards, or one GGUF file, Q4_K_M
    /// first); configs and tokenizers come along.
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// A branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// One JSON progress object per line, then the result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// One JSON array of the models.
    #[arg(long)]
    pub json: bool,
}

/// What a pull left in the cache.
#[derive(Debug)]
pub struct Pulled {
    /// What `--model` takes: the weights file when there is one (a GGUF, a single-file
    /// checkpoint), else the snapshot folder.
    pub path: PathBuf,
    /// That weights file's SHA-256, when there is one file.
    pub sha256: Option<String>,
    /// Every file, as downloaded (or found).
    pub files: Vec<Downloaded>,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    /// A line rewritten in place on stderr.
    Bar,
    /// JSON objects on stdout.
    Json,
    /// Nothing until each file is done.
    Quiet,
}

/// Downloads `files` (or the default pick) of `repo` at `revision`.
fn pull(
    config: &HubConfig,
    repo: &str,
    files: &[String],
    revision: &str,
    show: Show,
) -> Result<Pulled> {
    let info = repo_info(config, repo, revision)?;
    let picked = pick(&info, files)?;
    let mut done = Vec::new();
    for file in &picked {
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        let mut first: Option<u64> = None;
        let got = download_file(config, &info, revision, file, &mut |p: &Progress| {
            let base = *first.get_or_insert(p.done);
            let now = Instant::now();
            let end = p.total.is_some_and(|t| p.done >= t);
            if last.is_none_or(|l| now.duration_since(l) >= Duration::from_millis(250)) || end {
                last = Some(now);
                report(show, p, p.done.saturating_sub(base), started.elapsed());
            }
            ControlFlow::Continue(())
        })?
        .context("the download stopped")?;
        if show == Show::Bar {
            eprintln!();
        }
        if show != Show::Json {
            eprintln!(
                "{} {} ({:.1} MB, sha256 {})",
                if got.already { "have" } else { "got" },
                file.name,
                got.bytes as f64 / 1e6,
                got.sha256
            );
        }
        done.push(got);
    }
    let weights: Vec<&Downloaded> = done
        .iter()
        .zip(&picked)
        .filter(|(_, f)| kind(&f.name) != FileKind::Companion)
        .map(|(d, _)| d)
        .collect();
    let folder_model = picked
        .iter()
        .any(|f| f.name == "config.json" || f.name == "model_index.json");
    let snapshot = cache::repo_dir(&config.cache, &info.id)
        .join("snapshots")
        .join(&info.commit);
    let (path, sha256) = match weights.as_slice() {
        [one] if !folder_model => (one.path.clone(), Some(one.sha256.clone())),
        [one] => (snapshot, Some(one.sha256.clone())),
        _ => (snapshot, None),
    };
    Ok(Pulled {
        path,
        sha256,
        files: done,
    })
}

fn report(show: Show, p: &Progress, fetched: u64, elapsed: Duration) {
    match show {
        Show::Json => println!(
            "{}",
            json!({"file": p.file, "downloaded": p.done, "total": p.total})
        ),
        Show::Bar => {
            let speed = fetched as f64 / elapsed.as_secs_f64().max(1e-3);
            let left = p
                .total
                .filter(|_| speed > 0.0)
                .map(|t| (t.saturating_sub(p.done)) as f64 / speed);
            let pct = p.total.map_or(String::new(), |t| {
                format!(" {:5.1}%", p.done as f64 * 100.0 / t.max(1) as f64)
            });
            eprint!(
                "\r{}{pct} {:.1}/{} MB {:.1} MB/s{}   ",
                p.file,
                p.done as f64 / 1e6,
                p.total
                    .map_or("?".to_owned(), |t| format!("{:.1}", t as f64 / 1e6)),
                speed / 1e6,
                left.map_or(String::new(), |s| format!(", {}s left", s.round() as u64))
            );
            let _ = std::io::stderr().flush();
        }
        Show::Quiet => {}
    }
}

/// `studio pull`.
pub fn run_pull(args: &PullArgs) -> Result<()> {
    let config = HubConfig::from_env()?;
    let show = if args.json {
        Show::Json
    } else if std::io::stderr().is_terminal() {
        Show::Bar
    } else {
        Show::Quiet
    };
    let pulled = pull(&config, &args.repo, &args.files, &args.revision, show)?;
    if args.json {
        let files: Vec<serde_json::Value> = pulled
            .files
            .iter()
            .map(|f| json!({"path": f.path, "sha256": f.sha256, "bytes": f.bytes}))
            .collect();
        println!(
            "{}",
            json!({"done": true, "path": pulled.path, "sha256": pulled.sha256, "files": files})
        );
    } else {
        println!("{}", pulled.path.display());
    }
    Ok(())
}

/// `studio models`.
pub fn run_models(args: &ModelsArgs) -> Result<()> {
    let config = HubConfig::from_env()?;
    let models = studio_inference::llm::hf_cache::scan(&config.cache);
    if args.json {
        let list: Vec<serde_json::Value> = models
            .iter()
            .map(|m| {
                json!({
                    "repo": m.repo,
                    "path": m.path,
                    "bytes": m.bytes,
                    "supported": m.support.is_ok(),
                    "kind": format!("{:?}", m.kind).to_lowercase(),
                    "about": match &m.support { Ok(s) | Err(s) => s },
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    if models.is_empty() {
        println!(
            "no models in {} (studio pull ORG/NAME downloads one)",
            config.cache.display()
        );
    }
    for m in &models {
        let size = m
            .bytes
            .map_or(String::new(), |b| format!(" {:.1} MB", b as f64 / 1e6));
        let about = match &m.support {
            Ok(s) => s.clone(),
            Err(why) => format!("not loadable: {why}"),
        };
        println!("{}{size}  {about}\n  {}", m.repo, m.path.display());
    }
    Ok(())
}

/// Resolves a `--model` that names a repository (`ORG/NAME[:FILE]`, not a path on disk) from
/// the cache; with `pull`, downloads it first when the cache lacks it.
pub fn resolve_model(model: &mut PathBuf, pull_missing: bool) -> Result<()> {
    let Some(spec) = model.to_str().map(str::to_owned) else {
        return Ok(());
    };
    if !cache::looks_like_repo(&spec) {
        return Ok(());
    }
    let config = HubConfig::from_env()?;
    if let Some(path) = cache::resolve(&config.cache, &spec, "main") {
        *model = path;
        return Ok(());
    }
    if !pull_missing {
        bail!(
            "{spec} is not a file or folder here, nor in the Hugging Face cache ({}): run \
             `studio pull {}` first, or add --pull",
            config.cache.display(),
            spec.split(':').next().unwrap_or(&spec)
        );
    }
    let (repo, files) = match spec.split_once(':') {
        Some((r, f)) => (r.to_owned(), vec![f.to_owned()]),
        None => (spec.clone(), Vec::new()),
    };
    let show = if std::io::stderr().is_terminal() {
        Show::Bar
    } else {
        Show::Quiet
    };
    let pulled = pull(&config, &repo, &files, "main", show)
        .with_context(|| format!("downloading {spec}"))?;
    *model = match files.first() {
        Some(file) => pulled
            .files
            .iter()
            .find(|f| f.path.ends_with(file))
            .map_or(pulled.path, |f| f.path.clone()),
        None => pulled.path,
    };
    Ok(())
}
