//! Publishing: the RabbitMQ connection, the fan-out of units to `--thread_count` publisher
//! tasks, batching, and the publishers themselves.
//!
//! Each publisher owns one AMQP channel and a bounded queue of batches. A session's units
//! always go to the same publisher (a hash of client address and port), so they stay in order
//! on one channel. The fan-out runs on the drain's task and never waits: a full queue or an
//! exhausted memory budget drops the batch, counts its units and logs (at most every 10 s).
//!
//! When the broker goes away, publishers keep their batches and reconnect (1 s doubling to
//! 30 s, one reconnection shared by all); meanwhile their queues fill up to `--queue_size` and
//! the memory budget, past which the fan-out drops. A session that lost units on the way (a
//! dropped batch, a nacked message, a message unconfirmed when the channel broke) is ended for
//! the consumer as after a TCP gap: a synthetic COM_QUIT in its place, then nothing of the
//! session until a unit that starts a command.

use std::{
    collections::VecDeque,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

// Flow keys come from the network: a seeded hasher, but far cheaper per segment than SipHash.
use foldhash::HashSet;

use bytes::BytesMut;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    types::FieldTable,
    uri::{AMQPAuthority, AMQPQueryString, AMQPUri, AMQPUserInfo},
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use prometheus_client::metrics::histogram::Histogram;

use crate::{
    encode, memory::MemoryBudget, protocol::starts_command, recording::SharedRecorder,
    status::PipelineCounters,
};

/// Where and how to publish.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
    pub exchange: String,
    pub routing_key: String,
    /// Create the exchange (fanout, durable) instead of only checking that it exists.
    pub declare: bool,
    /// With `declare`: also create this queue (durable) and bind it to the exchange.
    pub queue: Option<String>,
    /// Publisher confirms: a nack counts as an MQ error.
    pub confirm: bool,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "cannot reach RabbitMQ at {addr} ({cause}): is the broker running and listening there? \
         (--rabbitmq_host, --rabbitmq_port)"
    )]
    Unreachable { addr: String, cause: lapin::Error },
    #[error("no answer from RabbitMQ at {addr} within {secs} s (--rabbitmq_host, --rabbitmq_port)")]
    Timeout { addr: String, secs: u64 },
    #[error(
        "RabbitMQ at {addr} refused the login of user {user:?}: check --rabbitmq_user and \
         --rabbitmq_password (or MRTE_RABBITMQ_PASSWORD). Note that RabbitMQ lets the guest user \
         in only from localhost."
    )]
    LoginRefused { addr: String, user: String },
    #[error(
        "RabbitMQ at {addr} refused access to vhost {vhost:?} for user {user:?}: does the vhost \
         exist, and may the user use it? (--rabbitmq_vhost)"
    )]
    VhostRefused {
        addr: String,
        vhost: String,
        user: String,
    },
    #[error(
        "exchange {exchange:?} does not exist on vhost {vhost:?} at {addr}: create it \
         (rabbitmqadmin declare exchange name={exchange} type=fanout durable=true), name \
         another with --rabbitmq_exchange_name, or pass --rabbitmq_declare to have it created"
    )]
    ExchangeMissing {
        addr: String,
        vhost: String,
        exchange: String,
    },
    #[error("RabbitMQ at {addr}: {what} failed")]
    Amqp {
        addr: String,
        what: String,
        #[source]
        source: lapin::Error,
    },
}

fn amqp_kind(e: &lapin::Error) -> Option<&AMQPErrorKind> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.kind()),
        _ => None,
    }
}

/// The connection to the broker, checked: the login works and the exchange exists. Shared by
/// the publishers, which reopen it (one of them, the others wait) when it breaks.
pub struct Broker {
    conn: tokio::sync::Mutex<Connection>,
    cfg: BrokerConfig,
}

impl Broker {
    pub fn addr(&self) -> String {
        self.cfg.addr()
    }

    /// Connects, logs in, and checks (or with `declare`, creates) the exchange.
    pub async fn connect(cfg: &BrokerConfig) -> Result<Self, PublishError> {
        Ok(Self {
            conn: tokio::sync::Mutex::new(open(cfg).await?),
            cfg: cfg.clone(),
        })
    }

    /// A plain channel on the current connection (no confirms), e.g. for `publish-file`.
    pub async fn open_channel(&self) -> Result<Channel, PublishError> {
        let conn = self.conn.lock().await;
        conn.create_channel()
            .await
            .map_err(amqp(&self.cfg, "opening a channel"))
    }

    /// A channel for publisher `index` (with confirms, if asked) on the current connection.
    async fn channel(&self, conn: &Connection, index: usize) -> Result<Channel, PublishError> {
        let channel = conn.create_channel().await.map_err(amqp(
            &self.cfg,
            format!("opening channel for publisher {index}"),
        ))?;
        if self.cfg.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(amqp(&self.cfg, "turning on publisher confirms"))?;
        }
        Ok(channel)
    }

    /// A new channel after the old one broke: the connection is opened again if it is gone
    /// and the exchange checked again; retried with backoff (1 s doubling to 30 s) until it
    /// works, each failure counted (MQError) and logged (at most every 10 s).
    async fn reopen(&self, index: usize, counters: &PipelineCounters) -> Channel {
        let mut delay = Duration::from_secs(1);
        let mut log = Throttled::default();
        loop {
            let attempt = async {
                let mut conn = self.conn.lock().await;
                if !conn.status().connected() {
                    *conn = open(&self.cfg).await?;
                    PipelineCounters::add(&counters.mq_reconnects, 1);
                    tracing::info!(broker = %self.addr(), "connected to RabbitMQ again");
                } else {
                    check_exchange(&self.cfg, &conn).await?;
                }
                self.channel(&conn, index).await
            };
            match attempt.await {
                Ok(channel) => return channel,
                Err(e) => {
                    PipelineCounters::add(&counters.mq_errors, 1);
                    log.hit(Instant::now(), |more| {
                        tracing::warn!(
                            publisher = index,
                            retry_in = ?delay,
                            similar_since_last_warning = more,
                            "{e}; batches wait in memory meanwhile (--queue_size, --max_mem_mb)"
                        )
                    });
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Closes the connection politely (after the publishers finished).
    pub async fn close(&self) {
        let conn = self.conn.lock().await;
        let _ = conn.close(200, "mrte-collector stopping".into()).await;
    }
}

fn amqp(cfg: &BrokerConfig, what: impl Into<String>) -> impl FnOnce(lapin::Error) -> PublishError {
    let addr = cfg.addr();
    let what = what.into();
    move |source| PublishError::Amqp { addr, what, source }
}

/// Connects and logs in, then checks the exchange.
async fn open(cfg: &BrokerConfig) -> Result<Connection, PublishError> {
    let conn = login(cfg).await?;
    check_exchange(cfg, &conn).await?;
    Ok(conn)
}

/// Connects and logs in, nothing more (e.g. to consume a queue).
pub async fn login(cfg: &BrokerConfig) -> Result<Connection, PublishError> {
    let addr = cfg.addr();
    let uri = AMQPUri {
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: cfg.user.clone(),
                password: cfg.password.clone(),
            },
            host: cfg.host.clone(),
            port: cfg.port,
        },
        vhost: cfg.vhost.clone(),
        query: AMQPQueryString {
            connection_timeout: Some(cfg.connect_timeout.as_millis() as u64),
            ..Default::default()
        },
        ..Default::default()
    };
    let props = ConnectionProperties::default()
        .with_connection_name(format!("mrte-collector pid {}", std::process::id()).into());
    let conn = tokio::time::timeout(cfg.connect_timeout, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| PublishError::Timeout {
            addr: addr.clone(),
            secs: cfg.connect_timeout.as_secs(),
        })?
        .map_err(|e| match amqp_kind(&e) {
            Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => PublishError::LoginRefused {
                addr: addr.clone(),
                user: cfg.user.clone(),
            },
            Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)) => PublishError::VhostRefused {
                addr: addr.clone(),
                vhost: cfg.vhost.clone(),
                user: cfg.user.clone(),
            },
            _ if e.is_io_error() => PublishError::Unreachable {
                addr: addr.clone(),
                cause: e,
            },
            _ => PublishError::Amqp {
                addr: addr.clone(),
                what: "connecting".into(),
                source: e,
            },
        })?;
    Ok(conn)
}

/// Checks (or with `declare`, creates) the exchange, and the queue with its binding.
async fn check_exchange(cfg: &BrokerConfig, conn: &Connection) -> Result<(), PublishError> {
    // The default exchange ("") always exists and cannot be declared.
    if cfg.exchange.is_empty() && !cfg.declare {
        return Ok(());
    }
    // A failed declare closes its channel: use one for the checks only.
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp(cfg, "opening a channel"))?;
    let options = ExchangeDeclareOptions {
        passive: !cfg.declare,
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        ExchangeKind::Fanout,
        options,
        FieldTable::default(),
    )
    .await
    .map_err(|e| match amqp_kind(&e) {
        Some(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) => PublishError::ExchangeMissing {
            addr: cfg.addr(),
            vhost: cfg.vhost.clone(),
            exchange: cfg.exchange.clone(),
        },
        _ => amqp(
            cfg,
            format!(
                "declaring exchange {:?} (fanout, durable; an existing exchange of that name \
                 must match)",
                cfg.exchange
            ),
        )(e),
    })?;
    if let (true, Some(queue)) = (cfg.declare, &cfg.queue) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .map_err(amqp(cfg, format!("declaring queue {queue:?}")))?;
        ch.queue_bind(
            queue.as_str().into(),
            cfg.exchange.as_str().into(),
            cfg.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(
            cfg,
            format!("binding queue {queue:?} to exchange {:?}", cfg.exchange),
        ))?;
    }
    let _ = ch.close(200, "checked".into()).await;
    Ok(())
}

impl BrokerConfig {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What every publisher shares.
#[derive(Clone)]
pub struct PublisherShared {
    /// The broker, unless messages only go to a recording.
    pub broker: Option<Arc<Broker>>,
    /// The recording, if messages go to a file too (or only).
    pub recorder: Option<SharedRecorder>,
    /// LOCAL_IP of the synthetic messages publishers make themselves.
    pub local_ip: Ipv4Addr,
    pub budget: Arc<MemoryBudget>,
    pub counters: Arc<PipelineCounters>,
    /// Capture-to-publish latency of each message.
    pub latency: Histogram,
}

/// Opens one channel per publisher (if there is a broker) and starts the publisher tasks.
pub async fn start_publishers(
    shared: &PublisherShared,
    count: usize,
    queue_size: usize,
) -> Result<Publishers, PublishError> {
    let mut senders = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let channel = match &shared.broker {
            Some(broker) => {
                let conn = broker.conn.lock().await;
                Some(broker.channel(&conn, index).await?)
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(queue_size);
        let publisher = Publisher {
            index,
            shared: shared.clone(),
            broken: HashSet::default(),
            record_errors: Throttled::default(),
        };
        tasks.push(tokio::spawn(async move {
            match channel {
                Some(channel) => publisher.run(channel, rx).await,
                None => publisher.run_to_file(rx).await,
            }
        }));
        senders.push(tx);
    }
    Ok(Publishers { senders, tasks })
}

/// What the original sent: text/plain, transient, no headers.
pub fn message_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(1)
}

/// The running publishers: their queues' senders (taken by the [`Fanout`]) and their tasks.
pub struct Publishers {
    pub senders: Vec<mpsc::Sender<Batch>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Publishers {
    /// Waits (at most `timeout`) for every publisher to empty its queue and stop, which they do
    /// once the fan-out holding their senders is gone. Returns how many did not finish in time.
    pub async fn join(self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut late = 0;
        for t in self.tasks {
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                late += 1;
            }
        }
        late
    }
}

/// One message being filled: `LOCAL_IP` then units.
#[derive(Debug)]
pub struct Batch {
    buf: BytesMut,
    units: u64,
    /// When the oldest unit went in: the batch leaves at the latest `max_wait` later.
    opened: Instant,
    /// Bytes taken from the memory budget for it, given back once it is done with.
    budgeted: u64,
    /// Sessions whose units in batches of this publisher just before this one were dropped:
    /// they end (COM_QUIT) before this batch.
    lost: Vec<(Ipv4Addr, u16)>,
    /// When its first captured unit was captured (CLOCK_MONOTONIC ns; 0: only synthetic).
    captured: u64,
    /// Written to the recording already (a batch published again is not recorded again).
    recorded: bool,
}

impl Batch {
    fn new(local_ip: Ipv4Addr, capacity: usize, now: Instant) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + encode::UNIT_OVERHEAD * 2);
        encode::put_message_header(&mut buf, local_ip);
        Self {
            buf,
            units: 0,
            opened: now,
            budgeted: 0,
            lost: Vec::new(),
            captured: 0,
            recorded: false,
        }
    }

    /// The sessions of its units.
    fn sessions(&self) -> impl Iterator<Item = (Ipv4Addr, u16)> {
        let units = encode::decode_message(&self.buf)
            .map(|m| m.units)
            .unwrap_or_default();
        units.into_iter().map(|u| (u.ip, u.port))
    }

    pub fn units(&self) -> u64 {
        self.units
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// When a batch leaves: once it holds more than `segments` units or `bytes` bytes, or its
/// oldest unit has waited `max_wait`.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub segments: u64,
    pub bytes: usize,
    pub max_wait: Duration,
}

/// Logs a recurring problem at most once per period, with how often it happened meanwhile.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    const PERIOD: Duration = Duration::from_secs(10);

    fn hit(&mut self, now: Instant, log: impl FnOnce(u64)) {
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::PERIOD)
        {
            log(self.suppressed);
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

struct Lane {
    tx: mpsc::Sender<Batch>,
    open: Option<Batch>,
    /// Sessions of dropped batches, for the next batch that gets through.
    lost: HashSet<(Ipv4Addr, u16)>,
}

/// Spreads units over the publishers' queues, batching per publisher.
pub struct Fanout {
    local_ip: Ipv4Addr,
    /// Capture time of the units being pushed (see [`Fanout::set_captured`]).
    captured: u64,
    lanes: Vec<Lane>,
    limits: BatchLimits,
    budget: Arc<MemoryBudget>,
    counters: Arc<PipelineCounters>,
    queue_full_log: Throttled,
    mem_log: Throttled,
}

/// The publisher that carries a session: the same for every unit of the session.
pub fn lane_of(ip: IpAddr, port: u16, lanes: usize) -> usize {
    use std::hash::BuildHasher as _;
    // Fixed keys: the choice must not change while the collector runs.
    let h =
        std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one((ip, port));
    (h % lanes as u64) as usize
}

impl Fanout {
    pub fn new(
        local_ip: Ipv4Addr,
        senders: Vec<mpsc::Sender<Batch>>,
        limits: BatchLimits,
        budget: Arc<MemoryBudget>,
        counters: Arc<PipelineCounters>,
    ) -> Self {
        Self {
            local_ip,
            captured: 0,
            lanes: senders
                .into_iter()
                .map(|tx| Lane {
                    tx,
                    open: None,
                    lost: HashSet::default(),
                })
                .collect(),
            limits,
            budget,
            counters,
            queue_full_log: Throttled::default(),
            mem_log: Throttled::default(),
        }
    }

    /// The capture time (CLOCK_MONOTONIC ns) of the segment whose units come next; 0 for
    /// synthetic units.
    pub fn set_captured(&mut self, ns: u64) {
        self.captured = ns;
    }

    /// Adds one unit to its session's batch; sends the batch if it is full.
    pub fn push(&mut self, ip: Ipv4Addr, port: u16, data: &[u8], now: Instant) {
        let lane = lane_of(IpAddr::V4(ip), port, self.lanes.len());
        let limits = self.limits;
        let local_ip = self.local_ip;
        let batch = self.lanes[lane]
            .open
            .get_or_insert_with(|| Batch::new(local_ip, limits.bytes.min(1 << 20), now));
        encode::put_unit(&mut batch.buf, ip, port, data);
        batch.units += 1;
        if batch.captured == 0 {
            batch.captured = self.captured;
        }
        if batch.units > limits.segments || batch.buf.len() > limits.bytes {
            self.send(lane, now);
        }
    }

    /// When the oldest open batch must leave, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.open.as_ref())
            .map(|b| b.opened + self.limits.max_wait)
            .min()
    }

    /// Sends every batch whose oldest unit has waited `max_wait`.
    pub fn send_due(&mut self, now: Instant) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane]
                .open
                .as_ref()
                .is_some_and(|b| now >= b.opened + self.limits.max_wait)
            {
                self.send(lane, now);
            }
        }
    }

    /// Sends every open batch (at shutdown), and the news of sessions dropped since the
    /// last batch that got through.
    pub fn send_all(&mut self, now: Instant) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].open.is_none() && !self.lanes[lane].lost.is_empty() {
                self.lanes[lane].open = Some(Batch::new(self.local_ip, 0, now));
            }
            self.send(lane, now);
        }
    }

    /// Batches waiting in the publishers' queues.
    pub fn waiting(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| (l.tx.max_capacity() - l.tx.capacity()) as u64)
            .sum()
    }

    fn send(&mut self, lane: usize, now: Instant) {
        let Some(mut batch) = self.lanes[lane].open.take() else {
            return;
        };
        let units = batch.units;
        // A batch sent early (by time) holds a buffer sized for a full one: queued like
        // that, a stalled broker would pin ~32 KiB per few units. It is copied to its size.
        if batch.buf.capacity() > 2 * batch.buf.len() {
            batch.buf = BytesMut::from(&batch.buf[..]);
        }
        // What the allocator holds for it, not just its length.
        let size = batch.buf.capacity() as u64;
        batch.budgeted = size;
        if !self.budget.try_take(size) {
            self.lanes[lane].lost.extend(batch.sessions());
            PipelineCounters::add(&self.counters.mem_limit, units);
            let (used, limit) = (self.budget.used(), self.budget.limit);
            self.mem_log.hit(now, |more| {
                tracing::warn!(
                    publisher = lane,
                    units,
                    queued_bytes = used,
                    limit_bytes = limit,
                    similar_since_last_warning = more,
                    "dropped a batch: the queued bytes would pass --max_mem_mb (the broker is \
                     slower than the traffic)"
                )
            });
            return;
        }
        batch.lost = self.lanes[lane].lost.drain().collect();
        match self.lanes[lane].tx.try_send(batch) {
            Ok(()) => {}
            Err(e) => {
                self.budget.give_back(size);
                PipelineCounters::add(&self.counters.queue_full, units);
                let closed = matches!(e, mpsc::error::TrySendError::Closed(_));
                let batch = match e {
                    mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
                };
                let sessions = batch.sessions();
                let lost = &mut self.lanes[lane].lost;
                lost.extend(batch.lost.iter().copied());
                lost.extend(sessions);
                self.queue_full_log.hit(now, |more| {
                    tracing::warn!(
                        publisher = lane,
                        units,
                        publisher_gone = closed,
                        similar_since_last_warning = more,
                        "dropped a batch: the publisher's queue is full (raise --queue_size or \
                         --thread_count, or check the broker)"
                    )
                });
            }
        }
    }
}

/// Messages written or awaiting their confirm per publisher, at most.
const MAX_UNCONFIRMED: usize = 256;

/// A message handed to the channel: resolves, with its batch, once lapin wrote it to the
/// socket (with the confirm to wait for, if confirms are on).
type Write = Pin<Box<dyn Future<Output = (Batch, lapin::Result<PublisherConfirm>)> + Send>>;

struct Publisher {
    index: usize,
    shared: PublisherShared,
    /// Sessions that lost units and got their COM_QUIT: their units are left out until one
    /// starts a command.
    broken: HashSet<(Ipv4Addr, u16)>,
    record_errors: Throttled,
}

impl Publisher {
    /// Messages only go to a recording: each batch is written as it comes.
    async fn run_to_file(mut self, mut rx: mpsc::Receiver<Batch>) {
        while let Some(mut batch) = rx.recv().await {
            if !batch.lost.is_empty() {
                let quits = self.end_sessions(std::mem::take(&mut batch.lost));
                self.deliver_to_file(quits);
            }
            let batch = self.leave_out_broken(batch);
            self.deliver_to_file(batch);
        }
    }

    fn deliver_to_file(&mut self, mut batch: Batch) {
        if batch.units > 0 {
            self.record(&mut batch);
            self.published(&batch);
        }
        self.shared.budget.give_back(batch.budgeted);
    }

    /// Writes the batch to the recording, if there is one and it is not there yet.
    fn record(&mut self, batch: &mut Batch) {
        let Some(recorder) = &self.shared.recorder else {
            return;
        };
        if std::mem::replace(&mut batch.recorded, true) {
            return;
        }
        let c = &self.shared.counters;
        match recorder.lock().expect("recorder lock").write(&batch.buf) {
            Ok(()) => {
                PipelineCounters::add(&c.recorded_msgs, 1);
                PipelineCounters::add(&c.recorded_bytes, 4 + batch.buf.len() as u64);
            }
            Err(e) => {
                PipelineCounters::add(&c.record_errors, 1);
                PipelineCounters::add(&c.record_error_units, batch.units);
                self.record_errors.hit(Instant::now(), |more| {
                    tracing::error!(
                        publisher = self.index,
                        similar_since_last_error = more,
                        "a message is missing from the recording: {e}"
                    )
                });
            }
        }
    }

    async fn run(mut self, channel: Channel, mut rx: mpsc::Receiver<Batch>) {
        let broker = self
            .shared
            .broker
            .clone()
            .expect("a publisher with a channel has a broker");
        let confirm = broker.cfg.confirm;
        let mut channel = Some(channel);
        // Batches to publish (again) before taking new ones, oldest first.
        let mut retry: VecDeque<Batch> = VecDeque::new();
        // Handed to the channel, not yet written, in publish order. Waiting for each write
        // before the next message would cap a publisher at one message per round trip through
        // lapin's I/O thread (a few thousand a second on a loaded server).
        let mut writing: VecDeque<Write> = VecDeque::new();
        // Written, awaiting their confirm, in publish order (confirms come in that order).
        let mut unconfirmed: VecDeque<(Batch, PublisherConfirm)> = VecDeque::new();
        let mut closing = false;
        let mut errors = Throttled::default();
        loop {
            let ch = match &channel {
                Some(ch) if ch.status().connected() => ch.clone(),
                _ => {
                    // Writes pending on the broken channel fail (lapin fails every pending
                    // frame when a channel closes): publish them again, in order.
                    let mut failed = VecDeque::new();
                    while let Some(write) = writing.pop_front() {
                        let (batch, written) = write.await;
                        if let Some(batch) =
                            self.written(batch, written, &mut unconfirmed, &mut errors)
                        {
                            failed.push_back(batch);
                        }
                    }
                    failed.extend(retry.drain(..));
                    retry = failed;
                    // What waited for a confirm on the broken channel may or may not have
                    // arrived: publishing it again could repeat statements, so it counts as
                    // lost and its sessions end there.
                    if let Some(quits) = self.abandon(&mut unconfirmed) {
                        retry.push_front(quits);
                    }
                    if closing && retry.is_empty() {
                        break;
                    }
                    channel = Some(broker.reopen(self.index, &self.shared.counters).await);
                    continue;
                }
            };
            let room = writing.len() + unconfirmed.len() < MAX_UNCONFIRMED;
            if let Some(mut batch) = retry.pop_front() {
                if !batch.lost.is_empty() {
                    // Units of these sessions were dropped just before this batch.
                    let quits = self.end_sessions(std::mem::take(&mut batch.lost));
                    retry.push_front(batch);
                    retry.push_front(quits);
                    continue;
                }
                if room {
                    self.publish(&ch, batch, &mut writing).await;
                    continue;
                }
                retry.push_front(batch);
            }
            if closing && retry.is_empty() && writing.is_empty() && unconfirmed.is_empty() {
                break;
            }
            tokio::select! {
                (batch, written) = async { writing.front_mut().unwrap().as_mut().await },
                    if !writing.is_empty() =>
                {
                    writing.pop_front();
                    if let Some(batch) = self.written(batch, written, &mut unconfirmed, &mut errors) {
                        retry.push_front(batch);
                        channel = None;
                    }
                }
                confirmed = async { (&mut unconfirmed.front_mut().unwrap().1).await },
                    if confirm && !unconfirmed.is_empty() =>
                {
                    match confirmed {
                        Ok(c) => {
                            let (batch, _) = unconfirmed.pop_front().unwrap();
                            self.shared.budget.give_back(batch.budgeted);
                            if let Confirmation::Nack(_) = c {
                                self.error("the broker nacked a message", &mut errors);
                                let quits = self.lose(vec![batch]);
                                retry.push_front(quits);
                            } else {
                                self.published(&batch);
                            }
                        }
                        // The channel broke (handled at the top of the loop).
                        Err(e) => {
                            self.error(&e.to_string(), &mut errors);
                            channel = None;
                        }
                    }
                }
                batch = rx.recv(), if !closing && retry.is_empty() && room => {
                    match batch {
                        Some(batch) => retry.push_back(batch),
                        None => closing = true,
                    }
                }
            }
        }
    }

    /// Hands one batch (units of ended sessions left out) to the channel: lapin queues its
    /// frames on this first poll, so the order of calls is the order on the wire.
    async fn publish(&mut self, ch: &Channel, batch: Batch, writing: &mut VecDeque<Write>) {
        let mut batch = self.leave_out_broken(batch);
        if batch.units == 0 {
            self.shared.budget.give_back(batch.budgeted);
            return;
        }
        self.record(&mut batch);
        let props = message_properties();
        let (ch, broker) = (ch.clone(), self.shared.broker.clone().expect("broker"));
        let mut write: Write = Box::pin(async move {
            let cfg = &broker.cfg;
            let written = ch
                .basic_publish(
                    cfg.exchange.as_str().into(),
                    cfg.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &batch.buf,
                    props,
                )
                .await;
            (batch, written)
        });
        // Poll once now (queues the frames); what is left waits in `writing`.
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
        match first {
            std::task::Poll::Pending => writing.push_back(write),
            // Done already (e.g. the channel was closed): handled in order like the others.
            std::task::Poll::Ready(out) => writing.push_back(Box::pin(std::future::ready(out))),
        }
    }

    /// A write finished: without confirms the batch is published; with them it waits for
    /// its confirm. Gives the batch back if the channel failed.
    fn written(
        &mut self,
        batch: Batch,
        written: lapin::Result<PublisherConfirm>,
        unconfirmed: &mut VecDeque<(Batch, PublisherConfirm)>,
        errors: &mut Throttled,
    ) -> Option<Batch> {
        let confirm_on = self.shared.broker.as_ref().is_some_and(|b| b.cfg.confirm);
        match written {
            Ok(confirm) if confirm_on => {
                unconfirmed.push_back((batch, confirm));
                None
            }
            Ok(_) => {
                self.published(&batch);
                self.shared.budget.give_back(batch.budgeted);
                None
            }
            Err(e) => {
                self.error(&e.to_string(), errors);
                Some(batch)
            }
        }
    }

    /// Counts a message handed to its last output (the broker, or the recording without
    /// one), and its capture-to-publish latency.
    fn published(&self, batch: &Batch) {
        if batch.captured != 0 {
            let ns = crate::capture::monotonic_ns().saturating_sub(batch.captured);
            self.shared.latency.observe(ns as f64 / 1e9);
        }
        PipelineCounters::add(&self.shared.counters.published_msgs, 1);
        PipelineCounters::add(&self.shared.counters.published_units, batch.units);
        PipelineCounters::add(
            &self.shared.counters.published_bytes,
            batch.buf.len() as u64,
        );
    }

    /// Batches whose units are lost (refused, or unknown after a broken channel): counted,
    /// and their sessions end; returns the message of COM_QUITs to publish first.
    fn lose(&mut self, batches: Vec<Batch>) -> Batch {
        let mut sessions = Vec::new();
        for batch in &batches {
            PipelineCounters::add(&self.shared.counters.mq_error_units, batch.units);
            sessions.extend(batch.sessions());
        }
        self.end_sessions(sessions)
    }

    fn abandon(&mut self, unconfirmed: &mut VecDeque<(Batch, PublisherConfirm)>) -> Option<Batch> {
        if unconfirmed.is_empty() {
            return None;
        }
        let batches: Vec<Batch> = unconfirmed.drain(..).map(|(b, _)| b).collect();
        for b in &batches {
            self.shared.budget.give_back(b.budgeted);
        }
        Some(self.lose(batches))
    }

    fn error(&self, why: &str, errors: &mut Throttled) {
        PipelineCounters::add(&self.shared.counters.mq_errors, 1);
        errors.hit(Instant::now(), |more| {
            tracing::error!(
                publisher = self.index,
                similar_since_last_error = more,
                "publishing a message failed: {why}"
            )
        });
    }

    /// A message of COM_QUITs for sessions that just lost units (those not ended already);
    /// their later units are left out until one starts a command.
    fn end_sessions(&mut self, sessions: Vec<(Ipv4Addr, u16)>) -> Batch {
        let mut quits = Batch::new(self.shared.local_ip, 0, Instant::now());
        for s in sessions {
            if self.broken.insert(s) {
                encode::put_unit(&mut quits.buf, s.0, s.1, &encode::COM_QUIT);
                quits.units += 1;
            }
        }
        PipelineCounters::add(&self.shared.counters.mq_lost_sessions, quits.units);
        quits
    }

    fn leave_out_broken(&mut self, batch: Batch) -> Batch {
        if self.broken.is_empty() {
            return batch;
        }
        let Ok(m) = encode::decode_message(&batch.buf) else {
            return batch;
        };
        let mut buf = BytesMut::with_capacity(batch.buf.len());
        encode::put_message_header(&mut buf, m.local_ip);
        let mut units = 0;
        for u in &m.units {
            let key = (u.ip, u.port);
            if self.broken.contains(&key) {
                if !starts_command(&u.data) {
                    PipelineCounters::add(&self.shared.counters.mq_lost_skipped, 1);
                    continue;
                }
                // The consumer sees a new session from here.
                self.broken.remove(&key);
            }
            encode::put_unit(&mut buf, u.ip, u.port, &u.data);
            units += 1;
        }
        Batch {
            buf,
            units,
            ..batch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout(
        lanes: usize,
        queue: usize,
        limits: BatchLimits,
        budget: u64,
    ) -> (Fanout, Vec<mpsc::Receiver<Batch>>, Arc<PipelineCounters>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..lanes).map(|_| mpsc::channel(queue)).unzip();
        let counters = Arc::new(PipelineCounters::default());
        let f = Fanout::new(
            Ipv4Addr::new(10, 0, 0, 1),
            txs,
            limits,
            Arc::new(MemoryBudget::new(budget)),
            counters.clone(),
        );
        (f, rxs, counters)
    }

    const LIMITS: BatchLimits = BatchLimits {
        segments: 20,
        bytes: 32 << 10,
        max_wait: Duration::from_millis(100),
    };

    #[tokio::test]
    async fn a_session_stays_on_one_publisher_in_order() {
        let (mut f, mut rxs, _) = fanout(4, 100, LIMITS, u64::MAX);
        let t = Instant::now();
        let sessions: Vec<(Ipv4Addr, u16)> = (0..50)
            .map(|i| (Ipv4Addr::new(198, 18, 0, i as u8), 40000 + i))
            .collect();
        for round in 0..30u32 {
            for &(ip, port) in &sessions {
                f.push(ip, port, &round.to_le_bytes(), t);
            }
        }
        f.send_all(t);
        let mut seen: std::collections::HashMap<(Ipv4Addr, u16), (usize, Vec<u32>)> =
            Default::default();
        for (lane, rx) in rxs.iter_mut().enumerate() {
            while let Ok(b) = rx.try_recv() {
                let m = encode::decode_message(b.bytes()).unwrap();
                assert_eq!(m.local_ip, Ipv4Addr::new(10, 0, 0, 1));
                assert!(m.units.len() <= 21);
                for u in m.units {
                    let e = seen.entry((u.ip, u.port)).or_insert((lane, vec![]));
                    assert_eq!(e.0, lane, "session moved to another publisher");
                    e.1.push(u32::from_le_bytes(u.data.try_into().unwrap()));
                }
            }
        }
        assert_eq!(seen.len(), 50);
        for (_, (_, rounds)) in seen {
            assert_eq!(rounds, (0..30).collect::<Vec<_>>());
        }
        let used: std::collections::HashSet<_> = sessions
            .iter()
            .map(|&(ip, p)| lane_of(IpAddr::V4(ip), p, 4))
            .collect();
        assert_eq!(
            used.len(),
            4,
            "50 sessions should spread over all publishers"
        );
    }

    #[tokio::test]
    async fn batches_leave_when_full_or_due() {
        let (mut f, mut rxs, _) = fanout(1, 100, LIMITS, u64::MAX);
        let t = Instant::now();
        let ip = Ipv4Addr::LOCALHOST;
        for _ in 0..20 {
            f.push(ip, 1, b"x", t);
        }
        assert!(
            rxs[0].try_recv().is_err(),
            "20 segments are not more than 20"
        );
        f.push(ip, 1, b"x", t);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 21);
        // Bytes: a 40 KiB unit passes 32 KiB at once.
        f.push(ip, 1, &[7; 40 << 10], t);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 1);
        // Time: a lone unit leaves once it waited max_wait, not before.
        f.push(ip, 1, b"y", t);
        assert_eq!(f.next_due(), Some(t + LIMITS.max_wait));
        f.send_due(t + Duration::from_millis(99));
        assert!(rxs[0].try_recv().is_err());
        f.send_due(t + LIMITS.max_wait);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 1);
        assert_eq!(f.next_due(), None);
    }

    #[tokio::test]
    async fn full_queue_and_memory_budget_drop_and_count() {
        let tiny = BatchLimits {
            segments: 0,
            ..LIMITS
        };
        let (mut f, mut rxs, c) = fanout(1, 2, tiny, u64::MAX);
        let t = Instant::now();
        for _ in 0..5 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().queue_full, 3);
        assert_eq!(f.waiting(), 2);
        // The next batch that gets through says which sessions lost units before it.
        assert!(rxs[0].try_recv().unwrap().lost.is_empty());
        assert!(rxs[0].try_recv().unwrap().lost.is_empty());
        f.push(Ipv4Addr::LOCALHOST, 2, b"abc", t);
        assert_eq!(rxs[0].try_recv().unwrap().lost, [(Ipv4Addr::LOCALHOST, 1)]);
        // Also when nothing follows: at exit.
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        rxs[0].try_recv().unwrap();
        rxs[0].try_recv().unwrap();
        f.send_all(t);
        let last = rxs[0].try_recv().unwrap();
        assert_eq!(
            (last.units, last.lost.as_slice()),
            (0, &[(Ipv4Addr::LOCALHOST, 3)][..])
        );

        // Two 4+17 byte messages fit in 50 bytes, the third does not.
        let (mut f, _rxs, c) = fanout(1, 100, tiny, 50);
        for _ in 0..3 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().mem_limit, 1);
        assert_eq!(f.waiting(), 2);
    }
}
