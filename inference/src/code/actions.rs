//! Editor actions (explain, fix, document, write tests, translate, free-form instruction) as
//! presets users can edit: `presets/code-actions/*.json`, each
//!
//! ```json
//! { "id": "fix", "label": "Fix", "description": "…", "kind": "edit",
//!   "system": "…", "template": "Fix … {language} … `{path}` … ```{fence}\n{code}\n``` {context}" }
//! ```
//!
//! `kind` is `explain` (the reply is Markdown, streamed into a side pane), `edit` (the reply's
//! code is a rewrite of the selection, shown as a diff to accept hunk by hunk) or `code` (the
//! reply's code is new code — tests, a translation — shown as code). Template placeholders:
//! `{language}` (the file's language), `{fence}` (its code-fence token), `{path}`, `{code}`
//! (the selection, or the whole file), `{instruction}` (free-form text), `{target_language}`
//! (for translations) and `{context}` (other open files, when the user includes them).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::language::{Language, language_for_path};
use crate::error::{Error, Result};
use crate::llm::chat::ChatMessage;

/// What an action's reply is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Markdown, streamed into a side pane.
    Explain,
    /// A rewrite of the code, shown as a diff against it.
    Edit,
    /// New code (tests, a translation), shown as code.
    Code,
}

/// One action preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionPreset {
    /// Unique key: a preset in the user's folder with the same id replaces the built-in one.
    pub id: String,
    /// Short name, the action's button text.
    pub label: String,
    /// One-sentence explanation, shown as the button's tooltip (optional; empty by default).
    #[serde(default)]
    pub description: String,
    /// What the reply is and how it is shown.
    pub kind: ActionKind,
    /// The system prompt sent with the rendered template.
    pub system: String,
    /// The user message, with `{language}`, `{fence}`, `{path}`, `{code}`, `{instruction}`,
    /// `{target_language}` and `{context}` placeholders; must contain `{code}`.
    pub template: String,
}

/// The presets shipped with Studio (the files in `presets/code-actions/`).
const BUILTIN: &[&str] = &[
    include_str!("../../../presets/code-actions/1-explain.json"),
    include_str!("../../../presets/code-actions/2-fix.json"),
    include_str!("../../../presets/code-actions/3-doc.json"),
    include_str!("../../../presets/code-actions/4-tests.json"),
    include_str!("../../../presets/code-actions/5-translate.json"),
    include_str!("../../../presets/code-actions/6-instruct.json"),
];

/// Parses one preset file's text.
pub fn parse_preset(json: &str) -> Result<ActionPreset> {
    let p: ActionPreset = serde_json::from_str(json)
        .map_err(|e| Error::InvalidParameter(format!("code action preset: {e}")))?;
    if p.id.trim().is_empty() {
        return Err(Error::InvalidParameter(
            "code action preset: `id` is empty".to_owned(),
        ));
    }
    if !p.template.contains("{code}") {
        return Err(Error::InvalidParameter(format!(
            "code action preset `{}`: the template has no {{code}} placeholder",
            p.id
        )));
    }
    Ok(p)
}

/// The built-in presets, in menu order.
pub fn builtin_presets() -> Vec<ActionPreset> {
    BUILTIN
        .iter()
        .filter_map(|j| parse_preset(j).ok())
        .collect()
}

/// Presets read from `dir` (`*.json`, in file-name order), and a message for each file that
/// could not be read. A missing folder gives none.
pub fn load_presets(dir: &Path) -> (Vec<ActionPreset>, Vec<String>) {
    let mut presets = Vec::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (presets, errors);
    };
    let mut files: Vec<_> = entries
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        })
        .collect();
    files.sort();
    for path in files {
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_preset(&t).map_err(|e| e.to_string()))
        {
            Ok(p) => {
                presets.retain(|q: &ActionPreset| q.id != p.id);
                presets.push(p);
            }
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    (presets, errors)
}

/// The built-in presets with those in `dir` (if any) replacing the ones of the same id and
/// adding new ones; plus the errors of files that could not be read.
pub fn presets_with(dir: Option<&Path>) -> (Vec<ActionPreset>, Vec<String>) {
    let mut presets = builtin_presets();
    let (found, errors) = dir.map(load_presets).unwrap_or_default();
    for p in found {
        if let Some(slot) = presets.iter_mut().find(|q| q.id == p.id) {
            *slot = p;
        } else {
            presets.push(p);
        }
    }
    (presets, errors)
}

/// Another open file, offered as context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// The file's path as shown to the user; its extension picks the code-fence language.
    pub path: String,
    /// The file's text (the prompt may keep only its first lines, or leave it out, to fit
    /// the budget).
    pub text: String,
}

/// What an action works on.
#[derive(Debug, Clone, Default)]
pub struct ActionInput {
    /// The file's path as shown to the user (relative or absolute).
    pub path: String,
    /// The selection, or the whole file when nothing is selected.
    pub code: String,
    /// Free-form instruction (the `instruct` action).
    pub instruction: String,
    /// Target language of a translation.
    pub target_language: String,
    /// Other open tabs, most relevant first (empty when the user does not include them).
    pub context: Vec<ContextFile>,
}

/// A rendered action prompt: a system prompt and one user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPrompt {
    /// The preset's system prompt.
    pub system: String,
    /// The rendered template: the user message.
    pub user: String,
    /// The preset's kind: how to show the reply.
    pub kind: ActionKind,
    /// What was left out to fit the budget, one sentence each (for the pane).
    pub cut: Vec<String>,
}

impl ActionPrompt {
    /// The conversation to send: the user message alone (the system prompt is `system`, passed
    /// separately).
    pub fn messages(&self) -> Vec<ChatMessage> {
        vec![ChatMessage::user(self.user.clone())]
    }
}

/// A rough token count for when no tokenizer is at hand (≈ 3 bytes per token for code).
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(3)
}

fn fence_for(code: &str) -> &'static str {
    if code.contains("````") {
        "~~~~~"
    } else if code.contains("```") {
        "````"
    } else {
        "```"
    }
}

fn render(
    preset: &ActionPreset,
    input: &ActionInput,
    language: Option<Language>,
    context: &str,
) -> String {
    let lang_name = language.map_or("source", |l| l.name);
    let fence_token = language.map_or("", |l| l.token);
    let fence = fence_for(&input.code);
    // Single pass over the template, so text substituted in is never scanned for placeholders.
    let mut out = String::with_capacity(preset.template.len() + input.code.len() + context.len());
    let mut rest = preset.template.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let name = &after[..close];
        let value: Option<&str> = match name {
            "language" => Some(lang_name),
            "fence" => Some(fence_token),
            "path" => Some(&input.path),
            "code" => Some(input.code.trim_end_matches('\n')),
            "instruction" => Some(input.instruction.trim()),
            "target_language" => Some(input.target_language.trim()),
            "context" => Some(context),
            _ => None,
        };
        if let Some(v) = value {
            out.push_str(v);
            rest = &after[close + 1..];
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    // The template's ``` fences become longer ones when the code itself contains ```.
    if fence != "```" {
        out = out.replace("```", fence);
    }
    out
}

fn context_block(files: &[ContextFile]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nOther open files, for context:\n");
    for f in files {
        let token = language_for_path(Path::new(&f.path)).map_or("", |l| l.token);
        let _ = write!(
            s,
            "\nFile `{}`:\n```{token}\n{}\n```\n",
            f.path,
            f.text.trim_end_matches('\n')
        );
    }
    s
}

/// Builds the prompt of `preset` for `input` within `budget` tokens (system and user message
/// together, as `count` measures them). Context files are dropped, last first, then the last
/// one kept is shortened to its start, to fit; the code itself is never cut (an error says it
/// is too long). `cut` says what was left out.
pub fn build_action_prompt(
    preset: &ActionPreset,
    input: &ActionInput,
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> Result<ActionPrompt> {
    if input.code.trim().is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if preset.template.contains("{instruction}") && input.instruction.trim().is_empty() {
        return Err(Error::InvalidParameter(
            "this action needs an instruction: say what to change".to_owned(),
        ));
    }
    if preset.template.contains("{target_language}") && input.target_language.trim().is_empty() {
        return Err(Error::InvalidParameter(
            "this action needs a target language (e.g. translate:python)".to_owned(),
        ));
    }
    let language = language_for_path(Path::new(&input.path));
    let system_tokens = count(&preset.system);
    let fits = |user: &str| system_tokens + count(user) <= budget;

    let mut cut = Vec::new();
    let mut files = input.context.clone();
    loop {
        let user = render(preset, input, language, &context_block(&files));
        if fits(&user) {
            return Ok(ActionPrompt {
                system: preset.system.clone(),
                user,
                kind: preset.kind,
                cut,
            });
        }
        let Some(last) = files.pop() else {
            let tokens = system_tokens + count(&user);
            return Err(Error::PromptTooLong {
                tokens,
                context: budget,
            });
        };
        // Try the last file shortened to the lines that fit before dropping it entirely.
        let lines: Vec<&str> = last.text.lines().collect();
        let (mut lo, mut hi) = (0usize, lines.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let mut trial = files.clone();
            trial.push(ContextFile {
                path: last.path.clone(),
                text: lines[..mid].join("\n"),
            });
            if fits(&render(preset, input, language, &context_block(&trial))) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo > 0 {
            cut.push(format!(
                "{}: only its first {lo} of {} lines were included",
                last.path,
                lines.len()
            ));
            files.push(ContextFile {
                path: last.path,
                text: lines[..lo].join("\n"),
            });
        } else {
            cut.push(format!("{}: left out (no room in the context)", last.path));
        }
    }
}

/// The code in a reply: the first fenced block (its contents; an unterminated block runs to
/// the end, as while streaming), or the whole reply when it has none.
pub fn extract_code(reply: &str) -> String {
    let mut lines = reply.split_inclusive('\n');
    let mut open: Option<(char, usize)> = None;
    let mut code = String::new();
    for line in lines.by_ref() {
        let t = line.trim_start();
        let ch = t.chars().next().unwrap_or(' ');
        if ch == '`' || ch == '~' {
            let n = t.chars().take_while(|c| *c == ch).count();
            if n >= 3 {
                open = Some((ch, n));
                break;
            }
        }
    }
    let Some((ch, n)) = open else {
        let body = reply.trim_matches('\n');
        return if body.trim().is_empty() {
            String::new()
        } else {
            format!("{body}\n")
        };
    };
    for line in lines {
        let t = line.trim();
        if t.len() >= n && t.chars().all(|c| c == ch) {
            break;
        }
        code.push_str(line);
    }
    code
}

/// The rewrite an edit action proposes for `original`: the reply's code, with `original`'s
/// trailing-newline convention kept (so a diff does not show a spurious last-line change).
pub fn rewrite_from_reply(original: &str, reply: &str) -> String {
    let mut code = extract_code(reply);
    let ends = original.ends_with('\n');
    if ends && !code.ends_with('\n') && !code.is_empty() {
        code.push('\n');
    }
    if !ends {
        while code.ends_with('\n') {
            code.pop();
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        let p = builtin_presets();
        let ids: Vec<&str> = p.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            ["explain", "fix", "doc", "tests", "translate", "instruct"]
        );
    }
}
