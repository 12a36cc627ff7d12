//! Line diffs: hunks with context, the unified format, per-hunk accept/reject, line endings.

use std::fmt::Write as _;

use studio_inference::code::diff::{LineKind, apply, diff_lines, unified};

const OLD: &str = "fn main() {\n    let a = 1;\n    let b = 2;\n    println!(\"{}\", a + b);\n}\n\nfn f() {}\nfn g() {}\nfn h() {}\nfn i() {}\nfn j() {}\nfn k() {}\n\nfn helper() -> i32 {\n    41\n}\n";

fn new_text() -> String {
    OLD.replace("let b = 2;", "let b = 3;")
        .replace("    41\n", "    // the answer\n    42\n")
}

#[test]
fn two_distant_changes_are_two_hunks_with_context() {
    let new = new_text();
    let d = diff_lines(OLD, &new, 3);
    assert_eq!(d.hunks.len(), 2);
    let h = &d.hunks[0];
    assert_eq!(
        (h.old_start, h.old_len, h.new_start, h.new_len),
        (0, 6, 0, 6)
    );
    assert_eq!((h.removed(), h.added()), (1, 1));
    assert_eq!(h.header(), "@@ -1,6 +1,6 @@");
    let kinds: Vec<LineKind> = h.lines.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds[..4],
        [
            LineKind::Context,
            LineKind::Context,
            LineKind::Removed,
            LineKind::Added
        ]
    );
    assert_eq!(h.lines[2].content(), "    let b = 2;");
    let h = &d.hunks[1];
    assert_eq!(h.header(), "@@ -12,5 +12,6 @@");

    let text = unified(&d, "src/main.rs", "src/main.rs");
    let want = "--- a/src/main.rs\n+++ b/src/main.rs\n@@ -1,6 +1,6 @@\n fn main() {\n     let a = 1;\n-    let b = 2;\n+    let b = 3;\n     println!(\"{}\", a + b);\n }\n \n@@ -12,5 +12,6 @@\n fn k() {}\n \n fn helper() -> i32 {\n-    41\n+    // the answer\n+    42\n }\n";
    assert_eq!(text, want);
}

#[test]
fn each_subset_of_hunks_applies() {
    let new = new_text();
    let d = diff_lines(OLD, &new, 3);
    assert_eq!(apply(OLD, &d, &[true, true]), new);
    assert_eq!(apply(OLD, &d, &[false, false]), OLD);
    assert_eq!(apply(OLD, &d, &[]), OLD);
    let first = apply(OLD, &d, &[true, false]);
    assert!(first.contains("let b = 3;") && first.contains("    41\n"));
    let second = apply(OLD, &d, &[false, true]);
    assert!(second.contains("let b = 2;") && second.contains("    42\n"));
    // Applying the rest to a partial result gives the full one.
    let rest = diff_lines(&first, &new, 3);
    assert_eq!(rest.hunks.len(), 1);
    assert_eq!(apply(&first, &rest, &[true]), new);
}

#[test]
fn nearby_changes_merge_and_identical_texts_have_no_hunks() {
    let old = "a\nb\nc\nd\ne\nf\ng\n";
    let new = "a\nB\nc\nd\nE\nf\ng\n";
    let d = diff_lines(old, new, 3);
    assert_eq!(d.hunks.len(), 1);
    assert_eq!(diff_lines(old, new, 0).hunks.len(), 2);
    assert!(diff_lines(old, old, 3).is_empty());
    assert_eq!(unified(&diff_lines(old, old, 3), "x", "x"), "");
}

#[test]
fn trailing_newline_and_crlf_are_kept() {
    let d = diff_lines("a\nb", "a\nb\n", 3);
    assert_eq!(d.hunks.len(), 1);
    assert_eq!(apply("a\nb", &d, &[true]), "a\nb\n");
    let text = unified(&d, "f", "f");
    assert_eq!(
        text,
        "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+b\n"
    );
    let old = "x\r\ny\r\nz\r\n";
    let new = "x\r\nY\r\nz\r\n";
    let d = diff_lines(old, new, 1);
    assert_eq!(apply(old, &d, &[true]), new);
    assert_eq!(d.hunks[0].lines[1].content(), "y");
    // Insertions at the very start and deletions at the very end.
    let d = diff_lines("b\nc\n", "a\nb\n", 3);
    assert_eq!(apply("b\nc\n", &d, &[true]), "a\nb\n");
    let d = diff_lines("", "new file\n", 3);
    assert_eq!(d.hunks[0].header(), "@@ -0,0 +1 @@");
    assert_eq!(apply("", &d, &[true]), "new file\n");
}

fn numbered(n: usize, word: &str) -> String {
    (0..n).fold(String::new(), |mut s, i| {
        let _ = writeln!(s, "{word} {i}");
        s
    })
}

#[test]
fn large_rewrites_round_trip() {
    let old: String = numbered(3000, "line");
    let new: String = (0..3000)
        .map(|i| {
            if i % 7 == 0 {
                format!("changed {i}\n")
            } else if i % 11 == 0 {
                String::new()
            } else {
                format!("line {i}\n")
            }
        })
        .collect();
    let d = diff_lines(&old, &new, 2);
    assert!(d.hunks.len() > 100);
    assert_eq!(apply(&old, &d, &vec![true; d.hunks.len()]), new);
    // Completely different texts still diff (as one replacement when needed).
    let other: String = numbered(3000, "other");
    let d = diff_lines(&old, &other, 3);
    assert_eq!(apply(&old, &d, &vec![true; d.hunks.len()]), other);
}
