//! Publishing: the RabbitMQ connection, the fan-out of units to `--thread_count` publisher
//! tasks, batching, and the publishers themselves.
//!
//! Each publisher owns one AMQP channel and a bounded queue of batches. A session's units
//! always go to the same publisher (a hash of client address and port), so they stay in order
//! on one channel. The fan-out runs on the drain's task and never waits: a full queue or an
//! exhausted memory budget drops the batch, counts its units and logs (at most every 10 s).

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use futures_util::{StreamExt as _, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    types::FieldTable,
    uri::{AMQPAuthority, AMQPQueryString, AMQPUri, AMQPUserInfo},
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{encode, status::PipelineCounters};

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

/// The connection to the broker, checked: the login works and the exchange exists.
pub struct Broker {
    conn: Connection,
    cfg: BrokerConfig,
}

impl Broker {
    pub fn addr(&self) -> String {
        self.cfg.addr()
    }

    /// Connects, logs in, and checks (or with `declare`, creates) the exchange.
    pub async fn connect(cfg: &BrokerConfig) -> Result<Self, PublishError> {
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
                Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
                    PublishError::LoginRefused {
                        addr: addr.clone(),
                        user: cfg.user.clone(),
                    }
                }
                Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)) => {
                    PublishError::VhostRefused {
                        addr: addr.clone(),
                        vhost: cfg.vhost.clone(),
                        user: cfg.user.clone(),
                    }
                }
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
        let broker = Self {
            conn,
            cfg: cfg.clone(),
        };
        broker.check_exchange().await?;
        Ok(broker)
    }

    fn amqp(&self, what: impl Into<String>) -> impl FnOnce(lapin::Error) -> PublishError {
        let addr = self.addr();
        let what = what.into();
        move |source| PublishError::Amqp { addr, what, source }
    }

    async fn check_exchange(&self) -> Result<(), PublishError> {
        let cfg = &self.cfg;
        // The default exchange ("") always exists and cannot be declared.
        if cfg.exchange.is_empty() && !cfg.declare {
            return Ok(());
        }
        // A failed declare closes its channel: use one for the checks only.
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(self.amqp("opening a channel"))?;
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
                addr: self.addr(),
                vhost: cfg.vhost.clone(),
                exchange: cfg.exchange.clone(),
            },
            _ => self.amqp(format!(
                "declaring exchange {:?} (fanout, durable; an existing exchange of that name \
                 must match)",
                cfg.exchange
            ))(e),
        })?;
        if let (true, Some(queue)) = (cfg.declare, &cfg.queue) {
            let options = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await
                .map_err(self.amqp(format!("declaring queue {queue:?}")))?;
            ch.queue_bind(
                queue.as_str().into(),
                cfg.exchange.as_str().into(),
                cfg.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.amqp(format!(
                "binding queue {queue:?} to exchange {:?}",
                cfg.exchange
            )))?;
        }
        let _ = ch.close(200, "checked".into()).await;
        Ok(())
    }

    /// Opens one channel per publisher and starts the publisher tasks.
    pub async fn start_publishers(
        &self,
        count: usize,
        queue_size: usize,
        budget: Arc<MemoryBudget>,
        counters: Arc<PipelineCounters>,
    ) -> Result<Publishers, PublishError> {
        let mut senders = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for index in 0..count {
            let channel = self
                .conn
                .create_channel()
                .await
                .map_err(self.amqp(format!("opening channel for publisher {index}")))?;
            if self.cfg.confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(self.amqp("turning on publisher confirms"))?;
            }
            let (tx, rx) = mpsc::channel(queue_size);
            let publisher = Publisher {
                index,
                channel,
                exchange: self.cfg.exchange.clone(),
                routing_key: self.cfg.routing_key.clone(),
                confirm: self.cfg.confirm,
                budget: budget.clone(),
                counters: counters.clone(),
            };
            tasks.push(tokio::spawn(publisher.run(rx)));
            senders.push(tx);
        }
        Ok(Publishers { senders, tasks })
    }

    /// Closes the connection politely (after the publishers finished).
    pub async fn close(self) {
        let _ = self.conn.close(200, "mrte-collector stopping".into()).await;
    }
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

/// Bytes queued for the broker, against `--max_mem_mb`.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// One message being filled: `LOCAL_IP` then units.
#[derive(Debug)]
pub struct Batch {
    buf: BytesMut,
    units: u64,
    /// When the oldest unit went in: the batch leaves at the latest `max_wait` later.
    opened: Instant,
}

impl Batch {
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
}

/// Spreads units over the publishers' queues, batching per publisher.
pub struct Fanout {
    local_ip: Ipv4Addr,
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
            lanes: senders
                .into_iter()
                .map(|tx| Lane { tx, open: None })
                .collect(),
            limits,
            budget,
            counters,
            queue_full_log: Throttled::default(),
            mem_log: Throttled::default(),
        }
    }

    /// Adds one unit to its session's batch; sends the batch if it is full.
    pub fn push(&mut self, ip: Ipv4Addr, port: u16, data: &[u8], now: Instant) {
        let lane = lane_of(IpAddr::V4(ip), port, self.lanes.len());
        let limits = self.limits;
        let local_ip = self.local_ip;
        let batch = self.lanes[lane].open.get_or_insert_with(|| {
            let mut buf =
                BytesMut::with_capacity(limits.bytes.min(1 << 20) + encode::UNIT_OVERHEAD * 2);
            encode::put_message_header(&mut buf, local_ip);
            Batch {
                buf,
                units: 0,
                opened: now,
            }
        });
        encode::put_unit(&mut batch.buf, ip, port, data);
        batch.units += 1;
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

    /// Sends every open batch (at shutdown).
    pub fn send_all(&mut self, now: Instant) {
        for lane in 0..self.lanes.len() {
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
        let Some(batch) = self.lanes[lane].open.take() else {
            return;
        };
        let units = batch.units;
        let size = batch.buf.len() as u64;
        if !self.budget.try_take(size) {
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
        match self.lanes[lane].tx.try_send(batch) {
            Ok(()) => {}
            Err(e) => {
                self.budget.give_back(size);
                PipelineCounters::add(&self.counters.queue_full, units);
                let closed = matches!(e, mpsc::error::TrySendError::Closed(_));
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

/// Confirms awaited at once per publisher before it waits for the oldest.
const MAX_UNCONFIRMED: usize = 256;

struct Publisher {
    index: usize,
    channel: Channel,
    exchange: String,
    routing_key: String,
    confirm: bool,
    budget: Arc<MemoryBudget>,
    counters: Arc<PipelineCounters>,
}

impl Publisher {
    async fn run(self, mut rx: mpsc::Receiver<Batch>) {
        // What the original sent: text/plain, transient, no headers.
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_delivery_mode(1);
        let mut unconfirmed = FuturesUnordered::new();
        let mut errors = Throttled::default();
        loop {
            tokio::select! {
                Some((units, confirmed)) = unconfirmed.next(), if !unconfirmed.is_empty() => {
                    self.confirmed(units, confirmed, &mut errors);
                }
                batch = rx.recv(), if unconfirmed.len() < MAX_UNCONFIRMED => {
                    let Some(batch) = batch else { break };
                    let units = batch.units;
                    let size = batch.buf.len() as u64;
                    let sent = self
                        .channel
                        .basic_publish(
                            self.exchange.as_str().into(),
                            self.routing_key.as_str().into(),
                            BasicPublishOptions::default(),
                            &batch.buf,
                            props.clone(),
                        )
                        .await;
                    self.budget.give_back(size);
                    match sent {
                        Ok(confirm) => {
                            PipelineCounters::add(&self.counters.published_msgs, 1);
                            PipelineCounters::add(&self.counters.published_units, units);
                            PipelineCounters::add(&self.counters.published_bytes, size);
                            if self.confirm {
                                unconfirmed.push(async move { (units, confirm.await) });
                            }
                        }
                        Err(e) => self.failed(units, &e.to_string(), &mut errors),
                    }
                }
            }
        }
        while let Some((units, confirmed)) = unconfirmed.next().await {
            self.confirmed(units, confirmed, &mut errors);
        }
    }

    fn confirmed(
        &self,
        units: u64,
        confirmed: lapin::Result<Confirmation>,
        errors: &mut Throttled,
    ) {
        match confirmed {
            Ok(Confirmation::Nack(_)) => self.failed(units, "the broker nacked it", errors),
            Ok(_) => {}
            Err(e) => self.failed(units, &e.to_string(), errors),
        }
    }

    fn failed(&self, units: u64, why: &str, errors: &mut Throttled) {
        PipelineCounters::add(&self.counters.mq_errors, 1);
        PipelineCounters::add(&self.counters.mq_error_units, units);
        errors.hit(Instant::now(), |more| {
            tracing::error!(
                publisher = self.index,
                units,
                similar_since_last_error = more,
                "publishing a message failed: {why}"
            )
        });
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
        let (mut f, _rxs, c) = fanout(1, 2, tiny, u64::MAX);
        let t = Instant::now();
        for _ in 0..5 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().queue_full, 3);
        assert_eq!(f.waiting(), 2);

        // Two 4+17 byte messages fit in 50 bytes, the third does not.
        let (mut f, _rxs, c) = fanout(1, 100, tiny, 50);
        for _ in 0..3 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().mem_limit, 1);
        assert_eq!(f.waiting(), 2);
    }
}
