//! Prometheus metrics of the front end, in the text exposition format at `/metrics`: responses by
//! status, requests in flight, queue depth, time to first token, inter-token latency, tokens per
//! second, token counts, and jobs that moved to another worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::metrics::{
    counter, gauge, load, load_i, Histogram, LATENCY_BUCKETS, RATE_BUCKETS, TOKEN_BUCKETS,
};

pub struct Metrics {
    responses: Mutex<BTreeMap<u16, u64>>,
    pub in_flight: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Jobs whose frames came from a later delivery attempt (a worker died or lost its lease).
    pub migrations: AtomicU64,
    /// Jobs sent to the worker holding their longest cached prefix (the rest go to the queue).
    pub routed: AtomicU64,
    pub request_seconds: Histogram,
    pub first_token_seconds: Histogram,
    pub inter_token_seconds: Histogram,
    pub tokens_per_second: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            responses: Mutex::default(),
            in_flight: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            request_seconds: Histogram::new(LATENCY_BUCKETS),
            first_token_seconds: Histogram::new(LATENCY_BUCKETS),
            inter_token_seconds: Histogram::new(TOKEN_BUCKETS),
            tokens_per_second: Histogram::new(RATE_BUCKETS),
        }
    }
}

/// What the bus and the registry report at scrape time.
pub struct Snapshot {
    pub workers: usize,
    pub models: usize,
    pub free_slots: u32,
    pub queue_depth: Option<u64>,
}

impl Metrics {
    pub fn response(&self, status: u16) {
        *self
            .responses
            .lock()
            .expect("metrics lock")
            .entry(status)
            .or_default() += 1;
    }

    /// Records a finished generation: token counts and its decode speed.
    pub fn finished(&self, prompt: u32, completion: u32, decode_ms: f64) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        if completion > 1 && decode_ms > 0.0 {
            self.tokens_per_second
                .observe((completion - 1) as f64 / (decode_ms / 1e3));
        }
    }

    pub fn render(&self, s: &Snapshot) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP onnxchat_chat_responses_total Chat completion responses by HTTP status.\n# TYPE onnxchat_chat_responses_total counter\n",
        );
        for (status, n) in self.responses.lock().expect("metrics lock").iter() {
            out.push_str(&format!(
                "onnxchat_chat_responses_total{{status=\"{status}\"}} {n}\n"
            ));
        }
        gauge(
            &mut out,
            "onnxchat_requests_in_flight",
            "Chat requests being answered.",
            load_i(&self.in_flight),
        );
        gauge(
            &mut out,
            "onnxchat_workers",
            "Live workers seen through heartbeats.",
            s.workers as i64,
        );
        gauge(
            &mut out,
            "onnxchat_models",
            "Models served by live workers.",
            s.models as i64,
        );
        gauge(
            &mut out,
            "onnxchat_worker_free_slots",
            "Free job slots over live workers.",
            s.free_slots as i64,
        );
        if let Some(d) = s.queue_depth {
            gauge(
                &mut out,
                "onnxchat_queue_depth",
                "Jobs waiting for or held by a worker.",
                d as i64,
            );
        }
        counter(
            &mut out,
            "onnxchat_prompt_tokens_total",
            "Prompt tokens of completed requests.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "onnxchat_completion_tokens_total",
            "Generated tokens of completed requests.",
            load(&self.completion_tokens),
        );
        counter(
            &mut out,
            "onnxchat_job_migrations_total",
            "Requests continued by another worker after a failure.",
            load(&self.migrations),
        );
        counter(
            &mut out,
            "onnxchat_jobs_routed_total",
            "Jobs a worker took directly because its prefix cache held their conversation.",
            load(&self.routed),
        );
        self.request_seconds.render(
            &mut out,
            "onnxchat_request_duration_seconds",
            "Time from request to last byte.",
        );
        self.first_token_seconds.render(
            &mut out,
            "onnxchat_time_to_first_token_seconds",
            "Time from request to the first generated text.",
        );
        self.inter_token_seconds.render(
            &mut out,
            "onnxchat_inter_token_seconds",
            "Time between consecutive streamed deltas.",
        );
        self.tokens_per_second.render(
            &mut out,
            "onnxchat_generation_tokens_per_second",
            "Decode speed of completed requests.",
        );
        out
    }
}
