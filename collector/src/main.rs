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

/// Where records go until the publishers (the next stage) plug in; the drain counts them.
struct Discard;

impl RecordSink for Discard {
    fn push(&mut self, _record: Record) {}
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = CaptureConfig {
        interface: cli.interface.clone(),
        ports: cli.port.clone(),
        snap_len: cli.snapshot_len,
        ring_bytes: cli.ring_buffer_mb << 20,
        attach_mode: cli.attach_mode,
        transport: cli.transport.into(),
        wakeup_interval: std::time::Duration::from_micros(cli.wakeup_interval_us),
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let mut capture = Capture::attach(&cfg)?;
    let stats_fd = if cli.bpf_stats {
        Some(collector::capture::enable_bpf_stats().context("enabling BPF run-time statistics")?)
    } else {
        None
    };
    let info0 = capture.program_info().ok();
    let mut drain = capture.take_drain()?.expect("fresh capture has its ring");
    let drain_stats = drain.shared_stats();
    let if_dropped_base = if_rx_dropped(&cli.interface);
    let totals = |capture: &Capture| -> anyhow::Result<Totals> {
        let d = drain_stats.load();
        Ok(Totals {
            kernel: capture.read_counters()?,
            // Records lost or unreadable between the kernel and the pipeline.
            user_dropped: d.lost + d.malformed,
            if_dropped: if_rx_dropped(&cli.interface).saturating_sub(if_dropped_base),
            ..Totals::default()
        })
    };

    let mut sink = Discard;
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
    let mut summary = StatusLine::summary(&end);
    if let (Some(_), Some(a), Ok(b)) = (&stats_fd, info0, capture.program_info()) {
        let runs = b.run_count() - a.run_count();
        let ns = (b.run_time() - a.run_time()).as_nanos();
        if runs > 0 {
            summary.push_str(&format!(
                " kernel_runs={runs} kernel_ns_per_packet={:.0}",
                ns as f64 / runs as f64
            ));
        }
    }
    capture.detach()?;
    println!("{summary}");
    let d = drain.stats;
    tracing::info!(
        records = d.records,
        bytes = d.bytes,
        malformed = d.malformed,
        lost = d.lost,
        "stopped"
    );
    Ok(())
}
