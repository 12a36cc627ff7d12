//! The chat panel's list of conversations: New chat, search (titles and messages of every
//! branch), rename in place (double-click, the context menu, or the header's Rename), delete
//! (with Undo, see [`super::store`]).

use super::command::ChatCommand;
use super::store::ConversationStore;
use crate::gui::command::Command;
use crate::gui::format;
use crate::gui::format::now_ms;
use crate::gui::style::weak;

struct Renaming {
    id: String,
    text: String,
    /// Focus goes to the field on its first frame only.
    focused: bool,
}

#[derive(Default)]
pub struct ConversationList {
    /// The search box's text.
    pub search: String,
    renaming: Option<Renaming>,
    /// Ids matching `search`, for the store revision they were computed at.
    matches: Option<(String, u64, Vec<String>)>,
}

impl ConversationList {
    /// Starts renaming `id` in place.
    pub fn start_rename(&mut self, id: &str, title: &str) {
        self.renaming = Some(Renaming {
            id: id.to_owned(),
            text: title.to_owned(),
            focused: false,
        });
    }

    pub fn is_renaming(&self, id: &str) -> bool {
        self.renaming.as_ref().is_some_and(|r| r.id == id)
    }

    /// Ids of the conversations to list: all, or those matching the search.
    fn visible(&mut self, store: &ConversationStore) -> Option<&[String]> {
        let query = self.search.trim().to_lowercase();
        if query.is_empty() {
            self.matches = None;
            return None;
        }
        let fresh = self
            .matches
            .as_ref()
            .is_some_and(|(q, rev, _)| *q == query && *rev == store.revision());
        if !fresh {
            let ids = store
                .list()
                .iter()
                .filter(|c| c.matches(&query))
                .map(|c| c.id.clone())
                .collect();
            self.matches = Some((query, store.revision(), ids));
        }
        self.matches.as_ref().map(|(_, _, ids)| ids.as_slice())
    }

    pub fn list_ui(
        &mut self,
        ui: &mut egui::Ui,
        store: &ConversationStore,
        selected: Option<&str>,
        streaming: Option<&str>,
        commands: &mut Vec<Command>,
    ) {
        ui.add_space(4.0);
        if ui
            .add_sized([ui.available_width(), 28.0], egui::Button::new("New chat"))
            .on_hover_text("Start a new conversation")
            .clicked()
        {
            commands.push(Command::from(ChatCommand::NewConversation));
        }
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            let clear = !self.search.is_empty();
            let width = ui.available_width() - if clear { 28.0 } else { 0.0 };
            ui.add(
                egui::TextEdit::singleline(&mut self.search)
                    .hint_text("Search chats")
                    .desired_width(width),
            )
            .accessible_name("Search chats");
            if clear
                && ui
                    .small_button("×")
                    .on_hover_text("Clear the search")
                    .clicked()
            {
                self.search.clear();
            }
        });
        let now = now_ms();
        let filtered = self.visible(store).map(<[String]>::to_vec);
        if let Some(ids) = &filtered {
            ui.label(
                weak(
                    ui,
                    &format!("{} of {} chats", ids.len(), store.list().len()),
                )
                .small(),
            );
        }
        ui.add_space(2.0);
        ui.separator();
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if store.list().is_empty() {
                    ui.label(weak(ui, "No conversations yet."));
                } else if filtered.as_ref().is_some_and(Vec::is_empty) {
                    ui.label(weak(ui, "No chats match."));
                }
                for c in store.list() {
                    if filtered.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
                        continue;
                    }
                    if let Some(r) = self.renaming.as_mut().filter(|r| r.id == c.id) {
                        let response = ui.add(
                            egui::TextEdit::singleline(&mut r.text)
                                .desired_width(ui.available_width()),
                        );
                        let response = response.accessible_name("Conversation title");
                        if !r.focused {
                            response.request_focus();
                            r.focused = true;
                        }
                        let escape = ui.input(|i| i.key_pressed(egui::Key::Escape));
                        if escape {
                            self.renaming = None;
                        } else if response.lost_focus() {
                            commands.push(Command::from(ChatCommand::RenameConversation {
                                id: c.id.clone(),
                                title: r.text.trim().to_owned(),
                            }));
                            self.renaming = None;
                        }
                        continue;
                    }
                    let is_selected = selected == Some(c.id.as_str());
                    let mut title = c.display_title().to_owned();
                    if streaming == Some(c.id.as_str()) {
                        title.push_str(" (writing…)");
                    }
                    let button = egui::Button::selectable(is_selected, title)
                        .min_size(egui::vec2(ui.available_width(), 0.0))
                        .truncate();
                    let response = ui.add(button).on_hover_ui(|ui| {
                        ui.label(format!(
                            "{} messages · updated {}",
                            c.active_path().len(),
                            format::ago(c.updated_ms, now)
                        ));
                        ui.label(weak(ui, "Double-click to rename; right-click for more"));
                    });
                    if response.double_clicked() {
                        self.start_rename(&c.id, &c.title);
                    } else if response.clicked() && !is_selected {
                        commands.push(Command::from(ChatCommand::SelectConversation(c.id.clone())));
                    }
                    response.context_menu(|ui| {
                        if ui.button("Rename").clicked() {
                            self.start_rename(&c.id, &c.title);
                            ui.close();
                        }
                        if ui.button("Delete").clicked() {
                            commands.push(Command::from(ChatCommand::DeleteConversation(c.id.clone())));
                            ui.close();
                        }
                    });
                }
                if let Some(r) = &self.renaming
                    && store.get(&r.id).is_none()
                {
                    self.renaming = None;
                }
            });
    }
}
