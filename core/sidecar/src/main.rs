//! `pymesh-proxy`: the native sidecar. Reads a config file, runs the engine, reloads
//! on SIGHUP or when the file changes, and drains on SIGTERM/SIGINT before exiting 0.
//! `pymesh-proxy init` installs the redirect rules of a transparent sidecar instead (see init.rs).

mod allocator;
mod code_pages;
mod init;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pymesh_engine::{config, Proxy};
use tokio::signal::unix::{signal, SignalKind};
use watch::{FileWatch, Stamp};

#[derive(Parser, Debug)]
#[command(name = "pymesh-proxy", version, about = "The pymesh sidecar proxy")]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The proxy configuration (YAML or JSON, the protobuf JSON mapping of ProxyConfig).
    #[arg(long, short, env = "PYMESH_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `pymesh_engine=debug`.
    #[arg(long, env = "PYMESH_LOG", default_value = "info")]
    log: String,
    /// Log format: `plain` or `json`.
    #[arg(long, env = "PYMESH_LOG_FORMAT", default_value = "plain")]
    log_format: String,
    /// Worker threads for the engine.
    #[arg(long, env = "PYMESH_THREADS", default_value_t = 1)]
    threads: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "PYMESH_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// How often to check the config file for changes; 0s turns watching off.
    #[arg(long, env = "PYMESH_WATCH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    watch_interval: Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install the transparent-proxy redirect rules in this network namespace (an init step).
    Init(init::InitArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| c.is_alphabetic())
            .unwrap_or(s.len()),
    );
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Init(init_args)) = args.command {
        return init::main(init_args);
    }
    let result = init_logging(&args.log, &args.log_format).and_then(|()| {
        // One thread (the default) runs everything on this one: no work-stealing
        // machinery, fewer wake-ups, the least CPU per request.
        let mut builder = if args.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder
                .worker_threads(args.threads)
                .thread_name("pymesh-worker");
            builder
        };
        let runtime = builder
            .enable_all()
            .build()
            .context("starting the runtime")?;
        runtime.block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on, not a debug dump.
            eprintln!("pymesh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        "json" => builder.json().init(),
        "plain" => builder.init(),
        other => anyhow::bail!("--log-format {other:?}: expected plain or json"),
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let config_path = args.config.clone().context("--config is required")?;
    let path = config_path.display();
    // Before anything is announced: a change or a SIGHUP that follows the announcement must
    // not be taken for the starting version, nor end the process (SIGHUP's default).
    let mut file = FileWatch::new(Stamp::of(&config_path));
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let initial = config::load_file(&config_path)
        .map_err(|e| anyhow::anyhow!("invalid config {path}: {e}"))?;
    let proxy = Proxy::start(initial)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start from {path}: {e}"))?;
    for (name, addr) in proxy.listeners() {
        // One line per listener on stdout, so a supervisor (or a test) learns the ports.
        println!("listening {name} {addr}");
    }
    println!("admin {}", proxy.admin_addr());
    // Start-up is done: the code only it ran need not stay resident.
    match code_pages::release() {
        Ok(bytes) => tracing::debug!(bytes, "start-up code pages released"),
        Err(e) => tracing::debug!(error = %e, "start-up code pages kept"),
    }

    let mut watch = tokio::time::interval(if args.watch_interval.is_zero() {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        args.watch_interval
    });
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                file.applied(Stamp::of(&config_path));
                reload(&proxy, &config_path).await;
            }
            _ = watch.tick(), if !args.watch_interval.is_zero() => {
                if file.poll(Stamp::of(&config_path)) {
                    reload(&proxy, &config_path).await;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            () = proxy.stop_requested() => break,
        }
    }
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    let drained = proxy.shutdown(args.shutdown_grace).await;
    if !drained {
        tracing::warn!("grace period over; closing the connections still open");
    }
    Ok(())
}

async fn reload(proxy: &Proxy, path: &Path) {
    match std::fs::read_to_string(path) {
        // The engine logs (and counts) the outcome of a reload itself.
        Ok(text) => {
            let _ = proxy.reload_text(&text).await;
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the config; the running one stays")
        }
    }
}
