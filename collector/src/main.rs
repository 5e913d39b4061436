use std::{io::IsTerminal as _, process::ExitCode, time::Instant};

use anyhow::Context as _;
use clap::Parser as _;
use collector::{
    capture::{Capture, CaptureConfig, Record, RecordSink},
    cli::Cli,
    status::{StatusLine, Totals, if_rx_dropped},
};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MRTE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mrte-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counts what the capture hands over (the stage the publishers plug into).
#[derive(Default)]
struct CountingSink {
    records: u64,
}

impl RecordSink for CountingSink {
    fn push(&mut self, _record: Record) {
        self.records += 1;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = CaptureConfig {
        interface: cli.interface.clone(),
        ports: cli.port.clone(),
        snap_len: cli.snapshot_len,
        ring_bytes: cli.ring_buffer_mb << 20,
        attach_mode: cli.attach_mode,
        transport: cli.transport.into(),
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let mut capture = Capture::attach(&cfg)?;
    let mut drain = capture.take_drain()?.expect("fresh capture has its ring");
    let if_dropped_base = if_rx_dropped(&cli.interface);
    let totals = |capture: &Capture| -> anyhow::Result<Totals> {
        Ok(Totals {
            kernel: capture.read_counters()?,
            if_dropped: if_rx_dropped(&cli.interface).saturating_sub(if_dropped_base),
            ..Totals::default()
        })
    };

    let mut sink = CountingSink::default();
    let mut status = StatusLine::new();
    let period = std::time::Duration::from_secs(cli.status_interval);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            r = drain.drain_once(&mut sink) => { r?; }
            _ = ticker.tick() => {
                let now = totals(&capture)?;
                println!("{}", status.next(&now, last.elapsed()));
                last = Instant::now();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drain.drain_now(&mut sink);
    let end = totals(&capture)?;
    capture.detach()?;
    println!("{}", StatusLine::summary(&end));
    tracing::info!(records = sink.records, "stopped");
    Ok(())
}
