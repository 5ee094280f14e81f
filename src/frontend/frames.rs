//! Reading one job's frames: order checks, timeouts, and cancellation when the reader goes away.
//!
//! Frames must arrive with `seq` 0, 1, 2, … A repeated `seq` (a redelivered frame) is dropped; a gap
//! is an error. A stream that goes silent, or ends without `done`/`error`, becomes a typed timeout or
//! internal error instead of a hang.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::metrics::Metrics;
use crate::bus::{Bus, FrameStream};
use crate::error::{ClassifiedError, ErrorClass};
use crate::protocol::{CancelRequest, DoneBody, FrameBody, TokenLogprob, ToolCallFrame};

/// What the reader yields.
#[derive(Debug)]
pub enum Event {
    Delta {
        index: u32,
        /// Answer text.
        text: String,
        /// Reasoning text (models with reasoning markers).
        reasoning: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
        tool_calls: Vec<ToolCallFrame>,
    },
    Done(DoneBody),
}

pub struct FrameReader {
    stream: FrameStream,
    next_seq: u64,
    /// Delivery attempt of the first frame; a later one means the job moved to another worker.
    first_attempt: Option<u32>,
    last_text_at: Option<std::time::Instant>,
    metrics: Arc<Metrics>,
    /// When the request arrived (for time to first token).
    started: std::time::Instant,
    first_timeout: Duration,
    idle_timeout: Duration,
    finished: bool,
    cancel: Option<CancelOnDrop>,
    /// Where a final frame's heartbeat goes.
    registry: Option<Arc<super::registry::Registry>>,
}

/// Sends a cancellation for the job unless disarmed: dropping an unfinished reader (client gone) stops
/// the worker's generation.
struct CancelOnDrop {
    bus: Arc<dyn Bus>,
    job_id: String,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let bus = self.bus.clone();
        let req = CancelRequest {
            job_id: self.job_id.clone(),
            reason: Some("client disconnected".into()),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = bus.cancel(&req).await;
            });
        }
    }
}

impl FrameReader {
    pub fn new(
        stream: FrameStream,
        bus: Arc<dyn Bus>,
        job_id: &str,
        first_timeout: Duration,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            stream,
            next_seq: 0,
            first_attempt: None,
            last_text_at: None,
            metrics,
            started: std::time::Instant::now(),
            first_timeout,
            idle_timeout,
            finished: false,
            cancel: Some(CancelOnDrop {
                bus,
                job_id: job_id.to_string(),
            }),
            registry: None,
        }
    }

    /// Applies the heartbeat a final frame carries to `registry` before handing the frame on.
    pub fn with_registry(mut self, registry: Arc<super::registry::Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    fn end(&mut self) {
        self.finished = true;
        if let Some(c) = self.cancel.take() {
            std::mem::forget(c);
        }
    }

    /// The next event; after `Done` or an error, the reader is finished.
    pub async fn next(&mut self) -> Result<Event, ClassifiedError> {
        if self.finished {
            return Err(ClassifiedError::new(
                ErrorClass::Internal,
                "the job's stream already ended",
            ));
        }
        loop {
            let timeout = if self.next_seq == 0 {
                self.first_timeout
            } else {
                self.idle_timeout
            };
            let frame = match tokio::time::timeout(timeout, self.stream.next()).await {
                Err(_) => {
                    let msg = if self.next_seq == 0 {
                        format!("no worker answered within {} s", timeout.as_secs())
                    } else {
                        format!(
                            "the worker stopped sending after {} frames (nothing for {} s)",
                            self.next_seq,
                            timeout.as_secs()
                        )
                    };
                    // Still armed: the drop of `cancel` tells the worker to stop.
                    self.finished = true;
                    return Err(ClassifiedError::new(ErrorClass::Timeout, msg));
                }
                Ok(None) => {
                    self.finished = true;
                    return Err(ClassifiedError::new(
                        ErrorClass::Unavailable,
                        format!(
                            "the job's frame stream closed after {} frames without an end",
                            self.next_seq
                        ),
                    ));
                }
                Ok(Some(f)) => f,
            };
            match self.first_attempt {
                None => self.first_attempt = Some(frame.attempt),
                Some(a) if frame.attempt > a => {
                    self.metrics
                        .migrations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.first_attempt = Some(frame.attempt);
                    tracing::info!(attempt = frame.attempt, "the job moved to another worker");
                }
                Some(_) => {}
            }
            if frame.seq < self.next_seq {
                continue; // a redelivered copy
            }
            if frame.seq > self.next_seq {
                self.finished = true;
                return Err(ClassifiedError::new(
                    ErrorClass::Internal,
                    format!(
                        "frames {}..{} of the job were lost",
                        self.next_seq, frame.seq
                    ),
                ));
            }
            self.next_seq += 1;
            return match frame.body {
                FrameBody::Delta {
                    text,
                    reasoning,
                    token_ids,
                    index,
                    logprobs,
                    tool_calls,
                } => {
                    if !text.is_empty() || !reasoning.is_empty() {
                        let now = std::time::Instant::now();
                        match self.last_text_at.replace(now) {
                            Some(prev) => self
                                .metrics
                                .inter_token_seconds
                                .observe((now - prev).as_secs_f64()),
                            None => self
                                .metrics
                                .first_token_seconds
                                .observe((now - self.started).as_secs_f64()),
                        }
                    }
                    Ok(Event::Delta {
                        index,
                        text,
                        reasoning,
                        token_ids,
                        logprobs,
                        tool_calls,
                    })
                }
                FrameBody::Done(mut d) => {
                    self.end();
                    if let (Some(reg), Some(hb)) = (&self.registry, d.heartbeat.take()) {
                        reg.update(*hb);
                    }
                    Ok(Event::Done(d))
                }
                FrameBody::Error { error } => {
                    self.end();
                    Err(error.into())
                }
            };
        }
    }
}
