//! One message of the open conversation: who wrote it, `< 2/3 >` arrows when the turn has
//! other versions, its text (replies as Markdown), the reply's footer (speed, seed, how it
//! ended) and its buttons (Copy, Edit, Regenerate), or the editor while it is being edited.

use egui::{Color32, RichText};
use studio_inference::llm::chat::Role;

use super::store::{Message, MessageId, ReplyInfo, ReplyState, Siblings};
use crate::gui::format;
use crate::gui::markdown::{Document, document_ui};
use crate::gui::style::weak;

/// A message being edited.
pub struct Editing {
    pub conversation: String,
    pub message: MessageId,
    pub text: String,
}

/// What the user did with a message this frame.
pub enum MessageAction {
    None,
    StartEdit,
    /// Change the text in place.
    SaveEdit(String),
    /// Send the edited text as a new version of this (user) message and reply to it.
    Resend(String),
    CancelEdit,
    /// Write this reply again as a new version.
    Regenerate,
    /// Show another version of this turn.
    ShowBranch(MessageId),
}

pub struct MessageView<'a> {
    pub message: &'a Message,
    /// The text shown: the message's, or a reply's text before its tool calls (which are
    /// shown in their own frame).
    pub text: &'a str,
    /// The other versions of this turn, when there are any.
    pub siblings: Option<Siblings>,
    pub is_last: bool,
    /// Nothing is being written into this conversation.
    pub can_edit: bool,
    /// Why a new reply cannot be started now (no model, a reply being written), if so.
    pub reply_blocked: Option<&'static str>,
    /// The reply's job has not started yet (queued behind another job).
    pub waiting: bool,
    /// The parsed text of a reply.
    pub document: Option<&'a Document>,
    pub id: egui::Id,
}

impl MessageView<'_> {
    pub fn message_ui(&self, ui: &mut egui::Ui, editing: Option<&mut Editing>) -> MessageAction {
        let m = self.message;
        let visuals = ui.visuals().clone();
        let fill = match m.role {
            Role::User | Role::Tool => visuals.faint_bg_color,
            Role::Assistant => visuals.extreme_bg_color,
        };
        let mut action = MessageAction::None;
        egui::Frame::new()
            .fill(fill)
            .stroke(visuals.widgets.noninteractive.bg_stroke)
            .corner_radius(6.0)
            .inner_margin(egui::Margin::symmetric(10, 8))
            .show(ui, |ui| {
                ui.set_width(ui.available_width());
                if let Some(a) = self.author_ui(ui) {
                    action = a;
                }
                if let Some(r) = &m.reply
                    && r.dropped_messages > 0
                {
                    let n = r.dropped_messages;
                    let text = if n == 1 {
                        "1 oldest message was left out to fit the context".to_owned()
                    } else {
                        format!("{n} oldest messages were left out to fit the context")
                    };
                    ui.label(RichText::new(text).small().color(visuals.warn_fg_color));
                }
                if let Some(editing) = editing {
                    action = self.edit_ui(ui, editing);
                    return;
                }
                let content = self.text.trim();
                if m.is_streaming() && content.is_empty() {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        let what = if self.waiting {
                            "Waiting for the model…"
                        } else {
                            "Thinking…"
                        };
                        ui.label(weak(ui, what));
                    });
                } else if let Some(document) = self.document {
                    document_ui(ui, document, self.id);
                } else if !content.is_empty() {
                    ui.add(egui::Label::new(content).wrap().selectable(true));
                }
                if m.is_streaming() && !content.is_empty() {
                    ui.spinner();
                }
                if let Some(r) = &m.reply {
                    reply_footer_ui(ui, r);
                }
                if !m.is_streaming()
                    && let Some(a) = self.buttons_ui(ui, content)
                {
                    action = a;
                }
            });
        action
    }

    /// "You" or "Assistant", the model, and the version arrows.
    fn author_ui(&self, ui: &mut egui::Ui) -> Option<MessageAction> {
        let m = self.message;
        let mut action = None;
        ui.horizontal(|ui| {
            match m.role {
                Role::User => ui.label(RichText::new("You").strong()),
                Role::Assistant => ui.label(RichText::new("Assistant").strong()),
                Role::Tool => ui.label(RichText::new("Tool result").strong()),
            };
            if let Some(model) = m.reply.as_ref().and_then(|r| r.model.as_deref()) {
                ui.label(weak(ui, model).small());
            }
            if let Some(s) = self.siblings {
                ui.add_space(8.0);
                ui.spacing_mut().item_spacing.x = 2.0;
                let what = match m.role {
                    Role::User | Role::Tool => "message",
                    Role::Assistant => "reply",
                };
                if ui
                    .add_enabled(s.previous.is_some(), egui::Button::new("<").small())
                    .on_hover_text(format!("Previous version of this {what}"))
                    .clicked()
                {
                    action = s.previous.map(MessageAction::ShowBranch);
                }
                ui.label(format!("{}/{}", s.position, s.count))
                    .on_hover_text(format!(
                        "Version {} of {} of this {what}; what follows belongs to this version",
                        s.position, s.count
                    ));
                if ui
                    .add_enabled(s.next.is_some(), egui::Button::new(">").small())
                    .on_hover_text(format!("Next version of this {what}"))
                    .clicked()
                {
                    action = s.next.map(MessageAction::ShowBranch);
                }
            }
        });
        action
    }

    fn buttons_ui(&self, ui: &mut egui::Ui, content: &str) -> Option<MessageAction> {
        let m = self.message;
        let mut action = None;
        ui.horizontal(|ui| {
            if !content.is_empty()
                && ui
                    .small_button("Copy")
                    .on_hover_text("Copy this message")
                    .clicked()
            {
                ui.ctx().copy_text(content.to_owned());
            }
            if self.can_edit {
                let hint = match m.role {
                    Role::User => {
                        "Edit this message: send it as a new version (this one is kept), or \
                         change it in place"
                    }
                    Role::Assistant | Role::Tool => "Edit this reply in place",
                };
                if ui.small_button("Edit").on_hover_text(hint).clicked() {
                    action = Some(MessageAction::StartEdit);
                }
            }
            if m.role == Role::Assistant && self.can_edit {
                let response = ui
                    .add_enabled(
                        self.reply_blocked.is_none(),
                        egui::Button::new("Regenerate").small(),
                    )
                    .on_hover_text(
                        "Write this reply again as a new version; this one is kept (use the \
                         arrows to go back to it)",
                    );
                let response = match self.reply_blocked {
                    Some(why) => response.on_disabled_hover_text(why),
                    None => response,
                };
                if response.clicked() {
                    action = Some(MessageAction::Regenerate);
                }
            }
        });
        action
    }

    fn edit_ui(&self, ui: &mut egui::Ui, editing: &mut Editing) -> MessageAction {
        let response = ui.add(
            egui::TextEdit::multiline(&mut editing.text)
                .desired_rows(3)
                .desired_width(f32::INFINITY),
        );
        response.accessible_name("Edit message");
        let mut action = MessageAction::None;
        ui.horizontal(|ui| {
            if self.message.role == Role::User {
                let response = ui
                    .add_enabled(
                        self.reply_blocked.is_none() && !editing.text.trim().is_empty(),
                        egui::Button::new("Resend"),
                    )
                    .on_hover_text(
                        "Send the edited message as a new version and write a reply to it; the \
                         original and its replies are kept (use the arrows to go back)",
                    );
                let response = match self.reply_blocked {
                    Some(why) => response.on_disabled_hover_text(why),
                    None => response,
                };
                if response.clicked() {
                    action = MessageAction::Resend(editing.text.trim().to_owned());
                }
            }
            let hint = if self.is_last {
                "Change the text in place"
            } else {
                "Change the text in place; the later messages stay as they are"
            };
            if ui.button("Save").on_hover_text(hint).clicked() {
                action = MessageAction::SaveEdit(editing.text.clone());
            }
            if ui.button("Cancel").clicked() {
                action = MessageAction::CancelEdit;
            }
        });
        action
    }
}

pub fn empty_chat_ui(ui: &mut egui::Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(ui.available_height() * 0.35);
        ui.label(weak(
            ui,
            "Send a message to start a conversation. Ctrl+Enter sends, Esc stops a reply.",
        ));
    });
}

fn reply_footer_ui(ui: &mut egui::Ui, r: &ReplyInfo) {
    let visuals = ui.visuals().clone();
    let mut parts: Vec<String> = Vec::new();
    if let Some(s) = &r.stats {
        if s.generated_tokens > 1 {
            parts.push(format!("{:.1} tok/s", s.decode_tok_s));
        }
        if s.generated_tokens > 0 {
            parts.push(format!("{:.0} ms to first token", s.ttft_ms));
        }
        parts.push(format!("{} tokens", format::thousands(s.generated_tokens)));
    }
    if let Some(seed) = r.seed
        && r.state != ReplyState::Streaming
    {
        parts.push(format!("seed {seed}"));
    }
    let (marker, color): (Option<String>, Color32) = match r.state {
        ReplyState::Streaming | ReplyState::Done => (
            r.finish_note().map(|n| format!("Ended: {n}")),
            visuals.warn_fg_color,
        ),
        ReplyState::Stopped => (Some("Stopped".to_owned()), visuals.warn_fg_color),
        ReplyState::Interrupted => (
            Some("Interrupted: Studio closed while this reply was being written".to_owned()),
            visuals.warn_fg_color,
        ),
        ReplyState::Failed => (
            Some(format!(
                "Failed: {}",
                r.error.as_deref().unwrap_or("unknown error")
            )),
            visuals.error_fg_color,
        ),
    };
    if marker.is_none() && parts.is_empty() {
        return;
    }
    ui.add_space(2.0);
    ui.horizontal_wrapped(|ui| {
        if let Some(marker) = marker {
            ui.label(RichText::new(marker).color(color));
        }
        if !parts.is_empty() {
            ui.label(RichText::new(parts.join(" · ")).color(visuals.weak_text_color()));
        }
    });
}
