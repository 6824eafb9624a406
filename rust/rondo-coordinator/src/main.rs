#[tokio::main]
async fn main() -> std::process::ExitCode {
    rondo_net::boot::main(
        "coordinator",
        "Rondo coordinator: tracks participants and runs the rounds of a federation.",
        rondo_coordinator::config::DEFAULTS,
        rondo_coordinator::run::run,
    )
    .await
}
