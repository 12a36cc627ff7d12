//! Code assist: fill-in-the-middle completion ([`fim`], [`complete`]), line diffs with
//! per-hunk apply ([`diff`]), editor actions from presets ([`actions`]) and languages by file
//! extension ([`language`]). No UI here: the Code panel and `studio complete` / `studio code`
//! both use these.

pub mod actions;
pub mod complete;
pub mod diff;
pub mod fim;
pub mod language;
