//! The HTTP front end (warp): `/v1/chat/completions` (JSON and SSE), `/v1/models`, `/health`,
//! `/ready`, `/metrics`. It validates and normalises requests, publishes them as jobs on the bus, and
//! answers from the frames workers send back. It never runs a model itself.
//!
//! Every error leaves through [`error_response`]: the one place where an [`ErrorClass`] becomes an HTTP
//! status and OpenAI's error body.

mod chat;
mod completions;
mod frames;
pub mod media;
mod messages;
pub mod metrics;
mod peek;
pub mod registry;
mod responses;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::bus::Bus;
use crate::error::{ClassifiedError, ErrorClass};
use crate::openai::response::{ErrorBody, ModelCard, ModelList};
use crate::openai::RequestLimits;
use metrics::Metrics;
use registry::Registry;

/// Front-end settings.
#[derive(Clone)]
pub struct FrontendConfig {
    /// Accepted `Authorization: Bearer` keys for `/v1/*`; empty = open.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS (`*` = any); empty = no CORS headers (browsers then allow only the
    /// server's own page).
    pub cors_allow_origins: Vec<String>,
    pub max_body_bytes: usize,
    /// Requests answered at once; more get 429.
    pub max_in_flight: usize,
    /// Offer jobs to the worker holding the longest cached prefix first (buses that route: NATS).
    pub prefix_routing: bool,
    /// Longest a request may wait for its first frame (queueing included), and its overall deadline.
    pub request_timeout: Duration,
    /// Longest silence between two frames of a running job.
    pub idle_timeout: Duration,
    pub limits: RequestLimits,
    /// More metrics to append to `/metrics` (the in-process worker's, under `serve`).
    pub extra_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Fetching of `http(s)://` image URLs; `None` = refused (the default).
    pub remote_media: Option<media::RemoteMediaConfig>,
}

impl std::fmt::Debug for FrontendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendConfig")
            .field("api_keys", &format!("<{} redacted>", self.api_keys.len()))
            .field("cors_allow_origins", &self.cors_allow_origins)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            api_keys: vec![],
            cors_allow_origins: vec![],
            max_body_bytes: 64 * 1024 * 1024,
            max_in_flight: 512,
            prefix_routing: true,
            request_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(120),
            limits: RequestLimits::default(),
            remote_media: None,
            extra_metrics: None,
        }
    }
}

pub struct AppState {
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub cfg: FrontendConfig,
}

pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// The one mapping from an error class to an HTTP response.
/// Overload and unavailability say when to retry.
pub fn error_response(e: &ClassifiedError) -> Response {
    let status =
        StatusCode::from_u16(e.class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &ErrorBody::from(e));
    if matches!(e.class, ErrorClass::Overloaded | ErrorClass::Unavailable) {
        resp.headers_mut()
            .insert("retry-after", warp::http::HeaderValue::from_static("1"));
    }
    resp
}

#[derive(Debug)]
struct ApiReject(ClassifiedError);
impl warp::reject::Reject for ApiReject {}

fn reject(e: ClassifiedError) -> Rejection {
    warp::reject::custom(ApiReject(e))
}

/// Reads the body up to `limit` bytes, whatever the transfer encoding; larger bodies are a 413.
fn body_limited(limit: usize) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |len: Option<u64>, body| async move {
            let too_large = || {
                reject(ClassifiedError::new(
                    ErrorClass::PayloadTooLarge,
                    format!("the request body is larger than the limit of {limit} bytes"),
                ))
            };
            if len.is_some_and(|l| l > limit as u64) {
                return Err(too_large());
            }
            // A declared length is allocated once: no doubling copies of a large body.
            let hint = len.map_or(0, |l| l as usize);
            read_all(body, limit, hint).await.map_err(|e| match e {
                None => too_large(),
                Some(msg) => reject(ClassifiedError::invalid("body", msg)),
            })
        })
}

async fn read_all<S, B>(body: S, limit: usize, hint: usize) -> Result<Bytes, Option<String>>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::with_capacity(hint.min(limit));
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| Some(format!("reading the request body failed: {e}")))?;
        if buf.len() + chunk.remaining() > limit {
            return Err(None);
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            buf.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// The body as sent, decompressed when `Content-Encoding` is `gzip`, `deflate` or `zstd` (agents
/// compress large conversations); the decompressed size is bounded by `limit` too.
pub(crate) fn decoded_body(
    encoding: Option<&str>,
    body: Bytes,
    limit: usize,
) -> Result<Bytes, ClassifiedError> {
    use std::io::Read;
    let encoding = encoding.map(|e| e.trim().to_ascii_lowercase());
    let reader: Box<dyn Read + '_> = match encoding.as_deref() {
        None | Some("") | Some("identity") => return Ok(body),
        Some("gzip") | Some("x-gzip") => Box::new(flate2::read::GzDecoder::new(&body[..])),
        Some("deflate") => Box::new(flate2::read::ZlibDecoder::new(&body[..])),
        Some("zstd") => Box::new(ruzstd::decoding::StreamingDecoder::new(&body[..]).map_err(
            |e| ClassifiedError::invalid("body", format!("the zstd body does not decode: {e}")),
        )?),
        Some(other) => {
            return Err(ClassifiedError::new(
                ErrorClass::Unprocessable,
                format!("Content-Encoding {other:?} is not supported (gzip, deflate, zstd)"),
            )
            .with_param("content-encoding"))
        }
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ClassifiedError::invalid("body", format!("the compressed body does not decode: {e}"))
        })?;
    if out.len() > limit {
        return Err(ClassifiedError::new(
            ErrorClass::PayloadTooLarge,
            format!("the decompressed request body is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(out.into())
}

fn with_auth(state: Arc<AppState>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |auth: Option<String>| {
            let state = state.clone();
            async move {
                if state.cfg.api_keys.is_empty() {
                    return Ok(());
                }
                let given = auth
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim);
                if given.is_some_and(|g| key_matches(&state.cfg.api_keys, g)) {
                    Ok(())
                } else {
                    Err(reject(ClassifiedError::new(
                        ErrorClass::Unauthorized,
                        "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                    )))
                }
            }
        })
        .untuple_one()
}

/// Compares the SHA-256 digests of the keys in constant time: neither the content nor the length of
/// a valid key can be learnt from response timing. Every key is compared.
fn key_matches(keys: &[String], given: &str) -> bool {
    use sha2::{Digest, Sha256};
    let g = Sha256::digest(given.as_bytes());
    let mut ok = 0u8;
    for k in keys {
        let d = Sha256::digest(k.as_bytes());
        let diff = d
            .iter()
            .zip(g.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        ok |= (diff == 0) as u8;
    }
    ok == 1
}

fn model_cards(state: &AppState) -> Vec<ModelCard> {
    state
        .registry
        .models()
        .into_iter()
        .map(|m| ModelCard {
            id: m.name,
            object: "model",
            created: m.created,
            owned_by: "onnx-chat",
        })
        .collect()
}

/// All routes, with the rejection handler.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let st = warp::any().map({
        let s = state.clone();
        move || s.clone()
    });
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(body_limited(state.cfg.max_body_bytes))
        .then(chat::handle);
    let text_completions = warp::path!("v1" / "completions")
        .and(warp::post())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(body_limited(state.cfg.max_body_bytes))
        .then(completions::handle);
    // Anthropic's Messages API: its own auth headers and error envelope (rejections of these two
    // routes are answered in Anthropic's shape; others pass on).
    let messages = warp::path!("v1" / "messages")
        .and(warp::post())
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("x-api-key"))
        .and(body_limited(state.cfg.max_body_bytes))
        .then(messages::handle);
    let count_tokens = warp::path!("v1" / "messages" / "count_tokens")
        .and(warp::post())
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("x-api-key"))
        .and(body_limited(state.cfg.max_body_bytes))
        .then(messages::count_tokens);
    let anthropic = messages
        .or(count_tokens)
        .unify()
        .recover(|r: Rejection| async move {
            match r.find::<ApiReject>() {
                Some(ApiReject(e)) => Ok(messages::error_response(e)),
                None => Err(r),
            }
        })
        .unify();
    let responses_create = warp::path!("v1" / "responses")
        .and(warp::post())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("content-encoding"))
        .and(body_limited(state.cfg.max_body_bytes))
        .then(responses::create);
    let responses_get = warp::path!("v1" / "responses" / String)
        .and(warp::get())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .then(responses::get);
    let responses_delete = warp::path!("v1" / "responses" / String)
        .and(warp::delete())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .then(responses::delete);
    let responses_items = warp::path!("v1" / "responses" / String / "input_items")
        .and(warp::get())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .then(responses::input_items);
    let responses = responses_create
        .or(responses_get)
        .unify()
        .or(responses_delete)
        .unify()
        .or(responses_items)
        .unify();
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .map(|s: Arc<AppState>| {
            json_response(
                StatusCode::OK,
                &ModelList {
                    object: "list",
                    data: model_cards(&s),
                },
            )
        });
    let model = warp::path!("v1" / "models" / String)
        .and(warp::get())
        .and(with_auth(state.clone()))
        .and(st.clone())
        .map(|id: String, s: Arc<AppState>| {
            let id = percent_decode(&id);
            match model_cards(&s).into_iter().find(|c| c.id == id) {
                Some(c) => json_response(StatusCode::OK, &c),
                None => error_response(
                    &ClassifiedError::new(
                        ErrorClass::ModelNotFound,
                        format!("The model `{id}` does not exist or is not served here."),
                    )
                    .with_param("model"),
                ),
            }
        });
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})));
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(st.clone())
        .map(|s: Arc<AppState>| {
            let models: Vec<String> = s.registry.models().into_iter().map(|m| m.name).collect();
            let (workers, free_slots) = s.registry.workers();
            let connected = s.bus.is_connected();
            let ok = connected && !models.is_empty();
            let body = serde_json::json!({
                "status": if ok { "ready" } else { "not_ready" },
                "bus": s.bus.kind(),
                "bus_connected": connected,
                "workers": workers,
                "free_slots": free_slots,
                "models": models,
            });
            json_response(
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                &body,
            )
        });
    let metrics =
        warp::path!("metrics")
            .and(warp::get())
            .and(st)
            .then(|s: Arc<AppState>| async move {
                let (workers, free_slots) = s.registry.workers();
                let snapshot = metrics::Snapshot {
                    workers,
                    models: s.registry.models().len(),
                    free_slots,
                    queue_depth: s.bus.queue_depth().await,
                };
                let mut text = s.metrics.render(&snapshot);
                if let Some(extra) = &s.cfg.extra_metrics {
                    text.push_str(&extra());
                }
                warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
                    .into_response()
            });
    chat.or(text_completions)
        .unify()
        .or(anthropic)
        .unify()
        .or(responses)
        .unify()
        .or(models)
        .unify()
        .or(model)
        .unify()
        .or(health)
        .unify()
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(ui::routes())
        .unify()
        .recover(handle_rejection)
        .unify()
}

use std::convert::Infallible;

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle_rejection(r: Rejection) -> Result<Response, Infallible> {
    let e = if let Some(ApiReject(e)) = r.find::<ApiReject>() {
        e.clone()
    } else if r.is_not_found() {
        ClassifiedError::new(ErrorClass::InvalidRequest, "Not found: unknown path")
            .with_param("path")
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        let resp = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &ErrorBody::from(&ClassifiedError::new(
                ErrorClass::InvalidRequest,
                "Method not allowed for this path",
            )),
        );
        return Ok(resp);
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        ClassifiedError::new(ErrorClass::PayloadTooLarge, "the request body is too large")
    } else if let Some(h) = r.find::<warp::reject::InvalidHeader>() {
        ClassifiedError::invalid("headers", h.to_string())
    } else {
        ClassifiedError::new(ErrorClass::InvalidRequest, format!("bad request: {r:?}"))
    };
    let mut resp = error_response(&e);
    if r.is_not_found() {
        *resp.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(resp)
}

/// Serves until `shutdown` is cancelled; open responses finish first.
pub async fn run(
    cfg: FrontendConfig,
    listener: tokio::net::TcpListener,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry::default());
    let follower = registry.spawn_follower(bus.clone());
    let state = Arc::new(AppState {
        bus,
        registry,
        metrics: Arc::default(),
        cfg,
    });
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "front end listening");
    let origins = state.cfg.cors_allow_origins.clone();
    let graceful = async move { shutdown.cancelled().await };
    if origins.is_empty() {
        warp::serve(routes(state))
            .incoming(listener)
            .graceful(graceful)
            .run()
            .await;
    } else {
        let cors = warp::cors()
            .allow_methods(["GET", "POST", "OPTIONS"])
            .allow_headers(["authorization", "content-type"]);
        let cors = if origins.iter().any(|o| o == "*") {
            cors.allow_any_origin()
        } else {
            cors.allow_origins(origins.iter().map(String::as_str))
        };
        warp::serve(routes(state).with(cors))
            .incoming(listener)
            .graceful(graceful)
            .run()
            .await;
    }
    follower.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_keys_match_exactly() {
        let keys = vec!["alpha".to_string(), "beta-key".to_string()];
        assert!(super::key_matches(&keys, "alpha"));
        assert!(super::key_matches(&keys, "beta-key"));
        assert!(!super::key_matches(&keys, "alph"));
        assert!(!super::key_matches(&keys, "alphaa"));
        assert!(!super::key_matches(&keys, ""));
        assert!(!super::key_matches(&[], "alpha"));
    }
}
