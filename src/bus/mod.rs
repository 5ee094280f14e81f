//! The message bus between front ends and workers, behind one trait with two implementations: the
//! in-process bus ([`memory::MemoryBus`], the embedded default of `serve`) and NATS with JetStream
//! (`nats::NatsBus`). Front-end and worker code only see [`Bus`].
//!
//! Flow: the front end subscribes to a job's frame subject, then publishes the job ([`Bus::submit`]);
//! a worker pulls jobs for the models it serves, as many as it has free slots ([`JobSource::next`]),
//! publishes frames ([`Bus::publish_frame`]) and acknowledges the job after its last frame.

pub mod memory;
pub mod nats;
pub mod progress;
pub mod store;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};

use crate::error::{ClassifiedError, ErrorClass};
use crate::protocol::{CancelRequest, Frame, Job, Progress, WorkerHeartbeat};

/// Frames of one job as they arrive; ends when the subscription ends.
pub type FrameStream = BoxStream<'static, Frame>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("message bus unavailable: {0}")]
    Unavailable(String),
    #[error("the job queue is full: {0}")]
    Overloaded(String),
    #[error("nobody is subscribed to {0}")]
    NoSubscriber(String),
    #[error("message too large for the bus: {0}")]
    TooLarge(String),
    #[error("bus protocol error: {0}")]
    Protocol(String),
}

impl BusError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unavailable(_) => ErrorClass::Unavailable,
            Self::Overloaded(_) => ErrorClass::Overloaded,
            Self::NoSubscriber(_) => ErrorClass::Cancelled,
            Self::TooLarge(_) => ErrorClass::PayloadTooLarge,
            Self::Protocol(_) => ErrorClass::Internal,
        }
    }
}

impl From<BusError> for ClassifiedError {
    fn from(e: BusError) -> Self {
        ClassifiedError::new(e.class(), e.to_string())
    }
}

/// Both sides of the bus.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Short name for logs and `/ready` (`memory`, `nats`).
    fn kind(&self) -> &'static str;

    /// Whether the bus is connected now (the in-process bus always is).
    fn is_connected(&self) -> bool;

    // --- front end ---

    /// Subscribes to `job.reply_to`, then publishes the job. The stream yields the job's frames.
    async fn submit(&self, job: &Job) -> Result<FrameStream, BusError>;

    /// Asks whichever worker runs a job to stop it.
    async fn cancel(&self, req: &CancelRequest) -> Result<(), BusError>;

    /// Worker heartbeats, starting with the latest known one of each live worker where the bus keeps them.
    async fn heartbeats(&self) -> Result<BoxStream<'static, WorkerHeartbeat>, BusError>;

    // --- worker ---

    /// A source of jobs for the given served model names.
    async fn job_source(
        &self,
        models: &[String],
        worker_id: &str,
    ) -> Result<Box<dyn JobSource>, BusError>;

    /// Publishes one frame to a job's reply subject.
    async fn publish_frame(&self, reply_to: &str, frame: &Frame) -> Result<(), BusError>;

    /// Asks the reader of `job`'s frames where the job stands ([`Progress`]) before running it.
    /// `Ok(None)`: the job names no progress subject (run it from the start, as attempt
    /// `delivery.attempt`). `Err(BusError::NoSubscriber)`: nobody reads its frames any more.
    async fn progress(&self, job: &Job, worker_id: &str) -> Result<Option<Progress>, BusError>;

    /// Cancellation requests for any job.
    async fn cancellations(&self) -> Result<BoxStream<'static, CancelRequest>, BusError>;

    /// Announces a worker.
    async fn announce(&self, hb: &WorkerHeartbeat) -> Result<(), BusError>;

    /// Jobs queued and not yet acknowledged, where the bus can tell cheaply.
    async fn queue_depth(&self) -> Option<u64> {
        None
    }

    /// As [`Bus::submit`], but the job is first offered to `worker` directly (the one holding the
    /// longest cached prefix of it); when that worker declines or does not answer at once, the job
    /// goes to the shared queue. Returns the frames and whether the worker took it. A routed job
    /// whose worker dies is put on the shared queue by the bus, so it still runs to the end.
    async fn submit_preferring(
        &self,
        job: &Job,
        worker: Option<&str>,
    ) -> Result<(FrameStream, bool), BusError> {
        let _ = worker;
        Ok((self.submit(job).await?, false))
    }

    /// Jobs offered to this worker directly (see [`Bus::submit_preferring`]); never any on buses
    /// that do not route.
    async fn offers(&self, worker_id: &str) -> Result<BoxStream<'static, Offer>, BusError> {
        let _ = worker_id;
        Ok(futures::stream::pending().boxed())
    }

    // --- stored state (the Responses API's stored responses; bounds in [`store::StoreLimits`]) ---

    /// Stores `value` under `key` (replacing it). `Ok(false)`: not stored (larger than the store
    /// takes, or the store is full).
    async fn store_put(&self, key: &str, value: bytes::Bytes) -> Result<bool, BusError>;

    /// The value under `key`, if stored and not expired.
    async fn store_get(&self, key: &str) -> Result<Option<bytes::Bytes>, BusError>;

    /// Deletes `key`; whether it was there.
    async fn store_delete(&self, key: &str) -> Result<bool, BusError>;
}

/// A job offered to one worker: take it (and run it like a delivery) or decline it.
pub struct Offer {
    /// Attempt 1; its acker cleans up media, and hands the job to the shared queue on `nak`.
    pub delivery: Delivery,
    pub reply: Box<dyn OfferResponder>,
}

/// The answer to an [`Offer`].
#[async_trait]
pub trait OfferResponder: Send {
    async fn reply(self: Box<Self>, accepted: bool, reason: Option<String>);
}

/// Where a worker gets jobs from.
#[async_trait]
pub trait JobSource: Send {
    /// Waits until at least one job is available, then returns up to `max` of them. `Ok(vec![])` after
    /// `wait` has passed with none, so callers can check for shutdown.
    async fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;
}

/// One delivered job and the handle to acknowledge it.
pub struct Delivery {
    pub job: Job,
    /// 1 for the first delivery, more after redeliveries.
    pub attempt: u32,
    pub ack: Box<dyn Acker>,
}

/// Acknowledgement of one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The job is finished (its last frame is published).
    async fn ack(&self);
    /// The job is still running: extend its lease.
    async fn in_progress(&self);
    /// Give the job back for redelivery (e.g. on shutdown), after `delay`.
    async fn nak(&self, delay: Option<Duration>);
    /// The job can never succeed: do not redeliver it.
    async fn term(&self);
}
