//! What the Code panel asks for, and why it submits jobs, as data (inside `Command::Panel`
//! and `JobPurpose::Panel`): a leaf module, so the window's command and job lists can name
//! them without importing the panel.

use std::path::PathBuf;

use studio_inference::worker::JobId;

/// What the Code panel asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeCommand {
    NewTab,
    /// Open a file (`None`: ask with a dialog).
    Open(Option<PathBuf>),
    /// Save tab `id` to its file (Save As when it has none).
    Save(u64),
    /// Save tab `tab` to `path` (`None`: ask with a dialog) and keep that as its file.
    SaveAs {
        tab: u64,
        path: Option<PathBuf>,
    },
    /// Close tab `id`, asking first when it has unsaved changes.
    Close(u64),
    /// Close tab `id`, dropping its unsaved changes.
    Discard(u64),
    /// Save tab `id`, then close it (when the save worked).
    SaveAndClose(u64),
    Undo,
    Redo,
    /// Tab: insert the whole suggestion.
    AcceptGhost,
    /// Ctrl+→: insert the suggestion's next word.
    AcceptWord,
    /// Esc: drop the suggestion (and cancel its request).
    DismissGhost,
    /// The pause after typing is over: ask for a completion at the cursor.
    RequestCompletion,
    /// Cancel a job of the panel's (a superseded completion).
    CancelJob(JobId),
    /// Run the action preset `id` on the selection (or the whole file).
    RunAction(String),
    /// Stop the running action; what it wrote so far stays in the pane.
    StopAction,
    /// Apply the accepted hunks of the action's diff as one undoable edit.
    ApplyHunks,
    /// Open the action's code (tests, a translation) in a new tab.
    OpenResultInTab,
    FindNext,
    FindPrevious,
    ReplaceOne,
    ReplaceAll,
    /// Quitting was asked for with unsaved tabs: save them all, then quit.
    SaveAllAndQuit,
    /// Quitting was asked for with unsaved tabs: quit anyway (their text stays in the
    /// recovery file only for untitled buffers).
    QuitDiscarding,
}

/// Why the Code panel submitted a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodePurpose {
    /// A ghost-text suggestion.
    CodeComplete,
    /// A code action (explain, fix, …).
    CodeAction,
}
