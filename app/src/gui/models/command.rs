//! What the Models panel asks for, as data (inside `Command::Panel`): a leaf module, so the
//! window's command list can name it without importing the panel. Loading and unloading a
//! model are the window's own commands (`Command::LoadModel`), as every panel asks for them.

use std::path::PathBuf;

/// What the Models panel asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelsCommand {
    /// Forget a model in the recent list.
    RemoveRecentModel(PathBuf),
    /// List the Hugging Face cache again.
    RescanHfCache,
    /// Ask before deleting this model from the Hugging Face cache.
    AskDelete(PathBuf),
    /// Delete this model from the Hugging Face cache (its links, and the blobs no other
    /// snapshot uses).
    Delete(PathBuf),
    /// Show this model's folder in the file manager.
    ShowInFolder(PathBuf),
}

/// The Models panel submits no jobs of its own (loads are the window's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelsPurpose {}
