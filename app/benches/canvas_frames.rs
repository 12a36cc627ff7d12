//! UI frame time of the Canvas while a generation runs, against the same window idle, measured
//! in one run (`cargo bench -p studio-app --bench canvas_frames`).
//!
//! The window is driven headless by egui_kittest (each frame: the app's event drain, preview
//! polling and the whole UI pass; no GPU rendering, which happens elsewhere). The worker
//! generates 512×512 images with a small random-weight SD 1.x model, so its threads keep every
//! core busy while the UI thread draws. Prints p50/p99 frame times for both phases and their
//! ratio.

use std::path::Path;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use studio_app::gui::canvas::CanvasCommand;
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_tests::sd::{TinyKind, TinySd, write_tiny_sd};

#[path = "../tests/common/mod.rs"]
mod common;

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    common::harness_sized(&AppConfig::for_tests(home), egui::vec2(1400.0, 900.0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Steps frames (about 60 per second) while `running` holds, at most `limit`; frame times in ms.
fn frames(
    h: &mut Harness<'_, StudioApp>,
    limit: usize,
    running: impl Fn(&StudioApp) -> bool,
) -> Vec<f64> {
    let mut times = Vec::new();
    while times.len() < limit && running(h.state()) {
        let t = Instant::now();
        h.step();
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        times.push(ms);
        std::thread::sleep(Duration::from_secs_f64((16.7 - ms).max(0.0) / 1000.0));
    }
    times.sort_by(f64::total_cmp);
    times
}

fn main() {
    let home = tempfile::tempdir().expect("home");
    let model = home.path().join("tiny-sd");
    write_tiny_sd(&model, TinySd::new(TinyKind::Sd1));
    let mut h = harness(home.path());
    h.state_mut()
        .push_command(Command::ShowPanel(Panel::Canvas));
    h.state_mut().push_command(CanvasCommand::LoadModel(model));
    let deadline = Instant::now() + Duration::from_mins(2);
    while h.state().canvas().model().is_none() {
        h.step();
        assert!(Instant::now() < deadline, "the model did not load");
        std::thread::sleep(Duration::from_millis(10));
    }
    {
        let form = h.state_mut().canvas_mut().form_mut();
        form.prompt = "a red cat on a mat".into();
        form.width = 512;
        form.height = 512;
        form.steps = 20;
        form.batch_count = 2;
    }
    let idle = frames(&mut h, 300, |_| true);
    h.state_mut().push_command(CanvasCommand::Generate);
    h.step();
    // Until the job ends: the steps, the VAE decodes, and the results arriving.
    let busy = frames(&mut h, 100_000, StudioApp::is_busy);
    let (i50, i99) = (percentile(&idle, 0.5), percentile(&idle, 0.99));
    let (b50, b99) = (percentile(&busy, 0.5), percentile(&busy, 0.99));
    println!("Canvas UI frame time (kittest, CPU side), ms");
    println!(
        "  idle        p50 {i50:7.2}  p99 {i99:7.2}  ({} frames)",
        idle.len()
    );
    println!(
        "  generating  p50 {b50:7.2}  p99 {b99:7.2}  ({} frames)",
        busy.len()
    );
    println!(
        "  generating / idle: p50 {:.2}x, p99 {:.2}x",
        b50 / i50.max(1e-9),
        b99 / i99.max(1e-9)
    );
}
