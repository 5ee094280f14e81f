//! The NATS bus: jobs on a JetStream work-queue stream, everything else on core NATS.
//!
//! - Jobs: stream `ONNXCHAT_JOBS` (file storage, work-queue retention) on `onnxchat.v1.jobs.>`; one
//!   durable pull consumer per model (`onnxchat-<model>`), shared by every worker serving the model.
//!   A worker fetches only as many jobs as it has free slots, so load follows capacity and nothing is
//!   pushed to a busy worker. Running jobs send in-progress acks; a job is acked after its last frame.
//!   Unacked jobs (a worker died) are redelivered after `ack_wait`, at most `max_deliver` times.
//!   When JetStream gives a job up (its `MAX_DELIVERIES` advisory), the front end that submitted it
//!   answers the client with an error at once, and front ends and workers delete the job from the
//!   stream (a work queue keeps an unacked message forever, where it would count against `max_jobs`).
//! - Frames: core NATS on the job's `reply_to` subject, which the front end subscribes to before it
//!   publishes the job. Cancellations and worker heartbeats are core NATS too.
//! - Large media: images and audio above [`NatsSettings::inline_limit`] go to the JetStream object
//!   store bucket `onnxchat-media` (with a TTL) and travel as references; NATS' default max payload is
//!   1 MB. Workers fetch them back before preprocessing and delete them when the job is done.
//!
//! Stream, consumers and bucket are created idempotently at start-up (settings in [`NatsSettings`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, object_store, stream};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, OnceCell};

use super::progress::Tracker;
use super::{Acker, Bus, BusError, Delivery, FrameStream, JobSource, Offer, OfferResponder};
use crate::error::ErrorClass;
use crate::protocol::{
    subjects, CancelRequest, ContentPart, Frame, FrameBody, Job, MediaSource, OfferReply, Progress,
    ProgressRequest, WireError, WorkerHeartbeat,
};

/// Per worker id: when its last heartbeat came, its TTL, and its process' `started_ms`.
type WorkerSeen = (std::time::Instant, Duration, u64);

/// How to authenticate to NATS. Secrets are never logged (`Debug` redacts them).
#[derive(Clone, Default)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<std::path::PathBuf>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub require_tls: bool,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

/// Settings of the stream, consumers and bucket. All are applied when missing and updated when they
/// differ (a changed setting takes effect on the next start).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub auth: NatsAuth,
    pub stream: String,
    /// Redelivery after this long without an ack or in-progress ack.
    pub ack_wait: Duration,
    /// Deliveries per job before it is given up.
    pub max_deliver: i64,
    /// Jobs older than this are dropped from the stream.
    pub max_age: Duration,
    /// Jobs waiting at most; beyond it publishing fails (discard policy `new`) → 429.
    pub max_jobs: i64,
    pub media_bucket: String,
    pub media_ttl: Duration,
    /// Base64 media longer than this (characters) go to the object store.
    pub inline_limit: usize,
    /// The key-value bucket of stored responses (the Responses API), and its bounds.
    pub store_bucket: String,
    pub store: super::store::StoreLimits,
    /// JetStream replicas of the stream and buckets this process creates (3 on a 3-node cluster).
    pub replicas: usize,
}

impl NatsSettings {
    /// The servers of `url`: one URL, or several separated by commas (the nodes of a cluster; the
    /// client connects to one and fails over to the others).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, BusError> {
        let servers: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(BusError::Unavailable("no NATS server URL given".into()));
        }
        servers
            .into_iter()
            .map(|s| {
                s.parse().map_err(|e| {
                    BusError::Unavailable(format!("NATS server URL {s:?} is invalid: {e}"))
                })
            })
            .collect()
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            auth: NatsAuth::default(),
            stream: "ONNXCHAT_JOBS".into(),
            ack_wait: Duration::from_secs(10),
            max_deliver: 3,
            max_age: Duration::from_secs(3600),
            max_jobs: 10_000,
            media_bucket: "onnxchat-media".into(),
            media_ttl: Duration::from_secs(3600),
            inline_limit: 64 * 1024,
            store_bucket: "onnxchat-responses".into(),
            store: super::store::StoreLimits::default(),
            replicas: 1,
        }
    }
}

#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: Arc<NatsSettings>,
    media: object_store::ObjectStore,
    /// Jobs this process submitted and still reads, by stream sequence: told (with the number of
    /// deliveries) when JetStream gives one up.
    given_up: Arc<Mutex<HashMap<u64, oneshot::Sender<u64>>>>,
    /// The `MAX_DELIVERIES` advisory subscription, started by the first submit or job source.
    watching_given_up: Arc<OnceCell<()>>,
    /// When each worker last announced itself, and its TTL (for routed jobs' watchdogs).
    workers_seen: Arc<Mutex<HashMap<String, WorkerSeen>>>,
    following_workers: Arc<OnceCell<()>>,
    /// Stored responses (the Responses API).
    store: jetstream::kv::Store,
}

/// JetStream's `io.nats.jetstream.advisory.v1.max_deliver` advisory (the fields we use).
#[derive(serde::Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: u64,
    #[serde(default)]
    consumer: String,
}

/// Removes a job's entry from [`NatsBus::given_up`] when its frame stream is dropped.
struct GivenUpEntry {
    map: Arc<Mutex<HashMap<u64, oneshot::Sender<u64>>>>,
    seq: u64,
}

impl Drop for GivenUpEntry {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&self.seq);
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    /// Connects (retrying in the background after a first failure would hide a wrong URL, so the first
    /// connection must succeed within 10 s) and makes sure the stream and bucket exist.
    pub async fn connect(settings: NatsSettings, client_name: &str) -> Result<Self, BusError> {
        let servers = settings.servers()?;
        let mut opts = async_nats::ConnectOptions::new();
        let a = &settings.auth;
        if let Some(path) = &a.creds_file {
            opts = opts.credentials_file(path).await.map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot read NATS credentials {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let (Some(u), Some(p)) = (&a.user, &a.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &a.token {
            opts = opts.token(t.clone());
        }
        if let Some(ca) = &a.tls_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        if a.require_tls {
            opts = opts.require_tls(true);
        }
        let client = opts
            .name(client_name)
            .connection_timeout(Duration::from_secs(10))
            .max_reconnects(None)
            .event_callback(|ev| async move {
                match ev {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(servers)
            .await
            .map_err(|e| {
                BusError::Unavailable(format!("cannot connect to NATS at {}: {e}", settings.url))
            })?;
        let js = jetstream::new(client.clone());
        let stream_cfg = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![subjects::all_jobs()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: settings.max_age,
            max_messages: settings.max_jobs,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            description: Some("onnx-chat jobs (work queue)".into()),
            num_replicas: settings.replicas,
            ..Default::default()
        };
        js.create_or_update_stream(stream_cfg).await.map_err(|e| {
            BusError::Unavailable(format!("cannot create stream {}: {e}", settings.stream))
        })?;
        let media = match js.get_object_store(&settings.media_bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: settings.media_bucket.clone(),
                    max_age: settings.media_ttl,
                    storage: stream::StorageType::File,
                    description: Some("onnx-chat request media".into()),
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    BusError::Unavailable(format!(
                        "cannot create object store {}: {e}",
                        settings.media_bucket
                    ))
                })?,
        };
        let store = match js.get_key_value(&settings.store_bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: settings.store_bucket.clone(),
                    description: "onnx-chat stored responses (the Responses API)".into(),
                    history: 1,
                    max_age: settings.store.ttl,
                    max_bytes: settings.store.max_bytes.min(i64::MAX as u64) as i64,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    BusError::Unavailable(format!(
                        "cannot create key-value bucket {}: {e}",
                        settings.store_bucket
                    ))
                })?,
        };
        Ok(Self {
            client,
            js,
            settings: Arc::new(settings),
            store,
            media,
            given_up: Arc::default(),
            watching_given_up: Arc::default(),
            workers_seen: Arc::default(),
            following_workers: Arc::default(),
        })
    }

    /// Subscribes (once) to the advisories JetStream sends when a job used up its `max_deliver`
    /// deliveries: every worker that took it died or stopped before the end (a job that crashes its
    /// worker, say). The job is deleted from the stream, and if this process submitted it, its reader
    /// gets an error frame now instead of waiting out the idle timeout.
    async fn watch_given_up(&self) {
        self.watching_given_up
            .get_or_init(|| async {
                let subject = format!(
                    "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                    self.settings.stream
                );
                match self.client.subscribe(subject).await {
                    Ok(sub) => {
                        tokio::spawn(given_up_task(self.clone(), sub));
                    }
                    // Without it, such jobs end in the idle timeout as before.
                    Err(e) => tracing::warn!(error = %e, "cannot watch for given-up jobs"),
                }
            })
            .await;
    }

    fn consumer_name(model: &str) -> String {
        // Consumer names allow no '.', '*', '>' or spaces; the subject token encoding has none.
        format!("onnxchat-{}", subjects::token(model).replace('~', "_"))
    }

    async fn consumer(
        &self,
        model: &str,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, BusError> {
        let name = Self::consumer_name(model);
        let cfg = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subjects::jobs(model),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            max_deliver: self.settings.max_deliver,
            max_ack_pending: 10_000,
            description: Some(format!("onnx-chat workers serving {model}")),
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(&self.settings.stream)
            .await
            .map_err(unavailable)?;
        match stream.create_consumer(cfg.clone()).await {
            Ok(c) => Ok(c),
            // Exists with other settings: update it.
            Err(_) => self
                .js
                .update_consumer_on_stream(cfg, &self.settings.stream)
                .await
                .map_err(|e| BusError::Unavailable(format!("cannot create consumer {name}: {e}"))),
        }
    }

    /// Moves large inline media of a job into the object store (front end, before publishing).
    pub async fn offload_media(&self, job: &mut Job) -> Result<(), BusError> {
        let mut n = 0usize;
        for part in job.messages.iter_mut().flat_map(|m| m.content.iter_mut()) {
            let source = match part {
                ContentPart::Image { source } | ContentPart::Audio { source, .. } => source,
                ContentPart::Text { .. } => continue,
            };
            let MediaSource::Inline { data } = source else {
                continue;
            };
            if data.len() <= self.settings.inline_limit {
                continue;
            }
            let key = format!("{}/{n}", job.job_id);
            n += 1;
            let sha256 = hex_sha256(data.as_bytes());
            let mut bytes = data.as_bytes();
            self.media
                .put(key.as_str(), &mut bytes)
                .await
                .map_err(|e| {
                    BusError::Unavailable(format!(
                        "cannot store media in {}: {e}",
                        self.settings.media_bucket
                    ))
                })?;
            *source = MediaSource::ObjectStore {
                bucket: self.settings.media_bucket.clone(),
                key,
                size: data.len() as u64,
                sha256: Some(sha256),
            };
        }
        Ok(())
    }

    /// Fetches object-store media back into the job (worker, before preprocessing).
    pub async fn fetch_media(&self, job: &mut Job) -> Result<Vec<String>, BusError> {
        let mut keys = Vec::new();
        for part in job.messages.iter_mut().flat_map(|m| m.content.iter_mut()) {
            let source = match part {
                ContentPart::Image { source } | ContentPart::Audio { source, .. } => source,
                ContentPart::Text { .. } => continue,
            };
            let MediaSource::ObjectStore { key, sha256, .. } = source else {
                continue;
            };
            let mut obj = self.media.get(key.as_str()).await.map_err(|e| {
                BusError::Unavailable(format!("media {key} is not in the object store: {e}"))
            })?;
            let mut data = String::new();
            obj.read_to_string(&mut data)
                .await
                .map_err(|e| BusError::Protocol(format!("media {key} could not be read: {e}")))?;
            if let Some(want) = sha256.as_deref() {
                let got = hex_sha256(data.as_bytes());
                if !got.eq_ignore_ascii_case(want) {
                    return Err(BusError::Protocol(format!(
                        "media {key} is corrupt: sha256 {got}, the job says {want}"
                    )));
                }
            }
            keys.push(key.clone());
            *source = MediaSource::Inline { data };
        }
        Ok(keys)
    }

    pub async fn delete_media(&self, keys: &[String]) {
        for k in keys {
            if let Err(e) = self.media.delete(k.as_str()).await {
                tracing::debug!(key = %k, error = %e, "media delete failed");
            }
        }
    }
}

/// How long publishing a job is retried through a transient failure: an ack lost or late while a
/// clustered stream elects a new leader (a node died), no responder yet, a connection being
/// re-established. The message id makes the retries one message (JetStream's duplicate window is
/// 120 s).
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(20);

impl NatsBus {
    /// Publishes to the job stream with `Nats-Msg-Id: msg_id`, retrying transient failures for
    /// [`PUBLISH_RETRY_FOR`]; a full stream is [`BusError::Overloaded`] at once.
    async fn publish_durably(
        &self,
        subject: String,
        msg_id: &str,
        payload: bytes::Bytes,
    ) -> Result<jetstream::publish::PublishAck, BusError> {
        use jetstream::context::PublishErrorKind as Kind;
        let deadline = std::time::Instant::now() + PUBLISH_RETRY_FOR;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id);
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await;
            let e = match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) => return Ok(ack),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            let msg = e.to_string();
            if msg.contains("maximum messages") || msg.contains("resource limits") {
                return Err(BusError::Overloaded(msg));
            }
            let transient = matches!(
                e.kind(),
                Kind::TimedOut | Kind::StreamNotFound | Kind::BrokenPipe
            ) || msg.contains("unavailable");
            if !transient || std::time::Instant::now() + backoff > deadline {
                return Err(unavailable(msg));
            }
            tracing::warn!(msg_id, error = %msg, "publishing a job failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Publishes a job to the shared work queue and returns its frames (from `sub`), with the
    /// given-up advisory mapped to an error frame.
    async fn publish_job(
        &self,
        sub: async_nats::Subscriber,
        job: &Job,
        payload: Vec<u8>,
        tracker: Arc<Tracker>,
    ) -> Result<FrameStream, BusError> {
        let ack = self
            .publish_durably(subjects::jobs(&job.model), &job.job_id, payload.into())
            .await?;
        self.watch_given_up().await;
        let (given_up_tx, given_up_rx) = oneshot::channel();
        if let Ok(mut m) = self.given_up.lock() {
            m.insert(ack.sequence, given_up_tx);
        }
        let entry = GivenUpEntry {
            map: self.given_up.clone(),
            seq: ack.sequence,
        };
        // The error frame for a given-up job takes the next sequence number, so the reader accepts
        // it after whatever frames the last attempt sent.
        let frames = {
            let tracker = tracker.clone();
            sub.filter_map(move |m| {
                let tracker = tracker.clone();
                async move {
                    match serde_json::from_slice::<Frame>(&m.payload) {
                        Ok(f) => tracker.admit(&f).then_some(f),
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a malformed frame");
                            None
                        }
                    }
                }
            })
        };
        let job_id = job.job_id.clone();
        let gave_up = futures::stream::once(given_up_rx).filter_map(move |r| {
            let frame = r.ok().map(|deliveries| Frame {
                job_id: job_id.clone(),
                seq: tracker.next_seq(),
                // Attempts are the tracker's to hand out; this frame only has to pass the reader.
                attempt: u32::MAX,
                body: FrameBody::Error {
                    error: WireError {
                        class: ErrorClass::Internal,
                        message: format!(
                            "the job was given up after {deliveries} deliveries: each worker that \
                             took it stopped or died before finishing it"
                        ),
                        param: None,
                    },
                },
            });
            async move { frame }
        });
        Ok(futures::stream::select(frames, gave_up)
            .map(move |f| {
                let _ = &entry;
                f
            })
            .boxed())
    }

    /// Offers a job to one worker; `Ok(true)` when it took it.
    async fn offer(&self, worker: &str, payload: &[u8]) -> Result<bool, BusError> {
        let req = self
            .client
            .request(subjects::worker_jobs(worker), payload.to_vec().into());
        let reply = tokio::time::timeout(OFFER_TIMEOUT, req)
            .await
            .map_err(|_| BusError::Unavailable(format!("worker {worker} did not answer")))?
            .map_err(unavailable)?;
        let r: OfferReply = serde_json::from_slice(&reply.payload)
            .map_err(|e| BusError::Protocol(format!("offer reply: {e}")))?;
        Ok(r.accepted)
    }

    /// The frames of a job a worker took directly. A watchdog follows the worker's heartbeats: if
    /// they stop (the worker died) before the job's last frame, the job goes to the shared queue,
    /// where another worker runs it from the start (same seed, same tokens; the reader drops the
    /// frames it already has).
    async fn routed(
        &self,
        sub: async_nats::Subscriber,
        job: &Job,
        worker: &str,
        payload: Vec<u8>,
        tracker: Arc<Tracker>,
    ) -> FrameStream {
        self.follow_workers().await;
        let finished = Arc::new(AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        {
            let (bus, finished, stop) = (self.clone(), finished.clone(), stop.clone());
            let (worker, job_id) = (worker.to_string(), job.job_id.clone());
            let started = std::time::Instant::now();
            let mut took = self.worker_started(&worker);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if finished.load(Ordering::Relaxed) {
                        return;
                    }
                    if bus.worker_alive(&worker, started, &mut took) {
                        continue;
                    }
                    tracing::warn!(job_id = %job_id, worker = %worker, "the worker running a routed job stopped announcing itself; queueing the job");
                    if let Err(e) = bus.rescue(&job_id, payload).await {
                        tracing::warn!(job_id = %job_id, error = %e, "could not queue the routed job");
                    }
                    return;
                }
            });
        }
        let guard = stop.drop_guard();
        sub.filter_map(move |m| {
            let finished = finished.clone();
            let tracker = tracker.clone();
            async move {
                match serde_json::from_slice::<Frame>(&m.payload) {
                    Ok(f) if tracker.admit(&f) => {
                        if f.body.is_terminal() {
                            finished.store(true, Ordering::Relaxed);
                        }
                        Some(f)
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a malformed frame");
                        None
                    }
                }
            }
        })
        .map(move |f| {
            let _ = &guard;
            f
        })
        .boxed()
    }

    /// Asks `job.progress_to` where the job stands; a few tries, since a worker that cannot learn it
    /// must not guess.
    async fn ask_progress(&self, job: &Job, worker_id: &str) -> Result<Option<Progress>, BusError> {
        let Some(subject) = job.progress_to.clone() else {
            return Ok(None);
        };
        let req = serde_json::to_vec(&ProgressRequest {
            job_id: job.job_id.clone(),
            worker_id: Some(worker_id.to_string()),
        })
        .map_err(|e| BusError::Protocol(e.to_string()))?;
        let mut last = String::new();
        for _ in 0..PROGRESS_TRIES {
            let asked = self.client.request(subject.clone(), req.clone().into());
            match tokio::time::timeout(PROGRESS_TIMEOUT, asked).await {
                Ok(Ok(m)) => {
                    return serde_json::from_slice(&m.payload)
                        .map(Some)
                        .map_err(|e| BusError::Protocol(format!("progress reply: {e}")))
                }
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    return Err(BusError::NoSubscriber(subject));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer".into(),
            }
        }
        Err(BusError::Unavailable(format!(
            "the job's reader did not say where it stands ({subject}): {last}"
        )))
    }

    /// Puts a routed job on the shared queue (its worker died or handed it back). The message id is
    /// the same from every caller, so JetStream keeps one copy.
    pub async fn rescue(&self, job_id: &str, payload: Vec<u8>) -> Result<(), BusError> {
        let job: Job =
            serde_json::from_slice(&payload).map_err(|e| BusError::Protocol(e.to_string()))?;
        self.publish_durably(
            subjects::jobs(&job.model),
            &format!("{job_id}/rescued"),
            payload.into(),
        )
        .await?;
        Ok(())
    }

    /// Starts (once) following worker heartbeats for the routed jobs' watchdogs.
    async fn follow_workers(&self) {
        self.following_workers
            .get_or_init(|| async {
                match self.client.subscribe(subjects::heartbeat()).await {
                    Ok(mut sub) => {
                        let seen = self.workers_seen.clone();
                        tokio::spawn(async move {
                            while let Some(m) = sub.next().await {
                                if let Ok(hb) =
                                    serde_json::from_slice::<WorkerHeartbeat>(&m.payload)
                                {
                                    if let Ok(mut s) = seen.lock() {
                                        s.insert(
                                            hb.worker_id,
                                            (
                                                std::time::Instant::now(),
                                                Duration::from_millis(hb.ttl_ms),
                                                hb.started_ms,
                                            ),
                                        );
                                    }
                                }
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot follow worker heartbeats"),
                }
            })
            .await;
    }

    /// Whether `worker` announced itself within its TTL, as the process that took the job: a
    /// heartbeat with another `started_ms` than `took` (the first one seen, when unknown) is a
    /// restarted worker under the same id, and the job died with the old process. A worker not
    /// heard of since `since` counts as alive for one default TTL (its first heartbeat may still be
    /// on the way).
    fn worker_alive(&self, worker: &str, since: std::time::Instant, took: &mut u64) -> bool {
        let seen = self
            .workers_seen
            .lock()
            .ok()
            .and_then(|s| s.get(worker).copied());
        match seen {
            Some((at, ttl, started)) => {
                if *took == 0 {
                    *took = started;
                }
                at.elapsed() <= ttl && (started == 0 || started == *took)
            }
            None => since.elapsed() <= Duration::from_secs(6),
        }
    }

    /// The `started_ms` of the process now announcing `worker` (0: unknown).
    fn worker_started(&self, worker: &str) -> u64 {
        self.workers_seen
            .lock()
            .ok()
            .and_then(|s| s.get(worker).map(|w| w.2))
            .unwrap_or(0)
    }

    /// An offer as the worker sees it: the job (media fetched) and how to answer.
    async fn offer_of(&self, m: async_nats::Message) -> Option<Offer> {
        let reply_to = m.reply.clone()?;
        let responder = NatsOfferReply {
            client: self.client.clone(),
            reply_to: reply_to.to_string(),
        };
        let mut job: Job = match serde_json::from_slice(&m.payload) {
            Ok(j) => j,
            Err(e) => {
                Box::new(responder)
                    .reply(false, Some(format!("not a job: {e}")))
                    .await;
                return None;
            }
        };
        let media_keys = match self.fetch_media(&mut job).await {
            Ok(k) => k,
            Err(e) => {
                Box::new(responder).reply(false, Some(e.to_string())).await;
                return None;
            }
        };
        Some(Offer {
            delivery: Delivery {
                ack: Box::new(RoutedAck {
                    bus: self.clone(),
                    job_id: job.job_id.clone(),
                    payload: m.payload.to_vec(),
                    media_keys,
                }),
                job,
                attempt: 1,
            },
            reply: Box::new(responder),
        })
    }
}

/// How long a front end waits for a worker to take an offered job before queueing it.
const OFFER_TIMEOUT: Duration = Duration::from_secs(2);

struct NatsOfferReply {
    client: async_nats::Client,
    reply_to: String,
}

#[async_trait]
impl OfferResponder for NatsOfferReply {
    async fn reply(self: Box<Self>, accepted: bool, reason: Option<String>) {
        let body = serde_json::to_vec(&OfferReply { accepted, reason }).unwrap_or_default();
        if let Err(e) = self.client.publish(self.reply_to, body.into()).await {
            tracing::debug!(error = %e, "offer reply not sent");
        }
    }
}

/// Acknowledgement of a routed job: no JetStream message to ack; handing it back queues it.
struct RoutedAck {
    bus: NatsBus,
    job_id: String,
    /// The job as offered (media by reference), for the shared queue.
    payload: Vec<u8>,
    media_keys: Vec<String>,
}

#[async_trait]
impl Acker for RoutedAck {
    async fn ack(&self) {
        self.bus.delete_media(&self.media_keys).await;
    }
    async fn in_progress(&self) {}
    async fn nak(&self, _delay: Option<Duration>) {
        if let Err(e) = self.bus.rescue(&self.job_id, self.payload.clone()).await {
            tracing::warn!(job_id = %self.job_id, error = %e, "could not hand the routed job back");
        }
    }
    async fn term(&self) {
        self.bus.delete_media(&self.media_keys).await;
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn store_put(&self, key: &str, value: bytes::Bytes) -> Result<bool, BusError> {
        if value.len() as u64 > self.client.server_info().max_payload as u64 {
            return Ok(false);
        }
        match self.store.put(key, value).await {
            Ok(_) => Ok(true),
            Err(e) => {
                // Most likely the bucket is full (its writes are refused until entries expire).
                tracing::warn!(error = %e, key, "not stored in {}", self.settings.store_bucket);
                Ok(false)
            }
        }
    }

    async fn store_get(&self, key: &str) -> Result<Option<bytes::Bytes>, BusError> {
        self.store
            .get(key)
            .await
            .map_err(|e| BusError::Unavailable(format!("reading {key}: {e}")))
    }

    async fn store_delete(&self, key: &str) -> Result<bool, BusError> {
        let had = self.store_get(key).await?.is_some();
        if had {
            self.store
                .purge(key)
                .await
                .map_err(|e| BusError::Unavailable(format!("deleting {key}: {e}")))?;
        }
        Ok(had)
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn submit(&self, job: &Job) -> Result<FrameStream, BusError> {
        Ok(self.submit_preferring(job, None).await?.0)
    }

    async fn submit_preferring(
        &self,
        job: &Job,
        worker: Option<&str>,
    ) -> Result<(FrameStream, bool), BusError> {
        let mut job = job.clone();
        self.offload_media(&mut job).await?;
        let progress_to = subjects::progress(&job.job_id);
        job.progress_to = Some(progress_to.clone());
        let payload = serde_json::to_vec(&job).map_err(|e| BusError::Protocol(e.to_string()))?;
        if payload.len() > self.client.server_info().max_payload {
            return Err(BusError::TooLarge(format!(
                "the job is {} bytes after moving media out; the NATS limit is {}",
                payload.len(),
                self.client.server_info().max_payload
            )));
        }
        // Subscribe first, so no frame (and no progress request) can be missed.
        let sub = self
            .client
            .subscribe(job.reply_to.clone())
            .await
            .map_err(unavailable)?;
        let requests = self
            .client
            .subscribe(progress_to)
            .await
            .map_err(unavailable)?;
        self.client.flush().await.map_err(unavailable)?;
        let tracker = Arc::new(Tracker::default());
        let answering = AbortOnDrop(tokio::spawn(answer_progress(
            self.client.clone(),
            requests,
            tracker.clone(),
        )));
        let (frames, routed) = match worker {
            Some(worker) => match self.offer(worker, &payload).await {
                Ok(true) => {
                    tracing::debug!(job_id = %job.job_id, worker, "job routed to the worker holding its prefix");
                    let frames = self.routed(sub, &job, worker, payload, tracker).await;
                    (frames, true)
                }
                other => {
                    if let Err(e) = other {
                        tracing::debug!(worker, error = %e, "offer failed; using the shared queue")
                    }
                    (self.publish_job(sub, &job, payload, tracker).await?, false)
                }
            },
            None => (self.publish_job(sub, &job, payload, tracker).await?, false),
        };
        // Progress requests are answered for as long as the frames are read.
        let frames = frames
            .map(move |f| {
                let _ = &answering;
                f
            })
            .boxed();
        Ok((frames, routed))
    }

    async fn offers(&self, worker_id: &str) -> Result<BoxStream<'static, Offer>, BusError> {
        let sub = self
            .client
            .subscribe(subjects::worker_jobs(worker_id))
            .await
            .map_err(unavailable)?;
        let bus = self.clone();
        Ok(sub
            .filter_map(move |m| {
                let bus = bus.clone();
                async move { bus.offer_of(m).await }
            })
            .boxed())
    }

    async fn cancel(&self, req: &CancelRequest) -> Result<(), BusError> {
        let payload = serde_json::to_vec(req).map_err(|e| BusError::Protocol(e.to_string()))?;
        self.client
            .publish(subjects::cancel(), payload.into())
            .await
            .map_err(unavailable)
    }

    async fn heartbeats(&self) -> Result<BoxStream<'static, WorkerHeartbeat>, BusError> {
        let sub = self
            .client
            .subscribe(subjects::heartbeat())
            .await
            .map_err(unavailable)?;
        Ok(sub
            .filter_map(
                |m| async move { serde_json::from_slice::<WorkerHeartbeat>(&m.payload).ok() },
            )
            .boxed())
    }

    async fn job_source(
        &self,
        models: &[String],
        worker_id: &str,
    ) -> Result<Box<dyn JobSource>, BusError> {
        let mut consumers = Vec::new();
        for m in models {
            consumers.push(self.consumer(m).await?);
        }
        // Workers delete given-up jobs too, so the queue stays clean for jobs that programs publish
        // straight to NATS, with no front end running.
        self.watch_given_up().await;
        tracing::info!(
            worker = worker_id,
            consumers = consumers.len(),
            "pulling jobs from JetStream"
        );
        Ok(Box::new(NatsSource {
            bus: self.clone(),
            consumers,
            next_index: 0,
        }))
    }

    async fn publish_frame(&self, reply_to: &str, frame: &Frame) -> Result<(), BusError> {
        let payload = serde_json::to_vec(frame).map_err(|e| BusError::Protocol(e.to_string()))?;
        self.client
            .publish(reply_to.to_string(), payload.into())
            .await
            .map_err(unavailable)
    }

    async fn progress(&self, job: &Job, worker_id: &str) -> Result<Option<Progress>, BusError> {
        self.ask_progress(job, worker_id).await
    }

    async fn cancellations(&self) -> Result<BoxStream<'static, CancelRequest>, BusError> {
        let sub = self
            .client
            .subscribe(subjects::cancel())
            .await
            .map_err(unavailable)?;
        Ok(sub
            .filter_map(|m| async move { serde_json::from_slice::<CancelRequest>(&m.payload).ok() })
            .boxed())
    }

    async fn queue_depth(&self) -> Option<u64> {
        let lookup = async {
            let mut s = self.js.get_stream(&self.settings.stream).await.ok()?;
            Some(s.info().await.ok()?.state.messages)
        };
        tokio::time::timeout(Duration::from_millis(500), lookup)
            .await
            .ok()
            .flatten()
    }

    async fn announce(&self, hb: &WorkerHeartbeat) -> Result<(), BusError> {
        let payload = serde_json::to_vec(hb).map_err(|e| BusError::Protocol(e.to_string()))?;
        self.client
            .publish(subjects::heartbeat(), payload.into())
            .await
            .map_err(unavailable)
    }
}

/// How long a worker waits for a progress answer, and how often it asks.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(2);
const PROGRESS_TRIES: usize = 3;

/// Answers the progress requests of one job from its tracker until aborted.
async fn answer_progress(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    tracker: Arc<Tracker>,
) {
    while let Some(m) = requests.next().await {
        let Some(reply) = m.reply else { continue };
        let p = tracker.grant();
        tracing::debug!(
            attempt = p.attempt,
            next_seq = p.next_seq,
            done = p.done,
            "progress asked"
        );
        match serde_json::to_vec(&p) {
            Ok(body) => {
                if let Err(e) = client.publish(reply, body.into()).await {
                    tracing::warn!(error = %e, "could not answer a progress request");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode progress"),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn given_up_task(bus: NatsBus, mut sub: async_nats::Subscriber) {
    while let Some(m) = sub.next().await {
        let Ok(a) = serde_json::from_slice::<MaxDeliveriesAdvisory>(&m.payload) else {
            continue;
        };
        tracing::warn!(
            stream_seq = a.stream_seq,
            deliveries = a.deliveries,
            consumer = %a.consumer,
            "a job used up its deliveries; giving it up"
        );
        // Every front end sees the advisory; the first delete wins, the others find nothing.
        if let Ok(s) = bus.js.get_stream(&bus.settings.stream).await {
            if let Err(e) = s.delete_message(a.stream_seq).await {
                tracing::debug!(error = %e, stream_seq = a.stream_seq, "given-up job not deleted");
            }
        }
        let reader = bus
            .given_up
            .lock()
            .ok()
            .and_then(|mut g| g.remove(&a.stream_seq));
        if let Some(tx) = reader {
            let _ = tx.send(a.deliveries);
        }
    }
}

struct NatsSource {
    bus: NatsBus,
    consumers: Vec<consumer::Consumer<consumer::pull::Config>>,
    next_index: usize,
}

#[async_trait]
impl JobSource for NatsSource {
    async fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if self.consumers.is_empty() {
            tokio::time::sleep(wait).await;
            return Ok(vec![]);
        }
        let per = (wait / self.consumers.len() as u32).max(Duration::from_millis(100));
        let mut out = Vec::new();
        for k in 0..self.consumers.len() {
            if out.len() >= max {
                break;
            }
            let c = &self.consumers[(self.next_index + k) % self.consumers.len()];
            let mut batch = c
                .fetch()
                .max_messages(max - out.len())
                .expires(per)
                .messages()
                .await
                .map_err(unavailable)?;
            while let Some(m) = batch.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch ended");
                        break;
                    }
                };
                let attempt = m.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
                let job: Job = match serde_json::from_slice(&m.payload) {
                    Ok(j) => j,
                    Err(e) => {
                        // Not a job: it can never succeed.
                        tracing::warn!(error = %e, subject = %m.subject, "dropping a malformed job");
                        let _ = m.ack_with(jetstream::AckKind::Term).await;
                        continue;
                    }
                };
                let mut job = job;
                let media_keys = match self.bus.fetch_media(&mut job).await {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(job_id = %job.job_id, error = %e, "media unavailable; retrying later");
                        let _ = m
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        continue;
                    }
                };
                out.push(Delivery {
                    job,
                    attempt,
                    ack: Box::new(NatsAck {
                        msg: m,
                        bus: self.bus.clone(),
                        media_keys,
                    }),
                });
            }
        }
        self.next_index = self.next_index.wrapping_add(1);
        Ok(out)
    }
}

struct NatsAck {
    msg: jetstream::Message,
    bus: NatsBus,
    media_keys: Vec<String>,
}

#[async_trait]
impl Acker for NatsAck {
    async fn ack(&self) {
        if let Err(e) = self.msg.double_ack().await {
            tracing::warn!(error = %e, "job ack failed");
        }
        self.bus.delete_media(&self.media_keys).await;
    }
    async fn in_progress(&self) {
        let _ = self.msg.ack_with(jetstream::AckKind::Progress).await;
    }
    async fn nak(&self, delay: Option<Duration>) {
        let _ = self.msg.ack_with(jetstream::AckKind::Nak(delay)).await;
    }
    async fn term(&self) {
        let _ = self.msg.ack_with(jetstream::AckKind::Term).await;
        self.bus.delete_media(&self.media_keys).await;
    }
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::NatsSettings;

    #[test]
    fn a_comma_separated_url_is_a_list_of_servers() {
        let s = |url: &str| NatsSettings {
            url: url.into(),
            ..Default::default()
        };
        let servers = s("nats://nats:4222, nats://nats-2:4222,nats://nats-3:4222")
            .servers()
            .unwrap();
        let hosts: Vec<String> = servers
            .iter()
            .map(|a| format!("{}:{}", a.host(), a.port()))
            .collect();
        assert_eq!(hosts, ["nats:4222", "nats-2:4222", "nats-3:4222"]);
        assert_eq!(s("nats://127.0.0.1:4222").servers().unwrap().len(), 1);
        let e = s("nats://a:4222,nats://b:notaport").servers().unwrap_err();
        assert!(e.to_string().contains("nats://b:notaport"), "{e}");
        assert!(s(" , ").servers().is_err());
    }
}
