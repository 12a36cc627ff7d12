//! The Settings panel's commands and job purposes (inside `Command::Panel` and
//! `JobPurpose::Panel`): none of its own. It changes the settings in place while it draws, and
//! what it asks for (a remote server, the API server) are the window's commands, as they
//! replace or serve the loaded model.

/// The Settings panel has no commands of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsCommand {}

/// The Settings panel submits no jobs of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsPurpose {}
