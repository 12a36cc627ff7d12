//! Process facts for benchmarks and the status bar.

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    status_kib("VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// Hands freed heap memory back to the OS and restarts the peak RSS count from the current
/// RSS (Linux: `malloc_trim`, then `5` written to `/proc/self/clear_refs`), so a benchmark
/// measures what running a model takes, not building it from random weights (whose
/// generator keeps a second copy while the kernels pack theirs). `false` where unsupported.
#[allow(unsafe_code)]
pub fn reset_peak_rss() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: `malloc_trim` only returns free heap pages to the OS.
        unsafe {
            malloc_trim(0);
        }
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Drops the pages of `data`, a slice of a read-only file mapping the caller has copied what
/// it needs from, from this process's resident memory (Linux `madvise(MADV_DONTNEED)` on the
/// whole pages inside it): a loader that reads a checkpoint once keeps only its own copies
/// resident, not the file too (a 5 GB UNet counted twice at its peak). Reading the slice again
/// faults the same bytes back in from the file. A no-op elsewhere.
#[allow(unsafe_code)]
pub fn release_mapped_pages(data: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const MADV_DONTNEED: std::ffi::c_int = 4;
        const PAGE: usize = 4096;
        unsafe extern "C" {
            fn madvise(
                addr: *mut std::ffi::c_void,
                len: usize,
                advice: std::ffi::c_int,
            ) -> std::ffi::c_int;
        }
        let start = (data.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (data.as_ptr() as usize + data.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: `[start, end)` lies inside `data`, which the caller guarantees is part of
            // a live read-only file mapping: MADV_DONTNEED only unmaps its pages from this
            // process, and the next read refills them from the unchanged file, so no value
            // seen through the mapping changes. The result is ignored: on failure the pages
            // simply stay resident.
            unsafe {
                madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// Current resident set size in MiB (Linux `VmRSS`).
pub fn rss_mb() -> Option<f64> {
    status_kib("VmRSS:").map(|kib| kib as f64 / 1024.0)
}

/// Memory the OS could give this process now, in bytes (Linux `MemAvailable`).
pub fn available_memory_bytes() -> Option<u64> {
    kib_in("/proc/meminfo", "MemAvailable:").map(|kib| kib * 1024)
}

/// Free memory of NVIDIA GPU `index` in bytes, from `nvidia-smi` (the driver's tool, on the
/// `PATH` wherever the driver is installed; `$STUDIO_NVIDIA_SMI` names another program with
/// its interface). `None` when there is none, it fails, or it takes more than 3 s. It runs a
/// process: call it off the UI thread.
pub fn nvidia_free_memory_bytes(index: usize) -> Option<u64> {
    let program = std::env::var_os("STUDIO_NVIDIA_SMI").unwrap_or_else(|| "nvidia-smi".into());
    free_memory_from(&program, index, std::time::Duration::from_secs(3))
}

/// [`nvidia_free_memory_bytes`] with `program` as `nvidia-smi`, waiting at most `limit`.
fn free_memory_from(
    program: &std::ffi::OsStr,
    index: usize,
    limit: std::time::Duration,
) -> Option<u64> {
    use std::io::Read as _;
    let mut child = std::process::Command::new(program)
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            &format!("--id={index}"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    // A line of digits: bound what is read.
    child
        .stdout
        .take()?
        .take(256)
        .read_to_string(&mut out)
        .ok()?;
    let mib: u64 = out.lines().next()?.trim().parse().ok()?;
    mib.checked_mul(1 << 20)
}

/// The machine's physical memory in bytes (Linux `MemTotal`).
pub fn total_memory_bytes() -> Option<u64> {
    kib_in("/proc/meminfo", "MemTotal:").map(|kib| kib * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    kib_in("/proc/self/status", key)
}

fn kib_in(file: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(file).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Memory read bandwidth in GB/s (10⁹ bytes per second) of `threads` threads, each summing
/// its own `bytes / threads` buffer (allocated and first touched on that thread) `rounds + 1`
/// times at once: the bound a decode step, which reads every weight byte once, can approach.
/// One figure per round after a warm-up round: the threads' rates in that round, added.
///
/// # Errors
/// When the system cannot start a thread.
pub fn read_bandwidth_gb_s(
    threads: usize,
    bytes: usize,
    rounds: usize,
) -> std::io::Result<Vec<f64>> {
    let threads = threads.max(1);
    let per = (bytes / threads / 64).max(1) * 64;
    std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            handles.push(
                std::thread::Builder::new()
                    .name(format!("studio-bw-{t}"))
                    .spawn_scoped(s, move || {
                        let buf: Vec<u64> = (0..per / 8).map(|i| i as u64 | 1).collect();
                        let mut secs = Vec::with_capacity(rounds + 1);
                        for _ in 0..=rounds {
                            let t = std::time::Instant::now();
                            std::hint::black_box(xor_words(&buf));
                            secs.push(t.elapsed().as_secs_f64());
                        }
                        secs
                    })?,
            );
        }
        let mut gb_s = vec![0f64; rounds];
        for h in handles {
            let secs = h
                .join()
                .map_err(|_| std::io::Error::other("a bandwidth thread panicked"))?;
            for (g, s) in gb_s.iter_mut().zip(&secs[1..]) {
                *g += per as f64 / s / 1e9;
            }
        }
        Ok(gb_s)
    })
}

/// The xor of every word of `buf` (an integer reduction, which the compiler vectorizes).
fn xor_words(buf: &[u64]) -> u64 {
    buf.iter().fold(0, |a, v| a ^ v)
}

/// Writes `bytes` to `path` atomically: readers (and a crash) see the old file or the new one,
/// never half of one.
///
/// - The temporary file is created exclusively (`O_EXCL`) in the target's folder, under a
///   fresh name, so a file or symlink planted there is never followed or reused.
/// - A symlink is written through: its target is replaced, the link stays.
/// - An existing target keeps its permissions (a script keeps its executable bit); a new one
///   gets the usual mode. `private` makes it readable by the user only (0600 on Unix), for
///   files holding secrets.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = AtomicFile::create(path, private)?;
    file.write_all(bytes)?;
    file.commit()
}

/// A file that replaces `path` atomically, as [`write_atomic`] does, for output written as it
/// is made (a GIF, frame by frame): written through [`std::io::Write`], it takes the target's
/// place only at [`AtomicFile::commit`]. Dropped without a commit (an error, a cancel) it
/// removes its temporary and the old file stays.
#[derive(Debug)]
pub struct AtomicFile {
    file: std::fs::File,
    tmp: std::path::PathBuf,
    target: std::path::PathBuf,
    dir: std::path::PathBuf,
    private: bool,
    keep: Option<std::fs::Permissions>,
    committed: bool,
}

impl AtomicFile {
    /// Creates the temporary beside `path` (see [`write_atomic`] for how).
    pub fn create(path: &std::path::Path, private: bool) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let target = match std::fs::symlink_metadata(path) {
            // Through the link (a dangling one: to where it points, relative to its folder).
            Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).or_else(|_| {
                std::fs::read_link(path).map(|to| {
                    path.parent()
                        .map_or_else(|| to.clone(), |dir| dir.join(&to))
                })
            })?,
            _ => path.to_path_buf(),
        };
        let keep = std::fs::metadata(&target).ok().map(|m| m.permissions());
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let name = target
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let mut attempts = 0;
        let (file, tmp) = loop {
            attempts += 1;
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            if private {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            match options.open(&tmp) {
                Ok(f) => break (f, tmp),
                // A name taken (left by a crash, or planted): try the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 1000 => {}
                Err(e) => return Err(e),
            }
        };
        Ok(Self {
            file,
            tmp,
            target,
            dir,
            private,
            keep,
            committed: false,
        })
    }

    /// Puts the written file in the target's place (permissions, `fsync`, rename, and the
    /// folder synced so the rename is durable).
    pub fn commit(mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        if self.private {
            use std::os::unix::fs::PermissionsExt as _;
            self.file
                .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        if let (false, Some(p)) = (self.private, self.keep.take()) {
            self.file.set_permissions(p)?;
        }
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Moves a file that could not be read aside to `NAME.bad-<unix seconds>` (`-2`, `-3`… added
/// when that name is taken), so the next save does not overwrite the user's data and an
/// earlier copy is never replaced. Returns the new path, `None` when it could not be moved.
pub fn keep_corrupt(path: &std::path::Path) -> Option<std::path::PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut base = path.as_os_str().to_owned();
    base.push(format!(".bad-{secs}"));
    for n in 1..1000 {
        let mut name = base.clone();
        if n > 1 {
            name.push(format!("-{n}"));
        }
        let bad = std::path::PathBuf::from(name);
        // Not `rename` alone: it would replace an existing copy.
        if std::fs::symlink_metadata(&bad).is_err() {
            return std::fs::rename(path, &bad).ok().map(|()| bad);
        }
    }
    None
}

/// Tunes glibc's allocator for the image models: buffers up to 32 MiB (glibc's ceiling for
/// this setting; a 256² VAE activation is about that) come from the heap and are reused
/// instead of being mapped fresh and zeroed page by page on every operation, and up to
/// 512 MiB of freed memory at the top of the heap is kept for the next operation. Measured
/// on `studio bench sd` at 256²: VAE decode 4.87 → 4.25 s, UNet step 3.50 → 3.34 s, the
/// same peak RSS. Call once at startup; elsewhere (other C libraries) it does nothing.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::c_int;
        // glibc's `mallopt` parameters (malloc.h).
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        unsafe extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // SAFETY: `mallopt` only adjusts allocator parameters; glibc rejects values out of
        // range by returning 0, which leaves its defaults in place.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    /// An executable shell script standing in for `nvidia-smi`.
    #[cfg(unix)]
    fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[cfg(unix)]
    #[test]
    fn gpu_free_memory_is_read_from_nvidia_smi_and_bad_answers_are_none() {
        use super::free_memory_from;
        use std::time::{Duration, Instant};
        let tmp = tempfile::tempdir().expect("tmp");
        let limit = Duration::from_secs(3);
        // The arguments reach the program: it answers only for the asked GPU.
        let ok = script(
            tmp.path(),
            "ok",
            r#"case "$*" in *--id=1*) echo " 8123";; *) exit 9;; esac"#,
        );
        assert_eq!(free_memory_from(ok.as_os_str(), 1, limit), Some(8123 << 20));
        assert_eq!(free_memory_from(ok.as_os_str(), 0, limit), None);
        let garbage = script(tmp.path(), "garbage", "echo 'No devices were found'");
        assert_eq!(free_memory_from(garbage.as_os_str(), 0, limit), None);
        let missing = tmp.path().join("missing");
        assert_eq!(free_memory_from(missing.as_os_str(), 0, limit), None);
        // A hung driver tool is abandoned at the limit.
        let hung = script(tmp.path(), "hung", "sleep 30");
        let started = Instant::now();
        assert_eq!(
            free_memory_from(hung.as_os_str(), 0, Duration::from_millis(300)),
            None
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Files in `dir` (the target and any temporary left behind).
    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Written output replaces the target only at commit; dropped uncommitted (a cancelled
    /// GIF export) it leaves the old file and no temporary.
    #[test]
    fn an_atomic_file_replaces_only_when_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("animation.gif");
        std::fs::write(&path, b"old").expect("old");
        let mut file = super::AtomicFile::create(&path, false).expect("create");
        file.write_all(b"half of a ").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(names(dir.path()), ["animation.gif"]);
        let mut file = super::AtomicFile::create(&path, false).expect("create");
        file.write_all(b"new").expect("write");
        file.commit().expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(names(dir.path()), ["animation.gif"]);
    }

    #[test]
    fn read_bandwidth_reports_one_figure_per_round() {
        let figures = super::read_bandwidth_gb_s(2, 1 << 20, 3).expect("threads");
        assert_eq!(figures.len(), 3);
        assert!(
            figures.iter().all(|g| g.is_finite() && *g > 0.0),
            "{figures:?}"
        );
    }
}
