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
            Command::SaveAsSafetensors(path) => self.save_as_safetensors(path),
            Command::ConvertCheckpoint { from, to } => self.convert_checkpoint(from, to),
        }
    }

    /// *Save as safetensors…*: asks where (beside the pickle by default), then converts.
    fn save_as_safetensors(&mut self, checkpoint: PathBuf) {
        let suggested = studio_inference::pickle::converted_path(&checkpoint);
        let mut dialog = rfd::FileDialog::new()
            .set_title("Save the model as safetensors")
            .add_filter("safetensors", &["safetensors"]);
        if let Some(dir) = suggested.parent() {
            dialog = dialog.set_directory(dir);
        }
        if let Some(name) = suggested.file_name() {
            dialog = dialog.set_file_name(name.to_string_lossy());
        }
        if let Some(to) = dialog.save_file() {
            self.convert_checkpoint(checkpoint, to.with_extension("safetensors"));
        }
    }

    /// Converts a pickle to safetensors on the worker (`studio convert`'s reader: the pickle
    /// is read as data); `logic` says where it went when the job is done.
    fn convert_checkpoint(&mut self, from: PathBuf, to: PathBuf) {
        let name = from.file_name().map_or_else(
            || from.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let (input, output) = (from.clone(), to.clone());
        let run: CustomJob =
            Box::new(move |_| studio_inference::pickle::convert(&input, &output).map(|_| ()));
        self.submit(
            JobKind::Custom {
                label: format!("Saving {name} as safetensors"),
                run,
            },
            JobPurpose::ConvertCheckpoint { from, to },
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
