//! Dismissable banners at the top of the window for errors, warnings and confirmations.
//! Errors and warnings stay until dismissed; confirmations fade after a few seconds. A notice
//! can carry an action (Undo) that is offered until the notice expires.

use std::time::{Duration, Instant};

use egui::{Color32, RichText};

use super::command::Command;

const INFO_LIFETIME: Duration = Duration::from_secs(6);
const MAX_SHOWN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone)]
pub struct Notice {
    pub id: u64,
    pub level: Level,
    pub text: String,
    /// A button's label and what it does.
    pub action: Option<(String, Command)>,
    /// How long it shows; `None`: confirmations a few seconds, others until dismissed.
    lifetime: Option<Duration>,
    created: Instant,
}

impl Notice {
    fn lifetime(&self) -> Option<Duration> {
        self.lifetime
            .or((self.level == Level::Info).then_some(INFO_LIFETIME))
    }
}

#[derive(Debug, Default)]
pub struct Notices {
    list: Vec<Notice>,
    next_id: u64,
}

impl Notices {
    /// Adds a notice; the same text twice shows once (refreshed).
    pub fn push(&mut self, level: Level, text: impl Into<String>) {
        let text = text.into();
        if let Some(existing) = self
            .list
            .iter_mut()
            .find(|n| n.text == text && n.action.is_none())
        {
            existing.created = Instant::now();
            existing.level = level;
            return;
        }
        self.next_id += 1;
        self.list.push(Notice {
            id: self.next_id,
            level,
            text,
            action: None,
            lifetime: None,
            created: Instant::now(),
        });
    }

    /// A confirmation with a button (Undo) that runs `command`, both gone after `lifetime`.
    pub fn undoable(
        &mut self,
        text: impl Into<String>,
        label: impl Into<String>,
        command: Command,
        lifetime: Duration,
    ) {
        self.next_id += 1;
        self.list.push(Notice {
            id: self.next_id,
            level: Level::Info,
            text: text.into(),
            action: Some((label.into(), command)),
            lifetime: Some(lifetime),
            created: Instant::now(),
        });
    }

    /// Removes the notices offering `command` (it was carried out).
    pub fn dismiss_action(&mut self, command: &Command) {
        self.list
            .retain(|n| n.action.as_ref().is_none_or(|(_, c)| c != command));
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.push(Level::Error, text);
    }

    pub fn warning(&mut self, text: impl Into<String>) {
        self.push(Level::Warning, text);
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.push(Level::Info, text);
    }

    pub fn dismiss(&mut self, id: u64) {
        self.list.retain(|n| n.id != id);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Notice> {
        self.list.iter()
    }

    /// Drops expired notices; returns when the next one expires.
    pub fn expire(&mut self) -> Option<Duration> {
        self.list
            .retain(|n| n.lifetime().is_none_or(|l| n.created.elapsed() < l));
        self.list
            .iter()
            .filter_map(|n| n.lifetime().map(|l| l.saturating_sub(n.created.elapsed())))
            .min()
    }

    /// The newest notices, each with a Dismiss button (and its action's), and "Dismiss all"
    /// when there are more.
    pub fn notices_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<Command>) {
        let mut dismissed = Vec::new();
        let hidden = self.list.len().saturating_sub(MAX_SHOWN);
        for notice in self.list.iter().skip(hidden).rev() {
            let visuals = ui.visuals();
            let (color, tag) = match notice.level {
                Level::Error => (visuals.error_fg_color, "Error"),
                Level::Warning => (visuals.warn_fg_color, "Warning"),
                Level::Info => (visuals.hyperlink_color, "Done"),
            };
            egui::Frame::new()
                .fill(visuals.extreme_bg_color)
                .stroke(egui::Stroke::new(1.0, color))
                .corner_radius(4.0)
                .inner_margin(egui::Margin::symmetric(8, 4))
                .show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.horizontal_top(|ui| {
                        ui.label(RichText::new(tag).color(color).strong());
                        let button_width = if notice.action.is_some() { 130.0 } else { 70.0 };
                        ui.scope(|ui| {
                            ui.set_max_width((ui.available_width() - button_width).max(100.0));
                            ui.add(egui::Label::new(notice.text.as_str()).wrap());
                        });
                        ui.with_layout(egui::Layout::right_to_left(egui::Align::TOP), |ui| {
                            if ui.small_button("Dismiss").clicked() {
                                dismissed.push(notice.id);
                            }
                            if let Some((label, command)) = &notice.action
                                && ui.small_button(label.as_str()).clicked()
                            {
                                commands.push(command.clone());
                                dismissed.push(notice.id);
                            }
                        });
                    });
                });
        }
        if hidden > 0 {
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(format!("…and {hidden} older notice(s)"))
                        .color(ui.visuals().weak_text_color()),
                );
                if ui.small_button("Dismiss all").clicked() {
                    dismissed.extend(self.list.iter().map(|n| n.id));
                }
            });
        }
        for id in dismissed {
            self.dismiss(id);
        }
    }
}

/// Colour for a level, for other places that mark errors (a failed reply).
pub fn level_color(ui: &egui::Ui, level: Level) -> Color32 {
    match level {
        Level::Error => ui.visuals().error_fg_color,
        Level::Warning => ui.visuals().warn_fg_color,
        Level::Info => ui.visuals().weak_text_color(),
    }
}
