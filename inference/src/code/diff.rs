//! Line diffs (Myers' algorithm) grouped into hunks with context, rendered as a unified diff,
//! and applied hunk by hunk (accept or reject each).
//!
//! Lines keep their own line endings, so a missing final newline, or `\r\n` line endings,
//! survive a round trip exactly: applying every hunk gives the new text byte for byte, applying
//! none gives the old text.

use std::fmt::Write as _;

/// The kind of one line of a hunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// An unchanged line, in both texts.
    Context,
    /// A line only in the old text.
    Removed,
    /// A line only in the new text.
    Added,
}

/// One line of a hunk; `text` includes its line ending (none for a last line without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffLine {
    /// Whether the line is context, removed or added.
    pub kind: LineKind,
    /// The line's text, with its line ending.
    pub text: String,
}

impl DiffLine {
    /// The line without its line ending.
    pub fn content(&self) -> &str {
        self.text
            .strip_suffix('\n')
            .map_or(self.text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t))
    }
}

/// A group of nearby changes with up to `context` unchanged lines around them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// 0-based index of the hunk's first line in the old text, and how many old lines it spans
    /// (context and removed).
    pub old_start: usize,
    /// Number of old lines the hunk spans (context and removed).
    pub old_len: usize,
    /// The same in the new text (context and added).
    pub new_start: usize,
    /// Number of new lines the hunk spans (context and added).
    pub new_len: usize,
    /// The hunk's lines in order: context, removed and added.
    pub lines: Vec<DiffLine>,
}

impl Hunk {
    /// The `@@ -a,b +c,d @@` header (1-based, as unified diffs write it).
    pub fn header(&self) -> String {
        let range = |start: usize, len: usize| {
            if len == 0 {
                format!("{start},0")
            } else if len == 1 {
                format!("{}", start + 1)
            } else {
                format!("{},{len}", start + 1)
            }
        };
        format!(
            "@@ -{} +{} @@",
            range(self.old_start, self.old_len),
            range(self.new_start, self.new_len)
        )
    }

    /// Number of added lines.
    pub fn added(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.kind == LineKind::Added)
            .count()
    }

    /// Number of removed lines.
    pub fn removed(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.kind == LineKind::Removed)
            .count()
    }
}

/// The differences between two texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// The hunks in text order; none when the texts are equal.
    pub hunks: Vec<Hunk>,
}

impl Diff {
    /// Whether the texts are equal (no hunks).
    pub fn is_empty(&self) -> bool {
        self.hunks.is_empty()
    }
}

/// Splits `text` into lines that keep their `\n` (the last one may have none).
pub fn split_lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal(usize, usize),
    Delete(usize),
    Insert(usize),
}

/// Beyond this many differences, the changed middle is shown as one replacement (Myers' trace
/// grows with the square of the edit distance).
const MAX_EDIT_DISTANCE: usize = 2000;

/// Myers' shortest edit script between `a` and `b`.
fn myers(a: &[&str], b: &[&str], base_a: usize, base_b: usize, ops: &mut Vec<Op>) {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = (n + m) as usize;
    let mut v = vec![0isize; 2 * max + 3];
    let off = max as isize + 1;
    let idx = |k: isize| (k + off) as usize;
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut found = false;
    for d in 0..=max.min(MAX_EDIT_DISTANCE) as isize {
        trace.push(v[idx(-d)..=idx(d)].to_vec());
        let mut k = -d;
        while k <= d {
            let mut x = if k == -d || (k != d && v[idx(k - 1)] < v[idx(k + 1)]) {
                v[idx(k + 1)]
            } else {
                v[idx(k - 1)] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[idx(k)] = x;
            if x >= n && y >= m {
                found = true;
                break;
            }
            k += 2;
        }
        if found {
            break;
        }
    }
    if !found {
        ops.extend((0..a.len()).map(|i| Op::Delete(base_a + i)));
        ops.extend((0..b.len()).map(|j| Op::Insert(base_b + j)));
        return;
    }
    let mut rev: Vec<Op> = Vec::new();
    let (mut x, mut y) = (n, m);
    for (d, vd) in trace.iter().enumerate().rev() {
        let d = d as isize;
        let at = |k: isize| vd[(k + d) as usize];
        let k = x - y;
        let prev_k = if k == -d || (k != d && at(k - 1) < at(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let (prev_x, prev_y) = if d == 0 {
            (0, 0)
        } else {
            let px = at(prev_k);
            (px, px - prev_k)
        };
        while x > prev_x && y > prev_y {
            x -= 1;
            y -= 1;
            rev.push(Op::Equal(base_a + x as usize, base_b + y as usize));
        }
        if d > 0 {
            if x == prev_x {
                rev.push(Op::Insert(base_b + prev_y as usize));
            } else {
                rev.push(Op::Delete(base_a + prev_x as usize));
            }
        }
        x = prev_x;
        y = prev_y;
    }
    ops.extend(rev.into_iter().rev());
}

fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let post = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut ops: Vec<Op> = (0..pre).map(|i| Op::Equal(i, i)).collect();
    myers(
        &a[pre..a.len() - post],
        &b[pre..b.len() - post],
        pre,
        pre,
        &mut ops,
    );
    ops.extend((0..post).map(|i| Op::Equal(a.len() - post + i, b.len() - post + i)));
    ops
}

/// The line diff of `old` → `new`, changes less than `2 × context + 1` lines apart grouped
/// into one hunk (as `diff -u` and git do).
pub fn diff_lines(old: &str, new: &str, context: usize) -> Diff {
    let a = split_lines(old);
    let b = split_lines(new);
    let ops = edit_script(&a, &b);
    // Indices of changed ops, grouped.
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Equal(..)))
        .map(|(i, _)| i)
        .collect();
    let mut groups: Vec<(usize, usize)> = Vec::new(); // op index ranges [first, last]
    for &i in &changed {
        match groups.last_mut() {
            Some((_, last)) if i - *last <= 2 * context + 1 => *last = i,
            _ => groups.push((i, i)),
        }
    }
    // Old/new line positions before each op.
    let mut pos = Vec::with_capacity(ops.len() + 1);
    let (mut oa, mut ob) = (0usize, 0usize);
    for op in &ops {
        pos.push((oa, ob));
        match op {
            Op::Equal(..) => {
                oa += 1;
                ob += 1;
            }
            Op::Delete(_) => oa += 1,
            Op::Insert(_) => ob += 1,
        }
    }
    pos.push((oa, ob));
    let hunks = groups
        .into_iter()
        .map(|(first, last)| {
            let start = first.saturating_sub(context);
            let end = (last + 1 + context).min(ops.len());
            let lines = ops[start..end]
                .iter()
                .map(|op| match *op {
                    Op::Equal(i, _) => DiffLine {
                        kind: LineKind::Context,
                        text: a[i].to_owned(),
                    },
                    Op::Delete(i) => DiffLine {
                        kind: LineKind::Removed,
                        text: a[i].to_owned(),
                    },
                    Op::Insert(j) => DiffLine {
                        kind: LineKind::Added,
                        text: b[j].to_owned(),
                    },
                })
                .collect();
            let (old_start, new_start) = pos[start];
            let (old_end, new_end) = pos[end];
            Hunk {
                old_start,
                old_len: old_end - old_start,
                new_start,
                new_len: new_end - new_start,
                lines,
            }
        })
        .collect();
    Diff { hunks }
}

/// The text after applying the hunks whose `accepted` entry is true to `old` (missing entries
/// count as rejected). `diff` must have been computed from `old`.
pub fn apply(old: &str, diff: &Diff, accepted: &[bool]) -> String {
    let a = split_lines(old);
    let mut out = String::with_capacity(old.len());
    let mut next = 0; // next old line to copy
    for (h, hunk) in diff.hunks.iter().enumerate() {
        if !accepted.get(h).copied().unwrap_or(false) {
            continue;
        }
        let start = hunk.old_start.min(a.len());
        for line in &a[next.min(start)..start] {
            out.push_str(line);
        }
        for line in &hunk.lines {
            if line.kind != LineKind::Removed {
                out.push_str(&line.text);
            }
        }
        next = (hunk.old_start + hunk.old_len).min(a.len());
    }
    for line in &a[next.min(a.len())..] {
        out.push_str(line);
    }
    out
}

/// Renders `diff` as a unified diff (`--- a/PATH`, `+++ b/PATH`, `@@ -a,b +c,d @@`, ` `/`-`/`+`
/// lines, `\ No newline at end of file` where a last line has none). Empty when nothing
/// changed.
pub fn unified(diff: &Diff, old_path: &str, new_path: &str) -> String {
    let mut out = String::new();
    if diff.is_empty() {
        return out;
    }
    let _ = writeln!(out, "--- a/{old_path}");
    let _ = writeln!(out, "+++ b/{new_path}");
    for hunk in &diff.hunks {
        let _ = writeln!(out, "{}", hunk.header());
        for line in &hunk.lines {
            let mark = match line.kind {
                LineKind::Context => ' ',
                LineKind::Removed => '-',
                LineKind::Added => '+',
            };
            out.push(mark);
            out.push_str(&line.text);
            if !line.text.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cases = [
            ("", ""),
            ("a\n", ""),
            ("", "a\n"),
            ("a\nb\nc\n", "a\nB\nc\n"),
            ("a\nb", "a\nb\n"),
            ("x\ny\nz\n", "y\nz\nw"),
            (
                "1\n2\n3\n4\n5\n6\n7\n8\n9\n",
                "1\n2x\n3\n4\n5\n6\n7\n8y\n9\n",
            ),
        ];
        for (old, new) in cases {
            let d = diff_lines(old, new, 3);
            let all = vec![true; d.hunks.len()];
            assert_eq!(apply(old, &d, &all), new, "{old:?} → {new:?}");
            assert_eq!(apply(old, &d, &[]), old);
        }
    }
}
