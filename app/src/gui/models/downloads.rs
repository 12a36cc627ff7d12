//! The Models panel's Hub work, off the UI thread: search and repository info on a
//! `studio-hub` thread, downloads two at a time on `studio-downloads-N` threads, the others
//! queued (resumed, verified: `studio_inference::hub`). Events come back over bounded channels and wake the
//! window. Unfinished downloads are remembered in `downloads.json` in the data folder and come
//! back paused after a restart; resuming continues the partial file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::{Deserialize, Serialize};
use studio_inference::hub::HubConfig;
use studio_inference::hub::api::{RepoInfo, SearchPage, repo_info, search, search_page};
use studio_inference::hub::download::download_file;
use studio_inference::hub::select::{FileKind, kind, pick};

/// Which panel a downloaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Served {
    Chat,
    Code,
    Canvas,
    Explorer,
}

impl Served {
    pub fn label(self) -> &'static str {
        match self {
            Served::Chat => "Chat",
            Served::Code => "Code",
            Served::Canvas => "Canvas",
            Served::Explorer => "Latent Explorer",
        }
    }

    /// The panel a repository's files serve, from their names (and the repository's).
    pub fn of(repo: &str, files: &[&str]) -> Option<Served> {
        let lower = repo.to_ascii_lowercase();
        let ext = |f: &str, e: &str| {
            Path::new(f)
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case(e))
        };
        let has = |pred: &dyn Fn(&str) -> bool| files.iter().any(|f| pred(f));
        if has(&|f| f == "model_index.json" || ext(f, "ckpt"))
            || lower.contains("stable-diffusion")
            || lower.contains("sdxl")
            || lower.contains("sd-turbo")
        {
            return Some(Served::Canvas);
        }
        if has(&|f| ext(f, "pkl")) || lower.contains("stylegan") {
            return Some(Served::Explorer);
        }
        if has(&|f| ext(f, "gguf") || f == "config.json") {
            return Some(if lower.contains("code") {
                Served::Code
            } else {
                Served::Chat
            });
        }
        None
    }
}

/// Where a download is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    Queued,
    Running {
        file: String,
        done: u64,
        total: Option<u64>,
        /// Bytes per second this run.
        speed: f64,
    },
    Paused,
    Done(PathBuf),
    Failed(String),
    Cancelled,
}

/// One download: a repository's default pick, or named files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Download {
    pub id: u64,
    pub repo: String,
    /// The branch, tag or commit; none: `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// Empty: the weights Studio loads.
    pub files: Vec<String>,
    pub served: Option<Served>,
    pub state: State,
    /// 0 run, 1 pause, 2 cancel.
    #[serde(skip)]
    stop: Arc<AtomicU8>,
}

enum Request {
    Search(String, Option<&'static str>),
    More(String),
    Info(String),
}

/// Downloads that run at once.
const PARALLEL: usize = 2;

/// What the threads report.
enum Event {
    Search(Result<SearchPage, String>, bool),
    Info(String, Result<RepoInfo, String>),
    Progress {
        id: u64,
        file: String,
        done: u64,
        total: Option<u64>,
        speed: f64,
    },
    Ended(u64, State),
}

/// The panel's view of the Hub: its last search, the repository shown, the downloads.
pub struct Hub {
    config: Option<HubConfig>,
    home: PathBuf,
    requests: Option<Sender<Request>>,
    jobs: Option<Sender<Download>>,
    events: Option<Receiver<Event>>,
    pub query: String,
    /// The Hub tag results must have: what Studio runs (`gguf`, `diffusers`, `safetensors`),
    /// or any.
    pub filter: Option<&'static str>,
    pub searching: bool,
    pub results: Vec<studio_inference::hub::api::SearchHit>,
    pub next_page: Option<String>,
    pub repo: Option<RepoInfo>,
    pub loading_repo: Option<String>,
    pub error: Option<String>,
    pub downloads: Vec<Download>,
    next_id: u64,
}

/// The downloads file in the data folder.
fn saved_path(home: &Path) -> PathBuf {
    home.join("downloads.json")
}

impl Hub {
    /// No Hub: the panel says downloading is not available.
    pub fn off() -> Self {
        Self {
            config: None,
            home: PathBuf::new(),
            requests: None,
            jobs: None,
            events: None,
            query: String::new(),
            filter: Some("gguf"),
            searching: false,
            results: Vec::new(),
            next_page: None,
            repo: None,
            loading_repo: None,
            error: None,
            downloads: Vec::new(),
            next_id: 1,
        }
    }

    /// With no `config` (no cache folder), the panel says the Hub is not available. Unfinished
    /// downloads of an earlier run come back paused.
    pub fn new(config: Option<HubConfig>, home: &Path, ctx: &egui::Context) -> Self {
        let mut hub = Self {
            config: config.clone(),
            home: home.to_path_buf(),
            ..Self::off()
        };
        if let Some(config) = config {
            hub.spawn(&config, ctx);
        }
        let saved = crate::home::load_json::<Vec<Download>>(&saved_path(home));
        for mut d in saved.ok().flatten().unwrap_or_default() {
            if matches!(d.state, State::Queued | State::Running { .. }) {
                d.state = State::Paused;
            }
            if matches!(d.state, State::Paused) {
                hub.next_id = hub.next_id.max(d.id + 1);
                hub.downloads.push(d);
            }
        }
        hub
    }

    fn spawn(&mut self, config: &HubConfig, ctx: &egui::Context) {
        let (req_tx, req_rx) = bounded::<Request>(16);
        let (job_tx, job_rx) = bounded::<Download>(64);
        let (ev_tx, ev_rx) = bounded::<Event>(256);
        let (cfg, events, wake) = (config.clone(), ev_tx.clone(), ctx.clone());
        let hub_thread = std::thread::Builder::new()
            .name("studio-hub".to_owned())
            .spawn(move || {
                for request in req_rx {
                    let event = match request {
                        Request::Search(q, filter) => Event::Search(
                            search(&cfg, &q, filter, 50).map_err(|e| e.to_string()),
                            false,
                        ),
                        Request::More(url) => Event::Search(
                            search_page(&cfg, &url).map_err(|e| e.to_string()),
                            true,
                        ),
                        Request::Info(repo) => {
                            let info = repo_info(&cfg, &repo, "main").map_err(|e| e.to_string());
                            Event::Info(repo, info)
                        }
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                    wake.request_repaint();
                }
            });
        // Two downloads at a time; the rest wait in the queue.
        let mut download_threads = Ok(());
        for n in 0..PARALLEL {
            let (cfg, events, wake, jobs) = (config.clone(), ev_tx.clone(), ctx.clone(), job_rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("studio-downloads-{n}"))
                .spawn(move || {
                    for job in jobs {
                        let state = run_download(&cfg, &job, &events, &wake);
                        if events.send(Event::Ended(job.id, state)).is_err() {
                            return;
                        }
                        wake.request_repaint();
                    }
                });
            if let Err(e) = spawned {
                download_threads = Err(e);
            }
        }
        match (hub_thread, download_threads) {
            (Ok(_), Ok(())) => {
                self.requests = Some(req_tx);
                self.jobs = Some(job_tx);
                self.events = Some(ev_rx);
            }
            (Err(e), _) | (_, Err(e)) => {
                self.error = Some(format!("Could not start the download threads: {e}"));
            }
        }
    }

    /// Whether the Hub can be used (a cache folder, the threads running).
    pub fn available(&self) -> bool {
        self.requests.is_some()
    }

    /// `HF_HUB_OFFLINE` is set.
    pub fn offline(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.offline)
    }

    /// The Hub's address.
    pub fn endpoint(&self) -> Option<&str> {
        self.config.as_ref().map(|c| c.endpoint.as_str())
    }

    pub fn search(&mut self) {
        let q = self.query.trim().to_owned();
        if let Some(tx) = &self.requests
            && tx.try_send(Request::Search(q, self.filter)).is_ok()
        {
            self.searching = true;
            self.error = None;
        }
    }

    pub fn more(&mut self) {
        if let (Some(tx), Some(url)) = (&self.requests, self.next_page.take())
            && tx.try_send(Request::More(url)).is_ok()
        {
            self.searching = true;
        }
    }

    pub fn open_repo(&mut self, repo: &str) {
        if let Some(tx) = &self.requests
            && tx.try_send(Request::Info(repo.to_owned())).is_ok()
        {
            self.loading_repo = Some(repo.to_owned());
            self.error = None;
        }
    }

    /// Queues a download of `files` of `repo` at `revision` (none: `main`; no files: the
    /// weights Studio loads).
    pub fn download(
        &mut self,
        repo: &str,
        revision: Option<&str>,
        files: Vec<String>,
        served: Option<Served>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let d = Download {
            id,
            repo: repo.to_owned(),
            revision: revision.map(str::to_owned),
            files,
            served,
            state: State::Queued,
            stop: Arc::new(AtomicU8::new(0)),
        };
        self.downloads.push(d.clone());
        self.enqueue(d);
        self.save();
    }

    fn enqueue(&mut self, d: Download) {
        let id = d.id;
        let sent = match &self.jobs {
            Some(tx) => match tx.try_send(d) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => Err("too many downloads are queued".to_owned()),
                Err(TrySendError::Disconnected(_)) => Err("the download thread stopped".to_owned()),
            },
            None => Err("the Hub is not available".to_owned()),
        };
        if let Err(why) = sent
            && let Some(d) = self.downloads.iter_mut().find(|d| d.id == id)
        {
            d.state = State::Failed(why);
        }
    }

    /// Pauses (keeping the partial file) or cancels (removing it) download `id`.
    pub fn stop(&mut self, id: u64, cancel: bool) {
        if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) {
            d.stop.store(if cancel { 2 } else { 1 }, Ordering::Relaxed);
            if matches!(d.state, State::Queued | State::Paused) {
                d.state = if cancel { State::Cancelled } else { State::Paused };
            }
        }
        self.save();
    }

    /// Resumes a paused or failed download.
    pub fn resume(&mut self, id: u64) {
        let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) else {
            return;
        };
        d.stop = Arc::new(AtomicU8::new(0));
        d.state = State::Queued;
        let d = d.clone();
        self.enqueue(d);
        self.save();
    }

    /// Forgets finished, failed and cancelled downloads.
    pub fn clear_finished(&mut self) {
        self.downloads
            .retain(|d| !matches!(d.state, State::Done(_) | State::Failed(_) | State::Cancelled));
        self.save();
    }

    /// Takes the threads' events; returns whether a download finished (the cache changed).
    pub fn poll(&mut self) -> bool {
        let mut finished = false;
        let Some(rx) = &self.events else {
            return false;
        };
        let events: Vec<Event> = rx.try_iter().take(512).collect();
        for event in events {
            match event {
                Event::Search(result, more) => {
                    self.searching = false;
                    match result {
                        Ok(page) => {
                            if !more {
                                self.results.clear();
                            }
                            self.results.extend(page.hits);
                            self.next_page = page.next;
                        }
                        Err(e) => self.error = Some(e),
                    }
                }
                Event::Info(repo, result) => {
                    if self.loading_repo.as_deref() == Some(repo.as_str()) {
                        self.loading_repo = None;
                    }
                    match result {
                        Ok(info) => self.repo = Some(info),
                        Err(e) => self.error = Some(e),
                    }
                }
                Event::Progress {
                    id,
                    file,
                    done,
                    total,
                    speed,
                } => {
                    if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id)
                        && !matches!(d.state, State::Cancelled | State::Paused)
                    {
                        d.state = State::Running {
                            file,
                            done,
                            total,
                            speed,
                        };
                    }
                }
                Event::Ended(id, state) => {
                    finished |= matches!(state, State::Done(_));
                    if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) {
                        d.state = state;
                    }
                    self.save();
                }
            }
        }
        finished
    }

    /// The running download's `(what, fraction)`, for the status bar.
    pub fn running(&self) -> Option<(String, f32)> {
        self.downloads.iter().find_map(|d| match &d.state {
            State::Running { file, done, total, .. } => Some((
                format!("{} · {file}", d.repo),
                total.map_or(0.0, |t| *done as f32 / t.max(1) as f32),
            )),
            _ => None,
        })
    }

    /// Keeps the unfinished downloads in the data folder (atomically).
    fn save(&self) {
        let unfinished: Vec<&Download> = self
            .downloads
            .iter()
            .filter(|d| matches!(d.state, State::Queued | State::Running { .. } | State::Paused))
            .collect();
        if let Err(e) = crate::home::save_json(&saved_path(&self.home), &unfinished) {
            log::warn!("saving the download list: {e:#}");
        }
    }
}

/// Runs one download on the downloads thread; returns how it ended.
fn run_download(
    config: &HubConfig,
    job: &Download,
    events: &Sender<Event>,
    wake: &egui::Context,
) -> State {
    // Stopped while it waited in the queue: nothing to ask the Hub.
    match job.stop.load(Ordering::Relaxed) {
        0 => {}
        1 => return State::Paused,
        _ => return State::Cancelled,
    }
    let revision = job.revision.as_deref().unwrap_or("main");
    let info = match repo_info(config, &job.repo, revision) {
        Ok(info) => info,
        Err(e) => return State::Failed(e.to_string()),
    };
    let files = match pick(&info, &job.files) {
        Ok(f) => f,
        Err(e) => return State::Failed(e.to_string()),
    };
    let mut paths = Vec::new();
    for file in &files {
        let started = Instant::now();
        let mut first = None;
        let mut last: Option<Instant> = None;
        let result = download_file(config, &info, revision, file, &mut |p| {
            match job.stop.load(Ordering::Relaxed) {
                0 => {}
                _ => return std::ops::ControlFlow::Break(()),
            }
            let base = *first.get_or_insert(p.done);
            let now = Instant::now();
            if last.is_none_or(|l| now.duration_since(l).as_millis() >= 100) {
                last = Some(now);
                let speed =
                    p.done.saturating_sub(base) as f64 / started.elapsed().as_secs_f64().max(1e-3);
                // Progress is lossy: a full channel drops a report, never blocks the download.
                let _ = events.try_send(Event::Progress {
                    id: job.id,
                    file: p.file.clone(),
                    done: p.done,
                    total: p.total,
                    speed,
                });
                wake.request_repaint();
            }
            std::ops::ControlFlow::Continue(())
        });
        match result {
            Ok(Some(done)) => paths.push((file.name.clone(), done.path)),
            Ok(None) => {
                if job.stop.load(Ordering::Relaxed) == 2 {
                    remove_partials(config, &info, &files);
                    return State::Cancelled;
                }
                return State::Paused;
            }
            Err(e) => return State::Failed(e.to_string()),
        }
    }
    let weights: Vec<&PathBuf> = paths
        .iter()
        .filter(|(n, _)| kind(n) != FileKind::Companion)
        .map(|(_, p)| p)
        .collect();
    let folder = paths
        .iter()
        .any(|(n, _)| n == "config.json" || n == "model_index.json");
    let snapshot = studio_inference::hub::cache::repo_dir(&config.cache, &info.id)
        .join("snapshots")
        .join(&info.commit);
    State::Done(match weights.as_slice() {
        [one] if !folder => (*one).clone(),
        _ => snapshot,
    })
}

/// A cancelled download's partial files.
fn remove_partials(config: &HubConfig, info: &RepoInfo, files: &[studio_inference::hub::api::RepoFile]) {
    let blobs = studio_inference::hub::cache::repo_dir(&config.cache, &info.id).join("blobs");
    for f in files {
        if let Some(sha) = &f.sha256 {
            let _ = std::fs::remove_file(blobs.join(format!("{sha}.incomplete")));
        }
    }
}
