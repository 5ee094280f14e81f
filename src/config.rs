//! Command-line and environment configuration: one clap struct per subcommand, shared parts flattened.
//! Every flag has an environment variable (shown by `--help`); secrets are redacted in `Debug`.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use crate::engine::rewrite::AttentionKernel;
use crate::engine::session::{AttentionMode, SessionOptions};
use crate::frontend::FrontendConfig;
use crate::models::catalog::DEFAULT_MODEL;
use crate::models::loaded::LoadOptions;
use crate::models::media::MediaLimits;
use crate::openai::RequestLimits;
use crate::pipeline::image::ImageLimits;
use crate::worker::WorkerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "onnx-chat",
    version,
    about = "OpenAI-compatible server for multimodal chat models exported to ONNX"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,onnx_chat=debug`).
    #[arg(long, global = true, env = "ONNX_CHAT_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines (same as `--log-format json`).
    #[arg(long, global = true, env = "ONNX_CHAT_LOG_JSON", value_parser = BoolishValueParser::new())]
    pub log_json: bool,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "ONNX_CHAT_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Front end and one worker in one process over an in-process bus (no broker needed).
    Serve(ServeArgs),
    /// The HTTP front end alone; jobs go to workers over NATS.
    Frontend(FrontendArgs),
    /// A worker alone: pulls jobs from NATS and runs the model.
    Worker(WorkerArgs),
    /// Print the resolved files of a model and every ONNX graph's inputs and outputs.
    Inspect(InspectArgs),
    /// Exit 0 when an HTTP endpoint answers 2xx (the container health check: a front end's /health, a
    /// worker's /metrics); no curl needed in the image.
    Probe(ProbeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a local snapshot directory, a hub repo id (onnx-community/gemma-3n-E2B-it-ONNX), or a
    /// display name (Gemma-3n-E2B-it-ONNX[/Q4_MIXED|QUANTIZED|FP16|FP32], SmolVLM-256M-Instruct[/UINT8|…],
    /// granite-vision-3.2-2b[/Q4_MIXED|…] for an export made by tools/export/).
    /// Repeat it (or separate with commas) to serve several models from one process; requests pick one by
    /// their `model`. `NAME=MODEL` sets the name clients use for that model.
    #[arg(long, env = "ONNX_CHAT_MODEL", default_value = DEFAULT_MODEL, value_delimiter = ',')]
    pub model: Vec<String>,
    /// Quantization (Q4_MIXED, Q4, QUANTIZED, UINT8, FP16, FP32, …); default: each model's own (Gemma-3n
    /// Q4_MIXED, SmolVLM UINT8, Granite Vision Q4_MIXED). With several models: once for all, or once per
    /// --model in order.
    #[arg(long, env = "ONNX_CHAT_QUANT", value_delimiter = ',')]
    pub quant: Vec<String>,
    /// The name clients use in `model`; default: the directory name, or the display name for hub models.
    /// With several models: once per --model, in order (or use NAME=MODEL).
    #[arg(long, env = "ONNX_CHAT_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,
}

/// One model to load, as `--model`, `--quant` and `--served-model-name` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    pub model: String,
    pub quant: Option<String>,
    pub served_name: Option<String>,
}

impl ModelArgs {
    /// One model.
    pub fn single(model: &str) -> Self {
        Self {
            model: vec![model.to_string()],
            quant: Vec::new(),
            served_model_name: Vec::new(),
        }
    }

    /// Pairs every `--model` with its quantization and served name (see the flags' help).
    pub fn choices(&self) -> Result<Vec<ModelChoice>, String> {
        let models: Vec<&str> = self
            .model
            .iter()
            .map(|m| m.trim())
            .filter(|m| !m.is_empty())
            .collect();
        if models.is_empty() {
            return Err("--model is empty".into());
        }
        let n = models.len();
        let per_model = |flag: &str, values: &[String], one_for_all: bool| {
            let values: Vec<String> = values
                .iter()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            match values.len() {
                0 => Ok(vec![None; n]),
                1 if one_for_all => Ok(vec![values.first().cloned(); n]),
                k if k == n => Ok(values.into_iter().map(Some).collect()),
                k => Err(format!(
                    "{k} {flag} values for {n} --model values; give {}one per --model, in order",
                    if one_for_all { "one for all or " } else { "" }
                )),
            }
        };
        let quants = per_model("--quant", &self.quant, true)?;
        let names = per_model("--served-model-name", &self.served_model_name, false)?;
        models
            .into_iter()
            .zip(quants)
            .zip(names)
            .map(|((spec, quant), flag_name)| {
                let (inline_name, model) = split_named(spec);
                let served_name = match (inline_name, flag_name) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(format!(
                        "--model {spec} names the model {a:?} but --served-model-name says {b:?}"
                    ))
                    }
                    (Some(a), _) => Some(a.to_string()),
                    (None, b) => b,
                };
                Ok(ModelChoice {
                    model: model.to_string(),
                    quant,
                    served_name,
                })
            })
            .collect()
    }
}

/// `NAME=MODEL` → (Some(NAME), MODEL); a value that is an existing path is never split.
fn split_named(spec: &str) -> (Option<&str>, &str) {
    if std::path::Path::new(spec).exists() {
        return (None, spec);
    }
    match spec.split_once('=') {
        Some((name, model)) if !name.trim().is_empty() && !model.trim().is_empty() => {
            (Some(name.trim()), model.trim())
        }
        _ => (None, spec),
    }
}

/// `--matmul-accuracy-level`: a level, or `auto` (by the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccuracyLevel {
    Auto,
    Level(i64),
}

impl AccuracyLevel {
    /// The level written into the graphs (`None` = leave them as exported).
    pub fn resolve(self) -> Option<i64> {
        match self {
            Self::Auto => crate::engine::session::auto_matmul_accuracy_level(),
            Self::Level(0) => None,
            Self::Level(l) => Some(l),
        }
    }
}

fn parse_attention(s: &str) -> Result<AttentionMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(AttentionMode::Auto),
        "fused" => Ok(AttentionMode::Fused),
        "unfused" => Ok(AttentionMode::Unfused),
        _ => Err(format!("{s:?}: expected auto, fused or unfused")),
    }
}

fn parse_attention_kernel(s: &str) -> Result<AttentionKernel, String> {
    match s.to_ascii_lowercase().as_str() {
        "onnx-chat" => Ok(AttentionKernel::Native),
        "ort" => Ok(AttentionKernel::Ort),
        _ => Err(format!("{s:?}: expected onnx-chat or ort")),
    }
}

fn parse_accuracy_level(s: &str) -> Result<AccuracyLevel, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(AccuracyLevel::Auto);
    }
    match s.parse::<i64>() {
        Ok(l @ 0..=4) => Ok(AccuracyLevel::Level(l)),
        _ => Err(format!("{s:?}: expected auto or a level 0..=4")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Path of libonnxruntime.so; default: the project's .venv, then system library paths.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads per ONNX session (default: all cores).
    #[arg(long, env = "ONNX_CHAT_THREADS")]
    pub threads: Option<usize>,
    /// `accuracy_level` of every 4-bit MatMulNBits node (the q4 sets), set at load: 4 = int8
    /// compute (2.7-3.7x faster decode on the bench model, next-token distributions within a small KL
    /// of the as-exported graph: BENCHMARKS.md), 0 = as exported (fp32 compute, exact to the
    /// reference; what the parity tests use). `auto` (default): 4 on CPUs with int8 dot-product
    /// kernels in ONNX Runtime (x86-64 with AVX2, ARM64), 0 elsewhere.
    #[arg(long, env = "ONNX_CHAT_MATMUL_ACCURACY_LEVEL", default_value = "auto", value_parser = parse_accuracy_level)]
    pub matmul_accuracy_level: AccuracyLevel,
    /// Keep the decoder's logits for every prompt position (by default a load-time rewrite computes
    /// only the last position's, so prefill never allocates prompt × vocabulary floats).
    #[arg(long, env = "ONNX_CHAT_FULL_LOGITS", value_parser = BoolishValueParser::new())]
    pub full_logits: bool,
    /// Let ONNX Runtime's intra-op threads spin-wait between operators (off by default: the
    /// spinning threads starve the server's own work between decode steps; see BENCHMARKS.md).
    #[arg(long, env = "ONNX_CHAT_ORT_SPINNING", value_parser = BoolishValueParser::new())]
    pub ort_spinning: bool,
    /// How the decoder's attention runs. `auto` (default): fused at load into one node per layer
    /// (see `--attention-kernel`) with the KV cache written in place (decode cost no longer grows with
    /// the copy of the whole cache), checked at load against the graph as exported on a probe
    /// prompt and kept as exported where they differ or the attention is not recognised. `fused`:
    /// the same without the check (shorter loads). `unfused`: as exported.
    #[arg(long, env = "ONNX_CHAT_ATTENTION", default_value = "auto", value_parser = parse_attention)]
    pub attention: AttentionMode,
    /// Which operator the fused layers run. `onnx-chat` (default): this server's own
    /// `onnx_chat.CachedAttention`, which reads each cached key and value once per step for all the
    /// query heads that share it (ONNX Runtime's reads them once per query head), where the KV cache
    /// is 32-bit float; `GroupQueryAttention` elsewhere. `ort`: `GroupQueryAttention` everywhere.
    #[arg(long, env = "ONNX_CHAT_ATTENTION_KERNEL", default_value = "onnx-chat", value_parser = parse_attention_kernel)]
    pub attention_kernel: AttentionKernel,
    /// Graph files of this many MiB or more have their inline weights read by ONNX Runtime straight
    /// from the file (a memory-mapped walk of the protobuf points it at each weight's bytes), so a
    /// load holds each weight once instead of three copies; `off` reads them as exported.
    #[arg(long = "weights-in-place-min-mb", env = "ONNX_CHAT_WEIGHTS_IN_PLACE_MIN_MB", default_value = "64", value_parser = parse_mib_or_off)]
    pub weights_in_place_min_bytes: u64,
}

/// `N` (MiB, as bytes) or `off` (never).
fn parse_mib_or_off(s: &str) -> Result<u64, String> {
    match s {
        "off" => Ok(u64::MAX),
        _ => s
            .parse::<u64>()
            .map(|mb| mb.saturating_mul(1 << 20))
            .map_err(|_| format!("{s:?}: expected a size in MiB or off")),
    }
}

impl RuntimeArgs {
    /// Session options from these flags (the rest at their defaults).
    pub fn session_options(&self) -> SessionOptions {
        let mut opts = SessionOptions::default();
        if let Some(t) = self.threads {
            opts.intra_threads = t;
        }
        opts.matmul_accuracy_level = self.matmul_accuracy_level.resolve();
        opts.last_logits = !self.full_logits;
        opts.spin = self.ort_spinning;
        opts.attention_mode = self.attention;
        opts.attention_kernel = self.attention_kernel;
        opts.weights_in_place_min_bytes = self.weights_in_place_min_bytes;
        opts
    }
}

#[derive(Clone, Args)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "ONNX_CHAT_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "ONNX_CHAT_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* requests. Repeat the flag (or separate keys
    /// with commas) to accept several keys.
    #[arg(
        long,
        env = "ONNX_CHAT_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,
    /// A file of accepted API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "ONNX_CHAT_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Origins allowed to call the API from a browser (CORS), e.g. https://app.example; `*` = any.
    /// Off by default.
    #[arg(long, env = "ONNX_CHAT_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Largest request body, in bytes.
    #[arg(long, env = "ONNX_CHAT_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds a request may take in all (queueing included).
    #[arg(long, env = "ONNX_CHAT_REQUEST_TIMEOUT", default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds of silence from a running job before the request fails.
    #[arg(long, env = "ONNX_CHAT_IDLE_TIMEOUT", default_value_t = 120)]
    pub idle_timeout: u64,
    /// Most images in one request.
    #[arg(long, env = "ONNX_CHAT_MAX_IMAGES", default_value_t = 8)]
    pub max_images: usize,
    /// Most audio clips in one request.
    #[arg(long, env = "ONNX_CHAT_MAX_AUDIO_CLIPS", default_value_t = 4)]
    pub max_audio_clips: usize,
    /// Fetch `http(s)://` image URLs in requests (off: only data URLs and base64 are accepted).
    /// Private, loopback and link-local addresses are refused unless their host is allow-listed.
    #[arg(long, env = "ONNX_CHAT_ALLOW_REMOTE_MEDIA", value_parser = BoolishValueParser::new())]
    pub allow_remote_media: bool,
    /// Hosts remote media may come from (comma-separated names or addresses); empty = any public host.
    #[arg(
        long,
        env = "ONNX_CHAT_REMOTE_MEDIA_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub remote_media_allow_host: Vec<String>,
    /// Largest remote image, in bytes.
    #[arg(long, env = "ONNX_CHAT_REMOTE_MEDIA_MAX_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub remote_media_max_bytes: usize,
    /// Seconds one remote fetch may take, redirects included.
    #[arg(long, env = "ONNX_CHAT_REMOTE_MEDIA_TIMEOUT", default_value_t = 10)]
    pub remote_media_timeout: u64,
    /// Requests answered at once by this front end; more get 429 with Retry-After.
    #[arg(long, env = "ONNX_CHAT_MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,
    /// Jobs waiting for a worker at most (in-process bus; over NATS see --max-queued-jobs); more get 429.
    #[arg(long, env = "ONNX_CHAT_MAX_QUEUED", default_value_t = 1024)]
    pub max_queued: usize,
    /// Over NATS, send a conversation's next turn to the worker whose prefix cache holds its
    /// longest prefix (from the workers' heartbeats) when that worker has a free slot; otherwise,
    /// and with this off, jobs go to the shared queue.
    #[arg(long, env = "ONNX_CHAT_PREFIX_ROUTING", default_value_t = true, value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub prefix_routing: bool,
}

impl std::fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpArgs")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("api_keys", &format!("<{} redacted>", self.api_key.len()))
            .field("api_key_file", &self.api_key_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpArgs {
    /// The front-end settings; reads `--api-key-file`.
    pub fn frontend_config(&self) -> anyhow::Result<FrontendConfig> {
        let mut api_keys: Vec<String> = self
            .api_key
            .iter()
            .filter(|k| !k.trim().is_empty())
            .cloned()
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read --api-key-file {}: {e}", path.display())
            })?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
        }
        Ok(FrontendConfig {
            api_keys,
            cors_allow_origins: self.cors_allow_origin.clone(),
            extra_metrics: None,
            max_body_bytes: self.max_body_bytes,
            max_in_flight: self.max_in_flight.max(1),
            prefix_routing: self.prefix_routing,
            request_timeout: Duration::from_secs(self.request_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            remote_media: self.allow_remote_media.then(|| {
                crate::frontend::media::RemoteMediaConfig {
                    allow_hosts: self.remote_media_allow_host.clone(),
                    max_bytes: self.remote_media_max_bytes,
                    timeout: Duration::from_secs(self.remote_media_timeout.max(1)),
                }
            }),
            limits: RequestLimits {
                max_images: self.max_images,
                max_audio_clips: self.max_audio_clips,
                ..RequestLimits::default()
            },
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerOpts {
    /// Serve this worker's Prometheus metrics at http://HOST:PORT/metrics (`worker` only; under
    /// `serve` they are part of the front end's /metrics).
    #[arg(long, env = "ONNX_CHAT_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    #[arg(long, env = "ONNX_CHAT_METRICS_HOST", default_value = "127.0.0.1")]
    pub metrics_host: String,
    /// This worker's id in heartbeats and logs (default: `worker-<random>`).
    #[arg(long, env = "ONNX_CHAT_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Jobs a worker runs at once (their decode steps share batched decoder runs, see --max-batch).
    #[arg(long, env = "ONNX_CHAT_MAX_CONCURRENT", default_value_t = 8)]
    pub max_concurrent: usize,
    /// Seconds running jobs get to finish on shutdown before they are handed back.
    #[arg(long, env = "ONNX_CHAT_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Longest prompt in tokens (default: the model's context length minus one).
    #[arg(long, env = "ONNX_CHAT_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest image, in bytes.
    #[arg(long, env = "ONNX_CHAT_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Largest image, in pixels (checked from the header before decoding).
    #[arg(long, env = "ONNX_CHAT_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Megabytes of vision/audio encoder outputs cached by content hash for reuse (0 = off).
    #[arg(long, env = "ONNX_CHAT_ENCODER_CACHE_MB", default_value_t = 256)]
    pub encoder_cache_mb: usize,
    /// Largest audio clip, in bytes.
    #[arg(long, env = "ONNX_CHAT_MAX_AUDIO_BYTES", default_value_t = 25 * 1024 * 1024)]
    pub max_audio_bytes: usize,
    /// Megabytes of finished conversations' KV kept per model for prefix reuse: a request whose
    /// prompt starts like a cached one (its previous turn, a shared system prompt) computes only the
    /// rest. Least recently used out first; 0 = off.
    #[arg(long, env = "ONNX_CHAT_KV_CACHE_MB", default_value_t = crate::models::loaded::DEFAULT_KV_CACHE_MB)]
    pub kv_cache_mb: usize,
    /// Most prompt tokens one prefill step computes; other streams decode between steps, so a long
    /// prompt no longer stalls them for its whole prefill.
    #[arg(long, env = "ONNX_CHAT_PREFILL_CHUNK", default_value_t = crate::models::loaded::DEFAULT_PREFILL_CHUNK as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_chunk: u64,
    /// Also chunk prompts and reuse cached prefixes on decoders that quantize activations
    /// dynamically (the `_quantized` exports), where that changes the numbers: faster, but outputs
    /// can differ from a one-shot prefill. Off: such models prefill in one piece, without the cache.
    #[arg(long, env = "ONNX_CHAT_ALLOW_INEXACT_REUSE", value_parser = BoolishValueParser::new())]
    pub allow_inexact_reuse: bool,
    /// Most sequences one batched decoder run advances (continuous batching: every decoding stream,
    /// and each of a request's `n` choices, is a row; rows join and leave between steps). 1 = off:
    /// sequences decode one at a time, taking turns.
    #[arg(long, env = "ONNX_CHAT_MAX_BATCH", default_value_t = crate::models::generate::DEFAULT_MAX_BATCH as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_batch: u64,
    /// Also batch decoders that quantize activations dynamically (the `_quantized` exports), where a
    /// row's numbers then depend on the other rows: faster, but outputs can differ from decoding
    /// alone. Off: such models decode one sequence at a time.
    #[arg(long, env = "ONNX_CHAT_ALLOW_INEXACT_BATCHING", value_parser = BoolishValueParser::new())]
    pub allow_inexact_batching: bool,
}

impl WorkerOpts {
    pub fn worker_config(&self) -> WorkerConfig {
        let mut cfg = WorkerConfig {
            max_concurrent: self.max_concurrent.max(1),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            ..WorkerConfig::default()
        };
        if let Some(id) = self.worker_id.as_ref().filter(|i| !i.is_empty()) {
            cfg.worker_id = id.clone();
        }
        cfg
    }

    pub fn load_options(&self, rt: &RuntimeArgs) -> LoadOptions {
        let mut opts = LoadOptions {
            session: rt.session_options(),
            ..LoadOptions::default()
        };
        opts.max_prompt_tokens = self.max_prompt_tokens;
        opts.encoder_cache_bytes = self.encoder_cache_mb * 1024 * 1024;
        opts.kv_cache_bytes = self.kv_cache_mb.saturating_mul(1024 * 1024);
        opts.prefill_chunk = self.prefill_chunk as usize;
        opts.allow_inexact_reuse = self.allow_inexact_reuse;
        opts.batch = crate::models::generate::BatchPolicy {
            max_rows: self.max_batch as usize,
            allow_inexact: self.allow_inexact_batching,
        };
        opts.media = MediaLimits {
            image: ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
            },
            max_audio_bytes: self.max_audio_bytes,
            ..MediaLimits::default()
        };
        opts
    }
}

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated. `frontend` and `worker` default to nats://127.0.0.1:4222;
    /// `serve` uses its in-process bus unless this is given.
    #[arg(long, env = "ONNX_CHAT_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "ONNX_CHAT_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "ONNX_CHAT_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "ONNX_CHAT_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT + NKey).
    #[arg(long, env = "ONNX_CHAT_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server's TLS certificate.
    #[arg(long, env = "ONNX_CHAT_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Require TLS to NATS.
    #[arg(long, env = "ONNX_CHAT_NATS_TLS", value_parser = BoolishValueParser::new())]
    pub nats_tls: bool,
    /// Seconds without an ack or progress before JetStream redelivers a job to another worker (a
    /// running job reports progress three times per period, so this is how long a dead worker's job
    /// waits before it moves).
    #[arg(long, env = "ONNX_CHAT_ACK_WAIT", default_value_t = 10)]
    pub ack_wait: u64,
    /// Deliveries of one job before it is given up.
    #[arg(long, env = "ONNX_CHAT_MAX_DELIVER", default_value_t = 3)]
    pub max_deliver: i64,
    /// Seconds a queued job is kept before it expires from the stream.
    #[arg(long, env = "ONNX_CHAT_JOB_MAX_AGE", default_value_t = 3600)]
    pub job_max_age: u64,
    /// Jobs the queue holds at most; further requests get 429.
    #[arg(long, env = "ONNX_CHAT_MAX_QUEUED_JOBS", default_value_t = 10_000)]
    pub max_queued_jobs: i64,
    /// Base64 media longer than this many characters travel through the object store.
    #[arg(long, env = "ONNX_CHAT_INLINE_MEDIA_LIMIT", default_value_t = 64 * 1024)]
    pub inline_media_limit: usize,
    /// Seconds a stored response (the Responses API's `store`) is kept for `previous_response_id`
    /// and `GET /v1/responses/{id}`.
    #[arg(long, env = "ONNX_CHAT_RESPONSES_TTL", default_value_t = 24 * 3600)]
    pub responses_ttl: u64,
    /// Megabytes of stored responses kept at most (in memory: the oldest go first; in the NATS
    /// key-value bucket: new ones are not stored until old ones expire).
    #[arg(long, env = "ONNX_CHAT_RESPONSES_STORE_MB", default_value_t = 256)]
    pub responses_store_mb: u64,
    /// Copies JetStream keeps of the job stream, the media object store and the stored-responses
    /// bucket when it creates them: 3 on a 3-node NATS cluster survives the loss of a node; 1 (default)
    /// for a single server. Existing streams and buckets keep theirs.
    #[arg(long, env = "ONNX_CHAT_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_replicas: u64,
}

impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsArgs")
            .field("nats_url", &self.nats_url)
            .field("auth", &self.settings().auth)
            .finish_non_exhaustive()
    }
}

impl NatsArgs {
    pub fn url(&self) -> String {
        self.nats_url
            .clone()
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
    }

    pub fn settings(&self) -> crate::bus::nats::NatsSettings {
        crate::bus::nats::NatsSettings {
            url: self.url(),
            auth: crate::bus::nats::NatsAuth {
                user: self.nats_user.clone(),
                password: self.nats_password.clone(),
                token: self.nats_token.clone(),
                creds_file: self.nats_creds.clone(),
                tls_ca: self.nats_tls_ca.clone(),
                require_tls: self.nats_tls,
            },
            ack_wait: Duration::from_secs(self.ack_wait.max(1)),
            max_deliver: self.max_deliver.max(1),
            max_age: Duration::from_secs(self.job_max_age.max(1)),
            max_jobs: self.max_queued_jobs.max(1),
            inline_limit: self.inline_media_limit,
            store: self.store_limits(),
            replicas: self.nats_replicas as usize,
            ..Default::default()
        }
    }

    /// Bounds of the stored responses (both buses).
    pub fn store_limits(&self) -> crate::bus::store::StoreLimits {
        crate::bus::store::StoreLimits {
            ttl: Duration::from_secs(self.responses_ttl.max(1)),
            max_bytes: self.responses_store_mb.max(1) << 20,
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub worker: WorkerOpts,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct FrontendArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub worker: WorkerOpts,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model to inspect (same forms as `serve --model`).
    pub model: String,
    /// Quantization whose file choice to show.
    #[arg(long, env = "ONNX_CHAT_QUANT")]
    pub quant: Option<String>,
    /// Only the graphs the quantization selects (default for hub models: nothing else is downloaded).
    #[arg(long)]
    pub selected_only: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The URL to GET.
    #[arg(default_value = "http://127.0.0.1:8000/health")]
    pub url: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[cfg(test)]
mod model_args_tests {
    use super::*;

    fn serve(args: &[&str]) -> ModelArgs {
        let mut argv = vec!["onnx-chat", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(s) => s.model,
            _ => unreachable!(),
        }
    }

    fn choice(model: &str, quant: Option<&str>, name: Option<&str>) -> ModelChoice {
        ModelChoice {
            model: model.into(),
            quant: quant.map(Into::into),
            served_name: name.map(Into::into),
        }
    }

    #[test]
    fn several_models_by_position_or_name() {
        let one = serve(&[
            "--model",
            "m1",
            "--quant",
            "FP32",
            "--served-model-name",
            "x",
        ]);
        assert_eq!(
            one.choices().unwrap(),
            vec![choice("m1", Some("FP32"), Some("x"))]
        );
        let two = serve(&["--model", "m1", "--model", "smol=m2", "--quant", "FP32"]);
        assert_eq!(
            two.choices().unwrap(),
            vec![
                choice("m1", Some("FP32"), None),
                choice("m2", Some("FP32"), Some("smol"))
            ]
        );
        let two = serve(&[
            "--model",
            "m1,m2",
            "--quant",
            "FP32,UINT8",
            "--served-model-name",
            "a",
            "--served-model-name",
            "b",
        ]);
        assert_eq!(
            two.choices().unwrap(),
            vec![
                choice("m1", Some("FP32"), Some("a")),
                choice("m2", Some("UINT8"), Some("b"))
            ]
        );
        let err = serve(&["--model", "m1", "--model", "m2", "--served-model-name", "a"])
            .choices()
            .unwrap_err();
        assert!(err.contains("1 --served-model-name values for 2"), "{err}");
        let err = serve(&["--model", "a=m1", "--served-model-name", "b"])
            .choices()
            .unwrap_err();
        assert!(err.contains("--served-model-name"), "{err}");
        // An existing path is never split at '='.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("x=y");
        std::fs::create_dir(&odd).unwrap();
        let path = odd.to_str().unwrap();
        assert_eq!(
            serve(&["--model", path]).choices().unwrap(),
            vec![choice(path, None, None)]
        );
        assert_eq!(
            ModelArgs::single("m").choices().unwrap(),
            vec![choice("m", None, None)]
        );
    }

    fn runtime(args: &[&str]) -> SessionOptions {
        let mut argv = vec!["onnx-chat", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(s) => s.runtime.session_options(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn weights_in_place_takes_mib_or_off_and_names_the_flag_when_wrong() {
        use crate::engine::session::WEIGHTS_IN_PLACE_MIN_BYTES;
        assert_eq!(
            runtime(&[]).weights_in_place_min_bytes,
            WEIGHTS_IN_PLACE_MIN_BYTES
        );
        assert_eq!(WEIGHTS_IN_PLACE_MIN_BYTES, 64 << 20, "the README says 64");
        let min = |v: &str| runtime(&["--weights-in-place-min-mb", v]).weights_in_place_min_bytes;
        assert_eq!(min("0"), 0);
        assert_eq!(min("128"), 128 << 20);
        assert_eq!(min("off"), u64::MAX);
        let err = Cli::try_parse_from(["onnx-chat", "serve", "--weights-in-place-min-mb", "lots"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--weights-in-place-min-mb"), "{err}");
        assert!(err.contains("expected a size in MiB or off"), "{err}");
    }

    /// The README states the default accuracy level; the code resolves `auto` by the same rule.
    #[test]
    fn the_default_accuracy_level_is_what_the_readme_says() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let rule = "`--matmul-accuracy-level` defaults to `auto`: level 4 (int8 compute) on x86-64 CPUs with AVX2 and on ARM64, as exported (0) elsewhere.";
        assert!(readme.contains(rule), "README.md states: {rule}");
        #[cfg(target_arch = "x86_64")]
        let want = std::arch::is_x86_feature_detected!("avx2").then_some(4);
        #[cfg(target_arch = "aarch64")]
        let want = Some(4);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let want = None;
        assert_eq!(runtime(&[]).matmul_accuracy_level, want);
        assert_eq!(
            runtime(&["--matmul-accuracy-level", "auto"]).matmul_accuracy_level,
            want
        );
    }

    #[test]
    fn runtime_flags_reach_the_session_options() {
        let d = runtime(&[]);
        assert_eq!(
            d.matmul_accuracy_level,
            crate::engine::session::auto_matmul_accuracy_level()
        );
        assert_eq!(
            runtime(&["--matmul-accuracy-level", "0"]).matmul_accuracy_level,
            None,
            "0 = as exported"
        );
        assert!(d.last_logits && !d.spin);
        let o = runtime(&[
            "--threads",
            "3",
            "--matmul-accuracy-level",
            "4",
            "--full-logits",
            "--ort-spinning",
        ]);
        assert_eq!(
            (
                o.intra_threads,
                o.matmul_accuracy_level,
                o.last_logits,
                o.spin
            ),
            (3, Some(4), false, true)
        );
        let mut argv = vec!["onnx-chat", "serve", "--matmul-accuracy-level", "5"];
        assert!(Cli::try_parse_from(&argv).is_err(), "levels are 0..=4");
        // In the environment, 1/0 (and yes/no, on/off) are booleans too. No other test reads this
        // variable.
        argv.truncate(2);
        unsafe { std::env::set_var("ONNX_CHAT_ORT_SPINNING", "1") };
        let parsed = Cli::try_parse_from(&argv);
        unsafe { std::env::remove_var("ONNX_CHAT_ORT_SPINNING") };
        match parsed.unwrap().command {
            Command::Serve(s) => assert!(s.runtime.session_options().spin),
            _ => unreachable!(),
        }
    }
}
