use std::{io::IsTerminal as _, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use collector::{
    bootstrap::{self, Mysql, MysqlConfig},
    capture::{self, Capture},
    cli::{Cli, Command, OnOff, Output, Run, StatusFormat},
    inspect,
    instance::Instance,
    memory::{self, MemoryBudget, MemoryPlan},
    metrics,
    pipeline::Pipeline,
    publish::{self, BatchLimits, Broker, Fanout, PublisherShared},
    recording::Recorder,
    status::{BrokerStatus, PipelineCounters, StatusLine, Totals, if_rx_dropped},
    tcp::Flows,
    types::SessionKey,
};
use collector_common::Counters;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MRTE_LOG")
                // lapin logs the broker errors this agent reports itself, with advice.
                .unwrap_or_else(|_| "info,lapin=off".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mrte-collector: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        match cli.command {
            None => run(cli.run).await,
            Some(Command::Inspect(args)) => inspect::run(args.config()).await,
            Some(Command::PublishFile(args)) => {
                publish::publish_file(&args.path, &args.rabbitmq.config()).await
            }
        }
    };
    let code = match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mrte-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Everything was flushed and reported; a client library's blocking thread still waiting
    // on a socket must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(cli: Run) -> anyhow::Result<()> {
    let mut cfg = cli.capture.config(cli.interface());
    cfg.prepared = cli.prepared_statements == OnOff::On;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Installed before anything is attached: without a handler, a SIGUSR1 or a hangup (the
    // terminal closed) would end the agent on the spot.
    let mut sigusr1 =
        signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    // Everything that can be wrong with the input is found before the program is attached.
    cfg.check()?;
    let plan = MemoryPlan::new(
        cli.max_mem_mb,
        cli.capture.ring_buffer_mb.into(),
        cfg.transport,
    )?;
    let (to_broker, to_file) = cli.outputs();
    if cli
        .output
        .iter()
        .filter(|o| matches!(o, Output::File(_)))
        .count()
        > 1
    {
        anyhow::bail!("--output: one file:PATH at most");
    }
    // Created before anything is attached: an existing or unwritable path stops the agent.
    let recorder = to_file
        .map(|path| Recorder::create(path, cli.output_file_mb << 20))
        .transpose()?
        .map(|r| Arc::new(std::sync::Mutex::new(r)));
    let metrics_listener = match &cli.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    tracing::debug!(?plan, "memory plan");
    // One agent per interface; what one that died left in the kernel goes before we attach.
    let mut instance = Instance::acquire(&cfg.interface, &cfg.ports)?;
    instance.clean_up();
    let local_ip = match cli.local_ip {
        Some(ip) => ip,
        None => capture::interface_ipv4(cli.interface())?,
    };
    if cli.capture.snapshot_len != 0 {
        tracing::warn!(
            snapshot_len = cli.capture.snapshot_len,
            "segments longer than --snapshot_len are cut (counted as Truncated); a cut \
             session cannot be replayed. 0, the default, keeps whole segments"
        );
    }
    let counters = Arc::new(PipelineCounters::default());
    let broker = if to_broker {
        let broker_cfg = cli.rabbitmq.config();
        let broker = Broker::connect(&broker_cfg, counters.clone()).await?;
        tracing::info!(
            broker = %broker.addr(),
            exchange = %broker_cfg.exchange,
            routing_key = %broker_cfg.routing_key,
            %local_ip,
            "connected to RabbitMQ"
        );
        Some(broker)
    } else {
        None
    };
    if let Some(r) = &recorder {
        let path = r.lock().expect("recorder lock").path();
        tracing::info!(path = %path.display(), "recording the messages");
    }
    let mysql_cfg = MysqlConfig {
        host: cli.mysql_host.clone(),
        port: cli.mysql_port(),
        user: cli.mysql_user.clone(),
        password: cli.mysql_password.clone(),
        server_ports: cli.capture.port.clone(),
        connect_timeout: Duration::from_secs(cli.mysql_connect_timeout),
        second_pass: Duration::from_millis(cli.bootstrap_second_pass_ms),
        gc_interval: Duration::from_secs(cli.gc_interval),
    };
    // Connected before attaching, so that the collector's own connection is known and never
    // published, and bad credentials stop the agent before it captures anything.
    let (mut mysql, own) = match connect_mysql(&mysql_cfg).await {
        Ok((mysql, own)) => (Some(mysql), own),
        Err(e) if cli.mysql_optional => {
            tracing::warn!(
                "{e:#}; running without the session bootstrap until MySQL answers (--mysql_optional)"
            );
            (None, None)
        }
        Err(e) => return Err(e),
    };
    let budget = Arc::new(MemoryBudget::new(plan.queues));
    let latency = metrics::latency_histogram();
    let shared = PublisherShared {
        broker: broker.clone(),
        recorder: recorder.clone(),
        local_ip,
        budget: budget.clone(),
        counters: counters.clone(),
        latency: latency.clone(),
    };
    let mut publishers = publish::start_publishers(
        &shared,
        cli.thread_count.into(),
        cli.queue_size.map(u64::from),
    );
    drop(shared);
    let limits = BatchLimits {
        segments: cli.batch_segments,
        bytes: cli.batch_bytes as usize,
        max_wait: Duration::from_millis(cli.read_timeout),
    };
    let fanout = Fanout::new(
        local_ip,
        std::mem::take(&mut publishers.senders),
        limits,
        budget.clone(),
        counters.clone(),
    );
    // Everything captured is held until the first process-list read has put each session's
    // COM_INIT_DB in front of it.
    let mut pipeline = Pipeline::new(fanout, counters.clone(), true, cli.include_replication);
    pipeline.flows.set_prepared(cfg.prepared);
    pipeline.set_own(own);
    pipeline.set_memory(&plan);

    // The process list as capture begins: the database of sessions that change it, or end,
    // before the first read after attaching.
    if let Some(m) = mysql.as_mut() {
        match m.read().await {
            Ok(before) => pipeline.set_before(before),
            Err(e) => {
                PipelineCounters::add(&counters.mysql_errors, 1);
                tracing::warn!("{e}");
            }
        }
    }
    instance.attaching();
    let mut capture = Capture::attach(&cfg)?;
    instance.attached(capture.added_clsact());
    let stats_fd = if cli.bpf_stats {
        Some(capture::enable_bpf_stats().context("enabling BPF run-time statistics")?)
    } else {
        None
    };
    let info0 = capture.program_info().ok();
    let replies_info0 = cfg
        .prepared
        .then(|| capture.program_info_of(capture::REPLIES_PROGRAM_NAME).ok())
        .flatten();
    let mut drain = capture.take_drain()?.expect("fresh capture has its ring");
    let drain_stats = drain.shared_stats();
    let if_dropped_base = if_rx_dropped(cli.interface());
    let totals = |(kernel, replies): (Counters, Counters), waiting: u64, flows: &Flows| Totals {
        kernel,
        replies,
        drain: drain_stats.load(),
        pipeline: counters.load(),
        if_dropped: if_rx_dropped(cli.interface()).saturating_sub(if_dropped_base),
        waiting,
        flows: flows.len() as u64,
        reorder_bytes: flows.pending_bytes() as u64,
        queued_bytes: budget.used(),
        rss: memory::rss(),
        broker: broker.as_ref().map_or(BrokerStatus::None, |b| b.status()),
    };

    // The status line's and the metrics endpoint's snapshot.
    let snapshot = |capture: &Capture, pipeline: &Pipeline| {
        anyhow::Ok(totals(
            (capture.read_counters()?, capture.read_reply_counters()?),
            pipeline.fanout.waiting(),
            &pipeline.flows,
        ))
    };

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (again_tx, again_rx) = mpsc::unbounded_channel();
    let bootstrap = tokio::spawn(bootstrap::run(
        mysql_cfg,
        mysql,
        events_tx,
        again_rx,
        counters.clone(),
    ));

    let (metrics_tx, mut metrics_rx) = mpsc::channel::<metrics::TotalsRequest>(8);
    let metrics_server = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!("serving metrics on http://{addr}/metrics");
        }
        tokio::spawn(metrics::serve(l, metrics_tx, latency.clone()))
    });
    let json = cli.status_format == StatusFormat::Json;
    let mut status = StatusLine::new();
    let period = Duration::from_secs(cli.status_interval);
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    let mut last = Instant::now();
    let mut status_due = false;
    loop {
        let due = pipeline.next_due();
        tokio::select! {
            r = drain.drain_once(&mut pipeline) => { r?; }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                pipeline.on_due(Instant::now());
            }
            Some(event) = events.recv() => pipeline.on_event(event),
            Some(reply) = metrics_rx.recv() => {
                let _ = reply.send(snapshot(&capture, &pipeline)?);
            }
            _ = sigusr1.recv() => {
                tracing::info!("SIGUSR1: sending the session bootstrap again");
                let _ = again_tx.send(());
            }
            _ = ticker.tick() => status_due = true,
            _ = sighup.recv() => {
                tracing::info!(
                    "SIGHUP: a status line now; nothing is re-read (restart the agent to change \
                     its flags)"
                );
                status_due = true;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        if std::mem::take(&mut status_due) {
            let now = snapshot(&capture, &pipeline)?;
            let line = if json {
                status.next_json(&now, last.elapsed())
            } else {
                status.next(&now, last.elapsed())
            };
            print_status(&line);
            last = Instant::now();
            if let Some(r) = &recorder
                && let Err(e) = r.lock().expect("recorder lock").flush()
            {
                // Buffered messages may be missing from the recording.
                PipelineCounters::add(&counters.record_errors, 1);
                tracing::error!("{e}");
            }
            pipeline.expire(last, FLOW_IDLE);
        }
    }
    drain.drain_now(&mut pipeline);
    let kernel = (capture.read_counters()?, capture.read_reply_counters()?);
    let mut kernel_cost = Vec::new();
    if stats_fd.is_some() {
        let cost = [
            (
                info0,
                capture::PROGRAM_NAME,
                ["kernel_runs", "kernel_ns_per_packet"],
            ),
            (
                replies_info0,
                capture::REPLIES_PROGRAM_NAME,
                ["reply_kernel_runs", "reply_kernel_ns_per_packet"],
            ),
        ];
        for (before, name, [runs_name, ns_name]) in cost {
            let (Some(a), Ok(b)) = (before, capture.program_info_of(name)) else {
                continue;
            };
            let runs = b.run_count() - a.run_count();
            let ns = (b.run_time() - a.run_time()).as_nanos();
            if runs > 0 {
                kernel_cost.push((runs_name, runs));
                kernel_cost.push((ns_name, (ns as f64 / runs as f64).round() as u64));
            }
        }
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    capture.detach()?;
    // Clean-up of the lock (and of a qdisc we added, once unused): after the detach.
    drop(instance);
    bootstrap.abort();

    // What was captured is published before the agent exits.
    pipeline.finish(Instant::now());
    let waiting = pipeline.fanout.waiting();
    let flows = std::mem::take(&mut pipeline.flows);
    drop(pipeline);
    let late = publishers.join(SHUTDOWN_GRACE).await;
    if late > 0 {
        tracing::error!(
            publishers = late,
            batches_waiting = waiting,
            "publishers did not finish within {SHUTDOWN_GRACE:?}; what they still held is \
             lost (exit_unpublished, mq_in_flight_units)"
        );
    }
    if let Some(broker) = &broker {
        broker.close().await;
    }
    if let Some(r) = &recorder {
        let mut r = r.lock().expect("recorder lock");
        if let Err(e) = r.flush() {
            tracing::error!("{e}");
        }
    }
    let end = totals(kernel, 0, &flows);
    if json {
        print_status(&StatusLine::summary_json(&end, &kernel_cost));
    } else {
        let mut line = StatusLine::summary(&end);
        for (k, v) in kernel_cost {
            line.push_str(&format!(" {k}={v}"));
        }
        print_status(&line);
    }
    Ok(())
}

/// Writes a status line to stdout. A closed stdout (the terminal gone, a reader that quit)
/// must not stop the capture, as `println!` would by panicking.
fn print_status(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        tracing::debug!("stdout is closed; status line not printed");
    }
}

/// Connects to MySQL and reads the process list once: the credentials and the PROCESS
/// privilege are checked, and the collector's own connection is known before capture starts.
async fn connect_mysql(cfg: &MysqlConfig) -> anyhow::Result<(Mysql, Option<SessionKey>)> {
    let mut mysql = Mysql::connect(cfg).await?;
    mysql.check_process_privilege().await?;
    let own = mysql.read().await?.own;
    Ok((mysql, own))
}

/// Sessions silent this long are forgotten by the flow table.
const FLOW_IDLE: Duration = Duration::from_secs(15 * 60);
/// How long publishers get at exit to hand their queues to the broker.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
