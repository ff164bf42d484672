//! `pymesh-backend`: a minimal fast test server for pymesh benchmarks (HTTP/1.1, h2c, gRPC
//! echo, TCP echo). Prints `listening on IP:PORT` once bound; exits on SIGTERM or SIGINT.

mod cli;
mod signals;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, and no backtrace.
            eprintln!("pymesh-backend: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(args.threads));
        builder
    }
    .enable_all()
    .build()
    .context("cannot start the async runtime")?;

    runtime.block_on(async {
        let shutdown = signals::shutdown().context("cannot install signal handlers")?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let bound = listener
            .local_addr()
            .context("cannot read the bound address")?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {bound}").context("cannot write to stdout")?;
        stdout.flush().context("cannot write to stdout")?;
        drop(stdout);
        pymesh_backend::serve(listener, args.config(), shutdown)
            .await
            .context("server failed")
    })
}
