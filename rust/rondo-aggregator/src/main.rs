use std::path::PathBuf;

use clap::Parser;
use rondo_aggregator::config::{AggregatorConfig, DEFAULTS};

/// Rondo aggregator: serves the global model and folds participants' updates into it.
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
        let config: AggregatorConfig =
            rondo_net::boot::load_config(DEFAULTS, cli.config.as_deref())?;
        rondo_aggregator::run::run(config).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aggregator: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
