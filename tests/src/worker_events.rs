//! Waiting on the inference worker's events in tests.

use std::time::{Duration, Instant};

use studio_inference::worker::{Event, JobId, Worker};

/// Receives events until `job` ends and returns that job's events (other jobs' events are
/// dropped). Panics when `timeout` passes first.
pub fn until_terminal(w: &Worker, job: JobId, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = w.events().recv_timeout(left).expect("event before timeout");
        if e.job() == job {
            let end = e.is_terminal();
            out.push(e);
            if end {
                return out;
            }
        }
    }
}

/// Receives events until text streams (the job is running and generating); panics if a job
/// ends first or `timeout` passes.
pub fn until_streaming(w: &Worker, timeout: Duration) {
    loop {
        let e = w.events().recv_timeout(timeout).expect("event");
        assert!(!e.is_terminal(), "ended before it streamed: {e:?}");
        if matches!(e, Event::Text { .. }) {
            return;
        }
    }
}
