//! The agent: every stage wired together, from the checks before capture starts to the exit
//! summary. [`Agent::start`] checks the input and connects (before anything is attached),
//! then attaches; [`Agent::run_until_signal`] drains, publishes and reports until SIGINT or
//! SIGTERM; [`Agent::shutdown`] detaches, publishes what was captured and prints the totals.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

use crate::{
    bootstrap::{self, Event, Mysql, MysqlConfig},
    capture::{self, Capture, CaptureConfig, Drain},
    instance::Instance,
    memory::{MemoryBudget, MemoryPlan},
    metrics,
    pipeline::Pipeline,
    publish::{self, BatchLimits, Broker, BrokerConfig, Fanout, PublisherShared, Publishers},
    recording::{Recorder, RecordingWriter},
    status::{BrokerStatus, KernelCost, PipelineCounters, StatusLine, Totals, TotalsReader},
    types::SessionKey,
};

/// Everything the agent runs with, checked by [`Agent::start`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub capture: CaptureConfig,
    pub max_mem_mb: u64,
    pub ring_buffer_mb: u64,
    /// Publish to RabbitMQ (else only to the recording).
    pub broker: Option<BrokerConfig>,
    /// A recording, and the size of each of its files.
    pub recording: Option<(PathBuf, u64)>,
    pub metrics_addr: Option<String>,
    /// LOCAL_IP of every message; the interface's IPv4 address if not given.
    pub local_ip: Option<Ipv4Addr>,
    pub snapshot_len: u32,
    pub mysql: MysqlConfig,
    /// Run without the session bootstrap when MySQL cannot be reached at start.
    pub mysql_optional: bool,
    pub publishers: usize,
    pub queue_size: Option<u64>,
    pub batch: BatchLimits,
    pub include_replication: bool,
    pub bpf_stats: bool,
    pub status_interval: Duration,
    pub status_json: bool,
}

/// Sessions silent this long are forgotten by the flow table.
const FLOW_IDLE: Duration = Duration::from_secs(15 * 60);
/// How often idle flows and the ended-session maps are pruned at least (else with each status
/// line): with --status_interval=3600 they would grow for an hour.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// How long publishers get at exit to hand their queues to the broker.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The signals the agent answers; installed before anything is attached: without a handler,
/// a SIGUSR1 or a hangup (the terminal closed) would end the agent on the spot.
struct Signals {
    int: Signal,
    term: Signal,
    usr1: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let one = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Self {
            int: one(SignalKind::interrupt(), "SIGINT")?,
            term: one(SignalKind::terminate(), "SIGTERM")?,
            usr1: one(SignalKind::user_defined1(), "SIGUSR1")?,
            hup: one(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

pub struct Agent {
    cfg: AgentConfig,
    signals: Signals,
    instance: Instance,
    capture: Capture,
    drain: Drain,
    pipeline: Pipeline,
    publishers: Publishers,
    broker: Option<Arc<Broker>>,
    recorder: Option<RecordingWriter>,
    totals: TotalsReader,
    kernel_cost: Option<KernelCost>,
    bootstrap: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<Event>,
    again: mpsc::UnboundedSender<()>,
    metrics_server: Option<JoinHandle<()>>,
    metrics_rx: mpsc::Receiver<metrics::TotalsRequest>,
}

impl Agent {
    /// Everything that can be wrong with the input is found before the programs are
    /// attached; then the agent attaches and starts the bootstrap, publishers and metrics.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        let signals = Signals::install()?;
        cfg.capture.check()?;
        let plan = MemoryPlan::new(cfg.max_mem_mb, cfg.ring_buffer_mb, cfg.capture.transport)?;
        // Created before anything is attached: an existing or unwritable path stops the agent.
        let recorder = cfg
            .recording
            .as_ref()
            .map(|(path, file_mb)| Recorder::create(path, file_mb << 20))
            .transpose()?;
        let metrics_listener = match &cfg.metrics_addr {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        tracing::debug!(?plan, "memory plan");
        // One agent per interface; what one that died left in the kernel goes before we attach.
        let mut instance = Instance::acquire(&cfg.capture.interface, &cfg.capture.ports)?;
        instance.clean_up();
        let local_ip = match cfg.local_ip {
            Some(ip) => ip,
            None => capture::interface_ipv4(&cfg.capture.interface)?,
        };
        if cfg.snapshot_len != 0 {
            tracing::warn!(
                snapshot_len = cfg.snapshot_len,
                "segments longer than --snapshot_len are cut (counted as Truncated); a cut \
                 session cannot be replayed. 0, the default, keeps whole segments"
            );
        }
        let counters = Arc::new(PipelineCounters::default());
        let broker = connect_broker(&cfg, &counters, local_ip).await?;
        if let Some(r) = &recorder {
            tracing::info!(path = %r.path().display(), "recording the messages");
        }
        // Connected before attaching, so that the collector's own connection is known and
        // never published, and bad credentials stop the agent before it captures anything.
        let (mut mysql, own) = match connect_mysql(&cfg.mysql).await {
            Ok((mysql, own)) => (Some(mysql), own),
            Err(e) if cfg.mysql_optional => {
                tracing::warn!(
                    "{e:#}; running without the session bootstrap until MySQL answers \
                     (--mysql_optional)"
                );
                (None, None)
            }
            Err(e) => return Err(e),
        };
        let budget = Arc::new(MemoryBudget::new(plan.queues));
        let (recorder, recording_queue) = match recorder {
            Some(r) => {
                let (writer, queue) = RecordingWriter::start(r, budget.clone(), counters.clone())
                    .context("starting the recording's thread")?;
                (Some(writer), Some(queue))
            }
            None => (None, None),
        };
        let latency = metrics::latency_histogram();
        let shared = PublisherShared {
            broker: broker.clone(),
            recorder: recording_queue,
            local_ip,
            budget: budget.clone(),
            counters: counters.clone(),
            latency: latency.clone(),
        };
        let mut publishers = publish::start_publishers(&shared, cfg.publishers, cfg.queue_size);
        drop(shared);
        let mut pipeline = new_pipeline(&cfg, &plan, &mut publishers, &budget, &counters, local_ip);
        pipeline.set_own(own);

        // The process list as capture begins: the database of sessions that change it, or
        // end, before the first read after attaching.
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
        let mut capture = Capture::attach(&cfg.capture)?;
        instance.attached(capture.added_clsact());
        let kernel_cost = if cfg.bpf_stats {
            Some(KernelCost::start(&capture, cfg.capture.prepared)?)
        } else {
            None
        };
        let drain = capture.take_drain()?.expect("fresh capture has its ring");
        let totals = TotalsReader::new(
            &cfg.capture.interface,
            drain.shared_stats(),
            counters.clone(),
            budget,
        );

        let (events_tx, events) = mpsc::unbounded_channel();
        let (again, again_rx) = mpsc::unbounded_channel();
        let bootstrap = tokio::spawn(bootstrap::run(
            cfg.mysql.clone(),
            mysql,
            events_tx,
            again_rx,
            counters.clone(),
        ));
        let (metrics_tx, metrics_rx) = mpsc::channel::<metrics::TotalsRequest>(8);
        let metrics_server = metrics_listener.map(|l| {
            if let Ok(addr) = l.local_addr() {
                tracing::info!("serving metrics on http://{addr}/metrics");
            }
            tokio::spawn(metrics::serve(l, metrics_tx, latency))
        });
        Ok(Self {
            cfg,
            signals,
            instance,
            capture,
            drain,
            pipeline,
            publishers,
            broker,
            recorder,
            totals,
            kernel_cost,
            bootstrap,
            events,
            again,
            metrics_server,
            metrics_rx,
        })
    }

    /// The status line's and the metrics endpoint's snapshot.
    fn snapshot(&self) -> anyhow::Result<Totals> {
        let kernel = (
            self.capture.read_counters()?,
            self.capture.read_reply_counters()?,
        );
        Ok(self.totals.read(
            kernel,
            self.pipeline.fanout.waiting(),
            &self.pipeline.flows,
            self.broker_status(),
        ))
    }

    fn broker_status(&self) -> BrokerStatus {
        self.broker
            .as_ref()
            .map_or(BrokerStatus::None, |b| b.status())
    }

    /// Drains, publishes and reports until SIGINT or SIGTERM.
    pub async fn run_until_signal(&mut self) -> anyhow::Result<()> {
        let mut status = StatusLine::new();
        let period = self.cfg.status_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        let mut last = Instant::now();
        let mut status_due = false;
        let mut other_host_told = false;
        let every = period.min(EXPIRE_EVERY);
        let mut expire = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            let due = self.pipeline.next_due();
            tokio::select! {
                r = self.drain.drain_once(&mut self.pipeline) => { r?; }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.pipeline.on_due(Instant::now());
                }
                Some(event) = self.events.recv() => self.pipeline.on_event(event),
                Some(reply) = self.metrics_rx.recv() => {
                    let _ = reply.send(self.snapshot()?);
                }
                _ = self.signals.usr1.recv() => {
                    tracing::info!("SIGUSR1: sending the session bootstrap again");
                    let _ = self.again.send(());
                }
                _ = ticker.tick() => status_due = true,
                _ = expire.tick() => self.pipeline.expire(Instant::now(), FLOW_IDLE),
                _ = self.signals.hup.recv() => {
                    tracing::info!(
                        "SIGHUP: a status line now; nothing is re-read (restart the agent to \
                         change its flags)"
                    );
                    status_due = true;
                }
                _ = self.signals.int.recv() => return Ok(()),
                _ = self.signals.term.recv() => return Ok(()),
            }
            if std::mem::take(&mut status_due) {
                let now = self.snapshot()?;
                let line = if self.cfg.status_json {
                    status.next_json(&now, last.elapsed())
                } else {
                    status.next(&now, last.elapsed())
                };
                print_status(&line);
                last = Instant::now();
                let other_host = now.kernel.get(collector_common::Counter::OtherHost);
                if other_host > 0 && !std::mem::replace(&mut other_host_told, true) {
                    tracing::warn!(
                        interface = %self.cfg.capture.interface,
                        "{other_host} segments to the MySQL port(s) came for other hosts' MAC \
                         addresses and were left out (other_host): on a bridge port or a \
                         macvlan parent, capture on the bridge or the macvlan, or pass \
                         --other_hosts to take them"
                    );
                }
            }
        }
    }

    /// Detaches, reads the kernel's final counters, drains the ring, publishes what was
    /// captured (within [`SHUTDOWN_GRACE`]), closes the broker connection and the recording,
    /// and prints the exit summary. Each step runs even if one before it failed (the first
    /// error is returned): every record the kernel counted is drained, and the summary says
    /// what became of it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let Self {
            cfg,
            instance,
            mut capture,
            mut drain,
            mut pipeline,
            publishers,
            broker,
            recorder,
            totals,
            kernel_cost,
            bootstrap,
            metrics_server,
            ..
        } = self;
        if let Some(m) = metrics_server {
            m.abort();
        }
        // Detached first: nothing the kernel counts after this is left unread.
        let mut failed = capture.detach_programs().err().map(anyhow::Error::from);
        let mut keep = |r: Result<_, crate::capture::CaptureError>| {
            r.unwrap_or_else(|e| {
                tracing::error!("{e:#}");
                failed.get_or_insert(e.into());
                Default::default()
            })
        };
        let kernel = (
            keep(capture.read_counters()),
            keep(capture.read_reply_counters()),
        );
        let cost = kernel_cost.map(|k| k.since(&capture)).unwrap_or_default();
        drain.drain_now(&mut pipeline);
        drop(capture);
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
        let broker_status = broker.as_ref().map_or(BrokerStatus::None, |b| b.status());
        if let Some(broker) = &broker {
            broker.close().await;
        }
        // The publishers are done with its queue: the writer writes what is left and ends.
        if let Some(r) = recorder {
            r.finish(SHUTDOWN_GRACE).await;
        }
        let end = totals.read(kernel, 0, &flows, broker_status);
        if cfg.status_json {
            print_status(&StatusLine::summary_json(&end, &cost));
        } else {
            let mut line = StatusLine::summary(&end);
            for (k, v) in cost {
                line.push_str(&format!(" {k}={v}"));
            }
            print_status(&line);
        }
        failed.map_or(Ok(()), Err)
    }
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

/// Connects to the broker (checks the exchange), if messages go to one.
async fn connect_broker(
    cfg: &AgentConfig,
    counters: &Arc<PipelineCounters>,
    local_ip: Ipv4Addr,
) -> anyhow::Result<Option<Arc<Broker>>> {
    let Some(broker_cfg) = &cfg.broker else {
        return Ok(None);
    };
    let broker = Broker::connect(broker_cfg, counters.clone()).await?;
    tracing::info!(
        broker = %broker.addr(),
        exchange = %broker_cfg.exchange,
        routing_key = %broker_cfg.routing_key,
        %local_ip,
        "connected to RabbitMQ"
    );
    Ok(Some(broker))
}

/// The pipeline in front of the publishers' queues (whose senders the fan-out takes).
/// Everything captured is held until the first process-list read has put each session's
/// COM_INIT_DB in front of it.
fn new_pipeline(
    cfg: &AgentConfig,
    plan: &MemoryPlan,
    publishers: &mut Publishers,
    budget: &Arc<MemoryBudget>,
    counters: &Arc<PipelineCounters>,
    local_ip: Ipv4Addr,
) -> Pipeline {
    let fanout = Fanout::new(
        local_ip,
        std::mem::take(&mut publishers.senders),
        cfg.batch,
        budget.clone(),
        counters.clone(),
    );
    let mut pipeline = Pipeline::new(fanout, counters.clone(), true, cfg.include_replication);
    pipeline.flows.set_prepared(cfg.capture.prepared);
    pipeline.flows.set_command_budget(budget.clone());
    pipeline.set_drain_cadence(cfg.capture.wakeup_interval);
    pipeline.set_memory(plan);
    pipeline
}
