//! `nin-serve`: parse options, set up logging, load the model, bind, serve.
//! Everything else lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use nin_serve::config::LogFormat;
use nin_serve::{AppState, Config};
use tracing_subscriber::EnvFilter;

/// jemalloc, started with the workspace's options (thp:always, transparent
/// huge pages; set once for every binary in `.cargo/config.toml`): the
/// batched forward passes allocate large activation buffers, as in training,
/// and the server's throughput stays comparable with the `throughput`
/// example's (`bench/load.sh` compares them).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match config.log_format {
        // One JSON object per line, for cluster log collectors.
        LogFormat::Json => logs.json().with_current_span(true).init(),
        // Colours only for a person at a terminal: container logs, files
        // and log collectors get plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nin-serve: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: nin-model's
/// messages already include their source (`...: No such file or directory`).
fn report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let state = AppState::start(&config)
        .await
        .context("cannot start the model")?;
    // Bound only now: a listening server is a warmed-up one.
    let listener = tokio::net::TcpListener::bind(&config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening (HTTP)");
    let grpc = match config.grpc_addr() {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (gRPC; `--grpc-addr off` serves none)")
            })?;
            tracing::info!(addr = %listener.local_addr()?, "listening (gRPC)");
            Some(listener)
        }
        None => None,
    };
    // One signal stops both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        nin_serve::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&stop| stop).await;
        }
    };
    let http = async {
        nin_serve::run(listener, state.clone(), signal())
            .await
            .context("HTTP server failed")
    };
    let grpc = async {
        match grpc {
            Some(listener) => nin_serve::grpc::serve(listener, state.clone(), signal())
                .await
                .context("gRPC server failed"),
            None => Ok(()),
        }
    };
    tokio::try_join!(http, grpc)?;
    tracing::info!("stopped");
    Ok(())
}
