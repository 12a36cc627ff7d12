//! File work the UI thread must not wait for, on one named thread (`studio-files`): encoding
//! and atomically writing images (generated images, the canvas autosave) and decoding gallery
//! thumbnails. Encoding a 1024² PNG takes a large part of a second on a slow CPU; done in a
//! frame it would freeze the window.
//!
//! Jobs run in the order they were submitted (so a canvas's image is on disk before the JSON
//! that names it). Results come back as [`FileDone`] for the UI to drain each frame;
//! [`FileWorker::flush`] waits until everything submitted is on disk (on exit).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use studio_inference::diffusion::imaging::{RgbImage, decode_image_file};

/// Makes the bytes to write (encoding happens on the file thread).
pub type Encode = Box<dyn FnOnce() -> anyhow::Result<Vec<u8>> + Send>;

enum Job {
    Write {
        what: String,
        path: PathBuf,
        encode: Encode,
    },
    Thumbnail {
        path: PathBuf,
        side: u32,
    },
    Barrier(Sender<()>),
}

/// What finished.
#[derive(Debug)]
pub enum FileDone {
    /// A write failed (successful writes are not reported). `what` is the caller's label
    /// ("the canvas", "the image …").
    WriteFailed { what: String, error: String },
    /// A thumbnail (longest side at most the asked size) and the image's `parameters` text.
    Thumbnail {
        path: PathBuf,
        result: Result<(RgbImage, Option<String>), String>,
    },
}

/// The handle to the file thread. Dropping it finishes the queued jobs first.
pub struct FileWorker {
    jobs: Option<Sender<Job>>,
    done: Receiver<FileDone>,
    thread: Option<JoinHandle<()>>,
    /// Results of jobs run on the calling thread, when the file thread could not start.
    inline: Mutex<Vec<FileDone>>,
}

impl FileWorker {
    /// Starts the thread; `wake` is called after each result (the UI passes a repaint). If the
    /// thread cannot start, jobs run on the caller's thread (slower frames, same results).
    pub fn spawn(wake: impl Fn() + Send + 'static) -> Self {
        let (job_tx, job_rx) = bounded::<Job>(64);
        let (done_tx, done_rx) = bounded::<FileDone>(256);
        let thread = std::thread::Builder::new()
            .name("studio-files".to_owned())
            .spawn(move || {
                for job in job_rx {
                    let done = run(job);
                    if let Some(done) = done {
                        if done_tx.send(done).is_err() {
                            return;
                        }
                        wake();
                    }
                }
            });
        let (jobs, thread) = match thread {
            Ok(t) => (Some(job_tx), Some(t)),
            Err(e) => {
                log::error!("the studio-files thread did not start ({e}); writing inline");
                (None, None)
            }
        };
        Self {
            jobs,
            done: done_rx,
            thread,
            inline: Mutex::new(Vec::new()),
        }
    }

    fn run_inline(&self, job: Job) {
        if let Some(done) = run(job) {
            self.inline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(done);
        }
    }

    /// Queues an atomic write of what `encode` makes (waits only when 64 jobs are queued).
    pub fn write(&self, what: impl Into<String>, path: &Path, encode: Encode) {
        let job = Job::Write {
            what: what.into(),
            path: path.to_path_buf(),
            encode,
        };
        match &self.jobs {
            // The thread only stops when this handle drops, so this cannot fail while we hold it.
            Some(tx) => {
                let _ = tx.send(job);
            }
            None => self.run_inline(job),
        }
    }

    /// Asks for a thumbnail; `false` when the queue is full (ask again next frame).
    pub fn thumbnail(&self, path: &Path, side: u32) -> bool {
        let job = Job::Thumbnail {
            path: path.to_path_buf(),
            side,
        };
        if let Some(tx) = &self.jobs {
            !matches!(tx.try_send(job), Err(TrySendError::Full(_)))
        } else {
            self.run_inline(job);
            true
        }
    }

    /// A result, if one is waiting.
    pub fn try_recv(&self) -> Option<FileDone> {
        self.done.try_recv().ok().or_else(|| {
            self.inline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop()
        })
    }

    /// Waits until every job submitted so far has run; returns the results that arrived
    /// meanwhile (the caller handles them as it would from [`Self::try_recv`]).
    pub fn flush(&self) -> Vec<FileDone> {
        let mut out: Vec<FileDone> = std::mem::take(
            &mut *self
                .inline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let Some(tx) = &self.jobs else {
            return out;
        };
        let (ack_tx, ack_rx) = bounded(1);
        if tx.send(Job::Barrier(ack_tx)).is_err() {
            return out;
        }
        loop {
            crossbeam_channel::select! {
                recv(ack_rx) -> _ => break,
                recv(self.done) -> d => match d {
                    Ok(d) => out.push(d),
                    Err(_) => break,
                },
            }
        }
        out.extend(self.done.try_iter());
        out
    }
}

impl Drop for FileWorker {
    fn drop(&mut self) {
        self.jobs = None;
        // Unblock a thread waiting to report into a full channel.
        while self.done.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                while self.done.try_recv().is_ok() {}
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

fn run(job: Job) -> Option<FileDone> {
    match job {
        Job::Write { what, path, encode } => {
            let result = encode().and_then(|bytes| crate::home::atomic_write(&path, &bytes));
            result.err().map(|e| FileDone::WriteFailed {
                what,
                error: format!("{e:#}"),
            })
        }
        Job::Thumbnail { path, side } => {
            let result = decode_image_file(&path)
                .map(|d| (thumbnail(&d.image, side), d.parameters))
                .map_err(|e| e.to_string());
            Some(FileDone::Thumbnail { path, result })
        }
        Job::Barrier(ack) => {
            let _ = ack.send(());
            None
        }
    }
}

/// `img` shrunk so its longest side is at most `side`.
pub fn thumbnail(img: &RgbImage, side: u32) -> RgbImage {
    let longest = img.width.max(img.height).max(1);
    if longest <= side {
        return img.clone();
    }
    let scale = f64::from(side) / f64::from(longest);
    img.resized(
        ((f64::from(img.width) * scale).round() as u32).max(1),
        ((f64::from(img.height) * scale).round() as u32).max(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_order_reports_failures_and_flush_waits() {
        let tmp = tempfile::tempdir().expect("tmp");
        let files = FileWorker::spawn(|| {});
        let a = tmp.path().join("a.txt");
        for i in 0..20u8 {
            files.write("a", &a, Box::new(move || Ok(vec![i])));
        }
        files.write(
            "the broken one",
            &tmp.path().join("b.txt"),
            Box::new(|| anyhow::bail!("no bytes today")),
        );
        let done = files.flush();
        assert_eq!(
            std::fs::read(&a).expect("a written"),
            [19],
            "the last write wins"
        );
        assert!(
            matches!(&done[..], [FileDone::WriteFailed { what, error }]
                if what == "the broken one" && error.contains("no bytes today")),
            "{done:?}"
        );
        assert!(!tmp.path().join("b.txt").exists());
        let img = RgbImage::new_filled(300, 100, [9, 8, 7]);
        let png = tmp.path().join("p.png");
        let encoded =
            studio_inference::diffusion::imaging::encode_png(&img, Some("a: b, c: d, e: f"))
                .expect("png");
        std::fs::write(&png, encoded).expect("write png");
        assert!(files.thumbnail(&png, 30));
        let done = files.flush();
        match &done[..] {
            [
                FileDone::Thumbnail {
                    path,
                    result: Ok((thumb, params)),
                },
            ] => {
                assert_eq!(path, &png);
                assert_eq!((thumb.width, thumb.height), (30, 10));
                assert_eq!(params.as_deref(), Some("a: b, c: d, e: f"));
            }
            other => panic!("{other:?}"),
        }
    }
}
