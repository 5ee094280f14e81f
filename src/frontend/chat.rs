//! `POST /v1/chat/completions`: validate, publish the job, then answer from its frames — as one JSON
//! body, or as OpenAI SSE chunks (role first, content deltas, a final chunk with `finish_reason`, an
//! optional usage chunk, `data: [DONE]`).
//!
//! A streaming request still gets a plain HTTP error when its first frame is an error (bad template,
//! context too long…): the stream is only opened once the first frame is good.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::frames::{Event, FrameReader};
use super::registry::Lookup;
use super::{error_response, json_response, AppState};
use crate::error::{ClassifiedError, ErrorClass};
use crate::openai::response::{
    AssistantMessage, ChatCompletion, Choice, ChoiceLogprobs, ChunkChoice, Delta, ResponseMeta,
    ToolCallOut,
};
use crate::openai::{self, ValidChatRequest};
use crate::protocol::{now_ms, prefix, DoneBody};

/// In-flight gauge that cannot be left incremented.
pub(super) struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(s: Arc<AppState>) -> Self {
        s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(s)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn handle(state: Arc<AppState>, auth: Option<String>, body: Bytes) -> Response {
    let t0 = Instant::now();
    let key = request_key(&state, auth.as_deref());
    respond(&state, start(&state, key.as_deref(), body, t0).await)
}

/// The HTTP answer (an error as OpenAI's envelope), counted in the metrics.
pub(super) fn respond(state: &AppState, result: Result<Response, ClassifiedError>) -> Response {
    let resp = result.unwrap_or_else(|e| error_response(&e));
    state.metrics.response(resp.status().as_u16());
    resp
}

/// The request body as JSON.
pub(super) fn parse_body(body: &[u8]) -> Result<serde_json::Value, ClassifiedError> {
    serde_json::from_slice(body).map_err(|e| {
        ClassifiedError::invalid("body", format!("the request body is not valid JSON: {e}"))
    })
}

/// The key the request was let in with (only when keys are required): it scopes the prefix cache.
pub(super) fn request_key(state: &AppState, auth: Option<&str>) -> Option<String> {
    auth.and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|_| !state.cfg.api_keys.is_empty())
        .map(str::to_string)
}

async fn start(
    state: &Arc<AppState>,
    api_key: Option<&str>,
    body: Bytes,
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    super::peek::refuse_oversized(state, super::peek::Api::Chat, &body)?;
    let value = parse_body(&body)?;
    let mut limits = state.cfg.limits.clone();
    limits.allow_remote_media = state.cfg.remote_media.is_some();
    let mut req = openai::validate(&value, &limits)?;
    fetch_remote_media(state, &mut req, "image_url.url").await?;
    let model = served_model(state, &req.model)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let created_ms = now_ms();
    let meta = ResponseMeta::new(
        "chatcmpl",
        &job_id,
        created_ms,
        &req.model,
        model.quant.as_deref(),
    );
    let flags = (req.stream, req.include_usage, req.return_token_ids);
    let logprobs = req.logprobs.is_some();
    let n = req.n;
    let deadline = created_ms + state.cfg.request_timeout.as_millis() as u64;
    let job = ValidChatRequest::into_job(
        req,
        &job_id,
        &model.name,
        created_ms,
        Some(deadline),
        api_key,
    );
    let (reader, first, in_flight) = submit(state, &job).await?;
    let (stream, include_usage, return_ids) = flags;
    if stream {
        Ok(sse(
            state.clone(),
            reader,
            first,
            meta,
            SseOptions {
                n,
                include_usage,
                return_ids,
                logprobs,
            },
            t0,
            in_flight,
        ))
    } else {
        collect(state, reader, first, meta, (n, return_ids, logprobs), t0).await
    }
}

/// Replaces the request's remote images (`http(s)://`, accepted only with `--allow-remote-media`)
/// with their bytes; an error names `messages[i].content[j].{field}` (indices of the internal
/// request's messages).
pub(super) async fn fetch_remote_media(
    state: &AppState,
    req: &mut ValidChatRequest,
    field: &str,
) -> Result<(), ClassifiedError> {
    let Some(fetcher) = &state.cfg.remote_media else {
        return Ok(());
    };
    for r in req.remote_media() {
        let param = format!("messages[{}].content[{}].{field}", r.message, r.part);
        let bytes = fetcher.fetch(&param, &r.url).await?;
        req.set_media(&r, &bytes);
    }
    Ok(())
}

/// The served model a request names, or the OpenAI-shaped error naming `model`.
pub(super) fn served_model(
    state: &Arc<AppState>,
    name: &str,
) -> Result<crate::protocol::WorkerModel, ClassifiedError> {
    match state.registry.lookup(name) {
        Lookup::Served(m) => Ok(m),
        Lookup::Unserved => Err(ClassifiedError::new(
            ErrorClass::Unavailable,
            format!(
                "No worker serves the model `{}` right now; retry shortly.",
                name
            ),
        )
        .with_param("model")),
        Lookup::Unknown => {
            let available: Vec<String> = state
                .registry
                .models()
                .into_iter()
                .map(|m| m.name)
                .collect();
            // With nothing served at all the service is unavailable, rather than the name wrong.
            let (class, avail) = if available.is_empty() {
                (
                    ErrorClass::Unavailable,
                    "none (no worker is ready)".to_string(),
                )
            } else {
                (ErrorClass::ModelNotFound, available.join(", "))
            };
            Err(ClassifiedError::new(
                class,
                format!(
                    "The model `{}` does not exist or is not served here. Available: {avail}",
                    name
                ),
            )
            .with_param("model"))
        }
    }
}

/// Publishes a job and waits for its first event (an error there is an HTTP error).
pub(super) async fn submit(
    state: &Arc<AppState>,
    job: &crate::protocol::Job,
) -> Result<(FrameReader, Event, InFlight), ClassifiedError> {
    let job_id = job.job_id.clone();
    let in_flight = InFlight::new(state.clone());
    if state.metrics.in_flight.load(Ordering::Relaxed) > state.cfg.max_in_flight as i64 {
        return Err(ClassifiedError::new(
            ErrorClass::Overloaded,
            format!(
                "This server is answering its maximum of {} requests; retry shortly.",
                state.cfg.max_in_flight
            ),
        ));
    }
    // Only worth hashing the conversation (media included) when there is a choice of workers.
    let route = (state.cfg.prefix_routing && state.registry.workers().0 > 1)
        .then(|| {
            let digests = prefix::digests(
                job.cache_scope.as_deref().unwrap_or(""),
                &job.model,
                &job.messages,
            );
            state.registry.route(&job.model, &digests)
        })
        .flatten();
    let (stream, routed) = state.bus.submit_preferring(job, route.as_deref()).await?;
    if routed {
        state.metrics.routed.fetch_add(1, Ordering::Relaxed);
    }
    let mut reader = FrameReader::new(
        stream,
        state.bus.clone(),
        &job_id,
        state.cfg.request_timeout,
        state.cfg.idle_timeout,
        state.metrics.clone(),
    )
    .with_registry(state.registry.clone());
    // The first event decides between an HTTP error and a successful answer.
    let first = reader.next().await?;
    Ok((reader, first, in_flight))
}

/// Counts a finished answer in the metrics (tokens, decode time, request duration).
pub(super) fn record_done(state: &AppState, done: &DoneBody, t0: Instant) {
    state.metrics.finished(
        done.usage.prompt_tokens,
        done.usage.completion_tokens,
        done.timings.decode_ms,
    );
    state
        .metrics
        .request_seconds
        .observe(t0.elapsed().as_secs_f64());
}

/// How choice `i` ended, from the final frame.
pub(super) fn finish_of(done: &DoneBody, i: u32) -> &'static str {
    done.choices
        .iter()
        .find(|c| c.index == i)
        .map(|c| c.finish_reason)
        .unwrap_or(done.finish_reason)
        .as_str()
}

/// One choice's answer, gathered from its deltas.
#[derive(Default)]
struct Gathered {
    text: String,
    reasoning: String,
    ids: Vec<u32>,
    logprobs: Vec<crate::protocol::TokenLogprob>,
    calls: Vec<crate::protocol::ToolCallFrame>,
}

async fn collect(
    state: &Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    meta: ResponseMeta,
    (n, return_ids, want_logprobs): (u32, bool, bool),
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    let mut got: Vec<Gathered> = (0..n).map(|_| Gathered::default()).collect();
    let mut ev = first;
    let done: DoneBody = loop {
        match ev {
            Event::Delta {
                index,
                text: t,
                reasoning,
                token_ids,
                logprobs,
                tool_calls,
            } => {
                let g = &mut got[(index as usize).min(n as usize - 1)];
                g.text.push_str(&t);
                g.reasoning.push_str(&reasoning);
                g.ids.extend(token_ids);
                g.logprobs.extend(logprobs);
                g.calls.extend(tool_calls);
            }
            Event::Done(d) => break d,
        }
        ev = reader.next().await?;
    };
    record_done(state, &done, t0);
    let choices = got
        .into_iter()
        .enumerate()
        .map(|(i, g)| Choice {
            index: i as u32,
            message: AssistantMessage {
                role: "assistant",
                // `null` rather than "" when the answer is calls, or only reasoning (as vLLM).
                content: (!g.text.is_empty() || (g.calls.is_empty() && g.reasoning.is_empty()))
                    .then_some(g.text),
                reasoning_content: (!g.reasoning.is_empty()).then_some(g.reasoning),
                refusal: None,
                tool_calls: g
                    .calls
                    .into_iter()
                    .map(|c| ToolCallOut::new(c, false))
                    .collect(),
            },
            logprobs: want_logprobs.then_some(ChoiceLogprobs {
                content: g.logprobs,
                refusal: None,
            }),
            finish_reason: finish_of(&done, i as u32),
            token_ids: return_ids.then_some(g.ids),
        })
        .collect();
    let body = ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint,
        choices,
        usage: done.usage,
        timings: done.timings,
    };
    Ok(json_response(StatusCode::OK, &body))
}

pub(super) fn data_event<T: serde::Serialize>(v: &T) -> warp::sse::Event {
    warp::sse::Event::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

struct SseOptions {
    n: u32,
    include_usage: bool,
    return_ids: bool,
    logprobs: bool,
}

/// The SSE response. A task reads the frames and feeds the response through a channel; when the
/// client goes away the channel closes, the task ends, and dropping the reader cancels the job.
/// With `n > 1` every chunk carries one choice, by `index`; each choice opens with its role chunk.
fn sse(
    state: Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    meta: ResponseMeta,
    opts: SseOptions,
    t0: Instant,
    in_flight: InFlight,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(32);
    let SseOptions {
        n,
        include_usage,
        return_ids,
        logprobs: want_logprobs,
    } = opts;
    let usage_field = include_usage.then_some(None);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        for index in 0..n {
            let role = meta.chunk(
                vec![ChunkChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                usage_field,
            );
            if tx.send(data_event(&role)).await.is_err() {
                return;
            }
        }
        let mut ev: Result<Event, ClassifiedError> = Ok(first);
        loop {
            let mut end = true;
            let out = match ev {
                Ok(Event::Delta {
                    index,
                    text,
                    reasoning,
                    token_ids,
                    logprobs,
                    tool_calls,
                }) => {
                    end = false;
                    let quiet = text.is_empty()
                        && reasoning.is_empty()
                        && tool_calls.is_empty()
                        && (!return_ids || token_ids.is_empty())
                        && (!want_logprobs || logprobs.is_empty());
                    if quiet {
                        vec![]
                    } else {
                        let calls = !tool_calls.is_empty();
                        // A reasoning chunk carries no `content` unless it has answer text too.
                        let thinking = !reasoning.is_empty();
                        let chunk = meta.chunk(
                            vec![ChunkChoice {
                                index,
                                delta: Delta {
                                    role: None,
                                    content: (!calls && (!thinking || !text.is_empty()))
                                        .then_some(text),
                                    reasoning_content: thinking.then_some(reasoning),
                                    tool_calls: tool_calls
                                        .into_iter()
                                        .map(|c| ToolCallOut::new(c, true))
                                        .collect(),
                                    token_ids: return_ids.then_some(token_ids),
                                },
                                logprobs: (want_logprobs && !logprobs.is_empty()).then_some({
                                    ChoiceLogprobs {
                                        content: logprobs,
                                        refusal: None,
                                    }
                                }),
                                finish_reason: None,
                            }],
                            usage_field,
                        );
                        vec![data_event(&chunk)]
                    }
                }
                Ok(Event::Done(done)) => {
                    state.metrics.finished(
                        done.usage.prompt_tokens,
                        done.usage.completion_tokens,
                        done.timings.decode_ms,
                    );
                    let mut v: Vec<warp::sse::Event> = (0..n)
                        .map(|index| {
                            data_event(&meta.chunk(
                                vec![ChunkChoice {
                                    index,
                                    delta: Delta::default(),
                                    logprobs: None,
                                    finish_reason: Some(finish_of(&done, index)),
                                }],
                                usage_field,
                            ))
                        })
                        .collect();
                    if include_usage {
                        v.push(data_event(&meta.chunk(vec![], Some(Some(done.usage)))));
                    }
                    v.push(warp::sse::Event::default().data("[DONE]"));
                    v
                }
                Err(e) => {
                    tracing::info!(class = ?e.class, error = %e.message, "stream ended with an error");
                    vec![
                        data_event(&crate::openai::response::ErrorBody::from(&e)),
                        warp::sse::Event::default().data("[DONE]"),
                    ]
                }
            };
            for e in out {
                if tx.send(e).await.is_err() {
                    return; // client gone: dropping `reader` cancels the job
                }
            }
            if end {
                state
                    .metrics
                    .request_seconds
                    .observe(t0.elapsed().as_secs_f64());
                return;
            }
            ev = tokio::select! {
                e = reader.next() => e,
                _ = tx.closed() => return,
            };
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response()
}
