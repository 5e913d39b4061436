//! A RabbitMQ exchange and queue of the test's own, removed on drop (also when a test panics).
//!
//! Every operation opens its own connection on a runtime of its own, so the fixture works the
//! same from plain and from async tests.

use std::{future::Future, time::Duration};

use futures_util::StreamExt as _;

use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};

/// What [`TestExchange::wait_routable`] publishes: not an MRTE message.
pub const PROBE: &[u8] = b"mrte-test-probe";

pub const AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One published message as the consumer receives it.
#[derive(Debug)]
pub struct Received {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
}

pub struct TestExchange {
    pub exchange: String,
    pub queue: String,
}

/// Runs `f` to completion on a fresh runtime in a thread of its own.
fn on_own_runtime<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

async fn connect() -> Connection {
    Connection::connect(AMQP_URI, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/setup.sh starts it)")
}

impl TestExchange {
    /// A fresh fanout exchange with a queue bound to it.
    pub fn new(tag: &str) -> Self {
        Self::declared(tag, false)
    }

    /// A durable fanout exchange with a quorum queue bound to it: both, and every message in
    /// the queue, survive a broker restart (`rabbitmqctl stop_app` / `start_app`).
    pub fn durable(tag: &str) -> Self {
        Self::declared(tag, true)
    }

    /// A fresh fanout exchange and a queue not bound to it yet ([`Self::bind`]).
    pub fn unbound(tag: &str) -> Self {
        let this = Self::named(tag);
        this.declare(false, false, None);
        this
    }

    /// A fresh fanout exchange with a queue bound that keeps only the newest message (the
    /// broker routes each, confirms it, and drops the one before): for benchmarks, where
    /// nothing consumes.
    pub fn capped(tag: &str) -> Self {
        let this = Self::named(tag);
        this.declare(false, true, Some(1));
        this
    }

    /// A fresh fanout exchange with a queue bound that a consumer of its own drains as a player
    /// would (no acks, a generous prefetch), counting what it takes; for benchmarks.
    pub fn consumed(tag: &str) -> (Self, Consumer) {
        let this = Self::declared(tag, false);
        let consumer = Consumer::start(&this.queue);
        (this, consumer)
    }

    fn declared(tag: &str, durable: bool) -> Self {
        let this = Self::named(tag);
        this.declare(durable, true, None);
        this
    }

    /// Waits (up to `secs`) until the broker lists the queue as running: a quorum queue
    /// recovers its log after the broker restarts, and until then the broker routes nothing
    /// to it (a loaded machine has taken over 20 s after a SIGKILL).
    pub fn wait_queue_running(&self, secs: u64) {
        wait_for(secs, &format!("queue {} running again", self.queue), || {
            rabbitmqctl(&["list_queues", "name", "state"]).is_some_and(|out| {
                out.lines().any(|l| {
                    let mut f = l.split_whitespace();
                    f.next() == Some(self.queue.as_str()) && f.next() == Some("running")
                })
            })
        });
    }

    /// Waits (up to `secs`) until the exchange routes messages to a queue again: listed as
    /// running, a recovering quorum queue may still take nothing for a while (its binding comes
    /// back with it). Probed with [`PROBE`] messages, which the test's reader skips.
    pub fn wait_routable(&self, secs: u64) {
        let exchange = self.exchange.clone();
        let start = std::time::Instant::now();
        let mut rebound = false;
        loop {
            let exchange = exchange.clone();
            let outcome = on_own_runtime(async move {
                let conn = Connection::connect(AMQP_URI, ConnectionProperties::default())
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let ch = conn
                    .create_channel()
                    .await
                    .map_err(|e| format!("channel: {e}"))?;
                ch.confirm_select(Default::default())
                    .await
                    .map_err(|e| format!("confirm_select: {e}"))?;
                let confirm = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        lapin::options::BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        PROBE,
                        BasicProperties::default(),
                    )
                    .await
                    .map_err(|e| format!("publish: {e}"))?
                    .await
                    .map_err(|e| format!("confirm: {e}"))?;
                let _ = conn.close(200, "".into()).await;
                match confirm {
                    lapin::Confirmation::Ack(None) => Ok(()),
                    lapin::Confirmation::Ack(Some(_)) => Err("returned: unroutable".to_owned()),
                    other => Err(format!("{other:?}")),
                }
            });
            let Err(why) = outcome else { return };
            // A binding made just before a SIGKILL can be lost with it (the broker's
            // metadata, not the agent's doing): made again, once, and said.
            let bindings = rabbitmqctl(&["list_bindings", "source_name", "destination_name"])
                .unwrap_or_default();
            let bound = bindings.lines().any(|l| {
                l.split_whitespace()
                    .eq([self.exchange.as_str(), self.queue.as_str()])
            });
            if !bound && !rebound && start.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "{}: the broker lost the binding in its restart: bound again",
                    self.queue
                );
                self.bind();
                rebound = true;
                continue;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "exchange {} routes nothing after {secs} s (last probe: {why}; bound: {bound}); \
                 queues:\n{}",
                self.exchange,
                rabbitmqctl(&["list_queues", "name", "type", "state", "messages"])
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Binds the queue to the exchange.
    pub fn bind(&self) {
        let (e, q) = (self.exchange.clone(), self.queue.clone());
        on_own_runtime(async move {
            let conn = connect().await;
            let ch = conn.create_channel().await.unwrap();
            ch.queue_bind(
                q.as_str().into(),
                e.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            conn.close(200, "".into()).await.unwrap();
        });
    }

    fn declare(&self, durable: bool, bound: bool, max_length: Option<i64>) {
        let (e, q) = (self.exchange.clone(), self.queue.clone());
        on_own_runtime(async move {
            let conn = connect().await;
            let ch = conn.create_channel().await.unwrap();
            ch.exchange_declare(
                e.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            let mut args = FieldTable::default();
            if durable {
                args.insert(
                    "x-queue-type".into(),
                    lapin::types::AMQPValue::LongString("quorum".into()),
                );
            }
            if let Some(n) = max_length {
                args.insert(
                    "x-max-length".into(),
                    lapin::types::AMQPValue::LongLongInt(n),
                );
            }
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
            conn.close(200, "".into()).await.unwrap();
        });
        if bound {
            self.bind();
        }
    }

    /// Names only, for an exchange and queue that the agent creates (removed on drop too).
    pub fn named(tag: &str) -> Self {
        let exchange = super::unique(&format!("mrte_test_{tag}_"));
        let queue = format!("{exchange}_q");
        Self { exchange, queue }
    }

    /// Every unit of every message taken from the queue, per client port, in order.
    pub fn units_by_port(&self) -> std::collections::HashMap<u16, Vec<collector::encode::Unit>> {
        let mut units: std::collections::HashMap<u16, Vec<collector::encode::Unit>> =
            Default::default();
        for m in self.take_all() {
            for u in collector::encode::decode_message(&m.data).unwrap().units {
                units.entry(u.port).or_default().push(u);
            }
        }
        units
    }

    /// Takes every message now in the queue, in order.
    pub fn take_all(&self) -> Vec<Received> {
        let q = self.queue.clone();
        on_own_runtime(async move {
            let conn = connect().await;
            let ch = conn.create_channel().await.unwrap();
            let mut out = Vec::new();
            // A consumer streams them, far faster than a basic.get each (a test that takes a
            // queue often must keep up on a loaded machine). It may hold no more unacked than
            // the queue had, and is cancelled before the ack, so none is delivered that is not
            // taken (a message given back could come again out of order).
            loop {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let ready = ch
                    .queue_declare(q.as_str().into(), passive, FieldTable::default())
                    .await
                    .unwrap()
                    .message_count();
                if ready == 0 {
                    break;
                }
                let n = ready.min(u16::MAX.into()) as u16;
                ch.basic_qos(n, BasicQosOptions::default()).await.unwrap();
                let mut consumer = ch
                    .basic_consume(
                        q.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                let mut last = None;
                for _ in 0..n {
                    let next = tokio::time::timeout(Duration::from_secs(30), consumer.next());
                    let d = next.await.expect("a delivery").unwrap().unwrap();
                    last = Some(d.delivery_tag);
                    out.push(Received {
                        data: d.data,
                        properties: d.properties,
                        routing_key: d.routing_key.to_string(),
                    });
                }
                ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .unwrap();
                let multiple = BasicAckOptions { multiple: true };
                ch.basic_ack(last.expect("n > 0"), multiple).await.unwrap();
            }
            conn.close(200, "".into()).await.unwrap();
            out
        })
    }
}

/// What a [`Consumer`] took from its queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consumed {
    pub messages: u64,
    /// Every unit, the agent's synthetic COM_QUITs too.
    pub units: u64,
    /// Payload bytes of the units, not of the synthetic COM_QUITs.
    pub payload_bytes: u64,
    /// Messages that are not MRTE messages.
    pub undecodable: u64,
}

/// The synthetic COM_QUIT the agent adds for a connection that ended without its own.
const COM_QUIT: [u8; 5] = [1, 0, 0, 0, 1];

/// Drains a queue in a thread of its own until stopped.
pub struct Consumer {
    counts: std::sync::Arc<std::sync::Mutex<Consumed>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Consumer {
    /// Drains `queue` until dropped.
    pub fn start(queue: &str) -> Self {
        let counts = std::sync::Arc::<std::sync::Mutex<Consumed>>::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (q, c) = (queue.to_owned(), counts.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let conn = connect().await;
                let ch = conn.create_channel().await.unwrap();
                ch.basic_qos(1000, BasicQosOptions::default())
                    .await
                    .unwrap();
                let mut consumer = ch
                    .basic_consume(
                        q.as_str().into(),
                        "bench".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                loop {
                    tokio::select! {
                        d = consumer.next() => {
                            let Some(Ok(d)) = d else { break };
                            let mut c = c.lock().unwrap();
                            c.messages += 1;
                            match collector::encode::decode_message(&d.data) {
                                Ok(m) => {
                                    c.units += m.units.len() as u64;
                                    c.payload_bytes += m
                                        .units
                                        .iter()
                                        .filter(|u| u.data != COM_QUIT)
                                        .map(|u| u.data.len() as u64)
                                        .sum::<u64>();
                                }
                                Err(_) => c.undecodable += 1,
                            }
                        }
                        _ = &mut stopped => break,
                    }
                }
                let _ = conn.close(200, "".into()).await;
            });
        });
        ready.recv().expect("the consumer started");
        Self {
            counts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// What it took so far.
    pub fn consumed(&self) -> Consumed {
        *self.counts.lock().unwrap()
    }

    /// Waits until `done` holds of what it took, or nothing more arrived for `quiet`; what
    /// it took.
    pub fn wait(&self, done: impl Fn(&Consumed) -> bool, quiet: Duration) -> Consumed {
        let (mut last, mut since) = (self.consumed(), std::time::Instant::now());
        loop {
            let now = self.consumed();
            if done(&now) {
                return now;
            }
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            } else if since.elapsed() > quiet {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        let (e, q) = (self.exchange.clone(), self.queue.clone());
        // Never panics: a panic in drop during a failing test would abort the run.
        on_own_runtime(async move {
            let Ok(conn) = Connection::connect(AMQP_URI, ConnectionProperties::default()).await
            else {
                return;
            };
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = conn.close(200, "".into()).await;
        });
    }
}

/// Runs `rabbitmqctl -q ARGS`, returning its stdout, or None if it failed.
pub fn rabbitmqctl(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether RabbitMQ's memory alarm is raised.
pub fn memory_alarmed() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).is_some_and(|o| o.contains("memory"))
}

/// Waits (at most `secs`) for `done`, panicking with `what` if it never holds.
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(secs),
            "RabbitMQ: {what} within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Whether a client can log in to the broker now (the node runs and its application is up).
pub fn broker_answers() -> bool {
    on_own_runtime(async {
        let connect = Connection::connect(AMQP_URI, ConnectionProperties::default());
        match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
            Ok(Ok(conn)) => {
                let _ = conn.close(200, "".into()).await;
                true
            }
            _ => false,
        }
    })
}

/// Puts the broker back as the tests expect it, whatever a fault left: the node started, its
/// application running, the memory alarm's watermark at `watermark`. Never panics (it runs
/// from drop).
pub fn restore_broker(watermark: &str) {
    use std::process::{Command, Stdio};
    if rabbitmqctl(&["eval", "ok."]).is_none() {
        let _ = Command::new("rabbitmq-server")
            .arg("-detached")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = std::time::Instant::now();
        while rabbitmqctl(&["eval", "ok."]).is_none()
            && start.elapsed() < std::time::Duration::from_secs(60)
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let _ = rabbitmqctl(&["start_app"]);
    let _ = rabbitmqctl(&["await_startup"]);
    let _ = rabbitmqctl(&["set_vm_memory_high_watermark", watermark]);
    let start = std::time::Instant::now();
    while memory_alarmed() && start.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// RabbitMQ's memory alarm raised (it blocks every publishing connection) until dropped, also
/// when the test fails; the high watermark is put back as it was.
pub struct MemoryAlarm {
    watermark: String,
}

fn watermark() -> String {
    let w = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
        .expect("rabbitmqctl answers (scripts/setup.sh starts RabbitMQ)")
        .trim()
        .to_owned();
    assert!(w.parse::<f64>().is_ok(), "watermark: {w:?}");
    w
}

impl MemoryAlarm {
    pub fn raise() -> Self {
        let this = Self {
            watermark: watermark(),
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.00001"]).expect("watermark");
        wait_for(20, "memory alarm raised", memory_alarmed);
        this
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["set_vm_memory_high_watermark", &self.watermark]);
        let start = std::time::Instant::now();
        while memory_alarmed() && start.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`) until dropped, also when the test
/// fails.
pub struct AppStopped;

impl AppStopped {
    pub fn stop() -> Self {
        rabbitmqctl(&["stop_app"]).expect("stop_app");
        Self
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
        let _ = rabbitmqctl(&["await_startup"]);
    }
}

/// A way the broker connection dies, as an operator or the network would cause it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `rabbitmqctl stop_app`, then `start_app`: the broker closes every connection.
    StopApp,
    /// The broker process killed (SIGKILL) and started again: the sockets are reset.
    Kill,
    /// `ss -K`: our side of every connection to the broker's port destroyed.
    CutTcp,
    /// `rabbitmqctl close_all_connections`.
    CloseAll,
    /// The memory alarm raised (the broker blocks publishing connections) for this long.
    MemoryAlarm(std::time::Duration),
    /// The broker process stopped (SIGSTOP) for this long: it says nothing, not even
    /// heartbeats.
    Freeze(std::time::Duration),
    /// The exchange deleted: the broker closes the channel of the next publish to it (the
    /// agent, with `--rabbitmq_declare`, declares it again).
    DeleteExchange,
}

/// Whether the exchange exists now.
pub fn exchange_exists(exchange: &str) -> bool {
    let e = exchange.to_owned();
    on_own_runtime(async move {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = ch
            .exchange_declare(
                e.as_str().into(),
                ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = conn.close(200, "".into()).await;
        exists
    })
}

fn delete_exchange(exchange: &str) {
    let e = exchange.to_owned();
    on_own_runtime(async move {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        conn.close(200, "".into()).await.unwrap();
    })
}

/// Causes faults on the local broker; restores it on drop (also when a test fails half-way).
pub struct BrokerFaults {
    watermark: String,
    /// The broker process, while frozen.
    frozen: std::sync::Mutex<Option<nix::unistd::Pid>>,
}

fn broker_pid() -> nix::unistd::Pid {
    let pid = rabbitmqctl(&["eval", "os:getpid()."]).expect("the broker's pid");
    nix::unistd::Pid::from_raw(pid.trim().trim_matches('"').parse().expect("a pid"))
}

impl BrokerFaults {
    pub fn new() -> Self {
        Self {
            watermark: watermark(),
            frozen: Default::default(),
        }
    }

    /// Causes `fault` and undoes it: when this returns, the broker takes connections again
    /// (and `exchange` exists again).
    pub fn cause(&self, fault: Fault, exchange: &str) {
        match fault {
            Fault::StopApp => {
                let stopped = AppStopped::stop();
                std::thread::sleep(std::time::Duration::from_millis(500));
                drop(stopped);
            }
            Fault::Kill => {
                let pid = broker_pid();
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
                wait_for(20, "the killed process gone", || {
                    nix::sys::signal::kill(pid, None).is_err()
                });
                let _ = std::process::Command::new("rabbitmq-server")
                    .arg("-detached")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            Fault::CutTcp => super::sh(&["ss", "-K", "dst", "127.0.0.1", "dport", "=", "5672"]),
            Fault::CloseAll => {
                rabbitmqctl(&["close_all_connections", "test fault"]).expect("close_all");
            }
            Fault::Freeze(hold) => {
                use nix::sys::signal::{Signal, kill};
                let pid = broker_pid();
                *self.frozen.lock().unwrap() = Some(pid);
                kill(pid, Signal::SIGSTOP).unwrap();
                std::thread::sleep(hold);
                kill(pid, Signal::SIGCONT).unwrap();
                *self.frozen.lock().unwrap() = None;
            }
            Fault::DeleteExchange => {
                delete_exchange(exchange);
                wait_for(30, "the exchange declared again", || {
                    exchange_exists(exchange)
                });
            }
            Fault::MemoryAlarm(hold) => {
                let alarm = MemoryAlarm::raise();
                std::thread::sleep(hold);
                drop(alarm);
                wait_for(20, "memory alarm cleared", || !memory_alarmed());
            }
        }
        wait_for(60, "taking connections again", || {
            // Cheap until the port is open (a broker boots in seconds).
            std::net::TcpStream::connect("127.0.0.1:5672").is_ok() && broker_answers()
        });
    }
}

impl Drop for BrokerFaults {
    fn drop(&mut self) {
        if let Some(pid) = self.frozen.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        restore_broker(&self.watermark);
    }
}
