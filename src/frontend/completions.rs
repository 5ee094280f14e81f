//! `POST /v1/completions` (legacy text completion): each prompt is one job (raw text, no chat
//! template); their choices are numbered prompt-major (`prompt · n + choice`). Answered as one
//! `text_completion` body or as SSE chunks of the same object, then `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::chat::{
    data_event, finish_of, parse_body, request_key, respond, served_model, submit, InFlight,
};
use super::frames::{Event, FrameReader};
use super::{json_response, AppState};
use crate::error::ClassifiedError;
use crate::openai::completions::{self, PromptInput, ValidCompletionRequest};
use crate::openai::response::{ErrorBody, LegacyLogprobs, ResponseMeta, TextChoice};
use crate::protocol::{now_ms, Usage};

pub async fn handle(state: Arc<AppState>, auth: Option<String>, body: Bytes) -> Response {
    let t0 = Instant::now();
    let key = request_key(&state, auth.as_deref());
    respond(&state, start(&state, key.as_deref(), body, t0).await)
}

/// One prompt's running job.
struct Running {
    reader: FrameReader,
    first: Option<Event>,
    _in_flight: InFlight,
}

async fn start(
    state: &Arc<AppState>,
    api_key: Option<&str>,
    body: Bytes,
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    super::peek::refuse_oversized(state, super::peek::Api::Completions, &body)?;
    let value = parse_body(&body)?;
    let req = completions::validate(&value, &state.cfg.limits)?;
    let model = served_model(state, &req.model)?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let created_ms = now_ms();
    let meta = ResponseMeta::new(
        "cmpl",
        &job_id,
        created_ms,
        &req.model,
        model.quant.as_deref(),
    );
    let deadline = created_ms + state.cfg.request_timeout.as_millis() as u64;
    let jobs = req.jobs(&job_id, &model.name, created_ms, Some(deadline), api_key);
    // All prompts at once (workers run them side by side); if one fails, dropping the others'
    // readers cancels their jobs.
    let running: Vec<Running> =
        futures::future::try_join_all(jobs.iter().map(|job| submit(state, job)))
            .await?
            .into_iter()
            .map(|(reader, first, in_flight)| Running {
                reader,
                first: Some(first),
                _in_flight: in_flight,
            })
            .collect();
    if req.stream {
        Ok(sse(state.clone(), running, req, meta, t0))
    } else {
        collect(state, running, &req, meta, t0).await
    }
}

fn add_usage(total: &mut Usage, u: &Usage) {
    let cached = total.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
        + u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
    *total = Usage::new(
        total.prompt_tokens + u.prompt_tokens,
        total.completion_tokens + u.completion_tokens,
    )
    .with_cached(cached);
}

async fn collect(
    state: &Arc<AppState>,
    running: Vec<Running>,
    req: &ValidCompletionRequest,
    meta: ResponseMeta,
    t0: Instant,
) -> Result<Response, ClassifiedError> {
    let n = req.n as usize;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (p, mut r) in running.into_iter().enumerate() {
        let prompt = match &req.prompts[p] {
            PromptInput::Text(t) => t.as_str(),
            PromptInput::Ids(_) => "",
        };
        let mut texts = vec![String::new(); n];
        let mut lps: Vec<LegacyLogprobs> = (0..n).map(|_| LegacyLogprobs::default()).collect();
        let mut offsets = vec![if req.echo { prompt.chars().count() } else { 0 }; n];
        let mut ev = r.first.take().expect("the first event");
        let done = loop {
            match ev {
                Event::Delta {
                    index,
                    text,
                    logprobs,
                    ..
                } => {
                    let i = (index as usize).min(n - 1);
                    texts[i].push_str(&text);
                    offsets[i] = lps[i].extend(logprobs, offsets[i], text.chars().count());
                }
                Event::Done(d) => break d,
            }
            ev = r.reader.next().await?;
        };
        state.metrics.finished(
            done.usage.prompt_tokens,
            done.usage.completion_tokens,
            done.timings.decode_ms,
        );
        add_usage(&mut usage, &done.usage);
        for (i, (text, lp)) in texts.into_iter().zip(lps).enumerate() {
            choices.push(TextChoice {
                index: (p * n + i) as u32,
                text: if req.echo {
                    format!("{prompt}{text}")
                } else {
                    text
                },
                logprobs: req.logprobs.is_some().then_some(lp),
                finish_reason: Some(finish_of(&done, i as u32)),
            });
        }
    }
    state
        .metrics
        .request_seconds
        .observe(t0.elapsed().as_secs_f64());
    Ok(json_response(
        StatusCode::OK,
        &meta.text_completion(choices, Some(usage)),
    ))
}

/// Every prompt's events, tagged with the prompt, as they come.
fn merged(
    running: Vec<Running>,
) -> impl futures::Stream<Item = (usize, Result<Event, ClassifiedError>)> {
    let streams = running.into_iter().enumerate().map(|(p, r)| {
        futures::stream::unfold(Some(r), move |r| async move {
            let mut r = r?;
            let ev = match r.first.take() {
                Some(e) => Ok(e),
                None => r.reader.next().await,
            };
            let end = !matches!(ev, Ok(Event::Delta { .. }));
            Some(((p, ev), (!end).then_some(r)))
        })
        .boxed()
    });
    futures::stream::select_all(streams)
}

fn sse(
    state: Arc<AppState>,
    running: Vec<Running>,
    req: ValidCompletionRequest,
    meta: ResponseMeta,
    t0: Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(32);
    let prompts = running.len();
    tokio::spawn(async move {
        let n = req.n as usize;
        let chunk =
            |index: usize, text: String, lp: Option<LegacyLogprobs>, end: Option<&'static str>| {
                data_event(&meta.text_completion(
                    vec![TextChoice {
                        index: index as u32,
                        text,
                        logprobs: lp,
                        finish_reason: end,
                    }],
                    None,
                ))
            };
        let mut offsets = vec![0usize; prompts * n];
        if req.echo {
            for p in 0..prompts {
                for i in 0..n {
                    let PromptInput::Text(text) = req.prompts[p].clone() else {
                        continue;
                    };
                    offsets[p * n + i] = text.chars().count();
                    if tx.send(chunk(p * n + i, text, None, None)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut usage = Usage::default();
        let mut open = prompts;
        let mut events = merged(running);
        while let Some((p, ev)) = tokio::select! {
            e = events.next() => e,
            _ = tx.closed() => return,
        } {
            let out = match ev {
                Ok(Event::Delta {
                    index,
                    text,
                    logprobs,
                    ..
                }) => {
                    let k = p * n + (index as usize).min(n - 1);
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let lp = req.logprobs.is_some().then(|| {
                        let mut lp = LegacyLogprobs::default();
                        offsets[k] = lp.extend(logprobs, offsets[k], text.chars().count());
                        lp
                    });
                    vec![chunk(k, text, lp, None)]
                }
                Ok(Event::Done(done)) => {
                    state.metrics.finished(
                        done.usage.prompt_tokens,
                        done.usage.completion_tokens,
                        done.timings.decode_ms,
                    );
                    add_usage(&mut usage, &done.usage);
                    open -= 1;
                    (0..n)
                        .map(|i| {
                            chunk(
                                p * n + i,
                                String::new(),
                                None,
                                Some(finish_of(&done, i as u32)),
                            )
                        })
                        .collect()
                }
                Err(e) => {
                    tracing::info!(class = ?e.class, error = %e.message, "stream ended with an error");
                    let _ = tx.send(data_event(&ErrorBody::from(&e))).await;
                    let _ = tx.send(warp::sse::Event::default().data("[DONE]")).await;
                    return;
                }
            };
            for e in out {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if open == 0 {
                break;
            }
        }
        if req.include_usage {
            let _ = tx
                .send(data_event(&meta.text_completion(vec![], Some(usage))))
                .await;
        }
        let _ = tx.send(warp::sse::Event::default().data("[DONE]")).await;
        state
            .metrics
            .request_seconds
            .observe(t0.elapsed().as_secs_f64());
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response()
}
