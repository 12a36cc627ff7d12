//! Routing and access control: each request's host, origin and API key checked, bodies read
//! within their limits, `/health` and `/v1/models` answered on the async threads, generation
//! requests prepared on blocking threads and queued for the model.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Result;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};
use studio_inference::llm::loader::LoadedModel;
use tokio::sync::oneshot;

use super::embeddings::{embeddings, model_entry};
use super::generation::generate_reply;
use super::openai::{Endpoint, parse_request};
use super::transport::{ApiError, Body, json_response};
use super::{Limits, ModelAccess, ModelJob, Shared};

/// Answers one request; CORS headers go on answers to the allowed origin.
pub(super) async fn respond(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = match route(&shared, request).await {
        Ok(response) => response,
        Err(e) => e.response(),
    };
    if let Some(origin) = origin.filter(|o| shared.allowed_origin(o)) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

pub(super) async fn route(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    shared.check_host(request.headers())?;
    shared.check_origin(request.headers())?;
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    if method == Method::OPTIONS {
        return Ok(preflight());
    }
    if path == "/health" {
        return match method {
            Method::GET | Method::HEAD => Ok(json_response(200, &json!({"status": "ok"}))),
            _ => Err(not_allowed(&method, &path, "GET")),
        };
    }
    shared.check_key(request.headers())?;
    let id = shared.model.id.as_str();
    match (path.as_str(), &method) {
        ("/v1/models", &Method::GET) => Ok(json_response(200, &shared.models_json())),
        (p, &Method::GET) if p.strip_prefix("/v1/models/") == Some(id) => {
            Ok(json_response(200, &shared.model_json()))
        }
        (p, &Method::GET) if p.starts_with("/v1/models/") => Err(ApiError {
            param: Some("model"),
            ..ApiError::status(
                404,
                "not_found_error",
                format!(
                    "no model `{}` here; this server has `{id}`",
                    &p["/v1/models/".len()..]
                ),
            )
        }),
        ("/v1/chat/completions" | "/v1/completions", &Method::POST) => {
            let endpoint = if path == "/v1/completions" {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            };
            let body = read_body(request, &shared.options.limits).await?;
            let prompter = &shared.model.prompter;
            let job = parse_request(
                endpoint,
                &body,
                prompter.context,
                prompter.tokenizer.vocab_size(),
            )?;
            generate_reply(shared.clone(), endpoint, job).await
        }
        ("/v1/embeddings", &Method::POST) => {
            let body = read_body(request, &shared.options.limits).await?;
            Ok(json_response(200, &embeddings(shared.clone(), body).await?))
        }
        ("/v1/models", _) => Err(not_allowed(&method, &path, "GET")),
        ("/v1/chat/completions" | "/v1/completions" | "/v1/embeddings", _) => {
            Err(not_allowed(&method, &path, "POST"))
        }
        _ => Err(ApiError::status(
            404,
            "not_found_error",
            format!(
                "no route {method} {path}; this server has GET /v1/models, \
                 POST /v1/chat/completions, POST /v1/completions and POST /v1/embeddings"
            ),
        )),
    }
}

pub(super) fn not_allowed(method: &Method, path: &str, allowed: &str) -> ApiError {
    ApiError::status(
        405,
        "invalid_request_error",
        format!("{method} is not allowed on {path}; use {allowed}"),
    )
}

/// The answer to a CORS preflight (only reached from no origin or the allowed one).
pub(super) fn preflight() -> Response<Body> {
    let mut response = Response::new(Body::Full(None));
    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// The host part of a `Host` header value: no port, no brackets, no trailing dot.
pub(super) fn host_name(host: &str) -> &str {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// Equal without an early exit, so that timing does not tell how much of a key was right.
pub(super) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// DNS rebinding: a page on `evil.example` that resolves to 127.0.0.1 still says
    /// `Host: evil.example`.
    pub(super) fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(host) = headers.get(header::HOST) else {
            return Err(ApiError::invalid("the request has no `Host` header"));
        };
        let host = String::from_utf8_lossy(host.as_bytes());
        let name = host_name(&host);
        let bound = self.addr.ip();
        let ip_ok = name.parse::<IpAddr>().is_ok_and(|ip| {
            ip == bound || bound.is_unspecified() || (bound.is_loopback() && ip.is_loopback())
        });
        let allowed = ip_ok
            || name.eq_ignore_ascii_case("localhost")
            || self
                .options
                .allow_hosts
                .iter()
                .any(|h| h.trim_end_matches('.').eq_ignore_ascii_case(name));
        if allowed {
            Ok(())
        } else {
            Err(ApiError::status(
                403,
                "permission_error",
                format!(
                    "requests for the host `{name}` are refused: use {} or localhost, or \
                     start the server with `--allow-host {name}`",
                    self.addr
                ),
            ))
        }
    }

    pub(super) fn allowed_origin(&self, origin: &HeaderValue) -> bool {
        self.options
            .cors_origin
            .as_deref()
            .is_some_and(|o| o.trim_end_matches('/').as_bytes() == origin.as_bytes())
    }

    /// Browsers send `Origin` on cross-origin requests: a page the user visits can't make the
    /// model generate unless it is the one allowed origin.
    pub(super) fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match headers.get(header::ORIGIN) {
            Some(origin) if !self.allowed_origin(origin) => Err(ApiError::status(
                403,
                "permission_error",
                format!(
                    "requests from web pages (origin `{}`) are refused; start the server with \
                     `--cors-origin ORIGIN` to allow one",
                    String::from_utf8_lossy(origin.as_bytes())
                ),
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.options.api_key else {
            return Ok(());
        };
        let sent = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .and_then(|v| v.strip_prefix(b"Bearer "));
        match sent {
            Some(sent) if same_secret(sent.trim_ascii(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(401, "invalid_request_error", "the API key is not right")
            }),
            None => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(
                    401,
                    "invalid_request_error",
                    "this server needs an API key: send `Authorization: Bearer KEY`",
                )
            }),
        }
    }

    pub(super) fn model_json(&self) -> Value {
        let context = self.model.prompter.context;
        json!({
            "id": self.model.id,
            "object": "model",
            "created": self.created,
            "owned_by": "studio",
            "max_model_len": context,
            "context_length": context,
        })
    }

    pub(super) fn models_json(&self) -> Value {
        let mut data = vec![self.model_json()];
        if let Some(e) = &self.model.embeddings {
            data.push(model_entry(e, self.created));
        }
        json!({"object": "list", "data": data})
    }

    /// Runs `work` (rendering, tokenizing, a small embedding model) on a blocking thread, at
    /// most `max_preparing` at once, so the async threads never wait on it.
    pub(super) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Shared) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self
            .preparing
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is stopping"))?;
        let shared = self.clone();
        tokio::task::spawn_blocking(move || work(&shared))
            .await
            .map_err(|e| ApiError::server(format!("the request's preparation failed: {e}")))?
    }

    /// Runs `job` on the model once it is free, off the async threads; `None` when it could
    /// not run (the GUI unloaded the model, or it panicked).
    pub(super) async fn on_model<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut LoadedModel, &dyn Fn() -> bool) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let job: ModelJob = Box::new(move |m, cancelled| {
            let _ = tx.send(job(m, cancelled));
        });
        match &self.model.access {
            ModelAccess::Owned(model) => {
                let guard = model.clone().lock_owned().await;
                let ran = tokio::task::spawn_blocking(move || {
                    let mut guard = guard;
                    job(&mut guard, &|| false);
                })
                .await;
                if let Err(e) = ran {
                    log::error!("serve: a generation failed: {e}");
                }
            }
            ModelAccess::Worker(submit) => submit(job).map_err(ApiError::unavailable)?,
        }
        rx.await.map_err(|_| {
            ApiError::unavailable("the model stopped before answering (was it unloaded?)")
        })
    }
}

/// Reads a JSON object body within the size and time limits.
pub(super) async fn read_body(
    request: Request<Incoming>,
    limits: &Limits,
) -> Result<Value, ApiError> {
    let too_large = || {
        ApiError::status(
            413,
            "invalid_request_error",
            format!(
                "the request body is over {} KiB",
                limits.max_body_bytes >> 10
            ),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, body.collect()).await {
        Err(_) => {
            return Err(ApiError::status(
                408,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    limits.body_timeout.as_secs()
                ),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(ApiError::invalid(format!(
                "could not read the request body: {e}"
            )));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::invalid("the request body must be a JSON object"))
    }
}
