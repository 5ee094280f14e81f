//! What each subcommand runs, with its dependencies passed in (listener, bus, shutdown token) so tests
//! start the real thing on `127.0.0.1:0`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bus::memory::MemoryBus;
use crate::bus::nats::NatsBus;
use crate::bus::Bus;
use crate::config::{ModelArgs, RuntimeArgs, WorkerOpts};
use crate::frontend::{self, FrontendConfig};
use crate::models::hub::HubConfig;
use crate::models::loaded::{LoadOptions, LoadedModel};
use crate::models::resolve::{self, ModelSpec, ResolvedModel};
use crate::worker::{self, WorkerConfig};

/// Resolves `--model` to local files (downloading from the hub if needed).
pub async fn resolve_model(args: &ModelArgs) -> anyhow::Result<ResolvedModel> {
    let spec = ModelSpec::parse(&args.model, args.quant.as_deref())?;
    let hub = HubConfig::from_env();
    Ok(resolve::resolve(&spec, args.served_model_name.as_deref(), &hub).await?)
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

/// Model loading shared by `serve` and `worker`.
pub async fn load_from_args(
    model: &ModelArgs,
    runtime: &RuntimeArgs,
    worker: &WorkerOpts,
) -> anyhow::Result<Arc<LoadedModel>> {
    let resolved = resolve_model(model).await?;
    load_model(resolved, runtime, worker.load_options(runtime)).await
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
        args.http.frontend_config(),
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
    let model = load_from_args(&args.model, &args.runtime, &args.worker).await?;
    let cfg = args.worker.worker_config();
    let bus = NatsBus::connect(args.nats.settings(), &cfg.worker_id).await?;
    eprintln!(
        "onnx-chat worker {} serving {} (NATS {})",
        cfg.worker_id,
        model.info.name,
        args.nats.url()
    );
    worker::run(Arc::new(bus), vec![model], cfg, shutdown).await?;
    Ok(())
}

/// `serve`: loads the model, then front end + worker over the in-process bus, or over NATS when
/// `--nats-url` is given.
pub async fn run_serve(
    args: crate::config::ServeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let model = load_from_args(&args.model, &args.runtime, &args.worker).await?;
    let bus: Arc<dyn Bus> = match &args.nats.nats_url {
        Some(_) => Arc::new(NatsBus::connect(args.nats.settings(), "onnx-chat-serve").await?),
        None => Arc::new(MemoryBus::new().with_max_queued(args.http.max_queued)),
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
        "onnx-chat serving {} ({}) at http://{}/v1 over the {} bus",
        model.info.name,
        model.info.quant,
        listener.local_addr()?,
        bus.kind()
    );
    serve_on(
        bus,
        vec![model],
        args.http.frontend_config(),
        args.worker.worker_config(),
        listener,
        shutdown,
    )
    .await
}
