//! `pymesh-loadgen`: constant-rate, open-loop HTTP load with coordinated-omission
//! correction (wrk2-style). Prints a text summary, or one JSON object with `--json`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pymesh_loadgen::cli::Args;
use pymesh_loadgen::timer;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, and no backtrace.
            eprintln!("pymesh-loadgen: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config()?;
    timer::tune_thread();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(usize::from(args.threads))
            .on_thread_start(timer::tune_thread);
        builder
    }
    .enable_all()
    .build()
    .context("cannot start the async runtime")?;

    let report = runtime.block_on(pymesh_loadgen::run(&config))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
