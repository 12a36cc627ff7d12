//! The Code panel's side pane: the action buttons (from the action presets), and what the
//! running or last action produced — an explanation as Markdown, new code with "Open in a new
//! tab", or an edit as a diff whose hunks are accepted or rejected one by one and applied
//! together as one undoable edit.

use egui::text::LayoutJob;
use egui::{Color32, RichText, TextFormat, TextStyle};
use studio_inference::code::actions::ActionKind;
use studio_inference::code::diff::{Hunk, LineKind};

use super::assist::RunState;
use super::{CodeCommand, CodePanel, TRANSLATE_TARGETS, note};
use crate::gui::command::Command;
use crate::gui::markdown::document_ui;
use crate::gui::settings_store::Settings;
use crate::gui::style::weak;

pub fn assist_pane_ui(
    panel: &mut CodePanel,
    ui: &mut egui::Ui,
    settings: &mut Settings,
    model_name: Option<&str>,
    commands: &mut Vec<Command>,
) {
    ui.add_space(6.0);
    ui.heading("Assist");
    match model_name {
        Some(name) => ui.label(weak(ui, &format!("Model: {name}"))),
        None => ui.label(weak(
            ui,
            "Load a model in the Models panel to run actions (any chat model works)",
        )),
    };
    let target = panel
        .active_tab()
        .map(|t| {
            // The panel's own copy of the cursor: what the action will take.
            let sel = panel
                .cursors
                .get(&t.id)
                .is_some_and(|c| c.primary != c.secondary);
            if sel {
                "On: the selection".to_owned()
            } else {
                format!("On: the whole of {}", t.title())
            }
        })
        .unwrap_or_default();
    ui.label(weak(ui, &target));
    ui.add_space(4.0);
    let running = panel
        .action
        .as_ref()
        .is_some_and(super::assist::ActionRun::is_streaming);
    let enabled = !running && model_name.is_some();
    let presets = panel.presets.clone();
    ui.horizontal_wrapped(|ui| {
        for p in presets
            .iter()
            .filter(|p| p.id != "translate" && p.id != "instruct")
        {
            if ui
                .add_enabled(enabled, egui::Button::new(&p.label))
                .on_hover_text(&p.description)
                .clicked()
            {
                commands.push(Command::from(CodeCommand::RunAction(p.id.clone())));
            }
        }
    });
    if let Some(p) = presets.iter().find(|p| p.id == "translate") {
        ui.horizontal(|ui| {
            let clicked = ui
                .add_enabled(
                    enabled,
                    egui::Button::new(format!("Translate to {}", panel.translate_to)),
                )
                .on_hover_text(&p.description)
                .clicked();
            let l = ui.label("Target language");
            egui::ComboBox::from_id_salt("code_translate_to")
                .selected_text(panel.translate_to.clone())
                .show_ui(ui, |ui| {
                    for t in TRANSLATE_TARGETS {
                        ui.selectable_value(&mut panel.translate_to, (*t).to_owned(), *t);
                    }
                })
                .response
                .labelled_by(l.id);
            if clicked {
                commands.push(Command::from(CodeCommand::RunAction(p.id.clone())));
            }
        });
    }
    if let Some(p) = presets.iter().find(|p| p.id == "instruct") {
        let l = ui.label("Instruction");
        ui.add(
            egui::TextEdit::multiline(&mut panel.instruction)
                .hint_text("e.g. Use iterators instead of the loop")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(l.id);
        if ui
            .add_enabled(
                enabled && !panel.instruction.trim().is_empty(),
                egui::Button::new(&p.label),
            )
            .on_hover_text(&p.description)
            .clicked()
        {
            commands.push(Command::from(CodeCommand::RunAction(p.id.clone())));
        }
    }
    ui.checkbox(
        &mut settings.code.include_tabs,
        "Include other open tabs as context",
    )
    .on_hover_text("What does not fit the model's context is cut; the pane says what");
    ui.separator();
    result_ui(panel, ui, commands);
}

fn result_ui(panel: &mut CodePanel, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
    let Some(run) = panel.action.as_mut() else {
        ui.label(weak(
            ui,
            "Select code (or nothing, for the whole file) and pick an action.",
        ));
        return;
    };
    ui.horizontal(|ui| {
        let what = if run.whole_file {
            "the whole file"
        } else {
            "the selection"
        };
        ui.label(RichText::new(format!("{} · {what}", run.preset.label)).strong());
        match &run.state {
            RunState::Streaming => {
                ui.spinner();
                if ui.button("Stop").clicked() {
                    commands.push(Command::from(CodeCommand::StopAction));
                }
            }
            RunState::Done => {}
            RunState::Stopped => {
                ui.label(weak(ui, "stopped"));
            }
            RunState::Failed(e) => {
                ui.label(RichText::new(format!("failed: {e}")).color(ui.visuals().error_fg_color));
            }
        }
    });
    for n in &run.notes {
        note(ui, n);
    }
    let kind = run.preset.kind;
    let streaming = run.is_streaming();
    let has_diff = kind == ActionKind::Edit && run.diff.is_some();
    egui::ScrollArea::vertical()
        .id_salt("code_result")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            if has_diff {
                diff_ui(panel, ui, commands);
                return;
            }
            let Some(run) = panel.action.as_mut() else {
                return;
            };
            if kind == ActionKind::Edit && run.state == RunState::Stopped {
                note(
                    ui,
                    "Stopped before the rewrite was complete: no diff to apply.",
                );
            }
            if run.reply.is_empty() && streaming {
                ui.label(weak(ui, "Waiting for the model…"));
            }
            let doc = run.document();
            document_ui(ui, &doc, egui::Id::unique("code_action_reply"));
            if kind == ActionKind::Code && !streaming && !run.reply.is_empty() {
                ui.add_space(6.0);
                if ui.button("Open in a new tab").clicked() {
                    commands.push(Command::from(CodeCommand::OpenResultInTab));
                }
            }
        });
}

fn diff_ui(panel: &mut CodePanel, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
    let Some(run) = panel.action.as_mut() else {
        return;
    };
    let Some(diff) = run.diff.clone() else {
        return;
    };
    if diff.is_empty() {
        ui.label("The model proposed no changes.");
        return;
    }
    let accepted = run.decisions.iter().filter(|d| **d == Some(true)).count();
    ui.horizontal_wrapped(|ui| {
        ui.label(format!(
            "{} change{} proposed",
            diff.hunks.len(),
            if diff.hunks.len() == 1 { "" } else { "s" }
        ));
        if ui.button("Accept all").clicked() {
            run.decisions.iter_mut().for_each(|d| *d = Some(true));
        }
        if ui.button("Reject all").clicked() {
            run.decisions.iter_mut().for_each(|d| *d = Some(false));
        }
        if ui
            .add_enabled(
                accepted > 0 && !run.applied,
                egui::Button::new(format!("Apply ({accepted} accepted)")),
            )
            .on_hover_text("Apply the accepted changes as one edit (Ctrl+Z undoes it)")
            .clicked()
        {
            commands.push(Command::from(CodeCommand::ApplyHunks));
        }
    });
    if run.applied {
        ui.label(weak(ui, "Applied."));
    }
    for (i, hunk) in diff.hunks.iter().enumerate() {
        ui.add_space(6.0);
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.horizontal(|ui| {
                ui.label(RichText::new(hunk.header()).monospace().small());
                let decision = run.decisions.get(i).copied().flatten();
                let accept = ui
                    .add(egui::Button::selectable(decision == Some(true), "Accept"))
                    .accessible_name(format!("Accept change {}", i + 1));
                let reject = ui
                    .add(egui::Button::selectable(decision == Some(false), "Reject"))
                    .accessible_name(format!("Reject change {}", i + 1));
                if let Some(d) = run.decisions.get_mut(i) {
                    if accept.clicked() {
                        *d = Some(true);
                    }
                    if reject.clicked() {
                        *d = Some(false);
                    }
                }
            });
            ui.label(hunk_job(ui, hunk));
        });
    }
}

/// The hunk's lines in monospace: added on green, removed on red, context plain.
fn hunk_job(ui: &egui::Ui, hunk: &Hunk) -> LayoutJob {
    let font = TextStyle::Monospace.resolve(ui.style());
    let text = ui.visuals().text_color();
    let mut job = LayoutJob::default();
    for line in &hunk.lines {
        let (mark, background) = match line.kind {
            LineKind::Context => (' ', Color32::TRANSPARENT),
            LineKind::Removed => ('-', Color32::DARK_RED.gamma_multiply(0.45)),
            LineKind::Added => ('+', Color32::DARK_GREEN.gamma_multiply(0.45)),
        };
        job.append(
            &format!("{mark}{}\n", line.content()),
            0.0,
            TextFormat {
                font_id: font.clone(),
                color: text,
                background,
                ..TextFormat::default()
            },
        );
    }
    job
}
