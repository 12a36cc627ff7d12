//! Everything the user can ask for, as data: widgets push [`Command`]s while the frame is
//! drawn, and [`StudioApp::apply_commands`] carries them out in one place afterwards.

use std::path::PathBuf;

use studio_inference::worker::{JobKind, LoadOptions};

use super::app::StudioApp;
use super::conversations::ReplyState;
use super::format;
use super::jobs::JobPurpose;
use super::settings_store::Panel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowPanel(Panel),
    /// Load a model folder or file (replacing the loaded one).
    LoadModel(PathBuf),
    UnloadModel,
    /// Cancel whatever the worker is running now (status bar's Cancel, Esc).
    CancelRunningJob,
    /// Send the typed message and ask for a reply.
    SendMessage,
    /// Stop the reply being written; its text so far is kept.
    StopReply,
    /// Replace the open conversation's last reply with a new one.
    Regenerate,
    NewConversation,
    SelectConversation(String),
    DeleteConversation(String),
    EditMessage {
        conversation: String,
        index: usize,
        content: String,
    },
    RemoveRecentModel(PathBuf),
    RescanHfCache,
}

impl StudioApp {
    /// Carries out the queued commands, in order.
    pub fn apply_commands(&mut self) {
        while !self.commands.is_empty() {
            let command = self.commands.remove(0);
            self.apply(command);
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::ShowPanel(panel) => self.settings.panel = panel,
            Command::LoadModel(path) => self.load_model(path),
            Command::UnloadModel => {
                self.submit(JobKind::UnloadModel, JobPurpose::UnloadModel);
            }
            Command::CancelRunningJob => {
                if let (Some(worker), Some(running)) = (&self.worker, self.jobs.running()) {
                    worker.cancel(running.id);
                }
            }
            Command::SendMessage => self.send_message(),
            Command::StopReply => {
                if let (Some(worker), Some(active)) = (&self.worker, self.chat.active()) {
                    worker.cancel(active.job);
                }
            }
            Command::Regenerate => self.regenerate(),
            Command::NewConversation => {
                self.chat.new_conversation();
                self.settings.panel = Panel::Chat;
            }
            Command::SelectConversation(id) => self.chat.select(&id),
            Command::DeleteConversation(id) => {
                if let (Some(worker), Some(active)) = (&self.worker, self.chat.active())
                    && active.conversation == id
                {
                    worker.cancel(active.job);
                }
                if let Err(e) = self.chat.store.delete(&id) {
                    self.notices.error(format!("{e:#}"));
                }
                if self.chat.selected.as_deref() == Some(id.as_str()) {
                    self.chat.selected = self.chat.store.list().first().map(|c| c.id.clone());
                }
            }
            Command::EditMessage {
                conversation,
                index,
                content,
            } => {
                if self.chat.edit_message(&conversation, index, content) {
                    self.save_conversation(&conversation);
                }
            }
            Command::RemoveRecentModel(path) => self.settings.recent_models.retain(|p| *p != path),
            Command::RescanHfCache => self.models.start_scan(),
        }
    }

    fn load_model(&mut self, path: PathBuf) {
        if path.as_os_str().is_empty() {
            self.notices
                .warning("Type or choose a model folder or file first");
            return;
        }
        if self.jobs.loading_model() == Some(&path) {
            return;
        }
        self.submit(
            JobKind::LoadModel {
                path: path.clone(),
                options: LoadOptions::default(),
            },
            JobPurpose::LoadModel(path),
        );
    }

    fn send_message(&mut self) {
        if self.chat.input.trim().is_empty() {
            return;
        }
        if self.model.is_none() {
            self.notices
                .warning("Load a model in the Models panel before sending a message");
            return;
        }
        if self.chat.active().is_some() {
            self.notices
                .warning("A reply is being written: wait for it or stop it first");
            return;
        }
        let Some(id) = self.chat.take_input() else {
            return;
        };
        self.start_reply(&id);
    }

    fn regenerate(&mut self) {
        if self.model.is_none() || self.chat.active().is_some() {
            return;
        }
        let Some(id) = self.chat.selected.clone() else {
            return;
        };
        if self.chat.drop_last_reply(&id) {
            self.start_reply(&id);
        } else {
            self.save_conversation(&id);
        }
    }

    /// Adds an empty reply to conversation `id`, saves, and submits the chat job.
    fn start_reply(&mut self, id: &str) {
        let Some(model) = self.model.as_ref().map(|m| m.name.clone()) else {
            return;
        };
        let mut params = self.settings.sampling.clone();
        if self.settings.new_seed_each_reply {
            params.seed = format::random_seed();
        }
        let Some(index) = self.chat.add_reply(id, &model, params.seed) else {
            return;
        };
        let messages = self
            .chat
            .store
            .get(id)
            .map(|c| c.turns_before(index))
            .unwrap_or_default();
        let kind = JobKind::Chat {
            system: self.settings.system_prompt.clone(),
            messages,
            params,
        };
        let purpose = JobPurpose::ChatReply {
            conversation: id.to_owned(),
            index,
        };
        match self.submit(kind, purpose) {
            Some(job) => self.chat.begin_reply(job, id.to_owned(), index),
            None => self.chat.finish_message(
                id,
                index,
                ReplyState::Failed,
                None,
                Some("the job could not be started".to_owned()),
            ),
        }
        self.save_conversation(id);
    }
}

/// "Could not load …: why", without naming the path twice when the loader's message does.
pub fn load_error(path: &std::path::Path, error: &str) -> String {
    let shown = path.display().to_string();
    if error.contains(&shown) {
        format!("Could not load the model: {error}")
    } else {
        format!("Could not load {shown}: {error}")
    }
}
