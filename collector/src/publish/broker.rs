//! The RabbitMQ connection: login and exchange checks, and the supervisor that notices every
//! way a connection dies and opens a new one.
//!
//! One connection (a [`Link`]) is shared by the publishers, each on a channel of its own. A
//! link is dead from the first of: an error lapin reports (a reset or closed socket, missed
//! heartbeats), the broker closing the connection, the broker blocking it for longer than
//! `--rabbitmq_timeout`, or a publisher finding a broker operation failed or overdue. The
//! supervisor then counts the cause, closes the old connection (so that nothing it still
//! holds overtakes the next one), and reconnects with backoff; publishers wait for the next
//! link and carry on.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt as _;
use lapin::{
    Channel, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind,
    options::{
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    types::FieldTable,
    uri::{AMQPAuthority, AMQPQueryString, AMQPUri, AMQPUserInfo},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use super::Throttled;
use crate::status::{BrokerStatus, PipelineCounters};

/// Where and how to publish.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// The node this configuration connects to: the first of `nodes` unless [`Self::at`]
    /// chose another.
    pub host: String,
    pub port: u16,
    /// Every node, in order of preference (`--rabbitmq_host a,b:5673,...`).
    pub nodes: Vec<(String, u16)>,
    pub user: String,
    pub password: String,
    pub vhost: String,
    pub exchange: String,
    pub routing_key: String,
    /// Create the exchange (fanout, durable) instead of only checking that it exists.
    pub declare: bool,
    /// With `declare`: also create this queue (durable) and bind it to the exchange.
    pub queue: Option<String>,
    /// Publisher confirms: a message counts as published once the broker confirmed it.
    pub confirm: bool,
    pub connect_timeout: Duration,
    /// Deadline of every broker operation: a publish written and confirmed, a channel opened,
    /// a connection closed, a blocked connection unblocked. Also the AMQP heartbeat interval.
    pub timeout: Duration,
}

impl BrokerConfig {
    pub fn addr(&self) -> String {
        node_addr(&self.host, self.port)
    }

    /// This configuration for node `i` of `nodes`.
    pub fn at(&self, i: usize) -> Self {
        let (host, port) = self.nodes[i].clone();
        Self {
            host,
            port,
            ..self.clone()
        }
    }
}

fn node_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The nodes of `--rabbitmq_host`: `host[:port]` separated by commas, an IPv6 address in
/// brackets when it has a port (`[::1]:5673`); a node without one takes `default_port`.
pub fn parse_nodes(list: &str, default_port: u16) -> Result<Vec<(String, u16)>, String> {
    let mut nodes = Vec::new();
    for item in list.split(',').map(str::trim) {
        let (host, port) = if let Some(rest) = item.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{item:?}: an IPv6 address in brackets lacks its ']'"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("{item:?}: expected ':PORT' after ']'")),
            }
        } else if item.matches(':').count() == 1 {
            let (host, port) = item.split_once(':').expect("one colon");
            (host, Some(port))
        } else {
            // A bare IPv6 address, or a name.
            (item, None)
        };
        if host.is_empty() {
            return Err(format!("{list:?}: an empty host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{item:?}: {p:?} is not a port"))?,
            None => default_port,
        };
        nodes.push((host.to_owned(), port));
    }
    Ok(nodes)
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
    #[error("RabbitMQ at {addr}: {what} did not finish within {secs} s (--rabbitmq_timeout)")]
    Overdue {
        addr: String,
        what: String,
        secs: u64,
    },
}

fn amqp_kind(e: &lapin::Error) -> Option<&AMQPErrorKind> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.kind()),
        _ => None,
    }
}

fn amqp(cfg: &BrokerConfig, what: impl Into<String>) -> impl FnOnce(lapin::Error) -> PublishError {
    let addr = cfg.addr();
    let what = what.into();
    move |source| PublishError::Amqp { addr, what, source }
}

/// `f` under the broker operation deadline.
async fn within<T>(
    cfg: &BrokerConfig,
    what: &str,
    f: impl Future<Output = Result<T, PublishError>>,
) -> Result<T, PublishError> {
    match tokio::time::timeout(cfg.timeout, f).await {
        Ok(done) => done,
        Err(_) => Err(PublishError::Overdue {
            addr: cfg.addr(),
            what: what.into(),
            secs: cfg.timeout.as_secs(),
        }),
    }
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
            // A silent broker is given up after two missed heartbeats.
            heartbeat: Some(cfg.timeout.as_secs().clamp(1, u16::MAX.into()) as u16),
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

/// Why a connection or a channel was given up: each has its counter
/// (`mq_reconnect_<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Down {
    /// The socket was reset or closed (an I/O error).
    Socket,
    /// The broker closed the connection (`connection.close`: stop_app, an operator, a
    /// policy).
    Closed,
    /// The broker closed a publisher's channel (`channel.close`, e.g. the exchange deleted).
    Channel,
    /// A broker operation failed while the connection looked fine.
    PublishError,
    /// A publish not written or confirmed, or a channel not opened, within the deadline.
    Timeout,
    /// The broker blocked the connection (a resource alarm) for longer than the deadline.
    Blocked,
    /// Nothing heard from the broker for two heartbeat intervals.
    Heartbeat,
}

impl Down {
    fn describe(self) -> &'static str {
        match self {
            Down::Socket => "the connection was reset or closed",
            Down::Closed => "the broker closed the connection",
            Down::Channel => "the broker closed the channel",
            Down::PublishError => "a broker operation failed",
            Down::Timeout => "a broker operation did not finish within --rabbitmq_timeout",
            Down::Blocked => "the broker blocked the connection for longer than --rabbitmq_timeout",
            Down::Heartbeat => "the broker missed two heartbeats",
        }
    }

    /// The counter of connections (or channels) given up for this cause.
    pub fn counter(self, c: &PipelineCounters) -> &std::sync::atomic::AtomicU64 {
        match self {
            Down::Socket => &c.mq_reconnect_socket,
            Down::Closed => &c.mq_reconnect_closed,
            Down::Channel => &c.mq_reconnect_channel,
            Down::PublishError => &c.mq_reconnect_publish_error,
            Down::Timeout => &c.mq_reconnect_timeout,
            Down::Blocked => &c.mq_reconnect_blocked,
            Down::Heartbeat => &c.mq_reconnect_heartbeat,
        }
    }

    /// The cause an error stands for, given the state the connection is in now.
    pub fn of(error: &lapin::Error, conn: &Connection) -> Down {
        match error.kind() {
            ErrorKind::IOError(_) | ErrorKind::RuntimeShutdownError(_) => Down::Socket,
            ErrorKind::MissingHeartbeatError => Down::Heartbeat,
            ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Hard(_)) => {
                Down::Closed
            }
            _ => Self::of_state(conn).unwrap_or(Down::PublishError),
        }
    }

    /// The cause the connection's state tells, if it is not connected.
    fn of_state(conn: &Connection) -> Option<Down> {
        let s = conn.status();
        if s.connected() {
            None
        } else if s.closing() || s.closed() {
            Some(Down::Closed)
        } else {
            Some(Down::Socket)
        }
    }
}

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// One connection to the broker, from its opening until it is given up.
pub struct Link {
    pub conn: Connection,
    /// Set once, by whoever first finds the connection dead.
    dead: watch::Sender<Option<Down>>,
    /// Taken when the connection opened, so that no event is missed.
    events: Mutex<Option<futures_util::stream::BoxStream<'static, Event>>>,
    /// Held while the exchange is checked again: publishers replacing their channels after a
    /// deleted exchange wait until one of them has declared it *and* bound the queue (a
    /// message published in between is routed nowhere).
    recheck: tokio::sync::Mutex<()>,
    /// The publishers' channels, held until the connection is closed: a channel whose last
    /// handle drops closes itself, and lapin fails the whole connection (socket closed at
    /// once, close never confirmed) when that meets the connection's own close.
    channels: Mutex<Vec<Channel>>,
    /// Set when the agent moves to another node: publishers take no new message here and
    /// leave once what they have in flight is settled.
    retiring: watch::Sender<bool>,
}

impl Link {
    fn new(conn: Connection) -> Arc<Self> {
        let events = conn.events_listener().boxed();
        Arc::new(Self {
            conn,
            retiring: watch::channel(false).0,
            dead: watch::channel(None).0,
            events: Mutex::new(Some(events)),
            recheck: tokio::sync::Mutex::new(()),
            channels: Mutex::default(),
        })
    }

    /// Gives the connection up (the first cause is kept).
    pub fn kill(&self, cause: Down) {
        self.dead.send_if_modified(|d| {
            let first = d.is_none();
            if first {
                *d = Some(cause);
            }
            first
        });
    }

    pub fn is_dead(&self) -> bool {
        self.dead.borrow().is_some()
    }

    pub fn is_retiring(&self) -> bool {
        *self.retiring.borrow()
    }

    /// Resolves once the agent moves to another node.
    pub async fn retired(&self) {
        let mut rx = self.retiring.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Resolves once the connection is given up, with the cause.
    pub async fn dead(&self) -> Down {
        let mut rx = self.dead.subscribe();
        let d = rx
            .wait_for(Option::is_some)
            .await
            .expect("sender held by self");
        d.expect("waited for Some")
    }

    /// Gives the connection up because of `error`, unless it is a channel's own: returns
    /// the cause, `Down::Channel` meaning only the channel is gone.
    pub fn fail(&self, error: &lapin::Error, channel: &Channel) -> Down {
        let cause = Down::of(error, &self.conn);
        // A soft error (404 for a deleted exchange, 403, ...) closes the channel only; the
        // error can reach the operation before lapin marks the channel closed.
        let soft = matches!(error.kind(), ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(_)));
        if cause == Down::PublishError && (soft || !channel.status().connected()) {
            return Down::Channel;
        }
        self.kill(cause);
        cause
    }

    /// The cause a failed operation on the connection stands for.
    pub fn cause_of(&self, e: &PublishError) -> Down {
        match e {
            PublishError::Overdue { .. } | PublishError::Timeout { .. } => Down::Timeout,
            PublishError::Amqp { source, .. } | PublishError::Unreachable { cause: source, .. } => {
                Down::of(source, &self.conn)
            }
            _ => Down::PublishError,
        }
    }

    /// A channel for publisher `index` (with confirms, if asked), within the deadline.
    pub async fn channel(&self, cfg: &BrokerConfig, index: usize) -> Result<Channel, PublishError> {
        within(cfg, "opening a channel", async {
            let channel = self
                .conn
                .create_channel()
                .await
                .map_err(amqp(cfg, format!("opening channel for publisher {index}")))?;
            if cfg.confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(amqp(cfg, "turning on publisher confirms"))?;
            }
            let mut held = self.channels.lock().expect("channels lock");
            held.retain(|c| c.status().connected() || c.status().closing());
            held.push(channel.clone());
            Ok(channel)
        })
        .await
    }

    /// Checks the exchange again (with `declare`, creates it again), within the deadline:
    /// before a channel the broker closed is replaced.
    pub async fn check_exchange(&self, cfg: &BrokerConfig) -> Result<(), PublishError> {
        let _one_at_a_time = self.recheck.lock().await;
        within(
            cfg,
            "checking the exchange",
            check_exchange(cfg, &self.conn),
        )
        .await
    }

    /// Closes a connection given up, if its socket still works, and waits until it is
    /// closed: then nothing it held can reach the broker after what the next connection
    /// publishes. Waits a while only (lapin's close of a connection that dies meanwhile may
    /// never finish, and a broker that stays blocked never reads the close).
    async fn close(&self, cfg: &BrokerConfig) {
        let status = self.conn.status();
        if !status.connected() {
            return;
        }
        let close = self.conn.close(320, "mrte-collector reconnecting".into());
        let gone = async {
            while !(status.errored() || status.closed()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let wait = (cfg.timeout * 6).max(Duration::from_secs(30));
        let start = Instant::now();
        tokio::select! {
            r = close => match r {
                Ok(()) => tracing::debug!("old connection closed after {:?}", start.elapsed()),
                Err(e) => tracing::warn!(
                    "closing the old connection failed after {:?}: {e}; what it held may \
                     still reach the broker after what the next one publishes",
                    start.elapsed()
                ),
            },
            // lapin marks the connection closed when the broker's close-ok arrives (or after
            // the broker's own close), a step before the close future resolves: that is a
            // confirmed close. Only an error means the broker may not have read everything.
            _ = gone => if status.errored() {
                tracing::warn!(
                    "the old connection failed before its close was confirmed ({:?})",
                    start.elapsed()
                )
            } else {
                tracing::debug!("old connection closed after {:?}", start.elapsed())
            },
            _ = tokio::time::sleep(wait) => tracing::warn!(
                "the broker did not close the old connection within {wait:?}; opening another \
                 anyway"
            ),
        }
    }

    /// Follows the connection until it is dead: lapin's errors, the broker's blocks, its
    /// state (a close by the broker has no error event).
    async fn watch(&self, cfg: &BrokerConfig, state: &Mutex<State>) {
        let Some(mut events) = self.events.lock().expect("events lock").take() else {
            return;
        };
        let mut blocked_until = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = self.dead() => return,
                event = events.next() => match event {
                    Some(Event::Error(e)) => self.kill(Down::of(&e, &self.conn)),
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(
                            %reason,
                            "RabbitMQ blocked the connection (a resource alarm); given up after \
                             {:?} (--rabbitmq_timeout)",
                            cfg.timeout
                        );
                        state.lock().expect("state lock").down(Instant::now());
                        blocked_until = Some(Instant::now() + cfg.timeout);
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!("RabbitMQ unblocked the connection");
                        state.lock().expect("state lock").up();
                        blocked_until = None;
                    }
                    Some(_) => {}
                    // lapin dropped its side: the connection is gone.
                    None => self.kill(Down::of_state(&self.conn).unwrap_or(Down::Socket)),
                },
                _ = tokio::time::sleep_until(blocked_until.unwrap_or_else(Instant::now)),
                    if blocked_until.is_some() => self.kill(Down::Blocked),
                _ = tick.tick() => {
                    if let Some(cause) = Down::of_state(&self.conn) {
                        // The error event, if any, names the cause better than the state.
                        match tokio::time::timeout(Duration::from_millis(50), events.next()).await {
                            Ok(Some(Event::Error(e))) => self.kill(Down::of(&e, &self.conn)),
                            _ => self.kill(cause),
                        }
                    }
                }
            }
        }
    }
}

/// Whether the broker can take messages now, for the status line.
#[derive(Debug, Default)]
struct State {
    down_since: Option<Instant>,
}

impl State {
    fn down(&mut self, now: Instant) {
        self.down_since.get_or_insert(now);
    }
    fn up(&mut self) {
        self.down_since = None;
    }
}

/// The broker: its configuration, the current connection, and the supervisor that replaces
/// it when it dies.
pub struct Broker {
    pub cfg: BrokerConfig,
    /// The live connection; None while reconnecting.
    current: watch::Sender<Option<Arc<Link>>>,
    state: Mutex<State>,
    counters: Arc<PipelineCounters>,
    stop: watch::Sender<bool>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// When the current (or last) connection opened.
    last_open: Mutex<Instant>,
    /// The node of `cfg.nodes` the current (or last) connection went to.
    node: std::sync::atomic::AtomicUsize,
}

/// How often a connection to a node other than the first checks whether an earlier node
/// answers again.
const FAILBACK_CHECK: Duration = Duration::from_secs(10);

impl Broker {
    /// The current (or last) node's address.
    pub fn addr(&self) -> String {
        self.cfg.at(self.node()).addr()
    }

    fn node(&self) -> usize {
        self.node.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connects, logs in, checks (or with `declare`, creates) the exchange, and starts the
    /// supervisor. An error here is the agent's start-up error.
    pub async fn connect(
        cfg: &BrokerConfig,
        counters: Arc<PipelineCounters>,
    ) -> Result<Arc<Self>, PublishError> {
        // The first node that answers; if none does, the first node's error (each is logged).
        let mut first_error = None;
        let mut opened = None;
        for i in 0..cfg.nodes.len() {
            match open(&cfg.at(i)).await {
                Ok(conn) => {
                    opened = Some((i, conn));
                    break;
                }
                Err(e) if cfg.nodes.len() > 1 => {
                    tracing::warn!(node = %cfg.at(i).addr(), "{e}; trying the next node");
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((node, conn)) = opened else {
            return Err(first_error.expect("a node was tried"));
        };
        let broker = Arc::new(Self {
            cfg: cfg.clone(),
            current: watch::channel(Some(Link::new(conn))).0,
            state: Mutex::default(),
            counters,
            stop: watch::channel(false).0,
            supervisor: Mutex::default(),
            last_open: Mutex::new(Instant::now()),
            node: node.into(),
        });
        let task = tokio::spawn(broker.clone().supervise());
        *broker.supervisor.lock().expect("supervisor lock") = Some(task);
        Ok(broker)
    }

    /// The live connection, once there is one.
    pub async fn link(&self) -> Arc<Link> {
        let mut rx = self.current.subscribe();
        let link = rx
            .wait_for(|l| l.as_ref().is_some_and(|l| !l.is_dead()))
            .await
            .expect("sender held by self");
        link.clone().expect("waited for Some")
    }

    /// A plain channel (no confirms) on the current connection, e.g. for `publish-file`.
    pub async fn open_channel(&self) -> Result<Channel, PublishError> {
        let link = self.link().await;
        within(&self.cfg, "opening a channel", async {
            link.conn
                .create_channel()
                .await
                .map_err(amqp(&self.cfg, "opening a channel"))
        })
        .await
    }

    /// Up, or down (no live unblocked connection) since when.
    pub fn status(&self) -> BrokerStatus {
        match self.state.lock().expect("state lock").down_since {
            None => BrokerStatus::Up,
            Some(t) => BrokerStatus::Down {
                secs: t.elapsed().as_secs(),
            },
        }
    }

    /// Stops the supervisor and closes the connection politely, within the deadline.
    pub async fn close(&self) {
        self.stop.send_replace(true);
        let task = self.supervisor.lock().expect("supervisor lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let link = self.current.borrow().clone();
        if let Some(link) = link {
            let close = link.conn.close(200, "mrte-collector stopping".into());
            if tokio::time::timeout(self.cfg.timeout, close).await.is_err() {
                tracing::warn!(
                    "the broker did not confirm the connection close within {:?}",
                    self.cfg.timeout
                );
            }
        }
    }

    async fn supervise(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            let Some(link) = self.current.borrow().clone() else {
                return;
            };
            // Until it dies; on a node other than the first, until an earlier one answers.
            let back = {
                let watching = link.watch(&self.cfg, &self.state);
                tokio::pin!(watching);
                loop {
                    // The check runs beside the watch: a death meanwhile is seen at once.
                    let check = async {
                        tokio::time::sleep(FAILBACK_CHECK).await;
                        self.failback().await
                    };
                    tokio::select! {
                        _ = &mut watching => break None,
                        _ = stop.wait_for(|s| *s) => return,
                        back = check, if self.node() > 0 => if back.is_some() {
                            break back;
                        },
                    }
                }
            };
            if let Some(back) = back {
                self.retire(link, back);
                continue;
            }
            let cause = *link.dead.borrow();
            let cause = cause.expect("watch returns once dead");
            self.current.send_replace(None);
            self.state.lock().expect("state lock").down(Instant::now());
            PipelineCounters::add(cause.counter(&self.counters), 1);
            tracing::warn!(
                broker = %self.addr(),
                "RabbitMQ connection lost: {cause}; reconnecting, batches wait in memory \
                 meanwhile (--max_mem_mb)"
            );
            // Closed before the next connection opens: what the old one still holds (lapin
            // writes nothing while the broker blocks it, and a blocked broker reads nothing)
            // reaches the broker before the close, so it cannot overtake what is published on
            // the next connection. A close that does not finish is waited for a while only.
            tokio::select! {
                _ = link.close(&self.cfg) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            drop(link);
            let opened = tokio::select! {
                link = self.reconnect() => link,
                _ = stop.wait_for(|s| *s) => return,
            };
            PipelineCounters::add(&self.counters.mq_reconnects, 1);
            tracing::info!(broker = %self.addr(), "connected to RabbitMQ again");
            self.state.lock().expect("state lock").up();
            self.current.send_replace(Some(opened));
        }
    }

    /// A connection to a node earlier than the current one, if one answers now.
    async fn failback(&self) -> Option<Arc<Link>> {
        for i in 0..self.node() {
            let cfg = self.cfg.at(i);
            let attempt = tokio::time::timeout(cfg.connect_timeout + cfg.timeout, open(&cfg));
            if let Ok(Ok(conn)) = attempt.await {
                let from = self.addr();
                self.node.store(i, std::sync::atomic::Ordering::Relaxed);
                *self.last_open.lock().expect("last_open lock") = Instant::now();
                PipelineCounters::add(&self.counters.mq_failbacks, 1);
                tracing::info!(
                    from = %from,
                    to = %cfg.addr(),
                    "RabbitMQ node answers again: moving back to it"
                );
                return Some(Link::new(conn));
            }
        }
        None
    }

    /// Makes `back` the current connection; `old` is closed once every publisher has left it
    /// (each settles what it has in flight there first), or after a deadline.
    fn retire(&self, old: Arc<Link>, back: Arc<Link>) {
        old.retiring.send_replace(true);
        self.current.send_replace(Some(back));
        let cfg = self.cfg.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + cfg.timeout * 3;
            // Publishers hold the link while they use it.
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            old.close(&cfg).await;
        });
    }

    /// A new connection: the first attempt at once (but not sooner than a second after the
    /// previous one opened, so that a connection that dies at once does not spin), then one a
    /// second for ten seconds (a broker restart takes a few), then 2 s doubling to 30 s.
    /// Each attempt tries the nodes in order of preference. Each failure counts as an MQError.
    async fn reconnect(&self) -> Arc<Link> {
        let started = Instant::now();
        let mut delay = Duration::from_secs(1);
        let mut log = Throttled::default();
        let since = self.last_open.lock().expect("last_open lock").elapsed();
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(since)).await;
        let last = self.node();
        loop {
            for i in 0..self.cfg.nodes.len() {
                let cfg = self.cfg.at(i);
                let attempt = tokio::time::timeout(cfg.connect_timeout + cfg.timeout, open(&cfg));
                let error = match attempt.await {
                    Ok(Ok(conn)) => {
                        *self.last_open.lock().expect("last_open lock") = Instant::now();
                        self.node.store(i, std::sync::atomic::Ordering::Relaxed);
                        if i != last {
                            PipelineCounters::add(&self.counters.mq_failovers, 1);
                            tracing::warn!(
                                from = %self.cfg.at(last).addr(),
                                to = %cfg.addr(),
                                "moved to another RabbitMQ node"
                            );
                        }
                        return Link::new(conn);
                    }
                    Ok(Err(e)) => e,
                    Err(_) => PublishError::Timeout {
                        addr: cfg.addr(),
                        secs: (cfg.connect_timeout + cfg.timeout).as_secs(),
                    },
                };
                PipelineCounters::add(&self.counters.mq_errors, 1);
                log.hit(Instant::now(), |more| {
                    tracing::warn!(
                        retry_in = ?delay,
                        similar_since_last_warning = more,
                        "{error}; batches wait in memory meanwhile (--max_mem_mb)"
                    )
                });
            }
            tokio::time::sleep(delay).await;
            if started.elapsed() >= Duration::from_secs(10) {
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Connects and logs in, then checks the exchange.
async fn open(cfg: &BrokerConfig) -> Result<Connection, PublishError> {
    let conn = login(cfg).await?;
    within(cfg, "checking the exchange", check_exchange(cfg, &conn)).await?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::parse_nodes;

    #[test]
    fn node_lists_parse_with_default_ports_and_ipv6() {
        let n = |s: &str| parse_nodes(s, 5672);
        assert_eq!(n("127.0.0.1").unwrap(), [("127.0.0.1".into(), 5672)]);
        assert_eq!(
            n("a, b:5673,[::1]:5674,::1,[fe80::2]").unwrap(),
            [
                ("a".into(), 5672),
                ("b".into(), 5673),
                ("::1".into(), 5674),
                ("::1".into(), 5672),
                ("fe80::2".into(), 5672),
            ]
        );
        for bad in ["", "a,,b", "a:0", "a:x", "[::1", "[::1]5673", ":5672"] {
            assert!(n(bad).is_err(), "{bad:?} accepted");
        }
    }
}
