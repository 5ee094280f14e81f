//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API over the same
//! job as chat ([`crate::anthropic`] parses the body into the internal request), answered as one
//! message object or as Anthropic's SSE events. Errors are Anthropic's envelope, with its types and
//! statuses; keys come as `x-api-key` or `Authorization: Bearer`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::chat::{fetch_remote_media, record_done, served_model, submit, InFlight};
use super::frames::{Event, FrameReader};
use super::{json_response, key_matches, AppState};
use crate::anthropic::request::{self as wire};
use crate::anthropic::response::{
    error_kind, stop_reason, tool_use, Block, BlockDelta, ErrorBody, Message, MessageDeltaBody,
    MessageUsage, StreamEvent,
};
use crate::error::{ClassifiedError, ErrorClass};
use crate::openai::ValidChatRequest;
use crate::protocol::{now_ms, DoneBody, ToolCallFrame};

/// Anthropic's error response for an error.
pub fn error_response(e: &ClassifiedError) -> Response {
    let (status, _) = error_kind(e.class);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &ErrorBody::from(e));
    if matches!(e.class, ErrorClass::Overloaded | ErrorClass::Unavailable) {
        resp.headers_mut()
            .insert("retry-after", warp::http::HeaderValue::from_static("1"));
    }
    resp
}

/// The key a request was let in with: `x-api-key` (Anthropic's SDK) or `Authorization: Bearer`.
/// `None` when the server takes no keys.
fn authorize(
    state: &AppState,
    bearer: Option<&str>,
    x_api_key: Option<&str>,
) -> Result<Option<String>, ClassifiedError> {
    if state.cfg.api_keys.is_empty() {
        return Ok(None);
    }
    let given = x_api_key.map(str::trim).or_else(|| {
        bearer
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
    });
    match given {
        Some(k) if key_matches(&state.cfg.api_keys, k) => Ok(Some(k.to_string())),
        _ => Err(ClassifiedError::new(
            ErrorClass::Unauthorized,
            "Missing or invalid API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`.",
        )),
    }
}

/// The request as the engine runs it, after auth, parsing and remote media.
async fn prepare(
    state: &Arc<AppState>,
    bearer: Option<&str>,
    x_api_key: Option<&str>,
    body: &[u8],
    count_only: bool,
) -> Result<(ValidChatRequest, Option<String>), ClassifiedError> {
    let key = authorize(state, bearer, x_api_key)?;
    super::peek::refuse_oversized(state, super::peek::Api::Messages, body)?;
    let mut limits = state.cfg.limits.clone();
    limits.allow_remote_media = state.cfg.remote_media.is_some();
    let mut req = wire::parse(body)?.into_request(&limits, count_only)?;
    fetch_remote_media(state, &mut req, "source.url").await?;
    Ok((req, key))
}

pub async fn handle(
    state: Arc<AppState>,
    bearer: Option<String>,
    x_api_key: Option<String>,
    body: Bytes,
) -> Response {
    let t0 = Instant::now();
    let result = async {
        let (req, key) = prepare(
            &state,
            bearer.as_deref(),
            x_api_key.as_deref(),
            &body,
            false,
        )
        .await?;
        start(&state, req, key.as_deref(), t0).await
    }
    .await;
    respond(&state, result)
}

pub async fn count_tokens(
    state: Arc<AppState>,
    bearer: Option<String>,
    x_api_key: Option<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let (req, key) =
            prepare(&state, bearer.as_deref(), x_api_key.as_deref(), &body, true).await?;
        let model = served_model(&state, &req.model)?;
        let job_id = uuid::Uuid::new_v4().to_string();
        let created_ms = now_ms();
        let deadline = created_ms + state.cfg.request_timeout.as_millis() as u64;
        let mut job = req.into_job(
            &job_id,
            &model.name,
            created_ms,
            Some(deadline),
            key.as_deref(),
        );
        job.count_only = true;
        job.clamp_max_tokens = true;
        let (_reader, first, _in_flight) = submit(&state, &job).await?;
        match first {
            Event::Done(d) => Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"input_tokens": d.usage.prompt_tokens}),
            )),
            Event::Delta { .. } => Err(ClassifiedError::new(
                ErrorClass::Internal,
                "the worker answered a token count with text",
            )),
        }
    }
    .await;
    respond(&state, result)
}

fn respond(state: &AppState, result: Result<Response, ClassifiedError>) -> Response {
    let resp = result.unwrap_or_else(|e| error_response(&e));
    state.metrics.response(resp.status().as_u16());
    resp
}

async fn start(
    state: &Arc<AppState>,
    req: ValidChatRequest,
    api_key: Option<&str>,
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    let model = served_model(state, &req.model)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let created_ms = now_ms();
    let id = format!("msg_{}", job_id.replace('-', ""));
    let name = req.model.clone();
    let stream = req.stream;
    let deadline = created_ms + state.cfg.request_timeout.as_millis() as u64;
    let mut job = req.into_job(&job_id, &model.name, created_ms, Some(deadline), api_key);
    // Agents send one large max_tokens whatever the model: it is the most they want, not a demand.
    job.clamp_max_tokens = true;
    let (reader, first, in_flight) = submit(state, &job).await?;
    let message = Message {
        id,
        kind: "message",
        role: "assistant",
        model: name,
        content: Vec::new(),
        stop_reason: None,
        stop_sequence: None,
        usage: MessageUsage::default(),
    };
    if stream {
        Ok(sse(state.clone(), reader, first, message, t0, in_flight))
    } else {
        collect(state, reader, first, message, t0).await
    }
}

/// The answer's blocks: reasoning, text, then calls.
fn blocks(thinking: String, text: String, calls: &[ToolCallFrame]) -> Vec<Block> {
    let mut out = Vec::new();
    if !thinking.is_empty() {
        out.push(Block::Thinking {
            thinking,
            signature: String::new(),
        });
    }
    if !text.is_empty() || (calls.is_empty() && out.is_empty()) {
        out.push(Block::Text { text });
    }
    out.extend(calls.iter().map(tool_use));
    out
}

async fn collect(
    state: &Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    mut message: Message,
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    let mut ev = first;
    let done = loop {
        match ev {
            Event::Delta {
                text: t,
                reasoning,
                tool_calls,
                ..
            } => {
                text.push_str(&t);
                thinking.push_str(&reasoning);
                calls.extend(tool_calls);
            }
            Event::Done(d) => break d,
        }
        ev = reader.next().await?;
    };
    record_done(state, &done, t0);
    let (reason, sequence) = stop_reason(&done, !calls.is_empty());
    message.content = blocks(thinking, text, &calls);
    message.stop_reason = Some(reason);
    message.stop_sequence = sequence;
    message.usage = MessageUsage::from(&done.usage);
    Ok(json_response(StatusCode::OK, &message))
}

fn event(e: &StreamEvent) -> warp::sse::Event {
    warp::sse::Event::default()
        .event(e.name())
        .data(serde_json::to_string(e).unwrap_or_else(|_| "{}".into()))
}

/// Which content block is open while streaming.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
}

/// Turns frames into Anthropic's block events: a block opens when its kind of output starts and
/// closes when another kind starts or the answer ends; calls are one block each.
#[derive(Default)]
struct Blocks {
    open: Option<(Open, u32)>,
    next: u32,
    calls: bool,
}

impl Blocks {
    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some((_, index)) = self.open.take() {
            out.push(StreamEvent::ContentBlockStop { index });
        }
    }

    fn ensure(&mut self, kind: Open, out: &mut Vec<StreamEvent>) -> u32 {
        if let Some((k, i)) = self.open {
            if k == kind {
                return i;
            }
        }
        self.close(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((kind, index));
        let content_block = match kind {
            Open::Thinking => Block::Thinking {
                thinking: String::new(),
                signature: String::new(),
            },
            Open::Text => Block::Text {
                text: String::new(),
            },
        };
        out.push(StreamEvent::ContentBlockStart {
            index,
            content_block,
        });
        index
    }

    fn delta(
        &mut self,
        thinking: String,
        text: String,
        calls: Vec<ToolCallFrame>,
    ) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if !thinking.is_empty() {
            let index = self.ensure(Open::Thinking, &mut out);
            out.push(StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::ThinkingDelta { thinking },
            });
        }
        if !text.is_empty() {
            let index = self.ensure(Open::Text, &mut out);
            out.push(StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::TextDelta { text },
            });
        }
        for c in calls {
            self.close(&mut out);
            self.calls = true;
            let index = self.next;
            self.next += 1;
            let Block::ToolUse { id, name, .. } = tool_use(&c) else {
                continue;
            };
            out.push(StreamEvent::ContentBlockStart {
                index,
                content_block: Block::ToolUse {
                    id,
                    name,
                    input: serde_json::json!({}),
                },
            });
            out.push(StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta {
                    partial_json: c.arguments,
                },
            });
            out.push(StreamEvent::ContentBlockStop { index });
        }
        out
    }

    fn done(&mut self, done: &DoneBody) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.next == 0 {
            // An empty answer still has its (empty) text block.
            self.ensure(Open::Text, &mut out);
        }
        self.close(&mut out);
        let (stop_reason, stop_sequence) = stop_reason(done, self.calls);
        out.push(StreamEvent::MessageDelta {
            delta: MessageDeltaBody {
                stop_reason,
                stop_sequence,
            },
            usage: MessageUsage::from(&done.usage),
        });
        out.push(StreamEvent::MessageStop {});
        out
    }
}

/// The SSE response: `message_start`, `ping`, the blocks, `message_delta`, `message_stop`; an error
/// after the stream opened is an `error` event. A client that goes away cancels the job.
fn sse(
    state: Arc<AppState>,
    mut reader: FrameReader,
    first: Event,
    message: Message,
    t0: Instant,
    in_flight: InFlight,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(32);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let opening = [StreamEvent::MessageStart { message }, StreamEvent::Ping {}];
        for e in &opening {
            if tx.send(event(e)).await.is_err() {
                return;
            }
        }
        let mut blocks = Blocks::default();
        let mut ev: Result<Event, ClassifiedError> = Ok(first);
        loop {
            let (out, end) = match ev {
                Ok(Event::Delta {
                    text,
                    reasoning,
                    tool_calls,
                    ..
                }) => (blocks.delta(reasoning, text, tool_calls), false),
                Ok(Event::Done(done)) => {
                    record_done(&state, &done, t0);
                    (blocks.done(&done), true)
                }
                Err(e) => {
                    tracing::info!(class = ?e.class, error = %e.message, "stream ended with an error");
                    (vec![StreamEvent::Error { error: (&e).into() }], true)
                }
            };
            for e in &out {
                if tx.send(event(e)).await.is_err() {
                    return; // client gone: dropping `reader` cancels the job
                }
            }
            if end {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Usage;
    use serde_json::Value;

    #[test]
    fn reasoning_text_and_calls_become_blocks_in_order() {
        let mut b = Blocks::default();
        let mut events = b.delta("let me think".into(), String::new(), vec![]);
        events.extend(b.delta(" more".into(), "The".into(), vec![]));
        events.extend(b.delta(String::new(), " answer".into(), vec![]));
        events.extend(b.delta(
            String::new(),
            String::new(),
            vec![ToolCallFrame {
                index: 0,
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{\"a\":1}".into(),
            }],
        ));
        let done = DoneBody {
            finish_reason: crate::protocol::FinishReason::ToolCalls,
            usage: Usage::new(5, 9),
            timings: Default::default(),
            choices: vec![],
            stop_sequence: None,
            heartbeat: None,
        };
        events.extend(b.done(&done));
        let v: Vec<Value> = events
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        let kinds: Vec<String> = v
            .iter()
            .map(|e| {
                let t = e["type"].as_str().unwrap();
                let sub = e["content_block"]["type"]
                    .as_str()
                    .or(e["delta"]["type"].as_str())
                    .unwrap_or("");
                format!("{t}:{}:{sub}", e["index"])
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "content_block_start:0:thinking",
                "content_block_delta:0:thinking_delta",
                "content_block_delta:0:thinking_delta",
                "content_block_stop:0:",
                "content_block_start:1:text",
                "content_block_delta:1:text_delta",
                "content_block_delta:1:text_delta",
                "content_block_stop:1:",
                "content_block_start:2:tool_use",
                "content_block_delta:2:input_json_delta",
                "content_block_stop:2:",
                "message_delta:null:",
                "message_stop:null:",
            ]
        );
        assert_eq!(v[8]["content_block"]["id"], "toolu_1");
        assert_eq!(v[11]["delta"]["stop_reason"], "tool_use");
        assert_eq!(v[11]["usage"]["output_tokens"], 9);
        // The whole answer's blocks, in the same order.
        let all = blocks(
            "think".into(),
            "text".into(),
            &[ToolCallFrame {
                index: 0,
                id: "call_2".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
        );
        let types: Vec<Value> = all
            .iter()
            .map(|b| serde_json::to_value(b).unwrap()["type"].clone())
            .collect();
        assert_eq!(types, ["thinking", "text", "tool_use"]);
    }
}
