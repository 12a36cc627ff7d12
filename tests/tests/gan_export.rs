//! The Latent Explorer's animation export through the worker: a GIF replaces its file only
//! when complete, and a cancelled export leaves the old file and no temporary behind.

use std::sync::Arc;
use std::time::Duration;

use studio_inference::device::DevicePreference;
use studio_inference::gan::NoiseMode;
use studio_inference::gan::latent::Space;
use studio_inference::gan::render::{GanAnimationOut, GanAnimationRequest, GanLatent};
use studio_inference::worker::{Event, JobKind, Worker, WorkerConfig};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};
use studio_tests::worker_events::until_terminal;

fn export(frames: usize, out: &std::path::Path) -> JobKind {
    let key = |seed| GanLatent {
        seed,
        ..GanLatent::default()
    };
    JobKind::ExportGanAnimation {
        request: Box::new(GanAnimationRequest {
            keyframes: vec![key(1), key(2)],
            space: Space::W,
            noise: NoiseMode::Const,
            directions: None,
            frames,
            fps: 10.0,
            out: GanAnimationOut::Gif(out.to_path_buf()),
            text: String::new(),
        }),
    }
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_gif_export_replaces_its_file_only_when_complete() {
    let models = tempfile::tempdir().expect("tempdir");
    let model = models.path().join("g.safetensors");
    write_stylegan2(&model, TinyStyleGan2::default(), 3, true);
    let w = Worker::spawn(WorkerConfig {
        device: DevicePreference::Cpu,
        repaint: Arc::new(|| {}),
        queue_capacity: 16,
        event_capacity: 256,
    })
    .expect("worker");
    let load = w.submit(JobKind::LoadGan { path: model }).expect("submit");
    let events = until_terminal(&w, load, Duration::from_secs(30));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );

    let out_dir = tempfile::tempdir().expect("tempdir");
    let gif = out_dir.path().join("animation.gif");
    std::fs::write(&gif, b"the previous export").expect("old");

    // Cancelled at once: whether it had started or not, the old file stays, alone.
    let job = w.submit(export(2000, &gif)).expect("submit");
    w.cancel(job);
    let events = until_terminal(&w, job, Duration::from_secs(30));
    assert!(
        matches!(events.last(), Some(Event::Cancelled { .. })),
        "{events:?}"
    );
    assert_eq!(std::fs::read(&gif).expect("read"), b"the previous export");
    assert_eq!(names(out_dir.path()), ["animation.gif"]);

    // Completed: a whole GIF (header and trailer) in its place, no temporary left.
    let job = w.submit(export(3, &gif)).expect("submit");
    let events = until_terminal(&w, job, Duration::from_secs(30));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    let bytes = std::fs::read(&gif).expect("read");
    assert!(bytes.starts_with(b"GIF89a"), "not a GIF");
    assert_eq!(bytes.last(), Some(&0x3b), "no GIF trailer");
    let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&bytes))
        .map(|d| image::AnimationDecoder::into_frames(d).count())
        .expect("decode");
    assert_eq!(frames, 3);
    assert_eq!(names(out_dir.path()), ["animation.gif"]);
}
