//! The Settings panel's API server: Studio's OpenAI-compatible server ([`crate::serve`]) on the
//! model the worker has loaded, started and stopped from the window (what LM Studio's "Local
//! Server" tab does). Its generations run as worker jobs, taking turns with the window's own.

use crossbeam_channel::{Receiver, TryRecvError};
use studio_inference::worker::{JobKind, JobSubmitter};

use crate::serve::{ServeOptions, ServedModel, Server};

use super::settings_store::ServerSettings;

/// What the Settings panel shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus<'a> {
    Stopped,
    Starting,
    Running { url: &'a str, model: &'a str },
}

#[derive(Debug, Default)]
pub struct ApiServer {
    /// The starting job's answer.
    starting: Option<Receiver<Result<Server, String>>>,
    running: Option<(Server, String)>,
}

impl ApiServer {
    /// The options the settings ask for: loopback, or every interface with the key required.
    pub fn options(settings: &ServerSettings) -> ServeOptions {
        ServeOptions {
            host: if settings.network {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            }
            .into(),
            port: settings.port,
            api_key: Some(settings.api_key.trim().to_owned()).filter(|k| !k.is_empty()),
            ..ServeOptions::default()
        }
    }

    /// The worker job that starts a server on the loaded model (stopping a running one first);
    /// the server arrives through [`Self::poll`].
    pub fn start_job(&mut self, submitter: JobSubmitter, options: ServeOptions) -> JobKind {
        self.stop();
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.starting = Some(rx);
        JobKind::Custom {
            label: "Starting the API server".into(),
            run: Box::new(move |ctx| {
                let Some(m) = ctx.model() else {
                    return Err(studio_inference::Error::InvalidParameter(
                        "the API server serves the local model loaded in Studio: load one \
                         first (a remote server's model can't be served again)"
                            .into(),
                    ));
                };
                let served = ServedModel::on_worker(m, submitter);
                let _ = tx.send(Server::start(served, &options).map_err(|e| format!("{e:#}")));
                Ok(())
            }),
        }
    }

    /// Call once per frame: `Some(Ok(message))` when a server has just started,
    /// `Some(Err(message))` when it could not.
    pub fn poll(&mut self) -> Option<Result<String, String>> {
        let answer = match self.starting.as_ref()?.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty) => return None,
            // The job failed before answering; its `Failed` event says why.
            Err(TryRecvError::Disconnected) => {
                self.starting = None;
                return None;
            }
        };
        self.starting = None;
        Some(match answer {
            Ok(server) => {
                let url = server.base_url();
                let message = format!("Serving {} at {url}", server.model_id());
                self.running = Some((server, url));
                Ok(message)
            }
            Err(e) => Err(format!("Could not start the API server: {e}")),
        })
    }

    /// Stops the server (or forgets one starting); true if one was running.
    pub fn stop(&mut self) -> bool {
        self.starting = None;
        self.running.take().map(|(s, _)| s.shutdown()).is_some()
    }

    pub fn status(&self) -> ServerStatus<'_> {
        match (&self.running, &self.starting) {
            (Some((server, url)), _) => ServerStatus::Running {
                url,
                model: server.model_id(),
            },
            (None, Some(_)) => ServerStatus::Starting,
            (None, None) => ServerStatus::Stopped,
        }
    }
}
