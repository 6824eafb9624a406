use std::path::PathBuf;

use clap::Parser;
use rondo_coordinator::config::{CoordinatorConfig, DEFAULTS};

/// Rondo coordinator: tracks participants and runs the rounds of a federation.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML config file (keys left out keep the built-in defaults; RONDO__SECTION__KEY
    /// environment variables override both).
    #[arg(short, long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    rondo_net::boot::init_tracing();
    let cli = Cli::parse();
    let result = async {
        let config: CoordinatorConfig =
            rondo_net::boot::load_config(DEFAULTS, cli.config.as_deref())?;
        rondo_coordinator::run::run(config).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("coordinator: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
