//! Process facts for benchmarks and the status bar.

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    status_kib("VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// Current resident set size in MiB (Linux `VmRSS`).
pub fn rss_mb() -> Option<f64> {
    status_kib("VmRSS:").map(|kib| kib as f64 / 1024.0)
}

/// Memory the OS could give this process now, in bytes (Linux `MemAvailable`).
pub fn available_memory_bytes() -> Option<u64> {
    kib_in("/proc/meminfo", "MemAvailable:").map(|kib| kib * 1024)
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

#[cfg(test)]
mod tests {
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
