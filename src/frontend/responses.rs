//! `/v1/responses`: OpenAI's Responses API over the same job as chat ([`crate::openai::responses`]
//! parses the body into the internal request). `POST` answers one response object or the typed event
//! stream; `store` (default true) keeps it in the bus's store (memory, or a JetStream key-value bucket
//! shared by every front end) for `previous_response_id`, `GET`, `DELETE` and `input_items`, scoped by
//! API key.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use warp::http::StatusCode;
use warp::reply::Response as HttpResponse;
use warp::Reply;

use super::chat::{
    fetch_remote_media, record_done, request_key, respond, served_model, submit, InFlight,
};
use super::frames::{Event, FrameReader};
use super::{json_response, AppState};
use crate::error::{ClassifiedError, ErrorClass};
use crate::openai::responses::request::ResponsesRequest;
use crate::openai::responses::response::{
    function_call, IncompleteDetails, Logprob, OutputItem, OutputText, ReasoningText, Response,
    ResponseError, ResponseUsage, StreamEvent,
};
use crate::openai::responses::{self as api, Stored};
use crate::openai::{cache_scope, ValidChatRequest};
use crate::protocol::{now_ms, ChatMessage, DoneBody, FinishReason, ToolCallFrame};

fn not_found(id: &str, param: &str) -> ClassifiedError {
    ClassifiedError::new(
        ErrorClass::NotFound,
        format!("No response with id '{id}' is stored here (it may have expired, been deleted, or belong to another key)."),
    )
    .with_param(param)
}

/// The stored response `id`, if this key may read it.
async fn load(
    state: &AppState,
    id: &str,
    scope: &Option<String>,
) -> Result<Option<Stored>, ClassifiedError> {
    let Some(bytes) = state.bus.store_get(&api::store_key(id)).await? else {
        return Ok(None);
    };
    let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| {
        ClassifiedError::new(
            ErrorClass::Internal,
            format!("stored response {id} unreadable: {e}"),
        )
    })?;
    Ok((&stored.scope == scope).then_some(stored))
}

/// What the response object echoes of the request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    raw: Map<String, Value>,
    store: bool,
}

impl Echo {
    fn response(
        &self,
        status: &str,
        output: Vec<OutputItem>,
        usage: Option<ResponseUsage>,
    ) -> Response {
        let r = &self.raw;
        let str_of = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
        let f32_of = |k: &str| r.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let reasoning = r
            .get("reasoning")
            .cloned()
            .filter(|v| v.is_object())
            .unwrap_or_else(|| json!({"effort": null, "summary": null}));
        let mut text = r
            .get("text")
            .cloned()
            .filter(|v| v.is_object())
            .unwrap_or_else(|| json!({}));
        if text.get("format").is_none() {
            text["format"] = json!({"type": "text"});
        }
        Response {
            id: self.id.clone(),
            object: "response".into(),
            created_at: self.created_at,
            status: status.into(),
            error: None,
            incomplete_details: None,
            instructions: str_of("instructions"),
            max_output_tokens: r.get("max_output_tokens").and_then(Value::as_u64),
            model: self.model.clone(),
            output,
            parallel_tool_calls: r
                .get("parallel_tool_calls")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            previous_response_id: str_of("previous_response_id"),
            reasoning,
            store: self.store,
            temperature: f32_of("temperature"),
            text,
            tool_choice: r
                .get("tool_choice")
                .cloned()
                .unwrap_or_else(|| json!("auto")),
            tools: r
                .get("tools")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            top_p: f32_of("top_p"),
            truncation: str_of("truncation").unwrap_or_else(|| "disabled".into()),
            usage,
            user: str_of("user"),
            metadata: r
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

/// The finished response: status from how it ended.
fn finished_response(echo: &Echo, done: &DoneBody, output: Vec<OutputItem>) -> Response {
    let incomplete = done.finish_reason == FinishReason::Length;
    let mut r = echo.response(
        if incomplete {
            "incomplete"
        } else {
            "completed"
        },
        output,
        Some(ResponseUsage::from(&done.usage)),
    );
    if incomplete {
        r.incomplete_details = Some(IncompleteDetails {
            reason: "max_output_tokens".into(),
        });
    }
    r
}

/// Keeps a finished response (when `store`), logging what could not be kept.
async fn keep(state: &AppState, stored: Stored) {
    if !stored.response.store {
        return;
    }
    let id = stored.response.id.clone();
    match serde_json::to_vec(&stored) {
        Ok(bytes) => match state
            .bus
            .store_put(&api::store_key(&id), bytes.into())
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                id,
                "response not stored: larger than the store takes, or the store is full"
            ),
            Err(e) => tracing::warn!(id, error = %e, "response not stored"),
        },
        Err(e) => tracing::warn!(id, error = %e, "response not stored"),
    }
}

/// Everything a finished answer needs to be rendered and stored.
struct Turn {
    echo: Echo,
    scope: Option<String>,
    input_items: Vec<Value>,
    conversation: Vec<ChatMessage>,
    logprobs: bool,
}

impl Turn {
    fn output(
        &self,
        reasoning: &str,
        text: &str,
        lp: Vec<Logprob>,
        calls: &[ToolCallFrame],
        status: &str,
    ) -> Vec<OutputItem> {
        api::output_items(
            &self.echo.id,
            reasoning,
            text,
            self.logprobs.then_some(lp),
            calls,
            status,
        )
    }

    fn stored(mut self, response: Response, text: &str, calls: &[ToolCallFrame]) -> Stored {
        self.conversation.push(api::answer_message(text, calls));
        Stored {
            scope: self.scope,
            response,
            input_items: self.input_items,
            conversation: self.conversation,
        }
    }
}

pub async fn create(
    state: Arc<AppState>,
    auth: Option<String>,
    encoding: Option<String>,
    body: Bytes,
) -> HttpResponse {
    let t0 = Instant::now();
    let key = request_key(&state, auth.as_deref());
    let result = async {
        let body = super::decoded_body(encoding.as_deref(), body, state.cfg.max_body_bytes)?;
        start(&state, key.as_deref(), &body, t0).await
    }
    .await;
    respond(&state, result)
}

async fn start(
    state: &Arc<AppState>,
    api_key: Option<&str>,
    body: &[u8],
    t0: Instant,
) -> Result<HttpResponse, ClassifiedError> {
    super::peek::refuse_oversized(state, super::peek::Api::Responses, body)?;
    let wire: ResponsesRequest = crate::wire::parse(body)?;
    wire.check()?;
    let raw: Map<String, Value> = serde_json::from_slice(body).unwrap_or_default();
    let scope = cache_scope(api_key, None);
    let history = match &wire.previous_response_id {
        None => Vec::new(),
        Some(prev) => {
            load(state, prev, &scope)
                .await?
                .ok_or_else(|| not_found(prev, "previous_response_id"))?
                .conversation
        }
    };
    let store = wire.store.unwrap_or(true);
    let logprobs = wire.logprobs().is_some();
    let instructions = wire.instructions.as_deref().is_some_and(|i| !i.is_empty());
    let mut limits = state.cfg.limits.clone();
    limits.allow_remote_media = state.cfg.remote_media.is_some();
    let mut req = wire.into_request(history, &limits)?;
    fetch_remote_media(state, &mut req, "image_url").await?;
    let model = served_model(state, &req.model)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let created_ms = now_ms();
    let id = format!("resp_{}", job_id.replace('-', ""));
    let turn = Turn {
        echo: Echo {
            id: id.clone(),
            created_at: created_ms / 1000,
            model: req.model.clone(),
            raw: raw.clone(),
            store,
        },
        scope,
        input_items: api::input_items(raw.get("input"), &id),
        conversation: req.messages[instructions as usize..].to_vec(),
        logprobs,
    };
    let stream = req.stream;
    let deadline = created_ms + state.cfg.request_timeout.as_millis() as u64;
    let mut job = ValidChatRequest::into_job(
        req,
        &job_id,
        &model.name,
        created_ms,
        Some(deadline),
        api_key,
    );
    // Agents send one large limit whatever the model: it is the most they want, not a demand.
    job.clamp_max_tokens = true;
    let (reader, first, in_flight) = submit(state, &job).await?;
    if stream {
        Ok(sse(state.clone(), reader, first, turn, t0, in_flight))
    } else {
        collect(state, reader, first, turn, t0).await
    }
}

async fn collect(
    state: &Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    turn: Turn,
    t0: Instant,
) -> Result<HttpResponse, ClassifiedError> {
    let (mut text, mut reasoning, mut calls, mut lp) =
        (String::new(), String::new(), Vec::new(), Vec::new());
    let mut ev = first;
    let done = loop {
        match ev {
            Event::Delta {
                text: t,
                reasoning: r,
                tool_calls,
                logprobs,
                ..
            } => {
                text.push_str(&t);
                reasoning.push_str(&r);
                calls.extend(tool_calls);
                lp.extend(logprobs.into_iter().map(Logprob::from));
            }
            Event::Done(d) => break d,
        }
        ev = reader.next().await?;
    };
    record_done(state, &done, t0);
    let status = if done.finish_reason == FinishReason::Length {
        "incomplete"
    } else {
        "completed"
    };
    let output = turn.output(&reasoning, &text, lp, &calls, status);
    let response = finished_response(&turn.echo, &done, output);
    keep(state, turn.stored(response.clone(), &text, &calls)).await;
    Ok(json_response(StatusCode::OK, &response))
}

/// Numbers the events of one stream.
struct Events {
    seq: u64,
}

impl Events {
    fn event(&mut self, kind: &'static str, fields: Value) -> warp::sse::Event {
        let e = StreamEvent {
            kind,
            sequence_number: self.seq,
            fields: match fields {
                Value::Object(o) => o,
                _ => Map::new(),
            },
        };
        self.seq += 1;
        warp::sse::Event::default()
            .event(kind)
            .data(serde_json::to_string(&e).unwrap_or_else(|_| "{}".into()))
    }
}

/// The item being streamed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Reasoning,
    Message,
}

/// Turns frames into the Responses event sequence.
struct Items {
    response_id: String,
    open: Option<(Open, u32)>,
    next: u32,
    reasoning: String,
    text: String,
    logprobs: Vec<Logprob>,
    want_logprobs: bool,
    calls: Vec<ToolCallFrame>,
    /// Whether a message item was opened.
    had_message: bool,
    /// Finished items by output index.
    done: Vec<OutputItem>,
}

impl Items {
    fn message(&self, status: &str) -> OutputItem {
        OutputItem::Message {
            id: api::item_id("msg", &self.response_id),
            status: status.into(),
            role: "assistant".into(),
            content: if status == "in_progress" {
                Vec::new()
            } else {
                vec![OutputText::new(
                    self.text.clone(),
                    self.want_logprobs.then(|| self.logprobs.clone()),
                )]
            },
        }
    }

    fn reasoning_item(&self, with_text: bool) -> OutputItem {
        OutputItem::Reasoning {
            id: api::item_id("rs", &self.response_id),
            summary: Vec::new(),
            content: if with_text {
                vec![ReasoningText::new(self.reasoning.clone())]
            } else {
                Vec::new()
            },
            status: None,
        }
    }

    fn close(&mut self, ev: &mut Events, out: &mut Vec<warp::sse::Event>, status: &str) {
        let Some((kind, index)) = self.open.take() else {
            return;
        };
        match kind {
            Open::Reasoning => {
                let id = api::item_id("rs", &self.response_id);
                out.push(ev.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": self.reasoning}),
                ));
                out.push(ev.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                           "part": {"type": "reasoning_text", "text": self.reasoning}}),
                ));
                let item = self.reasoning_item(true);
                out.push(ev.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.done.push(item);
            }
            Open::Message => {
                let id = api::item_id("msg", &self.response_id);
                let item = self.message(status);
                let part = match &item {
                    OutputItem::Message { content, .. } => json!(content[0]),
                    _ => json!({}),
                };
                out.push(ev.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": self.text,
                           "logprobs": if self.want_logprobs { json!(self.logprobs) } else { json!([]) }}),
                ));
                out.push(ev.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
                out.push(ev.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                ));
                self.done.push(item);
            }
        }
    }

    fn open(&mut self, kind: Open, ev: &mut Events, out: &mut Vec<warp::sse::Event>) -> u32 {
        if let Some((k, i)) = self.open {
            if k == kind {
                return i;
            }
        }
        self.close(ev, out, "completed");
        let index = self.next;
        self.next += 1;
        self.open = Some((kind, index));
        self.had_message |= kind == Open::Message;
        let (item, part, id) = match kind {
            Open::Reasoning => (
                self.reasoning_item(false),
                json!({"type": "reasoning_text", "text": ""}),
                api::item_id("rs", &self.response_id),
            ),
            Open::Message => (
                self.message("in_progress"),
                json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
                api::item_id("msg", &self.response_id),
            ),
        };
        out.push(ev.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        out.push(ev.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        ));
        index
    }

    fn delta(
        &mut self,
        ev: &mut Events,
        reasoning: String,
        text: String,
        logprobs: Vec<Logprob>,
        calls: Vec<ToolCallFrame>,
    ) -> Vec<warp::sse::Event> {
        let mut out = Vec::new();
        if !reasoning.is_empty() {
            let index = self.open(Open::Reasoning, ev, &mut out);
            self.reasoning.push_str(&reasoning);
            out.push(ev.event(
                "response.reasoning_text.delta",
                json!({"item_id": api::item_id("rs", &self.response_id), "output_index": index,
                       "content_index": 0, "delta": reasoning}),
            ));
        }
        if !text.is_empty() {
            let index = self.open(Open::Message, ev, &mut out);
            self.text.push_str(&text);
            let lp = if self.want_logprobs {
                json!(logprobs)
            } else {
                json!([])
            };
            self.logprobs.extend(logprobs);
            out.push(ev.event(
                "response.output_text.delta",
                json!({"item_id": api::item_id("msg", &self.response_id), "output_index": index,
                       "content_index": 0, "delta": text, "logprobs": lp}),
            ));
        }
        for c in calls {
            self.close(ev, &mut out, "completed");
            let index = self.next;
            self.next += 1;
            let item = function_call(&c);
            let mut added = json!(item);
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            let id = added["id"].clone();
            out.push(ev.event(
                "response.output_item.added",
                json!({"output_index": index, "item": added}),
            ));
            out.push(ev.event(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": index, "delta": c.arguments}),
            ));
            out.push(ev.event(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": index, "name": c.name, "arguments": c.arguments}),
            ));
            out.push(ev.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
            self.done.push(item);
            self.calls.push(c);
        }
        out
    }
}

/// The SSE response: `response.created`, `response.in_progress`, the items' events, then
/// `response.completed` / `response.incomplete` (or `response.failed` after an error). A client that
/// goes away cancels the job.
fn sse(
    state: Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    turn: Turn,
    t0: Instant,
    in_flight: InFlight,
) -> HttpResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(32);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let mut ev = Events { seq: 0 };
        let pending = turn.echo.response("in_progress", Vec::new(), None);
        for kind in ["response.created", "response.in_progress"] {
            if tx
                .send(ev.event(kind, json!({"response": pending})))
                .await
                .is_err()
            {
                return;
            }
        }
        let mut items = Items {
            response_id: turn.echo.id.clone(),
            open: None,
            next: 0,
            reasoning: String::new(),
            text: String::new(),
            logprobs: Vec::new(),
            want_logprobs: turn.logprobs,
            calls: Vec::new(),
            had_message: false,
            done: Vec::new(),
        };
        let mut next: Result<Event, ClassifiedError> = Ok(first);
        loop {
            let (out, end) = match next {
                Ok(Event::Delta {
                    text,
                    reasoning,
                    tool_calls,
                    logprobs,
                    ..
                }) => {
                    let lp = logprobs.into_iter().map(Logprob::from).collect();
                    (items.delta(&mut ev, reasoning, text, lp, tool_calls), false)
                }
                Ok(Event::Done(done)) => {
                    record_done(&state, &done, t0);
                    let mut out = Vec::new();
                    let status = if done.finish_reason == FinishReason::Length {
                        "incomplete"
                    } else {
                        "completed"
                    };
                    if !items.had_message && items.calls.is_empty() {
                        // An answer without text or calls still has its (empty) message, as
                        // when not streamed.
                        items.open(Open::Message, &mut ev, &mut out);
                    }
                    items.close(&mut ev, &mut out, status);
                    let response = finished_response(&turn.echo, &done, items.done.clone());
                    let kind = if status == "incomplete" {
                        "response.incomplete"
                    } else {
                        "response.completed"
                    };
                    out.push(ev.event(kind, json!({"response": response})));
                    let (text, calls) = (items.text.clone(), items.calls.clone());
                    keep(&state, turn.stored(response, &text, &calls)).await;
                    for e in out {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::info!(class = ?e.class, error = %e.message, "stream ended with an error");
                    let mut r = turn.echo.response("failed", items.done.clone(), None);
                    r.error = Some(ResponseError {
                        code: match e.class {
                            ErrorClass::Overloaded => "rate_limit_exceeded",
                            ErrorClass::InvalidRequest | ErrorClass::ContextLengthExceeded => {
                                "invalid_prompt"
                            }
                            _ => "server_error",
                        }
                        .into(),
                        message: e.message.clone(),
                    });
                    (
                        vec![ev.event("response.failed", json!({"response": r}))],
                        true,
                    )
                }
            };
            for e in out {
                if tx.send(e).await.is_err() {
                    return; // client gone: dropping `reader` cancels the job
                }
            }
            if end {
                return;
            }
            next = tokio::select! {
                e = reader.next() => e,
                _ = tx.closed() => return,
            };
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response()
}

/// `GET /v1/responses/{id}`.
pub async fn get(id: String, state: Arc<AppState>, auth: Option<String>) -> HttpResponse {
    let scope = cache_scope(request_key(&state, auth.as_deref()).as_deref(), None);
    let result = async {
        let stored = load(&state, &id, &scope)
            .await?
            .ok_or_else(|| not_found(&id, "response_id"))?;
        Ok(json_response(StatusCode::OK, &stored.response))
    }
    .await;
    respond(&state, result)
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(id: String, state: Arc<AppState>, auth: Option<String>) -> HttpResponse {
    let scope = cache_scope(request_key(&state, auth.as_deref()).as_deref(), None);
    let result = async {
        load(&state, &id, &scope)
            .await?
            .ok_or_else(|| not_found(&id, "response_id"))?;
        state.bus.store_delete(&api::store_key(&id)).await?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "response.deleted", "deleted": true}),
        ))
    }
    .await;
    respond(&state, result)
}

/// `GET /v1/responses/{id}/input_items` (`order` `desc` by default or `asc`, `limit` 1–100,
/// `after`).
pub async fn input_items(
    id: String,
    state: Arc<AppState>,
    auth: Option<String>,
    query: HashMap<String, String>,
) -> HttpResponse {
    let scope = cache_scope(request_key(&state, auth.as_deref()).as_deref(), None);
    let result = async {
        let stored = load(&state, &id, &scope)
            .await?
            .ok_or_else(|| not_found(&id, "response_id"))?;
        let mut items = stored.input_items;
        match query.get("order").map(String::as_str) {
            None | Some("desc") => items.reverse(),
            Some("asc") => {}
            Some(o) => {
                return Err(ClassifiedError::invalid(
                    "order",
                    format!("order must be \"asc\" or \"desc\", got {o:?}"),
                ))
            }
        }
        if let Some(after) = query.get("after") {
            if let Some(at) = items.iter().position(|i| i["id"] == after.as_str()) {
                items.drain(..=at);
            }
        }
        let limit = match query.get("limit") {
            None => 20,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    return Err(ClassifiedError::invalid(
                        "limit",
                        format!("limit must be between 1 and 100, got {l:?}"),
                    ))
                }
            },
        };
        let has_more = items.len() > limit;
        items.truncate(limit);
        Ok(json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": items,
                    "first_id": items.first().map(|i| i["id"].clone()),
                    "last_id": items.last().map(|i| i["id"].clone()),
                    "has_more": has_more}),
        ))
    }
    .await;
    respond(&state, result)
}
