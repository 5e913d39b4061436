//! The agent's record sink: leaves out the collector's own MySQL connection, holds segments
//! back while the bootstrap ([`crate::bootstrap`]) reads the process list, so that a session's
//! synthetic COM_INIT_DB goes into its publisher queue before any of its captured segments,
//! passes each session's segments through its flow ([`crate::tcp`]), and hands what comes out
//! to the MRTE fan-out.

use std::{net::IpAddr, sync::Arc, time::Duration};

// Flow keys come from the network: a seeded hasher, but far cheaper per segment than SipHash.
use foldhash::{HashMap, HashSet};

use tokio::time::Instant;

use crate::{
    bootstrap::{Event, Pass, Session, Snapshot},
    capture::{Record, RecordKind, RecordSink},
    encode,
    memory::MemoryPlan,
    protocol::{changes_database, is_handshake_response},
    publish::Fanout,
    session::Output,
    status::PipelineCounters,
    tcp::{Flows, Segment},
    types::{FlowKey, SessionKey},
};

/// Longest a segment is held back while a process-list read decides on its session.
const HOLD_MAX_TIME: Duration = Duration::from_secs(10);
/// How long a session whose end was captured is kept from the GC without a process-list read
/// showing it gone (MySQL down, or `--mysql_optional` without MySQL).
const ENDED_LINGER: Duration = Duration::from_secs(10 * 60);
/// How long a connection of ours replaced by a reconnect is still left out: long enough for
/// its last segments, short enough that a client reusing its port is not left out for long.
const FORMER_OWN_LINGER: Duration = Duration::from_secs(60);
/// What a held segment costs beyond its payload: the record, and its slot in the hold's
/// vector (which grows by doubling).
/// Most bytes held back at once unless the memory plan gives less.
const HOLD_MAX_BYTES: usize = 32 << 20;
const HELD_OVERHEAD: usize = 2 * std::mem::size_of::<Record>();

/// Segments held back until the bootstrap has decided on their sessions: every segment while
/// a read is under way (`all`), and the segments of sessions that were mid-handshake at the
/// first pass until the second.
#[derive(Debug, Default)]
struct Hold {
    all: bool,
    pending: HashSet<SessionKey>,
    records: Vec<Record>,
    /// Payload and overhead of the held records, against `max` (the memory plan's share).
    bytes: usize,
    max: usize,
    since: Option<Instant>,
}

impl Hold {
    fn holds(&self, key: &SessionKey) -> bool {
        self.all || (!self.pending.is_empty() && self.pending.contains(key))
    }
}

/// What the held segments tell about their sessions, for a process-list pass.
struct Held {
    /// Sessions with held segments.
    seen: HashSet<SessionKey>,
    /// Those whose first held payload is the handshake response: the consumer learns their
    /// database from it.
    started: HashSet<SessionKey>,
    /// Those that changed database in what is held: this read may show the new one.
    changed: HashSet<SessionKey>,
}

impl Held {
    fn of(records: &[Record]) -> Self {
        let mut held = Held {
            seen: HashSet::default(),
            started: HashSet::default(),
            changed: HashSet::default(),
        };
        for r in records.iter().filter(|r| r.is_client()) {
            let key = (r.src, r.sport);
            if changes_database(&r.data) {
                held.changed.insert(key);
            }
            if !r.data.is_empty() && held.seen.insert(key) && is_handshake_response(&r.data) {
                held.started.insert(key);
            }
        }
        held
    }
}

/// What one pass decides a session's COM_INIT_DB by.
struct InitDb<'a> {
    pass: Pass,
    held: &'a Held,
    /// The read just before attaching (first pass only).
    before: &'a HashMap<SessionKey, Session>,
}

/// The record sink of the agent: the collector's own connection left out, segments held
/// while the bootstrap decides, flow handling, then the MRTE fan-out.
pub struct Pipeline {
    pub flows: Flows,
    /// Scratch space for what a flow lets out.
    out: Vec<Output>,
    pub fanout: Fanout,
    counters: Arc<PipelineCounters>,
    /// The time of the current drain: one clock read per drain, not per record.
    now: Instant,
    /// The collector's own MySQL connection.
    own: Option<SessionKey>,
    /// Its connections before a reconnect, since when: their last segments (the read that
    /// found the connection dead) can be drained after the new one is known. Kept for
    /// [`FORMER_OWN_LINGER`].
    former_own: Vec<(SessionKey, Instant)>,
    hold: Hold,
    /// Sessions of the last process-list read, with their ids.
    known: HashMap<SessionKey, u64>,
    /// Sessions whose connection ended (FIN/RST), with their id if known and when, until the
    /// process list no longer shows them (or [`ENDED_LINGER`] passed, when MySQL is not
    /// read): the GC must not end them a second time.
    ended: HashMap<SessionKey, (Option<u64>, Instant)>,
    /// Most sessions in `ended` (the flow table's cap: a flood of RSTs must not grow it).
    max_ended: usize,
    /// Sessions read just before attaching, until the first read after.
    before: Option<HashMap<SessionKey, Session>>,
    /// The drain's timer cadence, when it has one: each drain then sends the batches that
    /// would fall due before the next, so that batches leave together, on the drain's own
    /// wake-ups, instead of each on a timer of its own.
    flush_ahead: Option<Duration>,
}

impl Pipeline {
    /// `hold` holds every segment from the start, until the first process-list read.
    pub fn new(
        fanout: Fanout,
        counters: Arc<PipelineCounters>,
        hold: bool,
        include_replication: bool,
    ) -> Self {
        let now = Instant::now();
        Self {
            flows: Flows::new(include_replication),
            out: Vec::new(),
            fanout,
            counters,
            now,
            own: None,
            former_own: Vec::new(),
            hold: Hold {
                all: hold,
                since: hold.then_some(now),
                max: HOLD_MAX_BYTES,
                ..Default::default()
            },
            known: HashMap::default(),
            ended: HashMap::default(),
            max_ended: crate::tcp::MAX_FLOWS,
            before: None,
            flush_ahead: None,
        }
    }

    /// Batches are sent at the end of each drain, `cadence` ahead of their time (zero: each
    /// on its own timer).
    pub fn set_drain_cadence(&mut self, cadence: Duration) {
        self.flush_ahead = (!cadence.is_zero()).then_some(cadence);
    }

    /// The memory plan's shares of the hold, of the bytes waiting behind gaps and of the flows.
    pub fn set_memory(&mut self, plan: &MemoryPlan) {
        self.max_ended = plan.max_flows();
        self.hold.max = plan.hold as usize;
        self.flows.set_pending_max(plan.reorder as usize);
        self.flows.set_max_flows(plan.max_flows());
    }

    /// The collector's own MySQL connection, known before capture starts.
    pub fn set_own(&mut self, own: Option<SessionKey>) {
        self.own = own;
    }

    /// The process list read just before attaching.
    pub fn set_before(&mut self, before: Snapshot) {
        self.before = Some(before.sessions);
    }

    /// Frees flows idle for `idle` and ended flows and sessions remembered long enough.
    pub fn expire(&mut self, now: Instant, idle: Duration) {
        self.flows.expire(now, idle, &self.counters);
        self.ended
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < ENDED_LINGER);
        self.former_own
            .retain(|(_, t)| now.saturating_duration_since(*t) < FORMER_OWN_LINGER);
    }

    /// When the next batch or held segment must leave.
    pub fn next_due(&self) -> Option<Instant> {
        let held = self.hold.since.map(|t| t + HOLD_MAX_TIME);
        // With a drain timer, batches leave at the end of a drain (see `end`).
        let batches = match self.flush_ahead {
            None => self.fanout.next_due(),
            Some(_) => None,
        };
        [batches, held, self.flows.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends due batches; releases held segments that waited too long.
    pub fn on_due(&mut self, now: Instant) {
        self.now = now;
        if self.hold.since.is_some_and(|t| now >= t + HOLD_MAX_TIME) {
            self.overflow();
        }
        self.give_up_gaps(false);
        self.fanout.send_due(now, now);
    }

    pub fn on_event(&mut self, event: Event) {
        self.now = Instant::now();
        match event {
            Event::Hold(on) => {
                self.hold.all = true;
                self.hold.since.get_or_insert(self.now);
                if let Some(on) = on {
                    let _ = on.send(());
                }
            }
            Event::Release => {
                self.hold.all = false;
                self.release();
            }
            Event::Snapshot(pass, snap) => self.apply(pass, snap),
        }
    }

    fn apply(&mut self, pass: Pass, mut snap: Snapshot) {
        self.learn(&mut snap);
        // The read made just before attaching: it knows the database each session had when
        // capture began, which is what a session that changes database or ends before the
        // first read after attaching needs.
        let before = match pass {
            Pass::First => self.before.take().unwrap_or_default(),
            _ => HashMap::default(),
        };
        let held = Held::of(&self.hold.records);
        let plan = InitDb {
            pass,
            held: &held,
            before: &before,
        };
        // Sessions known from before attaching, captured, and gone already end on the
        // consumer's side too, after their segments.
        let mut gone = Vec::new();
        for (key, b) in &before {
            if held.seen.contains(key)
                && !snap.sessions.contains_key(key)
                && !held.started.contains(key)
            {
                self.init_db(&plan, *key, b);
                gone.push(*key);
            }
        }
        self.bootstrap(&plan, &snap);
        gone.extend(self.gone_since_last_read(&snap));
        self.hold.all = false;
        self.release();
        let c = self.counters.clone();
        // A session whose COM_QUIT went out already gets no second one.
        let ended = if gone.is_empty() {
            Vec::new()
        } else {
            self.flows.ended_sessions(&gone)
        };
        for key in gone {
            if ended.contains(&key) {
                continue;
            }
            if self.inject(key, &encode::COM_QUIT) {
                PipelineCounters::add(&c.gc_quits, 1);
            }
            self.flows.forget(&key, &c);
        }
    }

    /// What a read tells beyond the sessions: hosts to place among the captured sessions,
    /// replicas whose COM_BINLOG_DUMP was before capture (their flows learn it here), the
    /// collector's own connection.
    fn learn(&mut self, snap: &mut Snapshot) {
        self.place_unresolved(snap);
        let new_replicas = self.flows.set_replicas(
            std::mem::take(&mut snap.replication),
            std::mem::take(&mut snap.replication_ids),
        );
        PipelineCounters::add(&self.counters.replication_skipped, new_replicas as u64);
        if snap.own.is_some() && snap.own != self.own {
            if let Some(old) = self.own {
                self.former_own.push((old, self.now));
            }
            self.own = snap.own;
        }
    }

    /// The COM_INIT_DBs of a pass: sessions mid-handshake at the first pass wait (held) for
    /// the second.
    fn bootstrap(&mut self, plan: &InitDb, snap: &Snapshot) {
        match plan.pass {
            Pass::First | Pass::Again => {
                for (key, s) in &snap.sessions {
                    if s.handshaking && plan.pass == Pass::First {
                        // Its database is known once it has authenticated, unless its
                        // handshake was captured.
                        if !plan.held.started.contains(key) {
                            self.hold.pending.insert(*key);
                        }
                    } else if !self.hold.pending.contains(key) {
                        self.init_db(plan, *key, s);
                    }
                }
            }
            Pass::Second => {
                for key in std::mem::take(&mut self.hold.pending) {
                    if let Some(s) = snap.sessions.get(&key) {
                        self.init_db(plan, key, s);
                    }
                }
            }
            Pass::Gc => {}
        }
    }

    /// A session's COM_INIT_DB, unless the consumer learns its database otherwise (its
    /// handshake was captured) or which one it had is not known (it changed database in
    /// what is held, and the read before attaching does not tell).
    fn init_db(&mut self, plan: &InitDb, key: SessionKey, s: &Session) {
        if plan.pass != Pass::Again && plan.held.started.contains(&key) {
            return;
        }
        let db = if plan.held.changed.contains(&key) {
            match plan.before.get(&key).filter(|b| b.id == s.id) {
                Some(b) => &b.db,
                None => {
                    PipelineCounters::add(&self.counters.bootstrap_db_changed, 1);
                    return;
                }
            }
        } else {
            &s.db
        };
        if let Some(db) = db
            && self.inject(key, &encode::com_init_db(db.as_bytes()))
        {
            PipelineCounters::add(&self.counters.bootstrap_units, 1);
        }
    }

    /// Sessions of the last read that this one no longer lists (or lists with another id:
    /// a new session on the address, which gets no COM_QUIT); remembers this read's.
    fn gone_since_last_read(&mut self, snap: &Snapshot) -> Vec<SessionKey> {
        let mut gone = Vec::new();
        for (key, id) in std::mem::take(&mut self.known) {
            match snap.sessions.get(&key) {
                None => gone.push(key),
                Some(s) if s.id != id => PipelineCounters::add(&self.counters.gc_port_reused, 1),
                Some(_) => {}
            }
        }
        for key in &gone {
            self.hold.pending.remove(key);
        }
        // A session whose end was captured may still be listed for a moment; a new session
        // on its address has another id.
        self.ended.retain(|key, (id, _)| {
            snap.sessions
                .get(key)
                .is_some_and(|s| id.is_none_or(|id| id == s.id))
        });
        self.known = snap
            .sessions
            .iter()
            .filter(|(k, _)| !self.ended.contains_key(k))
            .map(|(k, s)| (*k, s.id))
            .collect();
        gone
    }

    /// Rows the socket table could not place (sessions that closed between the process-list
    /// read and the socket-table read, mostly) are looked for among the sessions captured:
    /// one that matches the host's address and port, and only one, is that session.
    fn place_unresolved(&mut self, snap: &mut Snapshot) {
        for u in std::mem::take(&mut snap.unresolved) {
            let mut found: Vec<SessionKey> = self
                .flows
                .sessions()
                .chain(self.hold.records.iter().map(Record::client))
                .filter(|k| u.matches(k))
                .collect();
            found.sort();
            found.dedup();
            match (u.session, found.as_slice()) {
                (Some(session), [key]) => {
                    snap.sessions.entry(*key).or_insert(session);
                }
                (session, _) => {
                    if session.is_some() {
                        tracing::warn!(
                            host = u.host,
                            "no client address found for this process-list host: the \
                             session is not bootstrapped and gets no COM_QUIT"
                        );
                    }
                    PipelineCounters::add(&self.counters.unresolved_hosts, 1);
                }
            }
        }
    }

    /// Puts a synthetic unit into the session's publisher queue; false if the session's
    /// address cannot be encoded.
    fn inject(&mut self, key: SessionKey, data: &[u8]) -> bool {
        match key.0 {
            IpAddr::V4(ip) => {
                self.fanout.push(ip, key.1, data, self.now);
                true
            }
            IpAddr::V6(_) => {
                PipelineCounters::add(&self.counters.unencodable, 1);
                false
            }
        }
    }

    /// Passes on held segments whose sessions are no longer held, in arrival order.
    fn release(&mut self) {
        let records = std::mem::take(&mut self.hold.records);
        self.hold.bytes = 0;
        for r in records {
            if self.hold.holds(&r.client()) {
                self.hold.bytes += r.data.len() + HELD_OVERHEAD;
                self.hold.records.push(r);
            } else {
                self.deliver(r);
            }
        }
        if self.hold.records.is_empty() && !self.hold.all {
            self.hold.since = None;
        }
    }

    /// Held too long or too much: publish everything held, undecided.
    fn overflow(&mut self) {
        PipelineCounters::add(&self.counters.hold_overflow, self.hold.records.len() as u64);
        tracing::warn!(
            segments = self.hold.records.len(),
            bytes = self.hold.bytes,
            "published segments before the session bootstrap could decide on them (MySQL \
             too slow to answer?)"
        );
        self.hold.all = false;
        self.hold.pending.clear();
        self.release();
    }

    /// At exit: publishes whatever is still held and every open batch.
    pub fn finish(&mut self, now: Instant) {
        self.now = now;
        if !self.hold.records.is_empty() {
            self.overflow();
        }
        self.give_up_gaps(true);
        self.fanout.send_all(now);
    }

    fn deliver(&mut self, r: Record) {
        // Checked here, past the hold: a connection of ours made while capturing (a
        // reconnect) is known only from the read its segments were held for.
        let client = r.client();
        if self.own == Some(client) || self.former_own.iter().any(|(k, _)| *k == client) {
            if r.is_client() {
                PipelineCounters::add(&self.counters.own_traffic, 1);
            }
            return;
        }
        if let RecordKind::PrepareReply { awaiting } = r.kind {
            // In ring order, after the segments of the PREPARE it answers.
            let key = FlowKey {
                client: (r.dst, r.dport),
                server: (r.src, r.sport),
            };
            self.flows.reply(key, awaiting, &r.data, &self.counters);
            return;
        }
        if !r.src.is_ipv4() {
            if !r.data.is_empty() {
                PipelineCounters::add(&self.counters.unencodable, 1);
            }
            return;
        }
        let key = FlowKey {
            client: (r.src, r.sport),
            server: (r.dst, r.dport),
        };
        let mut out = std::mem::take(&mut self.out);
        if r.kind == RecordKind::TlsPlain {
            self.flows
                .plaintext(key, r.seq, r.data, self.now, &self.counters, &mut out);
        } else {
            let seg = Segment::new(r.seq, r.offset, r.segment_len, r.tcp_flags, r.data);
            self.flows
                .accept(key, seg, self.now, &self.counters, &mut out);
        }
        // What this segment lets out was captured (complete) with it: the latency histogram.
        self.fanout.set_captured(r.ts_ns);
        for o in out.drain(..) {
            self.publish(key.client, o);
        }
        self.fanout.set_captured(0);
        self.out = out;
        // Flows the table gave up for this one's room end for the consumer too.
        if self.flows.has_evicted() {
            for (k, o) in self.flows.take_evicted() {
                self.publish(k.client, o);
            }
        }
    }

    /// Publishes what flows let out when their gaps are given up: timed out, or `all`.
    fn give_up_gaps(&mut self, all: bool) {
        let mut timed_out = Vec::new();
        self.flows
            .on_timeout(self.now, all, &self.counters, &mut timed_out);
        for (key, o) in timed_out {
            self.publish(key.client, o);
        }
    }

    fn publish(&mut self, session: SessionKey, o: Output) {
        let IpAddr::V4(ip) = session.0 else {
            return;
        };
        match o {
            Output::Data(d) => self.fanout.push(ip, session.1, &d, self.now),
            Output::Quit => self.fanout.push(ip, session.1, &encode::COM_QUIT, self.now),
            // Only described for `inspect`.
            Output::Attributes(_) => {}
            Output::Closed { ended } => {
                // The session is over: the process-list GC must not end it again, and a
                // session the bootstrap gave a database ends for the consumer too.
                let id = self.known.remove(&session);
                let known = id.is_some();
                if self.ended.len() < self.max_ended || self.ended.contains_key(&session) {
                    self.ended.insert(session, (id, self.now));
                } else {
                    PipelineCounters::add(&self.counters.closed_unremembered, 1);
                }
                self.hold.pending.remove(&session);
                if known && !ended {
                    self.fanout.push(ip, session.1, &encode::COM_QUIT, self.now);
                    PipelineCounters::add(&self.counters.close_quits, 1);
                }
            }
        }
    }
}

impl RecordSink for Pipeline {
    fn push(&mut self, r: Record) {
        let key = r.client();
        if self.hold.holds(&key) {
            if !self.hold.all
                && r.is_client()
                && is_handshake_response(&r.data)
                && !self
                    .hold
                    .records
                    .iter()
                    .any(|h| h.client() == key && h.is_client() && !h.data.is_empty())
            {
                // A session pending since the first pass sends its handshake only now: the
                // consumer learns its database from it. Its SYN, if held, goes first.
                self.hold.pending.remove(&key);
                self.release();
                self.deliver(r);
                return;
            }
            self.hold.bytes += r.data.len() + HELD_OVERHEAD;
            self.hold.since.get_or_insert(self.now);
            self.hold.records.push(r);
            if self.hold.bytes > self.hold.max {
                self.overflow();
            }
            return;
        }
        self.deliver(r);
    }

    fn begin(&mut self) {
        self.now = Instant::now();
    }

    fn end(&mut self) {
        if let Some(ahead) = self.flush_ahead {
            self.fanout.send_due(self.now + ahead, self.now);
        }
    }
}

#[cfg(test)]
mod tests {
    mod bootstrap {
        use std::net::Ipv4Addr;

        use bytes::Bytes;

        use super::super::*;
        use crate::{
            encode::{COM_QUIT, com_init_db, decode_message},
            memory::MemoryBudget,
            publish::{BatchLimits, LaneReceiver, lane},
        };

        fn pipeline() -> (Pipeline, LaneReceiver, Arc<PipelineCounters>) {
            let (tx, rx) = lane(Some(100));
            let counters = Arc::new(PipelineCounters::default());
            let limits = BatchLimits {
                segments: 1000,
                bytes: 1 << 20,
                max_wait: Duration::from_secs(60),
            };
            let budget = Arc::new(MemoryBudget::new(1 << 30));
            let fanout = Fanout::new(
                Ipv4Addr::LOCALHOST,
                vec![tx],
                limits,
                budget,
                counters.clone(),
            );
            (
                Pipeline::new(fanout, counters.clone(), true, false),
                rx,
                counters,
            )
        }

        fn query(port: u16, seq: u32, sql: &str) -> Record {
            let mut data = ((sql.len() + 1) as u32).to_le_bytes()[..3].to_vec();
            data.extend_from_slice(&[0, 3]);
            data.extend_from_slice(sql.as_bytes());
            Record {
                kind: crate::capture::RecordKind::Client,
                ts_ns: 0,
                src: IpAddr::V4(Ipv4Addr::LOCALHOST),
                dst: IpAddr::V4(Ipv4Addr::LOCALHOST),
                sport: port,
                dport: 3306,
                seq,
                tcp_flags: 0,
                segment_len: data.len() as u32,
                offset: 0,
                ifindex: 1,
                data: Bytes::from(data),
            }
        }

        fn session(id: u64, db: &str) -> Session {
            Session {
                id,
                db: Some(db.into()),
                handshaking: false,
            }
        }

        fn key(port: u16) -> SessionKey {
            (IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        }

        /// Per port, the units published, in order.
        fn published(p: &mut Pipeline, rx: &mut LaneReceiver) -> HashMap<u16, Vec<Vec<u8>>> {
            p.fanout.send_all(Instant::now());
            let mut out: HashMap<u16, Vec<Vec<u8>>> = HashMap::default();
            while let Ok(b) = rx.try_recv() {
                for u in decode_message(b.bytes()).unwrap().units {
                    out.entry(u.port).or_default().push(u.data);
                }
            }
            out
        }

        /// Port 1 changes database and port 2 ends while the first read after attaching is
        /// under way: with the read made before attaching, both get the database they had
        /// as capture began, and the one that ended a COM_QUIT after its segments.
        #[test]
        fn the_read_before_attaching_serves_sessions_that_change_or_end() {
            for with_before in [true, false] {
                let (mut p, mut rx, c) = pipeline();
                if with_before {
                    p.set_before(Snapshot {
                        sessions: [(key(1), session(11, "old")), (key(2), session(12, "b"))]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    });
                }
                p.begin();
                let (use_new, select, insert) = (
                    query(1, 100, "USE new"),
                    query(1, 112, "SELECT 1"),
                    query(2, 500, "INSERT INTO t VALUES (1)"),
                );
                for r in [use_new.clone(), insert.clone(), select.clone()] {
                    p.push(r);
                }
                assert!(published(&mut p, &mut rx).is_empty(), "held");
                let after = Snapshot {
                    sessions: [(key(1), session(11, "new"))].into_iter().collect(),
                    ..Default::default()
                };
                p.on_event(Event::Snapshot(Pass::First, after));
                let got = published(&mut p, &mut rx);
                let l = c.load();
                if with_before {
                    assert_eq!(
                        got[&1],
                        [
                            com_init_db(b"old"),
                            use_new.data.to_vec(),
                            select.data.to_vec()
                        ]
                    );
                    assert_eq!(
                        got[&2],
                        [com_init_db(b"b"), insert.data.to_vec(), COM_QUIT.to_vec()]
                    );
                    assert_eq!(
                        (l.bootstrap_units, l.gc_quits, l.bootstrap_db_changed),
                        (2, 1, 0)
                    );
                } else {
                    assert_eq!(got[&1], [use_new.data.to_vec(), select.data.to_vec()]);
                    assert_eq!(got[&2], [insert.data.to_vec()]);
                    assert_eq!(
                        (l.bootstrap_units, l.gc_quits, l.bootstrap_db_changed),
                        (0, 0, 1)
                    );
                }
            }
        }

        /// A session gone from the process list gets a COM_QUIT from the GC, unless its own
        /// went out already while its flow is still open (its FIN not seen yet: behind a gap,
        /// say): the consumer is never told twice.
        #[test]
        fn the_gc_ends_a_session_once() {
            let (mut p, mut rx, c) = pipeline();
            p.begin();
            let both = Snapshot {
                sessions: [(key(1), session(11, "a")), (key(2), session(12, "b"))]
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            p.on_event(Event::Snapshot(Pass::First, both.clone()));
            p.on_event(Event::Snapshot(Pass::Second, both));
            let (q1, q2) = (query(1, 100, "SELECT 1"), query(2, 500, "SELECT 2"));
            let mut quit = query(1, 100 + q1.data.len() as u32, "");
            quit.data = Bytes::from_static(&COM_QUIT);
            quit.segment_len = COM_QUIT.len() as u32;
            for r in [q1.clone(), q2.clone(), quit] {
                p.push(r);
            }
            p.on_event(Event::Snapshot(Pass::Gc, Snapshot::default()));
            let got = published(&mut p, &mut rx);
            let ends = |port: u16| got[&port].iter().filter(|u| **u == COM_QUIT).count();
            assert_eq!((ends(1), ends(2)), (1, 1), "{got:?}");
            assert_eq!(c.load().gc_quits, 1);
        }
    }
}
