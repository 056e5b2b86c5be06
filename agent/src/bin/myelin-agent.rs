//! `myelin-agent`: see `myelin_agent::config::AgentConfig` for the flags.

use clap::Parser as _;
use myelin_agent::config::AgentConfig;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // glibc gives every thread that allocates an arena of its own; with tokio's workers each
    // arena keeps its share of the memory a large initial list left behind. Two arenas keep
    // the agent's resident memory close to what it uses, at no measurable cost (it does little
    // allocation once synced).
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the async runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let config = AgentConfig::parse();

    // kube's client logs an error for every failed connection while the API server is away;
    // the source already reports that once per retry, so keep kube quiet unless asked for.
    let directives = if config.log_level.contains("kube") {
        config.log_level.clone()
    } else {
        format!("{},kube_client::client::builder=off", config.log_level)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!(
            "invalid --log-level {:?} ({e}); using info",
            config.log_level
        );
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and container logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match myelin_agent::daemon::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
