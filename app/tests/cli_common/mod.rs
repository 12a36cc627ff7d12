//! What the command-line tests share: running the real `studio` binary and reading its result.
//!
//! Each test binary uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `studio` with `args` on one CPU thread.
pub fn studio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run studio")
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts failure and returns stderr.
#[track_caller]
pub fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
