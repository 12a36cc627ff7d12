//! UI frame time of the Latent Explorer while a slider is dragged continuously, against the
//! same window idle, in one run (`cargo bench -p studio-app --bench explorer_frames`).
//!
//! Headless (egui_kittest; the CPU side of each frame: event drain, mailbox polling and the UI
//! pass). Every frame moves ψ, as a drag does; the worker renders only the newest setting. A
//! 256×256 random-weight StyleGAN2 (skip architecture, 256 channels at most) keeps the worker
//! busy. Prints p50/p99 frame times, the ratio to idle, and how many requests became renders.

use std::path::Path;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use studio_app::gui::explorer::ExplorerCommand;
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

#[path = "../tests/common/mod.rs"]
mod common;

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    common::harness_sized(&AppConfig::for_tests(home), egui::vec2(1400.0, 900.0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Steps `n` frames at about 60 per second, calling `each` before every frame; sorted ms.
fn frames(
    h: &mut Harness<'_, StudioApp>,
    n: usize,
    mut each: impl FnMut(&mut StudioApp, usize),
) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        each(h.state_mut(), i);
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
    let model = home.path().join("g256.safetensors");
    let cfg = TinyStyleGan2 {
        z_dim: 128,
        w_dim: 128,
        resolution: 256,
        mapping_layers: 4,
        channel_base: 8192,
        channel_max: 256,
        ..TinyStyleGan2::default()
    };
    write_stylegan2(&model, cfg, 3, true);
    let mut h = harness(home.path());
    h.state_mut()
        .push_command(Command::ShowPanel(Panel::LatentExplorer));
    h.state_mut()
        .push_command(ExplorerCommand::LoadModel(model));
    let deadline = Instant::now() + Duration::from_mins(2);
    while h.state().explorer().image().is_none() {
        h.step();
        assert!(
            Instant::now() < deadline,
            "the generator did not load and render"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let idle = frames(&mut h, 200, |_, _| {});
    let (sent0, shown0) = h.state().explorer().render_counts();
    // A continuous drag: ψ sweeps between 0.3 and 1.3 over 600 frames (~10 s).
    let dragging = frames(&mut h, 600, |app, i| {
        let t = (i as f64 / 60.0).sin() * 0.5 + 0.8;
        app.explorer_mut().state_mut().latent.psi = t;
    });
    let (sent, shown) = h.state().explorer().render_counts();
    let (i50, i99) = (percentile(&idle, 0.5), percentile(&idle, 0.99));
    let (d50, d99) = (percentile(&dragging, 0.5), percentile(&dragging, 0.99));
    println!("Latent Explorer UI frame time (kittest, CPU side), ms, 256x256 generator");
    println!(
        "  idle      p50 {i50:7.2}  p99 {i99:7.2}  ({} frames)",
        idle.len()
    );
    println!(
        "  dragging  p50 {d50:7.2}  p99 {d99:7.2}  ({} frames)",
        dragging.len()
    );
    println!(
        "  dragging / idle: p50 {:.2}x, p99 {:.2}x; {} render requests, {} frames rendered and shown",
        d50 / i50.max(1e-9),
        d99 / i99.max(1e-9),
        sent - sent0,
        shown - shown0
    );
}
