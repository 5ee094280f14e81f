//! Command-line and environment configuration: one clap struct per subcommand, shared parts flattened.
//! Every flag has an environment variable (shown by `--help`); secrets are redacted in `Debug`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::frontend::FrontendConfig;
use crate::models::catalog::DEFAULT_MODEL;
use crate::models::gemma3n::MediaLimits;
use crate::models::loaded::LoadOptions;
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
    /// Log as JSON lines.
    #[arg(long, global = true, env = "ONNX_CHAT_LOG_JSON")]
    pub log_json: bool,
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
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a local snapshot directory, a hub repo id (onnx-community/gemma-3n-E2B-it-ONNX), or a
    /// display name (Gemma-3n-E2B-it-ONNX, Gemma-3n-E2B-it-ONNX/Q4_MIXED|QUANTIZED|FP16|FP32).
    #[arg(long, env = "ONNX_CHAT_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Quantization (Q4_MIXED, Q4, QUANTIZED, FP16, FP32, …); default: the model's default (Q4_MIXED).
    #[arg(long, env = "ONNX_CHAT_QUANT")]
    pub quant: Option<String>,
    /// The name clients use in `model`; default: the directory name, or the display name for hub models.
    #[arg(long, env = "ONNX_CHAT_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Path of libonnxruntime.so; default: the project's .venv, then system library paths.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads per ONNX session (default: all cores).
    #[arg(long, env = "ONNX_CHAT_THREADS")]
    pub threads: Option<usize>,
}

#[derive(Clone, Args)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, env = "ONNX_CHAT_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "ONNX_CHAT_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* requests.
    #[arg(long, env = "ONNX_CHAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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
    #[arg(long, env = "ONNX_CHAT_ALLOW_REMOTE_MEDIA")]
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
}

impl std::fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpArgs")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpArgs {
    pub fn frontend_config(&self) -> FrontendConfig {
        FrontendConfig {
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            max_body_bytes: self.max_body_bytes,
            max_in_flight: self.max_in_flight.max(1),
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
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerOpts {
    /// Jobs a worker runs at once (they take turns on the model, one token each).
    #[arg(long, env = "ONNX_CHAT_MAX_CONCURRENT", default_value_t = 4)]
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
}

impl WorkerOpts {
    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            max_concurrent: self.max_concurrent.max(1),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            ..WorkerConfig::default()
        }
    }

    pub fn load_options(&self, rt: &RuntimeArgs) -> LoadOptions {
        let mut opts = LoadOptions::default();
        if let Some(t) = rt.threads {
            opts.session.intra_threads = t;
        }
        opts.max_prompt_tokens = self.max_prompt_tokens;
        opts.encoder_cache_bytes = self.encoder_cache_mb * 1024 * 1024;
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
    #[arg(long, env = "ONNX_CHAT_NATS_TLS")]
    pub nats_tls: bool,
    /// Seconds without an ack or progress before JetStream redelivers a job to another worker.
    #[arg(long, env = "ONNX_CHAT_ACK_WAIT", default_value_t = 30)]
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
            ..Default::default()
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
