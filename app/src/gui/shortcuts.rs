//! The window's keyboard shortcuts (Ctrl is Cmd on macOS).

use egui::{Key, KeyboardShortcut, Modifiers};

/// Send the message (Chat), generate (Canvas).
pub const SEND_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
/// Undo on the canvas and in the editor.
pub const UNDO_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Z);
/// Redo (Ctrl+Shift+Z).
pub const REDO_SHORTCUT: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::Z);
/// Redo (Ctrl+Y).
pub const REDO_Y: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Y);
