//! Prometheus metrics of the front end, in the text exposition format at `/metrics`. Names carry the
//! `onnxchat_` prefix; labels stay low-cardinality (status code only).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

const LATENCY_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let total = self.total.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

pub struct Metrics {
    responses: Mutex<BTreeMap<u16, u64>>,
    pub in_flight: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub request_seconds: Histogram,
    pub first_token_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            responses: Mutex::default(),
            in_flight: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            request_seconds: Histogram::new(),
            first_token_seconds: Histogram::new(),
        }
    }
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

    pub fn tokens(&self, prompt: u32, completion: u32) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    pub fn render(&self, workers: usize, models: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP onnxchat_chat_responses_total Chat completion responses by HTTP status.\n# TYPE onnxchat_chat_responses_total counter\n");
        for (status, n) in self.responses.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "onnxchat_chat_responses_total{{status=\"{status}\"}} {n}"
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "onnxchat_requests_in_flight",
            "Chat requests being answered.",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "onnxchat_workers",
            "Live workers seen through heartbeats.",
            workers as i64,
        );
        gauge(
            &mut out,
            "onnxchat_models",
            "Models served by live workers.",
            models as i64,
        );
        counter(
            &mut out,
            "onnxchat_prompt_tokens_total",
            "Prompt tokens of completed requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "onnxchat_completion_tokens_total",
            "Generated tokens of completed requests.",
            self.completion_tokens.load(Ordering::Relaxed),
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
        out
    }
}
