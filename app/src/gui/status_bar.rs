//! The status bar: compute device, loaded model, the running job with its progress and a
//! Cancel button, the live generation rate, and the process's memory.

use std::time::{Duration, Instant};

use egui::RichText;
use studio_inference::llm::loader::ModelInfo;
use studio_inference::sys;

use super::chat::ActiveReply;
use super::command::Command;
use super::jobs::RunningJob;
use super::style::weak;

const RAM_INTERVAL: Duration = Duration::from_secs(1);

/// What the status bar shows, borrowed from the app for one frame.
pub struct StatusInfo<'a> {
    pub device: &'a str,
    pub model: Option<&'a ModelInfo>,
    /// The Canvas's Stable Diffusion model, if one is loaded.
    pub image_model: Option<&'a str>,
    pub running: Option<&'a RunningJob>,
    pub queued: usize,
    pub reply: Option<&'a ActiveReply>,
    /// Tokens per second, and whether it is live (streaming) or the last reply's.
    pub rate: Option<(f64, bool)>,
    pub max_new_tokens: usize,
    /// The download running in the Models panel: what, and how far.
    pub download: Option<(String, f32)>,
}

#[derive(Default)]
pub struct StatusBar {
    ram_mb: Option<f64>,
    ram_read_at: Option<Instant>,
}

impl StatusBar {
    pub fn status_bar_ui(
        &mut self,
        ui: &mut egui::Ui,
        info: &StatusInfo<'_>,
        commands: &mut Vec<Command>,
    ) {
        if self.ram_read_at.is_none_or(|t| t.elapsed() >= RAM_INTERVAL) {
            self.ram_mb = sys::rss_mb();
            self.ram_read_at = Some(Instant::now());
        }
        ui.horizontal(|ui| {
            ui.set_min_height(24.0);
            ui.label(weak(ui, "Device"));
            ui.label(info.device);
            ui.separator();
            ui.label(weak(ui, "Model"));
            match info.model {
                Some(m) => ui.label(&m.name),
                None => ui.label(weak(ui, "none")),
            };
            if let Some(name) = info.image_model {
                ui.separator();
                ui.label(weak(ui, "Image model"));
                ui.label(name);
            }
            ui.separator();
            match info.running {
                Some(job) => running_ui(ui, job, info, commands),
                None => {
                    ui.label(weak(ui, "Idle"));
                }
            }
            if info.queued > 0 {
                ui.label(weak(ui, &format!("+{} queued", info.queued)));
            }
            if let Some((what, fraction)) = &info.download {
                ui.separator();
                ui.label(weak(ui, "Downloading"));
                ui.add(
                    egui::ProgressBar::new(*fraction)
                        .desired_width(120.0)
                        .text(format!("{:.0}%", fraction * 100.0)),
                )
                .on_hover_text(what.as_str());
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if let Some(mb) = self.ram_mb {
                    ui.label(weak(ui, &format!("RAM {mb:.0} MiB")))
                        .on_hover_text("Memory used by Studio");
                }
                if let Some((rate, live)) = info.rate {
                    let text = format!("{rate:.1} tok/s");
                    if live {
                        ui.label(RichText::new(text).strong())
                            .on_hover_text("Generation speed of the reply being written");
                    } else {
                        ui.label(weak(ui, &text))
                            .on_hover_text("Generation speed of the last reply");
                    }
                    ui.separator();
                }
            });
        });
        if info.running.is_some() {
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
    }
}

fn running_ui(
    ui: &mut egui::Ui,
    job: &RunningJob,
    info: &StatusInfo<'_>,
    commands: &mut Vec<Command>,
) {
    ui.label(&job.label);
    let reply = info.reply.filter(|r| r.job == job.id);
    let (fraction, text) = match (reply, &job.progress) {
        (Some(r), _) => {
            // The reply ends at max new tokens or when the context is full, whichever is first.
            let limit = info.model.map_or(info.max_new_tokens, |m| {
                info.max_new_tokens.min(m.context_length)
            });
            (
                Some(r.tokens() as f32 / limit.max(1) as f32),
                format!("{} tokens", r.tokens()),
            )
        }
        (None, Some((f, message))) => (Some(*f), message.clone()),
        (None, None) => (
            None,
            format!("{:.0} s", job.started_at.elapsed().as_secs_f32()),
        ),
    };
    if let Some(f) = fraction {
        ui.add(
            egui::ProgressBar::new(f.clamp(0.0, 1.0))
                .desired_width(160.0)
                .text(text),
        );
    } else {
        ui.spinner();
        ui.label(weak(ui, &text));
    }
    if ui
        .small_button("Cancel")
        .on_hover_text("Stop this job (Esc)")
        .clicked()
    {
        commands.push(Command::CancelRunningJob);
    }
}
