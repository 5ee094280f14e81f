//! The worker: pulls jobs for the models it serves, as many as it has free slots, runs each through the
//! model's preprocessing and generation, and publishes frames back. It announces itself with
//! heartbeats, stops jobs on cancellation requests, keeps long jobs' leases alive, and acknowledges a
//! job once its last frame is published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

pub mod metrics;

use crate::bus::{Bus, BusError, Delivery};
use crate::error::{ClassifiedError, ErrorClass};
use crate::models::generate::GenEvent;
use crate::models::loaded::LoadedModel;
use crate::models::tools::{self, ToolEnd, ToolStream};
use crate::protocol::{
    now_ms, ChoiceEnd, DoneBody, Frame, FrameBody, Job, Progress, Timings, Usage, WorkerHeartbeat,
};
pub use metrics::WorkerMetrics;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// Jobs run at once (they share the model's owner thread, advancing in turn).
    pub max_concurrent: usize,
    pub heartbeat_interval: Duration,
    /// How often a running job's lease is extended.
    pub progress_interval: Duration,
    /// On shutdown, how long running jobs may take to finish before they are handed back.
    pub drain_timeout: Duration,
    /// Shared with whoever serves `/metrics`.
    pub metrics: Arc<WorkerMetrics>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            max_concurrent: 8,
            heartbeat_interval: Duration::from_secs(2),
            progress_interval: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(30),
            metrics: Arc::default(),
        }
    }
}

struct State {
    bus: Arc<dyn Bus>,
    models: HashMap<String, Arc<LoadedModel>>,
    cfg: WorkerConfig,
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    active: AtomicU32,
    completed: std::sync::atomic::AtomicU64,
    /// When this process started serving (heartbeats' `started_ms`).
    started_ms: u64,
    draining: AtomicBool,
}

impl State {
    fn heartbeat(&self) -> WorkerHeartbeat {
        self.heartbeat_finishing(0)
    }

    /// A heartbeat counting `finishing` running jobs as done already.
    fn heartbeat_finishing(&self, finishing: u32) -> WorkerHeartbeat {
        let mut seen = std::collections::HashSet::new();
        let models = self
            .models
            .values()
            .filter(|m| seen.insert(m.info.name.clone()))
            .map(|m| {
                let mut w = m.info.wire();
                w.prefixes = m.prefix.tags.lock().map(|t| t.clone()).unwrap_or_default();
                w
            })
            .collect();
        WorkerHeartbeat {
            worker_id: self.cfg.worker_id.clone(),
            models,
            max_concurrent: self.cfg.max_concurrent as u32,
            active: self
                .active
                .load(Ordering::Relaxed)
                .saturating_sub(finishing),
            ttl_ms: self.cfg.heartbeat_interval.as_millis() as u64 * 3,
            draining: self.draining.load(Ordering::Relaxed),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            completed: self.completed.load(Ordering::Relaxed),
            started_ms: self.started_ms,
        }
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains.
pub async fn run(
    bus: Arc<dyn Bus>,
    models: Vec<Arc<LoadedModel>>,
    cfg: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), ClassifiedError> {
    let mut by_name = HashMap::new();
    for m in &models {
        by_name.insert(m.info.name.clone(), m.clone());
        for a in &m.info.aliases {
            by_name.entry(a.clone()).or_insert_with(|| m.clone());
        }
    }
    let names: Vec<String> = models.iter().map(|m| m.info.name.clone()).collect();
    let state = Arc::new(State {
        bus: bus.clone(),
        models: by_name,
        cfg: cfg.clone(),
        running: Mutex::default(),
        active: AtomicU32::new(0),
        completed: Default::default(),
        started_ms: now_ms(),
        draining: AtomicBool::new(false),
    });
    cfg.metrics
        .slots
        .store(cfg.max_concurrent as i64, Ordering::Relaxed);
    for m in &models {
        cfg.metrics.watch_cache(m.cache_stats.clone());
        cfg.metrics.watch_prefix_cache(m.prefix.stats.clone());
        cfg.metrics.watch_batch(m.prefix.batch.clone());
    }
    let mut source = bus.job_source(&names, &cfg.worker_id).await?;
    let background = CancellationToken::new();
    tokio::spawn(cancel_task(state.clone(), background.clone()));
    tokio::spawn(heartbeat_task(state.clone(), background.clone()));
    tracing::info!(worker = %cfg.worker_id, models = ?names, slots = cfg.max_concurrent, bus = bus.kind(), "worker started");

    let slots = Arc::new(Semaphore::new(cfg.max_concurrent.max(1)));
    // Jobs offered to this worker directly (the front end routes a conversation's next turn to the
    // worker whose prefix cache holds it); they take the same slots as pulled jobs.
    let offers = match bus.offers(&cfg.worker_id).await {
        Ok(o) => Some(tokio::spawn(offer_task(
            state.clone(),
            slots.clone(),
            o,
            shutdown.clone(),
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take routed jobs; pulling from the queue only");
            None
        }
    };
    let mut jobs = tokio::task::JoinSet::new();
    loop {
        // Wait for a free slot before pulling: nothing is taken that cannot start now.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let free = slots.available_permits() + 1;
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = source.next(free, Duration::from_millis(500)) => b,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pulling jobs failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut permits = vec![first];
        for d in batch {
            let permit = match permits.pop() {
                Some(p) => p,
                None => slots.clone().acquire_owned().await.expect("semaphore open"),
            };
            let st = state.clone();
            jobs.spawn(async move {
                handle(st, d).await;
                drop(permit);
            });
        }
        while jobs.try_join_next().is_some() {}
    }

    // Drain: stop pulling, announce it, let running jobs finish within the drain timeout.
    state.draining.store(true, Ordering::Relaxed);
    let _ = bus.announce(&state.heartbeat()).await;
    tracing::info!(running = jobs.len(), "worker draining");
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        while jobs.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = jobs.len(),
            "drain timeout; handing the remaining jobs back"
        );
        for flag in state.running.lock().expect("running lock").values() {
            flag.store(true, Ordering::Relaxed);
        }
        jobs.shutdown().await;
    }
    if let Some(offers) = offers {
        let _ = offers.await;
    }
    background.cancel();
    Ok(())
}

/// Takes offered jobs while a slot is free (declines otherwise: the front end then queues them),
/// runs them like pulled jobs, and on shutdown drains them like the main loop does.
async fn offer_task(
    state: Arc<State>,
    slots: Arc<Semaphore>,
    mut offers: futures::stream::BoxStream<'static, crate::bus::Offer>,
    shutdown: CancellationToken,
) {
    let mut jobs = tokio::task::JoinSet::new();
    loop {
        let offer = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = jobs.join_next(), if !jobs.is_empty() => continue,
            o = offers.next() => match o {
                Some(o) => o,
                None => break,
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) if !state.draining.load(Ordering::Relaxed) => {
                offer.reply.reply(true, None).await;
                let st = state.clone();
                jobs.spawn(async move {
                    handle(st, offer.delivery).await;
                    drop(permit);
                });
            }
            _ => offer.reply.reply(false, Some("no free slot".into())).await,
        }
    }
    drop(offers); // later offers find no responder and go to the shared queue
    let drained = tokio::time::timeout(state.cfg.drain_timeout, async {
        while jobs.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        for flag in state.running.lock().expect("running lock").values() {
            flag.store(true, Ordering::Relaxed);
        }
        while jobs.join_next().await.is_some() {}
    }
}

async fn cancel_task(state: Arc<State>, stop: CancellationToken) {
    let mut stream = match state.bus.cancellations().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to cancellations");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            next = stream.next() => match next {
                Some(req) => {
                    if let Some(flag) = state.running.lock().expect("running lock").get(&req.job_id) {
                        tracing::info!(job_id = %req.job_id, "cancelling job");
                        flag.store(true, Ordering::Relaxed);
                    }
                }
                None => return,
            }
        }
    }
}

async fn heartbeat_task(state: Arc<State>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(state.cfg.heartbeat_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = state.bus.announce(&state.heartbeat()).await {
                    tracing::debug!(error = %e, "heartbeat failed");
                }
            }
        }
    }
}

/// Publishes a job's frames with consecutive sequence numbers.
struct Publisher {
    bus: Arc<dyn Bus>,
    job_id: String,
    reply_to: String,
    attempt: u32,
    seq: u64,
    metrics: Arc<WorkerMetrics>,
}

impl Publisher {
    async fn send(&mut self, body: FrameBody) -> Result<(), crate::bus::BusError> {
        let frame = Frame {
            job_id: self.job_id.clone(),
            seq: self.seq,
            attempt: self.attempt,
            body,
        };
        self.seq += 1;
        self.bus.publish_frame(&self.reply_to, &frame).await
    }

    async fn error(&mut self, e: ClassifiedError) {
        self.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(job_id = %self.job_id, class = ?e.class, error = %e.message, "job failed");
        let _ = self.send(FrameBody::Error { error: e.into() }).await;
    }
}

#[tracing::instrument(skip_all, fields(job_id = %delivery.job.job_id, model = %delivery.job.model, attempt = delivery.attempt))]
async fn handle(state: Arc<State>, delivery: Delivery) {
    let Delivery { job, attempt, ack } = delivery;
    tracing::info!("job started");
    let t0 = std::time::Instant::now();
    // Where the job stands, from whoever reads its frames: this run's attempt number, and what an
    // earlier attempt already delivered (the run continues from there).
    let progress = match state.bus.progress(&job, &state.cfg.worker_id).await {
        Ok(p) => p,
        Err(BusError::NoSubscriber(_)) => {
            return skip(&state, ack, "nobody reads the job's frames any more").await;
        }
        Err(e) => {
            // Running it blind could splice two answers: leave it for a later delivery.
            tracing::warn!(error = %e, "cannot learn where the job stands; handing it back");
            ack.nak(Some(Duration::from_secs(1))).await;
            return;
        }
    };
    if progress.as_ref().is_some_and(|p| p.done) {
        return skip(&state, ack, "the job's reader already has its final frame").await;
    }
    let mut out = Publisher {
        bus: state.bus.clone(),
        job_id: job.job_id.clone(),
        reply_to: job.reply_to.clone(),
        attempt: progress.as_ref().map_or(attempt, |p| p.attempt),
        seq: progress.as_ref().map_or(0, |p| p.next_seq),
        metrics: state.cfg.metrics.clone(),
    };
    let Some(model) = state.models.get(&job.model).cloned() else {
        out.error(ClassifiedError::new(
            ErrorClass::ModelNotFound,
            format!("this worker does not serve model {:?}", job.model),
        ))
        .await;
        ack.term().await;
        return;
    };
    if job.deadline_ms.is_some_and(|d| now_ms() > d) {
        out.error(ClassifiedError::new(
            ErrorClass::Timeout,
            "the job expired before a worker could start it",
        ))
        .await;
        ack.term().await;
        return;
    }
    state.active.fetch_add(1, Ordering::Relaxed);
    let m = &state.cfg.metrics;
    m.jobs_started.fetch_add(1, Ordering::Relaxed);
    m.active.fetch_add(1, Ordering::Relaxed);
    if attempt > 1 {
        m.jobs_redelivered.fetch_add(1, Ordering::Relaxed);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    state
        .running
        .lock()
        .expect("running lock")
        .insert(job.job_id.clone(), cancel.clone());
    // Announce the taken slot at once, so front ends (and operators) see it before the next tick.
    let _ = state.bus.announce(&state.heartbeat()).await;
    let finished = run_job(
        &state,
        &model,
        &job,
        progress.unwrap_or_default(),
        &mut out,
        cancel.clone(),
        ack.as_ref(),
    )
    .await;
    state
        .running
        .lock()
        .expect("running lock")
        .remove(&job.job_id);
    state.active.fetch_sub(1, Ordering::Relaxed);
    state.cfg.metrics.active.fetch_sub(1, Ordering::Relaxed);
    state.completed.fetch_add(1, Ordering::Relaxed);
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), finished, "job ended");
    if finished {
        ack.ack().await;
    } else {
        // Stopped by shutdown before the end: let another worker run it.
        ack.nak(None).await;
    }
    // Announce the freed slot now rather than at the next tick.
    let _ = state.bus.announce(&state.heartbeat()).await;
}

/// Acknowledges a job without running it (counted as skipped).
async fn skip(state: &State, ack: Box<dyn crate::bus::Acker>, why: &str) {
    tracing::info!(why, "not running the job");
    state
        .cfg
        .metrics
        .jobs_skipped
        .fetch_add(1, Ordering::Relaxed);
    ack.ack().await;
}

/// Returns false when the job was interrupted by a drain and should be handed back.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    state: &State,
    model: &Arc<LoadedModel>,
    job: &Job,
    progress: Progress,
    out: &mut Publisher,
    cancel: Arc<AtomicBool>,
    ack: &dyn crate::bus::Acker,
) -> bool {
    let queued_ms = (now_ms().saturating_sub(job.created_ms)) as f64;
    let prepared = {
        let model = model.clone();
        let job = job.clone();
        tokio::task::spawn_blocking(move || model.prepare(&job)).await
    };
    let mut prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            out.error(e).await;
            return true;
        }
        Err(e) => {
            out.error(ClassifiedError::new(
                ErrorClass::Internal,
                format!("preprocessing panicked: {e}"),
            ))
            .await;
            return true;
        }
    };
    let preprocess_ms = prepared.preprocess_ms;
    if job.count_only {
        // Rendered and tokenized (media placeholders included): that is the whole answer.
        let done = FrameBody::Done(DoneBody {
            finish_reason: crate::protocol::FinishReason::Stop,
            usage: Usage::new(prepared.input.ids.len() as u32, 0),
            timings: Timings {
                queued_ms,
                preprocess_ms,
                ..Timings::default()
            },
            choices: Vec::new(),
            stop_sequence: None,
            heartbeat: None,
        });
        if let Err(e) = out.send(done).await {
            tracing::info!(error = %e, "count not delivered");
        }
        return true;
    }
    // A continued job: each choice goes on from the ids its frames already delivered.
    let delivered = progress.delivered();
    if delivered > 0 {
        let n = prepared.params.n as u32;
        prepared.params.resume = (0..n).map(|i| progress.tokens(i).to_vec()).collect();
        let longest = (0..n).map(|i| progress.tokens(i).len()).max().unwrap_or(0);
        let m = &state.cfg.metrics;
        m.jobs_continued.fetch_add(1, Ordering::Relaxed);
        m.decode_steps_saved
            .fetch_add(longest as u64, Ordering::Relaxed);
        tracing::info!(
            delivered,
            next_seq = progress.next_seq,
            attempt = out.attempt,
            "continuing the job from what was delivered"
        );
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Err(e) = model.start(prepared, tx, cancel.clone()) {
        out.error(e).await;
        return true;
    }
    // With tools in play, each choice's text goes through a tool-call parser.
    let mut streams: Vec<ToolStream> = if tools::active_choice(job).is_some() {
        (0..job.n.unwrap_or(1).max(1))
            .map(|_| ToolStream::default())
            .collect()
    } else {
        Vec::new()
    };
    let mut lease = tokio::time::interval(state.cfg.progress_interval);
    lease.tick().await;
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = lease.tick() => { ack.in_progress().await; continue; }
        };
        let Some(ev) = ev else {
            // The generation ended without a final event: it was cancelled.
            if state.draining.load(Ordering::Relaxed) && cancel.load(Ordering::Relaxed) {
                return false;
            }
            out.error(ClassifiedError::new(
                ErrorClass::Cancelled,
                "the job was cancelled",
            ))
            .await;
            return true;
        };
        let body = match ev {
            GenEvent::Replayed { index, text } => {
                // Delivered before: only the tool-call parser's state needs it.
                if let Some(s) = streams.get_mut(index) {
                    s.push(&text);
                }
                continue;
            }
            GenEvent::Delta {
                index,
                text,
                reasoning,
                token_ids,
                logprobs,
            } => FrameBody::Delta {
                // The tool-call parser sees the answer only, never the reasoning.
                text: match streams.get_mut(index) {
                    Some(s) => s.push(&text),
                    None => text,
                },
                reasoning,
                token_ids,
                index: index as u32,
                logprobs,
                tool_calls: Vec::new(),
            },
            GenEvent::Done {
                mut choices,
                stop_strings,
                reasoning_tokens,
                prompt_tokens,
                cached_tokens,
                prefill_ms,
                decode_ms,
            } => {
                // Answers held back as possible tool calls: their calls, or their text.
                for (i, s) in streams.iter_mut().enumerate() {
                    let cut = choices
                        .get(i)
                        .is_some_and(|c| c.0 == crate::protocol::FinishReason::Length);
                    let max_calls = tools::max_calls(job);
                    let (text, tool_calls) =
                        match s.finish(&job.tools, &job.job_id, i, max_calls, cut) {
                            ToolEnd::Text(text) if text.is_empty() => continue,
                            ToolEnd::Text(text) => (text, Vec::new()),
                            ToolEnd::Calls(calls) => {
                                if let Some(c) = choices.get_mut(i) {
                                    c.0 = crate::protocol::FinishReason::ToolCalls;
                                }
                                (String::new(), calls)
                            }
                            // The calls that were complete; `finish_reason` stays "length".
                            ToolEnd::Cut(calls) => (String::new(), calls),
                        };
                    if progress.closed(i as u32) {
                        continue; // an earlier attempt delivered this closing frame
                    }
                    let body = FrameBody::Delta {
                        text,
                        reasoning: String::new(),
                        token_ids: Vec::new(),
                        index: i as u32,
                        logprobs: Vec::new(),
                        tool_calls,
                    };
                    if let Err(e) = out.send(body).await {
                        tracing::info!(error = %e, "frame not delivered; stopping the job");
                        cancel.store(true, Ordering::Relaxed);
                        return true;
                    }
                }
                if delivered > 0 {
                    let prefilled = prompt_tokens.saturating_sub(cached_tokens) + delivered;
                    state
                        .cfg
                        .metrics
                        .continued_prefill_tokens
                        .fetch_add(prefilled as u64, Ordering::Relaxed);
                }
                let completion_tokens = GenEvent::completion_tokens(&choices);
                state.cfg.metrics.generation(
                    prompt_tokens,
                    completion_tokens,
                    prefill_ms,
                    decode_ms,
                );
                state
                    .cfg
                    .metrics
                    .jobs_succeeded
                    .fetch_add(1, Ordering::Relaxed);
                let finish_reason = choices
                    .first()
                    .map(|c| c.0)
                    .unwrap_or(crate::protocol::FinishReason::Stop);
                let ends = if choices.len() > 1 {
                    choices
                        .iter()
                        .enumerate()
                        .map(|(i, &(finish_reason, n))| ChoiceEnd {
                            index: i as u32,
                            finish_reason,
                            completion_tokens: n as u32,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                FrameBody::Done(DoneBody {
                    finish_reason,
                    usage: Usage::new(prompt_tokens as u32, completion_tokens as u32)
                        .with_cached(cached_tokens as u32)
                        .with_reasoning(reasoning_tokens as u32),
                    timings: Timings {
                        queued_ms,
                        preprocess_ms,
                        prefill_ms,
                        decode_ms,
                    },
                    choices: ends,
                    stop_sequence: stop_strings.into_iter().next().flatten(),
                    heartbeat: None,
                })
            }
            GenEvent::Error(e) => {
                out.error(e).await;
                return true;
            }
        };
        let mut body = body;
        let terminal = body.is_terminal();
        if terminal {
            // Before the last frame: front ends learn what this worker's prefix cache now holds
            // (and that this slot is about to be free) before the client can send its next turn —
            // from the final frame itself for the front end waiting on it (no race with the
            // heartbeat subject), from the announcement for the others.
            let hb = state.heartbeat_finishing(1);
            if let FrameBody::Done(d) = &mut body {
                d.heartbeat = Some(Box::new(hb.clone()));
            }
            let _ = state.bus.announce(&hb).await;
        }
        if let Err(e) = out.send(body).await {
            // Nobody listens any more (client gone): stop generating.
            tracing::info!(error = %e, "frame not delivered; stopping the job");
            cancel.store(true, Ordering::Relaxed);
            return true;
        }
        if terminal {
            return true;
        }
    }
}
