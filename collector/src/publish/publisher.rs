//! The publishers: `--thread_count` tasks, each with its queue of batches and, while the
//! broker is up, one AMQP channel.
//!
//! A publisher keeps up to [`MAX_IN_FLIGHT`] messages in flight (handed to lapin, written,
//! awaiting their confirm), each under the `--rabbitmq_timeout` deadline. When its channel or
//! the connection dies, what was in flight and not confirmed counts as lost (it may or may not
//! have reached the broker), and its sessions end for the consumer as after a TCP gap: a
//! synthetic COM_QUIT in their place, then nothing of the session until a unit that starts a
//! command. Batches never handed to lapin wait, inside the memory budget, for the next
//! connection.

use std::{collections::VecDeque, net::Ipv4Addr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use futures_util::FutureExt as _;
use lapin::{
    BasicProperties, Channel, Confirmation, PublisherConfirm, options::BasicPublishOptions,
};
use prometheus_client::metrics::histogram::Histogram;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use super::{
    Throttled,
    broker::{Broker, Down, Link, PublishError},
    fanout::{Batch, LaneReceiver, LaneSender, lane, sessions_of},
};
use crate::{
    encode, memory::MemoryBudget, protocol::starts_command, recording::RecordingQueue,
    status::PipelineCounters,
};

/// What every publisher shares.
#[derive(Clone)]
pub struct PublisherShared {
    /// The broker, unless messages only go to a recording.
    pub broker: Option<Arc<Broker>>,
    /// The recording's queue, if messages go to a file too (or only).
    pub recorder: Option<RecordingQueue>,
    /// LOCAL_IP of the synthetic messages publishers make themselves.
    pub local_ip: Ipv4Addr,
    pub budget: Arc<MemoryBudget>,
    pub counters: Arc<PipelineCounters>,
    /// Capture-to-publish latency of each message.
    pub latency: Histogram,
}

/// Starts the publisher tasks, each with a queue of at most `queue_cap` batches if given
/// (the memory budget bounds them in any case).
pub fn start_publishers(
    shared: &PublisherShared,
    count: usize,
    queue_cap: Option<u64>,
) -> Publishers {
    let give_up = watch::channel(false).0;
    let mut senders = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let (tx, rx) = lane(queue_cap);
        let publisher = Publisher {
            index,
            shared: shared.clone(),
            broken: Broken::default(),
            record_errors: Throttled::default(),
            errors: Throttled::default(),
            unroutable: Unroutable::default(),
        };
        let give_up = give_up.subscribe();
        tasks.push(tokio::spawn(match shared.broker.clone() {
            Some(broker) => publisher.run(broker, rx, give_up).boxed(),
            None => publisher.run_to_file(rx).boxed(),
        }));
        senders.push(tx);
    }
    Publishers {
        senders,
        tasks,
        give_up,
    }
}

/// What the original sent: text/plain, transient, no headers.
pub fn message_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(1)
}

/// The running publishers: their queues' senders (taken by the fan-out) and their tasks.
pub struct Publishers {
    pub senders: Vec<LaneSender>,
    tasks: Vec<JoinHandle<()>>,
    /// Tells the publishers that the exit deadline passed.
    give_up: watch::Sender<bool>,
}

impl Publishers {
    /// Waits (at most `grace`) for every publisher to empty its queue and stop, which they do
    /// once the fan-out holding their senders is gone; then tells those still at it to give
    /// up (what they hold is counted as `exit_unpublished`, or `mq_in_flight_units` if in
    /// flight) and waits for that. Returns how many did not finish within `grace`.
    pub async fn join(self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        // A handle that resolved is not polled again (tokio panics on that): only the late
        // ones are kept.
        let mut late = Vec::new();
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                late.push(t);
            }
        }
        let count = late.len();
        if count > 0 {
            self.give_up.send_replace(true);
            for t in late {
                let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
            }
        }
        count
    }
}

/// Messages in flight (handed to lapin, not yet written or confirmed) per publisher, at most.
const MAX_IN_FLIGHT: usize = 256;
/// How often a publisher looks whether a blocked connection is unblocked.
const BLOCKED_POLL: Duration = Duration::from_millis(50);

/// lapin's write of one message: resolves once the frames are on the socket, with the
/// confirm to wait for.
type Write = std::pin::Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A message handed to lapin, not yet written (or, with confirms, not yet confirmed).
struct InFlight {
    /// Its buffer is in `payload` meanwhile (shared with the write, no copy).
    batch: Batch,
    payload: Bytes,
    write: Option<Write>,
    confirm: Option<PublisherConfirm>,
    /// Written and confirmed by then, or the connection is given up.
    deadline: Instant,
}

impl InFlight {
    /// The batch whole again, once lapin is done with the payload.
    fn into_batch(mut self) -> Batch {
        drop(self.write.take());
        self.batch.buf = BytesMut::from(self.payload);
        self.batch
    }
}

/// What the oldest message in flight did next.
enum Step {
    Written(lapin::Result<PublisherConfirm>),
    Confirmed(lapin::Result<Confirmed>),
}

/// The broker's answer to a message published with confirms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Confirmed {
    /// In every queue the exchange routes to.
    Acked,
    Nacked,
    /// Returned (published `mandatory`): no queue was bound to the exchange, so no consumer
    /// has it.
    Unroutable,
}

impl From<Confirmation> for Confirmed {
    fn from(c: Confirmation) -> Self {
        match c {
            Confirmation::Ack(None) | Confirmation::NotRequested => Confirmed::Acked,
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Confirmed::Unroutable,
            Confirmation::Nack(None) => Confirmed::Nacked,
        }
    }
}

async fn next_step(front: Option<&mut InFlight>) -> Step {
    let f = front.expect("something in flight");
    match (&mut f.write, &mut f.confirm) {
        (Some(write), _) => Step::Written(write.await),
        (None, Some(confirm)) => Step::Confirmed(confirm.await.map(Confirmed::from)),
        (None, None) => unreachable!("a message in flight is written or confirmed"),
    }
}

/// How publishing on a channel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The queue closed (exit) and everything in it was published.
    Finished,
    /// The exit deadline passed.
    GaveUp,
    /// The connection was given up: a new one comes.
    LinkDown,
    /// Only the channel died (closed by the broker): a new one is opened.
    ChannelDown,
    /// The agent moved to another node, and what was in flight here is settled: the next
    /// messages go on the new connection, after these (a session's order holds).
    Retired,
}

struct Publisher {
    index: usize,
    shared: PublisherShared,
    /// Sessions that lost units and got their COM_QUIT: their units are left out until one
    /// starts a command.
    broken: Broken,
    record_errors: Throttled,
    errors: Throttled,
    unroutable: Unroutable,
}

/// Sessions that lost units, since when. An entry goes when the session's next unit starts a
/// command; one whose session never sends another (its last message was the lost one) goes
/// after [`BROKEN_TTL`], so that the set stays bounded on an agent that runs for months.
#[derive(Default)]
struct Broken {
    since: HashMap<(Ipv4Addr, u16), Instant>,
    /// When to look for old entries next (at most once a minute).
    next_prune: Option<Instant>,
}

/// How long a broken session's entry is kept: longer than a client leaves a session idle
/// between commands in practice, and a session idle longer starts its next unit as a command
/// (or a new handshake) anyway.
const BROKEN_TTL: Duration = Duration::from_secs(30 * 60);
const BROKEN_PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Broken {
    fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    fn contains(&self, s: &(Ipv4Addr, u16)) -> bool {
        self.since.contains_key(s)
    }

    fn remove(&mut self, s: &(Ipv4Addr, u16)) {
        self.since.remove(s);
    }

    /// Adds `s` (false if it was there), and drops the entries older than [`BROKEN_TTL`].
    fn insert(&mut self, s: (Ipv4Addr, u16), now: Instant) -> bool {
        if self.next_prune.is_none_or(|at| now >= at) {
            self.since
                .retain(|_, since| now.saturating_duration_since(*since) < BROKEN_TTL);
            self.next_prune = Some(now + BROKEN_PRUNE_EVERY);
        }
        match self.since.entry(s) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        }
    }
}

/// Messages the broker returned because no queue took them (a queue not bound yet, or
/// its binding gone with a deleted exchange): publishing pauses, 100 ms doubling to 5 s
/// from one pause to the next, until one is routed. Without the pause the COM_QUITs for the
/// lost sessions, also returned, would be published again at once, round after round.
#[derive(Default)]
struct Unroutable {
    /// Pauses since a message was last routed.
    pauses: u32,
    until: Option<Instant>,
}

impl Unroutable {
    /// One more message returned: how long publishing pauses. The messages in flight behind
    /// it come back within the same pause and do not lengthen it.
    fn returned(&mut self) -> Duration {
        let now = Instant::now();
        if let Some(until) = self.until.filter(|&t| t > now) {
            return until - now;
        }
        let wait =
            (Duration::from_millis(100) * (1 << self.pauses.min(6))).min(Duration::from_secs(5));
        self.pauses += 1;
        self.until = Some(now + wait);
        wait
    }

    fn routed(&mut self) {
        self.pauses = 0;
        self.until = None;
    }

    fn held(&self) -> bool {
        self.until.is_some_and(|t| t > Instant::now())
    }

    async fn wait(&self) {
        if let Some(t) = self.until {
            tokio::time::sleep_until(t).await;
        }
    }
}

/// Batches taken from the queue, not yet handed to lapin, oldest first; and whether the
/// queue closed (exit).
#[derive(Default)]
struct Pending {
    batches: VecDeque<Batch>,
    closing: bool,
}

impl Publisher {
    /// Messages only go to a recording: each batch is written as it comes.
    async fn run_to_file(mut self, mut rx: LaneReceiver) {
        while let Some(mut batch) = rx.recv().await {
            if !batch.lost.is_empty() {
                let quits = self.end_sessions(std::mem::take(&mut batch.lost));
                self.deliver_to_file(quits);
            }
            let batch = self.leave_out_broken(batch);
            self.deliver_to_file(batch);
        }
    }

    /// Hands the batch, with its share of the memory budget, to the recording's thread.
    fn deliver_to_file(&mut self, mut batch: Batch) {
        if batch.units == 0 {
            self.shared.budget.give_back(batch.budgeted);
            return;
        }
        self.published(&batch, batch.buf.len());
        let message = std::mem::take(&mut batch.buf).freeze();
        match &self.shared.recorder {
            Some(r) => r.push_budgeted(message, batch.units, batch.budgeted),
            None => self.shared.budget.give_back(batch.budgeted),
        }
    }

    /// Queues the message for the recording, if there is one and it is not there yet.
    fn record(&mut self, batch: &mut Batch, message: &Bytes) {
        let Some(recorder) = &self.shared.recorder else {
            return;
        };
        if std::mem::replace(&mut batch.recorded, true) {
            return;
        }
        if !recorder.push(message.clone(), batch.units) {
            let (index, units) = (self.index, batch.units);
            self.record_errors.hit(Instant::now(), |more| {
                tracing::error!(
                    publisher = index,
                    units,
                    similar_since_last_error = more,
                    "a message is left out of the recording: what waits for its disk (or \
                     reader) would pass --max_mem_mb"
                )
            });
        }
    }

    async fn run(
        mut self,
        broker: Arc<Broker>,
        mut rx: LaneReceiver,
        mut give_up: watch::Receiver<bool>,
    ) {
        let mut pending = Pending::default();
        // Channels the broker closed in a row: each reopening waits longer (1 s doubling to
        // 30 s), and checks the exchange first (a deleted exchange is the usual cause).
        let mut channel_failures = 0u32;
        loop {
            let link = tokio::select! {
                link = broker.link() => link,
                _ = give_up.wait_for(|g| *g) => break,
            };
            if channel_failures > 0 {
                let delay = Duration::from_secs(1 << (channel_failures - 1).min(5))
                    .min(Duration::from_secs(30));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = link.dead() => continue,
                    _ = give_up.wait_for(|g| *g) => break,
                }
                if let Err(e) = link.check_exchange(&broker.cfg).await {
                    self.error(&e.to_string());
                    if !matches!(e, PublishError::ExchangeMissing { .. }) {
                        link.kill(link.cause_of(&e));
                    }
                    channel_failures += 1;
                    continue;
                }
            }
            let ch = match link.channel(&broker.cfg, self.index).await {
                Ok(ch) if channel_failures > 0 => {
                    tracing::info!(publisher = self.index, "publisher's channel open again");
                    ch
                }
                Ok(ch) => ch,
                Err(e) => {
                    self.error(&e.to_string());
                    link.kill(link.cause_of(&e));
                    continue;
                }
            };
            let (end, published) = self
                .publish_on(&broker, &link, &ch, &mut rx, &mut pending, &mut give_up)
                .await;
            if published {
                channel_failures = 0;
            }
            match end {
                End::Finished => return,
                End::GaveUp => break,
                End::LinkDown | End::Retired => {}
                End::ChannelDown => {
                    channel_failures += 1;
                    PipelineCounters::add(Down::Channel.counter(&self.shared.counters), 1);
                }
            }
        }
        // The exit deadline passed with the broker away: what is left is counted.
        let c = &self.shared.counters;
        while let Ok(batch) = rx.try_recv() {
            pending.batches.push_back(batch);
        }
        for batch in pending.batches {
            PipelineCounters::add(&c.exit_unpublished, batch.units);
            self.shared.budget.give_back(batch.budgeted);
        }
    }

    /// Publishes on `ch` until it or the connection dies, or the queue is done with, or the
    /// exit deadline passes; settles what was in flight. Returns how it ended and whether a
    /// message got through.
    async fn publish_on(
        &mut self,
        broker: &Broker,
        link: &Link,
        ch: &Channel,
        rx: &mut LaneReceiver,
        pending: &mut Pending,
        give_up: &mut watch::Receiver<bool>,
    ) -> (End, bool) {
        let cfg = &broker.cfg;
        // In publish order: writes resolve, and confirms come, in that order.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut published = false;
        let end = loop {
            // A blocked connection is not read by the broker: what lapin holds then is lost
            // if the block outlasts the deadline, so batches wait here instead. So do they
            // while no queue takes what is published (see `unroutable`).
            let blocked = link.conn.status().blocked();
            let held = self.unroutable.held();
            let retiring = link.is_retiring();
            if retiring && in_flight.is_empty() {
                break End::Retired;
            }
            while !blocked
                && !held
                && !retiring
                && in_flight.len() < MAX_IN_FLIGHT
                && let Some(mut batch) = pending.batches.pop_front()
            {
                if !batch.lost.is_empty() {
                    // Units of these sessions were dropped just before this batch.
                    let quits = self.end_sessions(std::mem::take(&mut batch.lost));
                    pending.batches.push_front(batch);
                    pending.batches.push_front(quits);
                    continue;
                }
                if let Some(f) = self.publish(ch, cfg, batch).await {
                    in_flight.push_back(f);
                }
            }
            if pending.closing && pending.batches.is_empty() && in_flight.is_empty() {
                break End::Finished;
            }
            let room = in_flight.len() < MAX_IN_FLIGHT && !blocked && !held && !retiring;
            // The oldest message is the first due.
            let due = in_flight.front().map(|f| f.deadline);
            tokio::select! {
                // In this order: a confirm that came is taken before its deadline counts.
                biased;
                _ = link.dead() => break End::LinkDown,
                _ = link.retired(), if !retiring => {}
                _ = give_up.wait_for(|g| *g) => break End::GaveUp,
                // The oldest message's next step: its write, or its confirm.
                step = next_step(in_flight.front_mut()), if !in_flight.is_empty() => match step {
                    Step::Written(Ok(confirm)) if cfg.confirm => {
                        let f = &mut in_flight[0];
                        f.write = None;
                        f.confirm = Some(confirm);
                    }
                    Step::Written(Ok(_)) | Step::Confirmed(Ok(Confirmed::Acked)) => {
                        self.done(in_flight.pop_front().expect("front"));
                        self.unroutable.routed();
                        published = true;
                    }
                    Step::Confirmed(Ok(Confirmed::Nacked)) => {
                        let batch = in_flight.pop_front().expect("front").into_batch();
                        self.error("the broker nacked a message");
                        let c = self.shared.counters.clone();
                        let quits = self.lose(vec![batch], &c.mq_error_units);
                        pending.batches.push_front(quits);
                    }
                    Step::Confirmed(Ok(Confirmed::Unroutable)) => {
                        let batch = in_flight.pop_front().expect("front").into_batch();
                        self.error(&format!(
                            "the broker routed a message to no queue: is a queue bound to \
                             exchange {:?}?",
                            cfg.exchange
                        ));
                        let wait = self.unroutable.returned();
                        if batch.synthetic {
                            // No queue has it (nor anything after it): published again once
                            // a queue takes messages, before anything else.
                            pending.batches.push_front(batch);
                        } else {
                            let c = self.shared.counters.clone();
                            let quits = self.lose(vec![batch], &c.mq_unroutable_units);
                            pending.batches.push_front(quits);
                        }
                        tracing::debug!(publisher = self.index, "publishing held for {wait:?}");
                    }
                    Step::Written(Err(e)) | Step::Confirmed(Err(e)) => {
                        // Done with: settled below as lost.
                        in_flight[0].write = None;
                        self.error(&e.to_string());
                        break self.failed(link, ch, &e);
                    }
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    let blocked = link.conn.status().blocked();
                    self.error(&format!(
                        "a message was not {} within {:?} (--rabbitmq_timeout){}",
                        if cfg.confirm { "written and confirmed" } else { "written" },
                        cfg.timeout,
                        if blocked { "; the broker blocks the connection" } else { "" }
                    ));
                    link.kill(if blocked { Down::Blocked } else { Down::Timeout });
                    break End::LinkDown;
                }
                // lapin tells no one of the unblock: looked at again.
                _ = tokio::time::sleep(BLOCKED_POLL), if blocked => {}
                _ = self.unroutable.wait(), if held => {}
                batch = rx.recv(), if !pending.closing && pending.batches.is_empty() && room => {
                    match batch {
                        Some(batch) => pending.batches.push_back(batch),
                        None => pending.closing = true,
                    }
                }
            }
        };
        self.settle(in_flight, pending, cfg.confirm, end == End::GaveUp);
        (end, published)
    }

    /// A broker operation on `ch` failed: the channel only, or the connection (given up).
    fn failed(&self, link: &Link, ch: &Channel, e: &lapin::Error) -> End {
        match link.fail(e, ch) {
            Down::Channel => {
                tracing::warn!(
                    publisher = self.index,
                    "RabbitMQ closed the publisher's channel ({e}); opening another"
                );
                End::ChannelDown
            }
            _ => End::LinkDown,
        }
    }

    /// What was in flight when publishing on a channel ended. A message written without
    /// confirms is published. Any other may or may not have reached the broker (and one lapin
    /// failed to write may sit between two that did): publishing it again could replay
    /// statements twice, so it counts as lost (`mq_in_flight_units`) and the sessions of every
    /// such message end right after them, before anything that waits. At the exit deadline
    /// nothing more is published.
    fn settle(
        &mut self,
        in_flight: VecDeque<InFlight>,
        pending: &mut Pending,
        confirm: bool,
        gave_up: bool,
    ) {
        let c = self.shared.counters.clone();
        let mut sessions = Vec::new();
        for mut f in in_flight {
            let written = f.write.as_mut().and_then(|w| w.as_mut().now_or_never());
            if !confirm && matches!(written, Some(Ok(_))) {
                self.done(f);
                continue;
            }
            PipelineCounters::add(&c.mq_in_flight_units, f.batch.units);
            self.shared.budget.give_back(f.batch.budgeted);
            sessions.extend(sessions_of(&f.payload));
        }
        if !gave_up && !sessions.is_empty() {
            let quits = self.end_sessions_again(sessions);
            pending.batches.push_front(quits);
        }
    }

    /// Hands one batch (units of ended sessions left out) to the channel: lapin queues its
    /// frames on this first poll, so the order of calls is the order on the wire.
    async fn publish(
        &mut self,
        ch: &Channel,
        cfg: &super::BrokerConfig,
        batch: Batch,
    ) -> Option<InFlight> {
        // The publisher's own COM_QUITs end sessions; they are not left out as part of one.
        let mut batch = if batch.synthetic {
            batch
        } else {
            self.leave_out_broken(batch)
        };
        if batch.units == 0 {
            self.shared.budget.give_back(batch.budgeted);
            return None;
        }
        let payload = std::mem::take(&mut batch.buf).freeze();
        self.record(&mut batch, &payload);
        let (ch, data) = (ch.clone(), payload.clone());
        let (exchange, routing_key) = (
            cfg.exchange.as_str().into(),
            cfg.routing_key.as_str().into(),
        );
        // Mandatory with confirms: a message no queue takes comes back with its confirm and
        // is counted (without confirms lapin would keep returned messages until asked).
        let options = BasicPublishOptions {
            mandatory: cfg.confirm,
            ..Default::default()
        };
        let mut write: Write = Box::pin(async move {
            ch.basic_publish(exchange, routing_key, options, &data, message_properties())
                .await
        });
        // Poll once now (queues the frames); the rest is awaited in order.
        if let std::task::Poll::Ready(out) =
            std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await
        {
            write = Box::pin(std::future::ready(out));
        }
        Some(InFlight {
            batch,
            payload,
            write: Some(write),
            confirm: None,
            deadline: Instant::now() + cfg.timeout,
        })
    }

    /// A message the broker has (written without confirms, or confirmed).
    fn done(&self, f: InFlight) {
        self.published(&f.batch, f.payload.len());
        self.shared.budget.give_back(f.batch.budgeted);
    }

    /// Batches whose units are lost: counted in `counter`, and their sessions end; returns
    /// the message of COM_QUITs to publish first.
    fn lose(&mut self, batches: Vec<Batch>, counter: &std::sync::atomic::AtomicU64) -> Batch {
        let mut sessions = Vec::new();
        for batch in &batches {
            PipelineCounters::add(counter, batch.units);
            self.shared.budget.give_back(batch.budgeted);
            sessions.extend(batch.sessions());
        }
        self.end_sessions_again(sessions)
    }

    /// COM_QUITs for sessions of a lost message, also those ended already: the lost message
    /// may have held their COM_QUIT.
    fn end_sessions_again(&mut self, sessions: Vec<(Ipv4Addr, u16)>) -> Batch {
        for s in &sessions {
            self.broken.remove(s);
        }
        self.end_sessions(sessions)
    }

    fn error(&mut self, why: &str) {
        PipelineCounters::add(&self.shared.counters.mq_errors, 1);
        let index = self.index;
        self.errors.hit(Instant::now(), |more| {
            tracing::error!(
                publisher = index,
                similar_since_last_error = more,
                "publishing a message failed: {why}"
            )
        });
    }

    /// Counts a message handed to its last output (the broker, or the recording without
    /// one), and its capture-to-publish latency.
    fn published(&self, batch: &Batch, bytes: usize) {
        if batch.captured != 0 {
            let ns = crate::types::monotonic_ns().saturating_sub(batch.captured);
            self.shared.latency.observe(ns as f64 / 1e9);
        }
        PipelineCounters::add(&self.shared.counters.published_msgs, 1);
        PipelineCounters::add(&self.shared.counters.published_units, batch.units);
        PipelineCounters::add(&self.shared.counters.published_bytes, bytes as u64);
    }

    /// A message of COM_QUITs for sessions that just lost units (those not ended already);
    /// their later units are left out until one starts a command.
    fn end_sessions(&mut self, sessions: Vec<(Ipv4Addr, u16)>) -> Batch {
        let mut quits = Batch::new(self.shared.local_ip, 0, Instant::now());
        quits.synthetic = true;
        for s in sessions {
            if self.broken.insert(s, Instant::now()) {
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

    #[test]
    fn broken_sessions_that_never_come_back_are_forgotten_after_the_ttl() {
        let t0 = Instant::now();
        let mut b = Broken::default();
        let a = (Ipv4Addr::new(198, 18, 0, 1), 40000);
        let c = (Ipv4Addr::new(198, 18, 0, 2), 40001);
        assert!(b.insert(a, t0));
        assert!(!b.insert(a, t0 + Duration::from_secs(1)), "already there");
        assert!(b.insert(c, t0 + BROKEN_TTL / 2));
        // Within the TTL both stay; past a's TTL (and the prune cadence) only c does.
        let later = t0 + BROKEN_TTL + BROKEN_PRUNE_EVERY;
        assert!(b.insert((Ipv4Addr::new(198, 18, 0, 3), 40002), later));
        assert!(!b.contains(&a), "a's entry outlived its TTL");
        assert!(b.contains(&c));
        b.remove(&c);
        assert!(!b.contains(&c));
        assert_eq!(b.since.len(), 1);
    }
}
