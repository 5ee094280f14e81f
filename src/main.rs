//! The `onnx-chat` binary: parse arguments, start logging, run the chosen subcommand.

use std::process::ExitCode;

use clap::Parser;
use onnx_chat::config::{Cli, Command};
use onnx_chat::{app, inspect, shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log, cli.log_json || cli.log_format == "json");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => app::run_serve(args, shutdown::on_signals()).await,
        Command::Frontend(args) => app::run_frontend(args, shutdown::on_signals()).await,
        Command::Worker(args) => app::run_worker(args, shutdown::on_signals()).await,
        Command::Inspect(args) => {
            let spec =
                onnx_chat::models::resolve::ModelSpec::parse(&args.model, args.quant.as_deref())?;
            let resolved = onnx_chat::models::resolve::resolve(
                &spec,
                None,
                &onnx_chat::models::hub::HubConfig::from_env(),
            )
            .await?;
            onnx_chat::engine::runtime::init(args.runtime.ort_lib.as_deref())?;
            let opts = args.runtime.session_options();
            let hub = matches!(
                spec.source,
                onnx_chat::models::resolve::ModelSource::Hub { .. }
            );
            let selected_only = args.selected_only || hub;
            let report = tokio::task::spawn_blocking(move || {
                inspect::inspect(resolved, selected_only, &opts)
            })
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", inspect::render_text(&report));
            }
            if let Some(why) = report.failure() {
                anyhow::bail!("{why}");
            }
            Ok(())
        }
        Command::Probe(args) => {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(args.timeout))
                .build()?;
            let status = client.get(&args.url).send().await?.status();
            anyhow::ensure!(status.is_success(), "{} answered {status}", args.url);
            Ok(())
        }
    }
}
