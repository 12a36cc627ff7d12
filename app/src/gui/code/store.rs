//! The Code panel's recovery file, `STUDIO_HOME/code/session.json`: the open tabs (path,
//! untitled name, cursor) and the text of every tab with unsaved changes. Written atomically on
//! the file thread about a second after the last edit (and on exit), read at startup, so a
//! crash or a restart loses nothing typed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::buffer::{Tab, read_source};
use crate::files::FileWorker;
use crate::home::load_json;

/// Bumped when the saved layout changes meaning.
pub const SESSION_VERSION: u32 = 1;

/// How long after the last edit the session is written.
pub const SAVE_DEBOUNCE: Duration = Duration::from_secs(1);

/// One tab as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SavedTab {
    pub id: u64,
    pub path: Option<PathBuf>,
    pub untitled: String,
    /// The unsaved text; `None` when the tab matches its file.
    pub text: Option<String>,
    pub language: Option<String>,
}

impl Default for SavedTab {
    fn default() -> Self {
        Self {
            id: 0,
            path: None,
            untitled: "untitled".to_owned(),
            text: None,
            language: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    pub version: u32,
    pub tabs: Vec<SavedTab>,
    /// The id of the tab shown.
    pub active: Option<u64>,
    /// The next untitled buffer's number.
    pub next_untitled: u64,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            version: SESSION_VERSION,
            tabs: Vec::new(),
            active: None,
            next_untitled: 1,
        }
    }
}

pub fn dir(home: &Path) -> PathBuf {
    home.join("code")
}

pub fn session_path(home: &Path) -> PathBuf {
    dir(home).join("session.json")
}

/// The session as it stands: every tab, with the text of those not saved.
pub fn snapshot(tabs: &[Tab], active: Option<u64>, next_untitled: u64) -> Session {
    Session {
        version: SESSION_VERSION,
        tabs: tabs
            .iter()
            .map(|t| SavedTab {
                id: t.id,
                path: t.path.clone(),
                untitled: t.untitled.clone(),
                text: (t.is_dirty() || t.path.is_none()).then(|| t.text.clone()),
                language: t.language_token.clone(),
            })
            .collect(),
        active,
        next_untitled,
    }
}

/// What was read at startup: the tabs, the active one, notes for notices.
pub struct Restored {
    pub tabs: Vec<Tab>,
    pub active: Option<u64>,
    pub next_untitled: u64,
    pub notes: Vec<String>,
}

/// Reads the session (a bad file is kept aside as `session.json.bad-<timestamp>` with a note).
pub fn restore(home: &Path) -> Restored {
    let path = session_path(home);
    let mut notes = Vec::new();
    let session: Session = match load_json(&path) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            notes.push(format!(
                "The Code panel's open tabs could not be restored: {e:#}.{}",
                crate::home::keep_corrupt(&path)
            ));
            Session::default()
        }
    };
    let mut tabs = Vec::new();
    for s in session.tabs {
        let disk = s.path.as_deref().map(read_source);
        let mut tab = match (s.text, disk) {
            (Some(text), disk) => {
                let mut tab = Tab::new(s.id, s.path.clone(), s.untitled, text);
                match disk {
                    Some(Ok(on_disk)) => tab.set_saved_text(&on_disk),
                    // An empty untitled buffer has nothing to save.
                    None if tab.text.is_empty() => {}
                    // The file is gone, unreadable, or there is none: never saved.
                    Some(Err(_)) | None => tab.mark_unsaved(),
                }
                tab
            }
            (None, Some(Ok(text))) => Tab::new(s.id, s.path.clone(), s.untitled, text),
            (None, Some(Err(e))) => {
                notes.push(format!("A tab was not reopened: {}", e.0));
                continue;
            }
            (None, None) => Tab::new(s.id, None, s.untitled, String::new()),
        };
        tab.language_token = s.language;
        tabs.push(tab);
    }
    let active = session
        .active
        .filter(|a| tabs.iter().any(|t| t.id == *a))
        .or_else(|| tabs.first().map(|t| t.id));
    Restored {
        tabs,
        active,
        next_untitled: session.next_untitled.max(1),
        notes,
    }
}

/// Writes the session a moment after the last change.
#[derive(Debug)]
pub struct SessionStore {
    path: PathBuf,
    /// The session last written (or read), to skip identical writes.
    written: Option<Session>,
    /// When the first unsaved change happened.
    dirty_since: Option<Instant>,
    /// A fingerprint of the tabs' revisions at the last check.
    last_seen: Vec<(u64, u64)>,
    last_active: Option<u64>,
}

impl SessionStore {
    pub fn new(home: &Path) -> Self {
        Self {
            path: session_path(home),
            written: None,
            dirty_since: None,
            last_seen: Vec::new(),
            last_active: None,
        }
    }

    /// Notes changes and writes [`SAVE_DEBOUNCE`] after the last one; returns how long until
    /// the next write is due.
    pub fn tick(
        &mut self,
        tabs: &[Tab],
        active: Option<u64>,
        next_untitled: u64,
        files: &FileWorker,
    ) -> Option<Duration> {
        let seen: Vec<(u64, u64)> = tabs.iter().map(|t| (t.id, t.rev)).collect();
        if seen != self.last_seen || active != self.last_active {
            self.last_seen = seen;
            self.last_active = active;
            self.dirty_since = Some(Instant::now());
        }
        let since = self.dirty_since?;
        let elapsed = since.elapsed();
        if elapsed < SAVE_DEBOUNCE {
            return Some(SAVE_DEBOUNCE.saturating_sub(elapsed));
        }
        self.write(tabs, active, next_untitled, files);
        None
    }

    /// Writes now if anything changed since the last write.
    pub fn flush(
        &mut self,
        tabs: &[Tab],
        active: Option<u64>,
        next_untitled: u64,
        files: &FileWorker,
    ) {
        self.write(tabs, active, next_untitled, files);
    }

    fn write(&mut self, tabs: &[Tab], active: Option<u64>, next_untitled: u64, files: &FileWorker) {
        self.dirty_since = None;
        let session = snapshot(tabs, active, next_untitled);
        if self.written.as_ref() == Some(&session) {
            return;
        }
        let to_write = session.clone();
        self.written = Some(session);
        files.write(
            "The Code panel's recovery file",
            &self.path,
            Box::new(move || {
                serde_json::to_vec_pretty(&to_write)
                    .map_err(|e| anyhow::anyhow!("serializing the code session: {e}"))
            }),
        );
    }
}
