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
