//! The in-process bus: `serve` runs a front end and a worker in one process over it, no broker needed.
//! Jobs wait in one queue per model; frames go straight to the subscriber's channel. A frame for a job
//! whose subscriber is gone fails with [`BusError::NoSubscriber`], which the worker treats as a
//! cancellation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{broadcast, mpsc};

use super::progress::Tracker;
use super::{Acker, Bus, BusError, Delivery, FrameStream, JobSource};
use crate::protocol::{subjects, CancelRequest, Frame, Job, Progress, WorkerHeartbeat};

type SharedReceiver = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(Job, u32)>>>;
type Queue = (mpsc::UnboundedSender<(Job, u32)>, SharedReceiver);

#[derive(Default)]
struct Inner {
    queues: Mutex<HashMap<String, Queue>>,
    subscribers: Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    /// Progress of each job being read, by its `progress_to` subject.
    trackers: Mutex<HashMap<String, Arc<Tracker>>>,
    heartbeats: Mutex<HashMap<String, WorkerHeartbeat>>,
    /// Wakes waiting job sources when a job is queued.
    queued: tokio::sync::Notify,
    /// Jobs queued and not yet taken by a worker, and the most allowed.
    depth: std::sync::atomic::AtomicUsize,
    max_depth: std::sync::atomic::AtomicUsize,
    /// Stored responses (the Responses API).
    store: super::store::MemoryStore,
}

/// See the module docs. Cheap to clone; clones share the same queues.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
    cancel_tx: broadcast::Sender<CancelRequest>,
    hb_tx: broadcast::Sender<WorkerHeartbeat>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::with_store(super::store::StoreLimits::default())
    }

    /// A bus whose stored state has these bounds.
    pub fn with_store(limits: super::store::StoreLimits) -> Self {
        let inner = Inner {
            max_depth: usize::MAX.into(),
            store: super::store::MemoryStore::new(limits),
            ..Default::default()
        };
        Self {
            inner: Arc::new(inner),
            cancel_tx: broadcast::channel(1024).0,
            hb_tx: broadcast::channel(64).0,
        }
    }

    /// Jobs beyond `max` waiting for a worker are refused with [`BusError::Overloaded`].
    pub fn with_max_queued(self, max: usize) -> Self {
        self.inner
            .max_depth
            .store(max.max(1), std::sync::atomic::Ordering::Relaxed);
        self
    }

    fn queue(&self, model: &str) -> Queue {
        let mut q = self.inner.queues.lock().expect("queues lock");
        q.entry(model.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Arc::new(tokio::sync::Mutex::new(rx)))
            })
            .clone()
    }

    fn requeue(&self, job: Job, attempt: u32) {
        let (tx, _) = self.queue(&job.model);
        self.inner
            .depth
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send((job, attempt));
        self.inner.queued.notify_waiters();
    }
}

/// Removes the subscription (and the job's progress) when the front end drops the stream.
struct Unsubscribe {
    inner: Arc<Inner>,
    subject: String,
    progress: String,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.subscribers.lock() {
            s.remove(&self.subject);
        }
        if let Ok(mut t) = self.inner.trackers.lock() {
            t.remove(&self.progress);
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn store_put(&self, key: &str, value: bytes::Bytes) -> Result<bool, BusError> {
        Ok(self.inner.store.put(key, value))
    }

    async fn store_get(&self, key: &str) -> Result<Option<bytes::Bytes>, BusError> {
        Ok(self.inner.store.get(key))
    }

    async fn store_delete(&self, key: &str) -> Result<bool, BusError> {
        Ok(self.inner.store.delete(key))
    }

    fn is_connected(&self) -> bool {
        true
    }

    async fn submit(&self, job: &Job) -> Result<FrameStream, BusError> {
        use std::sync::atomic::Ordering;
        let max = self.inner.max_depth.load(Ordering::Relaxed);
        if self
            .inner
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < max).then_some(d + 1)
            })
            .is_err()
        {
            return Err(BusError::Overloaded(format!(
                "{max} jobs are already waiting for a worker"
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .subscribers
            .lock()
            .expect("subscribers lock")
            .insert(job.reply_to.clone(), tx);
        let mut job = job.clone();
        let progress = subjects::progress(&job.job_id);
        job.progress_to = Some(progress.clone());
        let tracker = Arc::new(Tracker::default());
        self.inner
            .trackers
            .lock()
            .expect("trackers lock")
            .insert(progress.clone(), tracker.clone());
        let guard = Unsubscribe {
            inner: self.inner.clone(),
            subject: job.reply_to.clone(),
            progress,
        };
        let (qtx, _) = self.queue(&job.model);
        qtx.send((job, 1))
            .map_err(|_| BusError::Unavailable("job queue closed".into()))?;
        self.inner.queued.notify_waiters();
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|f| (f, (rx, guard)))
        });
        Ok(stream
            .filter(move |f| futures::future::ready(tracker.admit(f)))
            .boxed())
    }

    async fn cancel(&self, req: &CancelRequest) -> Result<(), BusError> {
        let _ = self.cancel_tx.send(req.clone());
        Ok(())
    }

    async fn heartbeats(&self) -> Result<BoxStream<'static, WorkerHeartbeat>, BusError> {
        let rx = self.hb_tx.subscribe();
        let known: Vec<WorkerHeartbeat> = self
            .inner
            .heartbeats
            .lock()
            .expect("heartbeats lock")
            .values()
            .cloned()
            .collect();
        let live =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| async move { r.ok() });
        Ok(futures::stream::iter(known).chain(live).boxed())
    }

    async fn job_source(
        &self,
        models: &[String],
        _worker_id: &str,
    ) -> Result<Box<dyn JobSource>, BusError> {
        let receivers = models.iter().map(|m| self.queue(m).1).collect();
        Ok(Box::new(MemorySource {
            bus: self.clone(),
            receivers,
            next_index: 0,
        }))
    }

    async fn publish_frame(&self, reply_to: &str, frame: &Frame) -> Result<(), BusError> {
        let tx = self
            .inner
            .subscribers
            .lock()
            .expect("subscribers lock")
            .get(reply_to)
            .cloned();
        match tx {
            Some(tx) => tx
                .send(frame.clone())
                .map_err(|_| BusError::NoSubscriber(reply_to.to_string())),
            None => Err(BusError::NoSubscriber(reply_to.to_string())),
        }
    }

    async fn progress(&self, job: &Job, _worker_id: &str) -> Result<Option<Progress>, BusError> {
        let Some(subject) = &job.progress_to else {
            return Ok(None);
        };
        let tracker = self
            .inner
            .trackers
            .lock()
            .expect("trackers lock")
            .get(subject)
            .cloned();
        match tracker {
            Some(t) => Ok(Some(t.grant())),
            None => Err(BusError::NoSubscriber(subject.clone())),
        }
    }

    async fn cancellations(&self) -> Result<BoxStream<'static, CancelRequest>, BusError> {
        let rx = self.cancel_tx.subscribe();
        Ok(tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|r| async move { r.ok() })
            .boxed())
    }

    async fn queue_depth(&self) -> Option<u64> {
        Some(self.inner.depth.load(std::sync::atomic::Ordering::Relaxed) as u64)
    }

    async fn announce(&self, hb: &WorkerHeartbeat) -> Result<(), BusError> {
        self.inner
            .heartbeats
            .lock()
            .expect("heartbeats lock")
            .insert(hb.worker_id.clone(), hb.clone());
        let _ = self.hb_tx.send(hb.clone());
        Ok(())
    }
}

struct MemorySource {
    bus: MemoryBus,
    receivers: Vec<SharedReceiver>,
    next_index: usize,
}

#[async_trait]
impl JobSource for MemorySource {
    async fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let inner = self.bus.inner.clone();
        loop {
            // Register for the wake-up before looking, so a job queued in between is not missed.
            let queued = inner.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            // Fair across models: start where the last call stopped.
            for k in 0..self.receivers.len() {
                let i = (self.next_index + k) % self.receivers.len();
                let mut rx = self.receivers[i].lock().await;
                while out.len() < max {
                    match rx.try_recv() {
                        Ok((job, attempt)) => {
                            inner
                                .depth
                                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                            out.push(self.delivery(job, attempt))
                        }
                        Err(_) => break,
                    }
                }
            }
            self.next_index = self.next_index.wrapping_add(1);
            if !out.is_empty() {
                return Ok(out);
            }
            tokio::select! {
                _ = &mut queued => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(out),
            }
        }
    }
}

impl MemorySource {
    fn delivery(&self, job: Job, attempt: u32) -> Delivery {
        Delivery {
            ack: Box::new(MemoryAck {
                bus: self.bus.clone(),
                job: Mutex::new(Some(job.clone())),
                attempt,
            }),
            job,
            attempt,
        }
    }
}

struct MemoryAck {
    bus: MemoryBus,
    job: Mutex<Option<Job>>,
    attempt: u32,
}

#[async_trait]
impl Acker for MemoryAck {
    async fn ack(&self) {
        self.job.lock().expect("ack lock").take();
    }
    async fn in_progress(&self) {}
    async fn nak(&self, delay: Option<Duration>) {
        let job = self.job.lock().expect("ack lock").take();
        if let Some(job) = job {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            self.bus.requeue(job, self.attempt + 1);
        }
    }
    async fn term(&self) {
        self.job.lock().expect("ack lock").take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameBody, SamplingOverrides};

    fn job(id: &str) -> Job {
        Job {
            job_id: id.into(),
            model: "m".into(),
            reply_to: format!("r.{id}"),
            created_ms: 0,
            messages: vec![],
            sampling: SamplingOverrides::default(),
            max_tokens: None,
            stop: vec![],
            ignore_eos: false,
            deadline_ms: None,
            n: None,
            cache_scope: None,
            ..Job::default()
        }
    }

    #[tokio::test]
    async fn round_trip_and_unsubscribe() {
        let bus = MemoryBus::new();
        let mut frames = bus.submit(&job("a")).await.unwrap();
        let mut src = bus.job_source(&["m".into()], "w").await.unwrap();
        let got = src.next(4, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.len(), 1);
        let d = &got[0];
        let f = Frame {
            job_id: "a".into(),
            seq: 0,
            attempt: d.attempt,
            body: FrameBody::Delta {
                text: "x".into(),
                reasoning: String::new(),
                token_ids: vec![],
                index: 0,
                logprobs: vec![],
                tool_calls: vec![],
            },
        };
        bus.publish_frame(&d.job.reply_to, &f).await.unwrap();
        assert_eq!(frames.next().await.unwrap(), f);
        drop(frames);
        assert!(matches!(
            bus.publish_frame(&d.job.reply_to, &f).await,
            Err(BusError::NoSubscriber(_))
        ));
        // nak redelivers with the next attempt number
        got.into_iter().next().unwrap().ack.nak(None).await;
        let again = src.next(1, Duration::from_millis(100)).await.unwrap();
        assert_eq!(again[0].attempt, 2);
        assert!(src
            .next(1, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty());
    }
}
