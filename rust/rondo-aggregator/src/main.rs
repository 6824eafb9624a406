#[tokio::main]
async fn main() -> std::process::ExitCode {
    rondo_net::boot::main(
        "aggregator",
        "Rondo aggregator: serves the global model and folds participants' updates into it.",
        rondo_aggregator::config::DEFAULTS,
        rondo_aggregator::run::run,
    )
    .await
}
