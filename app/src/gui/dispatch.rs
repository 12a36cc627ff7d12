//! Carrying out the frame's [`Command`]s: each panel's ([`Command::Panel`]) go to its `apply`
//! with the shared state lent as an [`AppContext`](super::context::AppContext); the window's
//! own (model load/unload, remote, API server, navigation, checkpoint conversion) are carried
//! out here.

use std::path::{Path, PathBuf};

use studio_inference::worker::{CustomJob, JobKind, LoadOptions};

use super::api_server::ApiServer;
use super::app::StudioApp;
use super::command::{Command, ExportFormat};
use super::context::app_context;
use super::jobs::JobPurpose;

impl StudioApp {
    /// Carries out the queued commands, in order.
    pub fn apply_commands(&mut self) {
        while !self.commands.is_empty() {
            let command = self.commands.remove(0);
            self.apply(command);
        }
    }

    /// The panels take their own commands (each with the shared state lent as an
    /// [`AppContext`](super::context::AppContext)); the window's own are carried out here.
    fn apply(&mut self, command: Command) {
        match command {
            Command::Panel(c) => self.panels.apply(c, &mut app_context!(self)),
            Command::ShowPanel(panel) => self.settings.panel = panel,
            Command::LoadModel(path) => self.load_model(path),
            Command::UnloadModel => {
                self.submit(JobKind::UnloadModel, JobPurpose::UnloadModel);
            }
            Command::ConnectRemote(config) => {
                let url = config.base_url.clone();
                self.submit(
                    JobKind::ConnectRemote { config },
                    JobPurpose::ConnectRemote(url),
                );
            }
            Command::StartApiServer => {
                if let Some(worker) = &self.worker {
                    let options = ApiServer::options(&self.settings.server);
                    let kind = self.api_server.start_job(worker.submitter(), options);
                    self.submit(kind, JobPurpose::StartApiServer);
                }
            }
            Command::StopApiServer => {
                if self.api_server.stop() {
                    self.notices.info("The API server stopped");
                }
            }
            Command::CancelRunningJob => {
                if let (Some(worker), Some(running)) = (&self.worker, self.jobs.running()) {
                    worker.cancel(running.id);
                }
            }
            Command::ConvertCheckpoint(path) => self.convert_checkpoint(path),
        }
    }

    /// Converts a PyTorch checkpoint beside it on the worker (`studio convert`'s reader: the
    /// pickle is read as data); `logic` opens the result when the job is done.
    fn convert_checkpoint(&mut self, checkpoint: PathBuf) {
        self.notices
            .dismiss_action(&Command::ConvertCheckpoint(checkpoint.clone()));
        let name = checkpoint.file_name().map_or_else(
            || checkpoint.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let path = checkpoint.clone();
        let run: CustomJob =
            Box::new(move |_| studio_inference::pickle::convert_beside(&path).map(|_| ()));
        self.submit(
            JobKind::Custom {
                label: format!("Converting {name} to safetensors"),
                run,
            },
            JobPurpose::ConvertCheckpoint(checkpoint),
        );
    }

    /// Writes conversation `id` as shown (its active path) to `path`; says how it went in a
    /// notice. Returns whether it was written.
    pub fn export_to(&mut self, id: &str, format: ExportFormat, path: &Path) -> bool {
        self.panels
            .chat
            .export_to(id, format, path, &mut app_context!(self))
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
        let options = LoadOptions {
            context_length: self.settings.context_length,
        };
        self.submit(
            JobKind::LoadModel {
                path: path.clone(),
                options: options.clone(),
            },
            JobPurpose::LoadModel(path, options),
        );
    }
}
