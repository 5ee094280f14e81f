//! What each subcommand runs, with its dependencies passed in (listener, bus, shutdown token) so tests
//! start the real thing on `127.0.0.1:0`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::memory::MemoryBus;
use crate::bus::nats::NatsBus;
use crate::bus::Bus;
use crate::config::{ModelArgs, ModelChoice, RuntimeArgs, WorkerOpts};
use crate::frontend::{self, FrontendConfig};
use crate::models::hub::HubConfig;
use crate::models::loaded::{LoadOptions, LoadedModel};
use crate::models::resolve::{self, ModelSpec, ResolvedModel};
use crate::worker::{self, WorkerConfig};

/// Resolves one `--model` to local files (downloading from the hub if needed).
pub async fn resolve_model(choice: &ModelChoice) -> anyhow::Result<ResolvedModel> {
    let spec = ModelSpec::parse(&choice.model, choice.quant.as_deref())?;
    let hub = HubConfig::from_env();
    Ok(resolve::resolve(&spec, choice.served_name.as_deref(), &hub).await?)
}

/// Loads ONNX Runtime and the model's sessions (on the model's owner thread).
pub async fn load_model(
    resolved: ResolvedModel,
    runtime: &RuntimeArgs,
    opts: LoadOptions,
) -> anyhow::Result<Arc<LoadedModel>> {
    crate::engine::runtime::init(runtime.ort_lib.as_deref())?;
    let model = tokio::task::spawn_blocking(move || LoadedModel::load(&resolved, &opts)).await??;
    Ok(Arc::new(model))
}

/// `serve`: front end and worker in one process over the in-process bus.
pub async fn serve(
    models: Vec<Arc<LoadedModel>>,
    frontend_cfg: FrontendConfig,
    worker_cfg: WorkerConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_on(
        Arc::new(MemoryBus::new()),
        models,
        frontend_cfg,
        worker_cfg,
        listener,
        shutdown,
    )
    .await
}

/// `serve` over a given bus (`serve --nats-url` passes NATS).
pub async fn serve_on(
    bus: Arc<dyn Bus>,
    models: Vec<Arc<LoadedModel>>,
    frontend_cfg: FrontendConfig,
    worker_cfg: WorkerConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut frontend_cfg = frontend_cfg;
    let worker_metrics = worker_cfg.metrics.clone();
    frontend_cfg.extra_metrics = Some(Arc::new(move || worker_metrics.render()));
    // The front end stops first (finishing open streams), then the worker drains.
    let worker_stop = CancellationToken::new();
    let worker = tokio::spawn(worker::run(
        bus.clone(),
        models,
        worker_cfg,
        worker_stop.clone(),
    ));
    frontend::run(frontend_cfg, listener, bus, shutdown).await?;
    worker_stop.cancel();
    worker.await??;
    Ok(())
}

/// Model loading shared by `serve` and `worker`: every `--model`, in order. Two models may not be
/// served under the same name, nor one under another's alias (requests could not tell them apart).
pub async fn load_from_args(
    model: &ModelArgs,
    runtime: &RuntimeArgs,
    worker: &WorkerOpts,
) -> anyhow::Result<Vec<Arc<LoadedModel>>> {
    let choices = model.choices().map_err(anyhow::Error::msg)?;
    let mut resolved = Vec::with_capacity(choices.len());
    for c in &choices {
        resolved.push(resolve_model(c).await?);
    }
    check_names(&resolved)?;
    let mut models = Vec::with_capacity(resolved.len());
    for r in resolved {
        models.push(load_model(r, runtime, worker.load_options(runtime)).await?);
    }
    Ok(models)
}

fn check_names(models: &[ResolvedModel]) -> anyhow::Result<()> {
    for (i, a) in models.iter().enumerate() {
        for b in &models[..i] {
            if a.served_name == b.served_name || b.aliases.contains(&a.served_name) {
                anyhow::bail!(
                    "two models would be served as {:?} ({} and {}); name them with NAME=MODEL or --served-model-name",
                    a.served_name,
                    b.spec,
                    a.spec
                );
            }
            if a.aliases.contains(&b.served_name) {
                anyhow::bail!(
                    "{:?} ({}) is also a name of {}; name them with NAME=MODEL or --served-model-name",
                    b.served_name,
                    b.spec,
                    a.spec
                );
            }
        }
    }
    Ok(())
}

/// `name (QUANT, fused attention)`, comma-separated, for start-up messages.
fn describe(models: &[Arc<LoadedModel>]) -> String {
    models
        .iter()
        .map(|m| {
            let attention = if m.fused_attention() {
                "fused attention"
            } else {
                "attention as exported"
            };
            format!("{} ({}, {attention})", m.info.name, m.info.quant)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `frontend`: the HTTP front end over NATS.
pub async fn run_frontend(
    args: crate::config::FrontendArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bus = NatsBus::connect(args.nats.settings(), "onnx-chat-frontend").await?;
    let listener = tokio::net::TcpListener::bind((args.http.host.as_str(), args.http.port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}:{}: {e}",
                args.http.host,
                args.http.port
            )
        })?;
    eprintln!(
        "onnx-chat front end at http://{}/v1 (NATS {})",
        listener.local_addr()?,
        args.nats.url()
    );
    frontend::run(
        args.http.frontend_config()?,
        listener,
        Arc::new(bus),
        shutdown,
    )
    .await?;
    Ok(())
}

/// `worker`: one worker over NATS.
pub async fn run_worker(
    args: crate::config::WorkerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A wrong NATS URL fails before the model load, not after it.
    args.nats.settings().servers()?;
    let models = load_from_args(&args.model, &args.runtime, &args.worker).await?;
    let mut cfg = args.worker.worker_config();
    let settings = args.nats.settings();
    cfg.progress_interval = progress_interval(settings.ack_wait);
    let bus = NatsBus::connect(settings, &cfg.worker_id).await?;
    if let Some(port) = args.worker.metrics_port {
        let listener = tokio::net::TcpListener::bind((args.worker.metrics_host.as_str(), port))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {}:{port} for metrics: {e}",
                    args.worker.metrics_host
                )
            })?;
        tokio::spawn(serve_worker_metrics(
            listener,
            cfg.metrics.clone(),
            shutdown.clone(),
        ));
    }
    eprintln!(
        "onnx-chat worker {} serving {} (NATS {})",
        cfg.worker_id,
        describe(&models),
        args.nats.url()
    );
    worker::run(Arc::new(bus), models, cfg, shutdown).await?;
    Ok(())
}

/// `serve`: loads the models, then front end + worker over the in-process bus, or over NATS when
/// `--nats-url` is given.
pub async fn run_serve(
    args: crate::config::ServeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if args.nats.nats_url.is_some() {
        args.nats.settings().servers()?;
    }
    let models = load_from_args(&args.model, &args.runtime, &args.worker).await?;
    let mut worker_cfg = args.worker.worker_config();
    let bus: Arc<dyn Bus> = match &args.nats.nats_url {
        Some(_) => {
            let settings = args.nats.settings();
            worker_cfg.progress_interval = progress_interval(settings.ack_wait);
            Arc::new(NatsBus::connect(settings, "onnx-chat-serve").await?)
        }
        None => Arc::new(
            MemoryBus::with_store(args.nats.store_limits()).with_max_queued(args.http.max_queued),
        ),
    };
    let listener = tokio::net::TcpListener::bind((args.http.host.as_str(), args.http.port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}:{}: {e}",
                args.http.host,
                args.http.port
            )
        })?;
    eprintln!(
        "onnx-chat serving {} at http://{}/v1 over the {} bus",
        describe(&models),
        listener.local_addr()?,
        bus.kind()
    );
    serve_on(
        bus,
        models,
        args.http.frontend_config()?,
        worker_cfg,
        listener,
        shutdown,
    )
    .await
}

/// Progress acks three times per ack-wait period, so a live job never looks dead.
fn progress_interval(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(200))
}

/// A worker's own `/metrics` and `/health` (`worker --metrics-port`).
pub async fn serve_worker_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<crate::worker::WorkerMetrics>,
    shutdown: CancellationToken,
) {
    use warp::Filter;
    let m = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4",
        )
    });
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})));
    warp::serve(m.or(health))
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}
