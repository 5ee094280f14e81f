//! Prometheus metrics of a worker: jobs by outcome, redeliveries it picked up, slots, tokens, prefill
//! time, inter-token latency and speed, and the encoder cache. Served by `worker --metrics-port`,
//! and appended to the front end's `/metrics` under `serve`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::batch::BatchStats;
use crate::engine::prefix_cache::PrefixCacheStats;
use crate::metrics::{
    counter, gauge, load, load_i, Histogram, LATENCY_BUCKETS, RATE_BUCKETS, TOKEN_BUCKETS,
};
use crate::models::encoder_cache::CacheStats;

pub struct WorkerMetrics {
    pub jobs_started: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_failed: AtomicU64,
    /// Jobs this worker received on a second or later delivery (taken over from another worker).
    pub jobs_redelivered: AtomicU64,
    /// Jobs that continued from ids an earlier attempt had delivered (rather than starting over).
    pub jobs_continued: AtomicU64,
    /// Positions continued jobs prefilled: prompt tokens not found in the prefix cache plus the
    /// delivered ids.
    pub continued_prefill_tokens: AtomicU64,
    /// Decode steps continued jobs did not run again (the longest delivered choice, per job).
    pub decode_steps_saved: AtomicU64,
    /// Jobs not run because their reader already had the final frame or was gone.
    pub jobs_skipped: AtomicU64,
    pub active: AtomicI64,
    pub slots: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prefill_seconds: Histogram,
    pub inter_token_seconds: Histogram,
    pub tokens_per_second: Histogram,
    caches: std::sync::Mutex<Vec<Arc<CacheStats>>>,
    prefix: std::sync::Mutex<Vec<Arc<PrefixCacheStats>>>,
    batches: std::sync::Mutex<Vec<Arc<BatchStats>>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("jobs_started", &self.jobs_started)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            jobs_started: AtomicU64::new(0),
            jobs_succeeded: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_redelivered: AtomicU64::new(0),
            jobs_continued: AtomicU64::new(0),
            continued_prefill_tokens: AtomicU64::new(0),
            decode_steps_saved: AtomicU64::new(0),
            jobs_skipped: AtomicU64::new(0),
            active: AtomicI64::new(0),
            slots: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prefill_seconds: Histogram::new(LATENCY_BUCKETS),
            inter_token_seconds: Histogram::new(TOKEN_BUCKETS),
            tokens_per_second: Histogram::new(RATE_BUCKETS),
            caches: Default::default(),
            prefix: Default::default(),
            batches: Default::default(),
        }
    }
}

impl WorkerMetrics {
    pub fn watch_cache(&self, stats: Arc<CacheStats>) {
        self.caches.lock().expect("metrics lock").push(stats);
    }

    pub fn watch_prefix_cache(&self, stats: Arc<PrefixCacheStats>) {
        self.prefix.lock().expect("metrics lock").push(stats);
    }

    pub fn watch_batch(&self, stats: Arc<BatchStats>) {
        self.batches.lock().expect("metrics lock").push(stats);
    }

    /// Records one finished generation.
    pub fn generation(&self, prompt: usize, generated: usize, prefill_ms: f64, decode_ms: f64) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        self.prefill_seconds.observe(prefill_ms / 1e3);
        if generated > 1 && decode_ms > 0.0 {
            let steps = (generated - 1) as f64;
            self.inter_token_seconds.observe(decode_ms / 1e3 / steps);
            self.tokens_per_second.observe(steps / (decode_ms / 1e3));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        counter(
            &mut out,
            "onnxchat_worker_jobs_started_total",
            "Jobs this worker started.",
            load(&self.jobs_started),
        );
        counter(
            &mut out,
            "onnxchat_worker_jobs_succeeded_total",
            "Jobs that ended with a done frame.",
            load(&self.jobs_succeeded),
        );
        counter(
            &mut out,
            "onnxchat_worker_jobs_failed_total",
            "Jobs that ended with an error frame or were cancelled.",
            load(&self.jobs_failed),
        );
        counter(
            &mut out,
            "onnxchat_worker_jobs_redelivered_total",
            "Jobs received on a later delivery attempt (taken over from a failed worker).",
            load(&self.jobs_redelivered),
        );
        counter(
            &mut out,
            "onnxchat_worker_jobs_continued_total",
            "Jobs continued from the ids an earlier attempt delivered.",
            load(&self.jobs_continued),
        );
        counter(
            &mut out,
            "onnxchat_worker_continued_prefill_tokens_total",
            "Positions continued jobs prefilled again (uncached prompt tokens plus delivered ids).",
            load(&self.continued_prefill_tokens),
        );
        counter(
            &mut out,
            "onnxchat_worker_decode_steps_saved_total",
            "Decode steps continued jobs did not redo (their longest delivered choice).",
            load(&self.decode_steps_saved),
        );
        counter(
            &mut out,
            "onnxchat_worker_jobs_skipped_total",
            "Jobs not run: their reader already had the final frame, or nobody reads them any more.",
            load(&self.jobs_skipped),
        );
        gauge(
            &mut out,
            "onnxchat_worker_active_jobs",
            "Jobs running now.",
            load_i(&self.active),
        );
        gauge(
            &mut out,
            "onnxchat_worker_slots",
            "Jobs this worker runs at once.",
            load_i(&self.slots),
        );
        counter(
            &mut out,
            "onnxchat_worker_prompt_tokens_total",
            "Prompt tokens prefilled.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "onnxchat_worker_generated_tokens_total",
            "Tokens generated.",
            load(&self.generated_tokens),
        );
        let (mut hits, mut misses) = (0, 0);
        for c in self.caches.lock().expect("metrics lock").iter() {
            hits += load(&c.hits);
            misses += load(&c.misses);
        }
        counter(
            &mut out,
            "onnxchat_encoder_cache_hits_total",
            "Image/audio encodings reused from the cache.",
            hits,
        );
        counter(
            &mut out,
            "onnxchat_encoder_cache_misses_total",
            "Image/audio encodings computed.",
            misses,
        );
        let (mut hit, mut miss, mut evicted, mut bytes, mut entries) = (0, 0, 0, 0, 0);
        for c in self.prefix.lock().expect("metrics lock").iter() {
            hit += load(&c.hit_tokens);
            miss += load(&c.miss_tokens);
            evicted += load(&c.evictions);
            bytes += load_i(&c.bytes);
            entries += load_i(&c.entries);
        }
        counter(
            &mut out,
            "onnxchat_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV came from the prefix cache.",
            hit,
        );
        counter(
            &mut out,
            "onnxchat_prefix_cache_miss_tokens_total",
            "Prompt tokens computed (not in the prefix cache), where the cache is used.",
            miss,
        );
        counter(
            &mut out,
            "onnxchat_prefix_cache_evictions_total",
            "Prefix-cache entries dropped to stay within --kv-cache-mb.",
            evicted,
        );
        gauge(
            &mut out,
            "onnxchat_prefix_cache_bytes",
            "Bytes of KV the prefix cache holds.",
            bytes,
        );
        gauge(
            &mut out,
            "onnxchat_prefix_cache_entries",
            "Sequences the prefix cache holds.",
            entries,
        );
        let (mut runs, mut row_steps, mut rebuilds, mut rows) = (0, 0, 0, 0);
        for b in self.batches.lock().expect("metrics lock").iter() {
            runs += load(&b.runs);
            row_steps += load(&b.row_steps);
            rebuilds += load(&b.rebuilds);
            rows += b.rows.load(Ordering::Relaxed) as i64;
        }
        counter(
            &mut out,
            "onnxchat_decode_batch_runs_total",
            "Batched decoder runs (each advances every decoding sequence by one token).",
            runs,
        );
        counter(
            &mut out,
            "onnxchat_decode_batch_row_steps_total",
            "Tokens decoded by batched runs (rows summed over runs).",
            row_steps,
        );
        counter(
            &mut out,
            "onnxchat_decode_batch_rebuilds_total",
            "Times the batch's KV was re-laid out because sequences joined or left.",
            rebuilds,
        );
        gauge(
            &mut out,
            "onnxchat_decode_batch_rows",
            "Rows of the last batched decoder run.",
            rows,
        );
        self.prefill_seconds.render(
            &mut out,
            "onnxchat_worker_prefill_seconds",
            "Encoders plus prompt prefill, to the first token.",
        );
        self.inter_token_seconds.render(
            &mut out,
            "onnxchat_worker_inter_token_seconds",
            "Mean time per decode step of a job.",
        );
        self.tokens_per_second.render(
            &mut out,
            "onnxchat_worker_tokens_per_second",
            "Decode speed of a job.",
        );
        out
    }
}
