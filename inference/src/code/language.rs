//! The programming language of a file, from its extension (or well-known file name).

use std::path::Path;

/// A language Studio knows: its display name, the token syntect (and Markdown code fences)
/// use for it, and its line-comment marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Language {
    /// Display name, as used in prompts ("Rust", "Python").
    pub name: &'static str,
    /// The syntect / code-fence token (`rs`, `py`, `js`, …): what `egui_extras::syntax_highlighting`
    /// takes as the language.
    pub token: &'static str,
    /// The line-comment marker, if the language has one.
    pub line_comment: Option<&'static str>,
}

const fn lang(name: &'static str, token: &'static str, comment: Option<&'static str>) -> Language {
    Language {
        name,
        token,
        line_comment: comment,
    }
}

/// Every language Studio recognises, with the extensions that select it.
const TABLE: &[(&[&str], Language)] = &[
    (&["rs"], lang("Rust", "rs", Some("//"))),
    (&["py", "pyw", "pyi"], lang("Python", "py", Some("#"))),
    (
        &["js", "mjs", "cjs", "jsx"],
        lang("JavaScript", "js", Some("//")),
    ),
    (
        &["ts", "mts", "cts", "tsx"],
        lang("TypeScript", "ts", Some("//")),
    ),
    (&["c", "h"], lang("C", "c", Some("//"))),
    (
        &["cpp", "cc", "cxx", "c++", "hpp", "hh", "hxx", "h++", "ipp"],
        lang("C++", "cpp", Some("//")),
    ),
    (&["go"], lang("Go", "go", Some("//"))),
    (&["java"], lang("Java", "java", Some("//"))),
    (&["html", "htm", "xhtml"], lang("HTML", "html", None)),
    (&["css"], lang("CSS", "css", None)),
    (&["json", "jsonc"], lang("JSON", "json", None)),
    (&["toml"], lang("TOML", "toml", Some("#"))),
    (&["md", "markdown"], lang("Markdown", "md", None)),
    (
        &["sh", "bash", "zsh", "ksh", "bashrc", "zshrc", "profile"],
        lang("Shell", "sh", Some("#")),
    ),
    (&["yaml", "yml"], lang("YAML", "yaml", Some("#"))),
    (&["xml", "svg"], lang("XML", "xml", None)),
    (&["sql"], lang("SQL", "sql", Some("--"))),
    (&["rb"], lang("Ruby", "rb", Some("#"))),
    (&["php"], lang("PHP", "php", Some("//"))),
    (&["cs"], lang("C#", "cs", Some("//"))),
    (&["kt", "kts"], lang("Kotlin", "kt", Some("//"))),
    (&["swift"], lang("Swift", "swift", Some("//"))),
    (&["lua"], lang("Lua", "lua", Some("--"))),
    (&["txt", "text"], lang("Plain text", "txt", None)),
];

/// The language of `path`, from its extension (case-insensitive) or a well-known file name
/// (`Makefile`-less: `.bashrc`, `Cargo.lock` as TOML). `None` when unknown.
pub fn language_for_path(path: &Path) -> Option<Language> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name == "cargo.lock" {
        return language_by_token("toml");
    }
    let ext = match name.rsplit_once('.') {
        Some((_, ext)) => ext.to_owned(),
        None => return None,
    };
    TABLE
        .iter()
        .find(|(exts, _)| exts.contains(&ext.as_str()))
        .map(|(_, l)| *l)
}

/// The language whose syntect token is `token` (`rs`, `py`, …).
pub fn language_by_token(token: &str) -> Option<Language> {
    TABLE.iter().map(|(_, l)| *l).find(|l| l.token == token)
}

/// The language called `name` (case-insensitive; also accepts tokens and extensions such as
/// `rust`, `rs`, `python`, `py`, `c++`, `cpp`, `js`, `typescript`, `bash`).
pub fn language_by_name(name: &str) -> Option<Language> {
    let n = name.trim().to_ascii_lowercase();
    if n.is_empty() {
        return None;
    }
    let alias = match n.as_str() {
        "golang" => "go",
        "javascript" | "node" => "js",
        "typescript" => "ts",
        "bash" | "shell" | "zsh" => "sh",
        "c++" | "cplusplus" => "cpp",
        "csharp" | "c#" => "cs",
        "kotlin" => "kt",
        "ruby" => "rb",
        "markdown" => "md",
        "python" | "python3" => "py",
        "rust" => "rs",
        other => other,
    };
    TABLE
        .iter()
        .find(|(exts, l)| l.name.eq_ignore_ascii_case(alias) || exts.contains(&alias))
        .map(|(_, l)| *l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_and_names() {
        let l = |p: &str| language_for_path(Path::new(p)).map(|l| l.name);
        assert_eq!(l("src/main.rs"), Some("Rust"));
        assert_eq!(l("a/B.PY"), Some("Python"));
        assert_eq!(l("x.tsx"), Some("TypeScript"));
        assert_eq!(l("x.hpp"), Some("C++"));
        assert_eq!(l("x.h"), Some("C"));
        assert_eq!(l("Cargo.toml"), Some("TOML"));
        assert_eq!(l("run.sh"), Some("Shell"));
        assert_eq!(l("README"), None);
        assert_eq!(language_by_name("Go").map(|l| l.token), Some("go"));
        assert_eq!(language_by_name("c++").map(|l| l.name), Some("C++"));
        assert_eq!(language_by_name("python").map(|l| l.token), Some("py"));
        assert_eq!(language_by_name("klingon"), None);
    }
}
