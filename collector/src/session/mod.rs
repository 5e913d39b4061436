//! The MySQL session stage: follows the packets of one connection's client stream, in order
//! and exactly once as [`crate::tcp`] hands it over, and decides what of it is published.
//!
//! Replication is kept out of the replay: a session that sends COM_REGISTER_SLAVE,
//! COM_BINLOG_DUMP or COM_BINLOG_DUMP_GTID is a replica (a COM_QUIT ends what was published of
//! it, nothing more is), and semi-sync ACK packets (`0xef` after the header) are left out,
//! unless `--include_replication`. With prepared statements followed, COM_STMT_* commands are
//! collected and each execute is published as the text query it stands for ([`crate::prepared`]).
//! After a gap given up, bytes are left out until a segment starts with a command.
//!
//! Before the packets, the [`wire`]: TLS sessions are left out (counted), compressed ones
//! inflated. The handshake response is published with the capabilities a player cannot use
//! (TLS, compression, query attributes) cleared; COM_QUERYs lose their query attributes
//! ([`attributes`]); a COM_CHANGE_USER is followed by a COM_INIT_DB of the database it names.
//! What cannot be made replayable ends the session with a COM_QUIT there, counted.

mod attributes;
mod wire;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use foldhash::HashSet;
use mysql_common::constants::CapabilityFlags;

use self::wire::Wire;
pub use self::{
    attributes::{Split, looks_like_attributes, split},
    wire::{WireError, starts_frame, starts_tls_record},
};
use crate::{
    memory::MemoryBudget,
    prepared::{MAX_COMMAND, Reply, StatementError, Statements},
    protocol::{
        self, HEADER,
        command::{self, is_statement},
        starts_command,
    },
    status::PipelineCounters,
    types::SessionKey,
};

/// Capabilities a player's own connection does not have: cleared in the published handshake.
const NOT_REPLAYED: CapabilityFlags = CapabilityFlags::CLIENT_SSL
    .union(CapabilityFlags::CLIENT_COMPRESS)
    .union(CapabilityFlags::CLIENT_QUERY_ATTRIBUTES)
    .union(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM);

/// How long a connection with prepared statements open is kept while idle: MySQL's default
/// `wait_timeout`.
pub const STATEMENTS_IDLE: Duration = Duration::from_secs(8 * 3600);

/// What the packet follower leaves out.
#[derive(Debug, Default)]
pub(crate) struct Policy {
    pub(crate) include_replication: bool,
    /// Prepared-statement commands are taken out and executes published as text.
    pub(crate) prepared: bool,
    /// Thread ids of the replicas' binlog dumps in the process list: a `KILL` of one of them
    /// is a semi-sync replica stopping (it kills its dump thread on the source), not a
    /// statement to replay.
    pub(crate) replica_ids: HashSet<u64>,
    /// Query attributes taken off a COM_QUERY are described before it ([`Output::Attributes`]),
    /// for `inspect`.
    pub(crate) describe_attributes: bool,
    /// What collected commands and long data take from (the publishers' queue budget, which
    /// they share with what is in transit); none: unbounded (tests, `inspect`).
    pub(crate) commands: Option<Arc<MemoryBudget>>,
}

/// Bytes a follower holds of the command budget; given back when done with, or when the
/// follower goes.
#[derive(Debug, Default)]
struct Held {
    budget: Option<Arc<MemoryBudget>>,
    bytes: u64,
}

impl Held {
    /// Takes `n` bytes more; false if the budget has no room (or nothing is taken: no budget).
    fn take(&mut self, policy: &Policy, n: usize) -> bool {
        let Some(budget) = &policy.commands else {
            return true;
        };
        if !budget.try_take(n as u64) {
            return false;
        }
        self.budget.get_or_insert_with(|| budget.clone());
        self.bytes += n as u64;
        true
    }

    /// Gives back all but `keep` bytes.
    fn keep(&mut self, keep: usize) {
        let back = self.bytes.saturating_sub(keep as u64);
        if let Some(b) = &self.budget {
            b.give_back(back);
        }
        self.bytes -= back;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keep(0);
    }
}

/// The semi-sync ACK's magic byte, where a command byte would be.
pub const SEMI_SYNC_ACK: u8 = 0xef;

/// What leaves the session stage for a connection, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Data(Bytes),
    /// The session ends here for the consumer: a synthetic COM_QUIT.
    Quit,
    /// The query attributes (name, value as SQL) taken off the COM_QUERY that follows; only
    /// with [`Policy::describe_attributes`], and never published.
    Attributes(Vec<(Vec<u8>, Vec<u8>)>),
    /// The connection ended (FIN or RST). `ended`: the consumer's session has ended already
    /// (the client's COM_QUIT, or a synthetic one the flow sent); otherwise the flow published
    /// nothing, and only the bootstrap knows whether the consumer has the session.
    Closed {
        ended: bool,
    },
}

/// What happens to the bytes of the packet under way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[default]
    Keep,
    /// Left out (replication).
    Drop,
    /// Collected whole, not published as it is.
    Collect(Collected),
}

/// Why a command is collected whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collected {
    /// For the connection's prepared statements.
    Statement,
    /// The handshake response: published with [`NOT_REPLAYED`] cleared.
    Handshake,
    /// A COM_QUERY with query attributes: published without them.
    Query,
    /// A COM_CHANGE_USER: published, then a COM_INIT_DB of its database.
    ChangeUser,
}

/// Where a connection is in its MySQL packets: the session stage's state of one connection.
#[derive(Debug, Default)]
pub(crate) struct Follower {
    /// Bytes left of the current packet's payload; 0 at a packet start.
    left: usize,
    /// The start of a packet (header and command byte) cut by a segment end: not published
    /// until the packet's fate is known.
    head: Vec<u8>,
    mode: Mode,
    /// The current packet is 0xffffff bytes long: the next one continues its command.
    continues: bool,
    /// The command being collected (command byte and body, over continuation packets).
    collect: Vec<u8>,
    /// It passed [`MAX_COMMAND`] or the budget; the rest is not kept.
    collect_over: bool,
    /// The budget's bytes for `collect`, and for the statements' long data.
    collect_held: Held,
    long_held: Held,
    /// A replica's session: everything is left out.
    replica: bool,
    /// After a gap given up: bytes are left out until a segment starts with a command.
    resync: bool,
    /// The last command the client sent was COM_QUIT.
    quit: bool,
    /// The connection's prepared statements (created at its first statement command).
    statements: Option<Box<Statements>>,
    wire: Wire,
    /// The handshake response just changed the wire: what follows it goes through the new one.
    rewired: bool,
    /// The first packet was looked at (a handshake response or not).
    started: bool,
    /// The handshake says whether COM_QUERYs carry query attributes; without it, each one's
    /// bytes tell.
    attributes: Option<bool>,
    /// The rest of the session could not be made replayable: it ended with a COM_QUIT.
    broken: bool,
    /// The TLS request was seen: the plaintext starts with the handshake response.
    tls_requested: bool,
    /// The server's reads gave this session's plaintext (`--tls=auto`).
    tls_read: bool,
    /// The plaintext of a session encrypted before capture began: left out until a read that
    /// starts a command.
    plain_resync: bool,
    /// The plaintext's own wire (a TLS session may be compressed inside): `wire` is the
    /// ciphertext's.
    plain_wire: Wire,
    /// Why was logged (once per session).
    warned_unreplayable: bool,
}

impl Follower {
    /// The consumer's session has ended: the client's COM_QUIT, or a synthetic one.
    pub(crate) fn ended(&self) -> bool {
        self.quit || self.replica || self.resync || self.broken
    }

    /// Whether the connection has prepared statements open.
    pub(crate) fn has_statements(&self) -> bool {
        self.statements.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// A replica's session (the process list says so): everything is left out from now.
    pub(crate) fn mark_replica(&mut self) {
        self.replica = true;
    }

    /// Bytes went missing before what comes next: left out until a segment starts with a
    /// command.
    pub(crate) fn resync(&mut self) {
        if self.ciphertext() {
            // The ciphertext is not published; the plaintext comes from the server's reads.
            return;
        }
        self.resync = true;
        self.wire.resync();
    }

    /// A TLS session: what TC captures of it is ciphertext, left out.
    pub(crate) fn ciphertext(&self) -> bool {
        matches!(self.wire, Wire::Tls)
    }

    /// Plaintext the client sent on this TLS session, as the server's `SSL_read` returned it:
    /// followed as the session's stream (through a wire of its own: compression inside TLS).
    pub(crate) fn plaintext(
        &mut self,
        data: Bytes,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        PipelineCounters::add(&c.tls_plain_bytes, data.len() as u64);
        if !std::mem::replace(&mut self.tls_read, true) {
            PipelineCounters::add(&c.tls_read_sessions, 1);
            if !self.tls_requested {
                // Encrypted before capture began.
                self.plain_resync = true;
                self.started = true;
                if !self.ciphertext() {
                    PipelineCounters::add(&c.tls_sessions, 1);
                    self.wire = Wire::Tls;
                }
            }
        }
        if self.plain_resync {
            if !starts_plain_command(&data) {
                PipelineCounters::add(&c.gap_bytes, data.len() as u64);
                return;
            }
            self.plain_resync = false;
            // A read of a packet header alone starts the command too (the follower's own
            // resync wants the command byte in the same bytes).
            if self.resync {
                self.restart(c);
            }
        }
        let ciphertext = std::mem::replace(&mut self.wire, std::mem::take(&mut self.plain_wire));
        self.feed(data, policy, c, out);
        self.plain_wire = std::mem::replace(&mut self.wire, ciphertext);
    }

    /// Plaintext of this TLS session was lost before the next read (`missing` bytes, 0 if
    /// unknown): what was published of it ends with a COM_QUIT, and the plaintext is left out
    /// until a read starts a command, as after a TCP gap.
    pub(crate) fn plaintext_lost(
        &mut self,
        missing: u64,
        published: bool,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        PipelineCounters::add(&c.tls_gaps, 1);
        PipelineCounters::add(&c.gap_bytes, missing);
        if published && !self.ended() {
            out.push(Output::Quit);
        }
        self.resync = true;
        self.plain_wire.resync();
        // A compressed wire finds its next frame by itself; the follower's resync then waits
        // for a command in what it inflates.
        self.plain_resync = !matches!(self.plain_wire, Wire::Compressed(_));
    }

    /// After bytes went missing: the packet state starts again at a command.
    fn restart(&mut self, c: &PipelineCounters) {
        // The statements stay: the server still has them. PREPAREs whose bytes were lost
        // will never have their replies paired. So do the wire and what the handshake said.
        if let Some(s) = self.statements.as_mut() {
            PipelineCounters::add(&c.stmt_reply_lost, s.forget_awaiting() as u64);
        }
        self.left = 0;
        // A packet start held back until its fate was known: never published.
        PipelineCounters::add(&c.gap_bytes, self.head.len() as u64);
        self.head.clear();
        self.mode = Mode::Keep;
        self.continues = false;
        self.collect.clear();
        self.collect_over = false;
        self.collect_held.keep(0);
        self.quit = false;
        self.resync = false;
    }

    /// The rest of the session cannot be made replayable (`why`): it ends here for the
    /// consumer, and nothing more of it is published.
    fn unreplayable(
        &mut self,
        why: &dyn std::fmt::Display,
        counter: &std::sync::atomic::AtomicU64,
        out: &mut Vec<Output>,
    ) {
        PipelineCounters::add(counter, 1);
        if !self.ended() {
            out.push(Output::Quit);
        }
        self.broken = true;
        self.wire = Wire::Broken;
        if !std::mem::replace(&mut self.warned_unreplayable, true) {
            tracing::warn!("a session cannot be replayed from here and ends: {why}");
        }
    }

    /// The first bytes of the server's reply to a COM_STMT_PREPARE on `client`'s
    /// connection, sent when `awaiting` PREPAREs were unanswered (see [`Statements::reply`]).
    /// `gap`: bytes of the stream have not arrived (the PREPARE it answers may be there).
    pub(crate) fn reply(
        &mut self,
        client: SessionKey,
        awaiting: u8,
        head: &[u8],
        gap: bool,
        c: &PipelineCounters,
    ) {
        let statements = self.statements.get_or_insert_with(Default::default);
        if gap || self.resync {
            // No reply of the connection can be paired until its stream is whole.
            PipelineCounters::add(&c.stmt_reply_unmatched, 1);
            PipelineCounters::add(&c.stmt_reply_lost, statements.forget_awaiting() as u64);
            return;
        }
        let (reply, lost) = statements.reply(awaiting, head);
        PipelineCounters::add(&c.stmt_reply_lost, lost as u64);
        match reply {
            Reply::Known { .. } => PipelineCounters::add(&c.stmt_known, 1),
            Reply::Failed => PipelineCounters::add(&c.stmt_prepare_failed, 1),
            Reply::Unmatched { why } => {
                PipelineCounters::add(&c.stmt_reply_unmatched, 1);
                if !std::mem::replace(&mut statements.warned_unmatched, true) {
                    tracing::warn!(
                        client = %format_args!("{}:{}", client.0, client.1),
                        awaiting,
                        head = %head.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        "a COM_STMT_PREPARE reply could not be paired ({why}): that statement \
                         gets no id, its executes are not published (logged once per session)"
                    );
                }
            }
        }
    }
}

/// Coalesces the kept byte ranges of one segment into as few outputs as possible.
struct Kept<'a> {
    data: &'a Bytes,
    run: Option<(usize, usize)>,
}

impl Kept<'_> {
    fn keep(&mut self, from: usize, to: usize, out: &mut Vec<Output>) {
        if from == to {
            return;
        }
        match &mut self.run {
            Some((_, end)) if *end == from => *end = to,
            _ => {
                self.flush(out);
                self.run = Some((from, to));
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<Output>) {
        if let Some((from, to)) = self.run.take() {
            out.push(Output::Data(self.data.slice(from..to)));
        }
    }
}

/// Largest unit a synthetic statement is published in: the consumer joins units anyway; a
/// rendered 16 MiB blob takes a few batches, not hundreds, and the broker's message size
/// limit stays far away.
const SYNTHETIC_UNIT: usize = 1 << 20;

impl Follower {
    /// Takes the next bytes of the client's stream through the wire and the packets; appends
    /// what to publish.
    pub(crate) fn feed(
        &mut self,
        data: Bytes,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        if let Wire::Unknown = self.wire {
            self.wire = Wire::classify(&data, c);
        }
        if let Wire::Plain = self.wire {
            // The handshake response may change the wire: the rest goes through the new one.
            if let Some(rest) = self.follow(data, policy, c, out) {
                self.feed(rest, policy, c, out);
            }
            return;
        }
        let mut packets = Vec::new();
        let r = self.wire.unwrap(data, c, &mut packets);
        for p in packets {
            self.follow(p, policy, c, out);
        }
        if let Err(e) = r {
            self.unreplayable(&e, &c.unreplayable_frames, out);
        }
    }

    /// Follows `data` through the packets; appends the bytes to publish. Stops after a
    /// handshake response that changed the wire, and returns the bytes after it.
    fn follow(
        &mut self,
        data: Bytes,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) -> Option<Bytes> {
        if self.broken {
            PipelineCounters::add(&c.unreplayable_bytes, data.len() as u64);
            return None;
        }
        if self.resync {
            if !starts_command(&data) {
                PipelineCounters::add(&c.gap_bytes, data.len() as u64);
                return None;
            }
            self.restart(c);
        }
        let mut kept = Kept {
            data: &data,
            run: None,
        };
        // Bytes of a packet start carried over from earlier segments.
        let mut carried = self.head.len();
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                let n = self.left.min(data.len() - i);
                self.take(&mut kept, i, i + n, c, out);
                self.left -= n;
                i += n;
                if self.left == 0 {
                    self.packet_end(&mut kept, policy, c, out);
                    if std::mem::take(&mut self.rewired) {
                        kept.flush(out);
                        return Some(data.slice(i..));
                    }
                }
                continue;
            }
            // A packet starts (or its header continues) at `i - head.len() + carried`.
            let head_from = i;
            while self.head.len() < HEADER && i < data.len() {
                self.head.push(data[i]);
                i += 1;
            }
            let len = u32::from_le_bytes([
                self.head[0],
                *self.head.get(1).unwrap_or(&0),
                *self.head.get(2).unwrap_or(&0),
                0,
            ]) as usize;
            let continuation = self.continues;
            let cut = self.head.len() < HEADER
                || (len > 0 && !continuation && self.head.len() == HEADER && i == data.len());
            if cut {
                // The segment ends inside the packet's start: held until its command byte
                // is here.
                break;
            }
            if len > 0 && !continuation && self.head.len() == HEADER {
                // The command byte decides, too.
                self.head.push(data[i]);
                i += 1;
            }
            if !continuation {
                let was_replica = self.replica;
                self.mode = self.decide(&data, i, len, policy, c);
                if self.replica && !was_replica {
                    // What was published of the session ends for the consumer.
                    kept.flush(out);
                    out.push(Output::Quit);
                }
            }
            self.continues = len == 0xff_ffff;
            // The header (and command byte): the part carried over, then the part here.
            let head = std::mem::take(&mut self.head);
            match self.mode {
                Mode::Keep => {
                    if carried > 0 {
                        kept.flush(out);
                        let rest = Bytes::copy_from_slice(&head[..carried]);
                        out.push(Output::Data(rest));
                    }
                    kept.keep(head_from, i, out);
                }
                Mode::Drop => PipelineCounters::add(&c.replication_bytes, head.len() as u64),
                Mode::Collect(_) => {
                    self.collect_packet(len, policy, c);
                    self.collect_bytes(&head[HEADER..]);
                }
            }
            carried = 0;
            self.left = len - (head.len() - HEADER);
            self.head = head;
            self.head.clear();
            if self.left == 0 {
                self.packet_end(&mut kept, policy, c, out);
                if std::mem::take(&mut self.rewired) {
                    kept.flush(out);
                    return Some(data.slice(i..));
                }
            }
        }
        kept.flush(out);
        None
    }

    /// What happens to a new command packet whose header (and command byte, if any) is in
    /// `self.head`; `data[i..]` follows it.
    fn decide(
        &mut self,
        data: &[u8],
        i: usize,
        len: usize,
        policy: &Policy,
        c: &PipelineCounters,
    ) -> Mode {
        let include_replication = policy.include_replication;
        let seq = self.head[3];
        let first = !std::mem::replace(&mut self.started, true);
        let handshake_seq = if self.tls_requested { 2 } else { 1 };
        if first && seq == handshake_seq && len >= 32 && matches!(self.wire, Wire::Plain) {
            // The handshake response (or the TLS request), when the session's start is here.
            let caps = data
                .get(i..i + 1)
                .map_or(CapabilityFlags::CLIENT_PROTOCOL_41.bits(), |b| {
                    u32::from(b[0]) << 8
                });
            if caps & CapabilityFlags::CLIENT_PROTOCOL_41.bits() != 0 {
                self.collect.clear();
                self.collect_over = false;
                return Mode::Collect(Collected::Handshake);
            }
        }
        let Some(&cmd) = self.head.get(HEADER) else {
            // An empty packet.
            return if self.replica && !include_replication {
                Mode::Drop
            } else {
                Mode::Keep
            };
        };
        let becomes_replica = !include_replication
            && !self.replica
            && seq == 0
            && matches!(
                cmd,
                command::REGISTER_SLAVE | command::BINLOG_DUMP | command::BINLOG_DUMP_GTID
            );
        let ack = seq == 0 && cmd == SEMI_SYNC_ACK;
        // A short query whose whole packet is in this segment: a replica's KILL of its dump
        // thread? (A statement split over segments is published as it is.)
        let kill = !include_replication
            && seq == 0
            && cmd == command::QUERY
            && !policy.replica_ids.is_empty()
            && len <= 64
            && data
                .get(i..i + len - 1)
                .and_then(killed_thread)
                .is_some_and(|id| policy.replica_ids.contains(&id));
        if kill {
            PipelineCounters::add(&c.replica_kills, 1);
        }
        self.quit = seq == 0 && cmd == command::QUIT;
        if becomes_replica {
            self.replica = true;
            PipelineCounters::add(&c.replication_sessions, 1);
        }
        if ack {
            PipelineCounters::add(&c.semi_sync_acks, 1);
        }
        if !include_replication && (self.replica || ack || kill) {
            return Mode::Drop;
        }
        let collected = match cmd {
            _ if seq != 0 => None,
            _ if policy.prepared && is_statement(cmd) => Some(Collected::Statement),
            // Only this packet's body counts: after an empty query come the next packet's
            // header bytes, which look like an attribute block (`00 01`).
            command::QUERY
                if self.attributes.unwrap_or_else(|| {
                    let body = data.get(i..).unwrap_or_default();
                    attributes::looks_like_attributes(
                        &body[..body.len().min(len.saturating_sub(1))],
                    )
                }) =>
            {
                Some(Collected::Query)
            }
            command::CHANGE_USER => Some(Collected::ChangeUser),
            _ => None,
        };
        match collected {
            Some(what) => {
                self.collect.clear();
                self.collect_over = false;
                Mode::Collect(what)
            }
            None => Mode::Keep,
        }
    }

    /// Payload bytes `data[from..to]` of the packet under way.
    fn take(
        &mut self,
        kept: &mut Kept,
        from: usize,
        to: usize,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        match self.mode {
            Mode::Keep => kept.keep(from, to, out),
            Mode::Drop => PipelineCounters::add(&c.replication_bytes, (to - from) as u64),
            Mode::Collect(_) => self.collect_bytes(&kept.data[from..to]),
        }
    }

    /// A packet of `len` bytes of the command being collected starts: its room is taken from
    /// the budget at once, in one allocation (a command's pieces reallocated as they came
    /// would leave the heap fragmented well past what the budget counts).
    fn collect_packet(&mut self, len: usize, policy: &Policy, c: &PipelineCounters) {
        if self.collect_over {
            return;
        }
        if self.collect.len() + len > MAX_COMMAND {
            self.give_up_collect();
        } else if self.collect_held.take(policy, len) {
            self.collect.reserve_exact(len);
        } else {
            PipelineCounters::add(&c.command_mem_limit, 1);
            self.give_up_collect();
        }
    }

    /// Kept of a command given up: its byte, and the statement id and parameter that may
    /// follow it (what comes of the command is decided by them).
    const GIVEN_UP_KEEPS: usize = 7;

    fn give_up_collect(&mut self) {
        self.collect_over = true;
        self.collect.truncate(Self::GIVEN_UP_KEEPS);
        self.collect.shrink_to_fit();
        self.collect_held.keep(0);
    }

    fn collect_bytes(&mut self, bytes: &[u8]) {
        let room = if self.collect_over {
            Self::GIVEN_UP_KEEPS.saturating_sub(self.collect.len())
        } else {
            bytes.len()
        };
        self.collect
            .extend_from_slice(&bytes[..room.min(bytes.len())]);
    }

    /// The collected command, its budget given back (it is used at once).
    fn take_collected(&mut self) -> Vec<u8> {
        self.collect_held.keep(0);
        std::mem::take(&mut self.collect)
    }

    /// The current packet is complete; so is its command unless the next packet continues it.
    fn packet_end(
        &mut self,
        kept: &mut Kept,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        if self.continues {
            return;
        }
        if let Mode::Collect(what) = self.mode {
            // What was kept before the command goes first.
            kept.flush(out);
            match what {
                Collected::Statement => self.statement_command(policy, c, out),
                Collected::Handshake => self.handshake(c, out),
                Collected::Query => self.query(policy.describe_attributes, c, out),
                Collected::ChangeUser => self.change_user(c, out),
            }
        }
        self.mode = Mode::Keep;
    }

    /// The handshake response, collected: a TLS request switches the wire to TLS; otherwise
    /// it is published with [`NOT_REPLAYED`] cleared, and a compressed session's wire waits
    /// for its first command.
    fn handshake(&mut self, c: &PipelineCounters, out: &mut Vec<Output>) {
        let mut body = self.take_collected();
        if std::mem::replace(&mut self.collect_over, false) {
            let why = "the handshake response was not kept (no memory for it)";
            self.unreplayable(&why, &c.unreplayable_frames, out);
            return;
        }
        let caps = CapabilityFlags::from_bits_retain(u32::from_le_bytes([
            body[0], body[1], body[2], body[3],
        ]));
        if body.len() == 32 && caps.contains(CapabilityFlags::CLIENT_SSL) {
            PipelineCounters::add(&c.tls_sessions, 1);
            PipelineCounters::add(&c.tls_bytes, (HEADER + body.len()) as u64);
            self.wire = Wire::Tls;
            self.rewired = true;
            // The full handshake response comes inside TLS, with sequence number 2.
            self.tls_requested = true;
            self.started = false;
            self.plain_wire = Wire::Plain;
            return;
        }
        if protocol::HandshakeResponse::parse(&body).is_some() {
            self.attributes = Some(caps.contains(CapabilityFlags::CLIENT_QUERY_ATTRIBUTES));
            if caps.contains(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM) {
                // The zstd level, the response's last byte, goes with its flag.
                body.pop();
            }
            body[..4].copy_from_slice(&(caps - NOT_REPLAYED).bits().to_le_bytes());
            if caps.intersects(
                CapabilityFlags::CLIENT_COMPRESS
                    | CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM,
            ) {
                PipelineCounters::add(&c.compressed_sessions, 1);
                self.wire = Wire::Auth {
                    left: 0,
                    head: Vec::new(),
                };
                self.rewired = true;
            }
        }
        out.push(Output::Data(Bytes::from(protocol::packet(1, &body))));
    }

    /// A COM_QUERY with query attributes, collected: published as the SQL alone.
    fn query(&mut self, describe: bool, c: &PipelineCounters, out: &mut Vec<Output>) {
        let body = self.take_collected();
        if std::mem::replace(&mut self.collect_over, false) {
            let why = format!(
                "a COM_QUERY with query attributes passed {MAX_COMMAND} bytes, or the memory \
                 budget (--max_mem_mb)"
            );
            self.unreplayable(&why, &c.unreplayable_attributes, out);
            return;
        }
        match attributes::split(&body[1..], describe) {
            Ok(s) => {
                PipelineCounters::add(&c.query_attributes, 1);
                if !s.attributes.is_empty() {
                    out.push(Output::Attributes(s.attributes));
                }
                push_synthetic(protocol::command_packets(command::QUERY, s.sql), out);
            }
            Err(e) => {
                let why = format!("a COM_QUERY's query attributes do not parse: {e}");
                self.unreplayable(&why, &c.unreplayable_attributes, out);
            }
        }
    }

    /// A COM_CHANGE_USER, collected: published, then the database it names as a COM_INIT_DB
    /// (the player's own connection does not change user, but follows the database).
    fn change_user(&mut self, c: &PipelineCounters, out: &mut Vec<Output>) {
        let body = self.take_collected();
        if std::mem::replace(&mut self.collect_over, false) {
            let why = "a COM_CHANGE_USER was not kept (no memory for it)";
            self.unreplayable(&why, &c.unreplayable_frames, out);
            return;
        }
        out.push(Output::Data(Bytes::from(protocol::command_packets(
            body[0],
            &body[1..],
        ))));
        if let Some(db) = protocol::change_user_database(&body[1..]) {
            PipelineCounters::add(&c.change_user_dbs, 1);
            out.push(Output::Data(Bytes::from(protocol::command_packets(
                command::INIT_DB,
                &db,
            ))));
        }
    }

    /// A whole prepared-statement command, collected.
    fn statement_command(&mut self, policy: &Policy, c: &PipelineCounters, out: &mut Vec<Output>) {
        PipelineCounters::add(&c.stmt_commands, 1);
        let body = self.take_collected();
        let over = std::mem::replace(&mut self.collect_over, false);
        let statements = self.statements.get_or_insert_with(Default::default);
        statements.attributes = self.attributes == Some(true);
        let cmd = body[0];
        if over {
            PipelineCounters::add(&c.stmt_too_large, 1);
            tracing::warn!(
                command = format_args!("0x{cmd:02x}"),
                "a prepared-statement command passed {MAX_COMMAND} bytes, or the memory budget \
                 (--max_mem_mb): not kept"
            );
            if cmd == command::STMT_PREPARE {
                let lost = statements.prepare(None);
                PipelineCounters::add(&c.stmt_reply_lost, lost as u64);
            } else if cmd == command::STMT_SEND_LONG_DATA {
                // The parameter's value is incomplete: its execute must not render.
                statements.long_data_lost(&body[1..]);
            }
            return;
        }
        if cmd == command::STMT_PREPARE {
            PipelineCounters::add(&c.stmt_prepares, 1);
            let lost = statements.prepare(Some(&body[1..]));
            PipelineCounters::add(&c.stmt_reply_lost, lost as u64);
            return;
        }
        if cmd == command::STMT_SEND_LONG_DATA
            && !self.long_held.take(policy, body.len().saturating_sub(7))
        {
            PipelineCounters::add(&c.command_mem_limit, 1);
            statements.long_data_lost(&body[1..]);
            return;
        }
        let result = statements.command(cmd, &body[1..]);
        // What the statements hold of long data now (used up by an execute, dropped by a
        // reset or a close, or never kept).
        if self.long_held.bytes > 0 {
            self.long_held.keep(statements.long_bytes());
        }
        match result {
            Ok(None) => {}
            Ok(Some(sql)) => {
                PipelineCounters::add(&c.stmt_rendered, 1);
                push_synthetic(protocol::into_command_packets(command::QUERY, sql), out);
            }
            Err(e) => {
                let log = match &e {
                    StatementError::Unknown { .. } => {
                        PipelineCounters::add(&c.stmt_unknown, 1);
                        !std::mem::replace(&mut statements.warned_unknown, true)
                    }
                    StatementError::Render { id, .. } => {
                        PipelineCounters::add(&c.stmt_unrenderable, 1);
                        statements.first_failure(*id)
                    }
                    StatementError::Fetch => {
                        PipelineCounters::add(&c.stmt_fetches, 1);
                        false
                    }
                    StatementError::Bulk | StatementError::Short { .. } => {
                        PipelineCounters::add(&c.stmt_unrenderable, 1);
                        true
                    }
                };
                if log {
                    tracing::warn!("prepared statement not published: {e}");
                }
            }
        }
    }
}

/// Whether a plaintext read starts a packet that starts a command: the server reads a
/// packet's header alone, or with its payload.
fn starts_plain_command(data: &[u8]) -> bool {
    data.len() == HEADER && data[3] == 0 && data[..3] != [0, 0, 0] || starts_command(data)
}

/// A command the session stage wrote, in units of at most [`SYNTHETIC_UNIT`] bytes.
fn push_synthetic(packets: Vec<u8>, out: &mut Vec<Output>) {
    let packets = Bytes::from(packets);
    let mut at = 0;
    while at < packets.len() {
        let to = (at + SYNTHETIC_UNIT).min(packets.len());
        out.push(Output::Data(packets.slice(at..to)));
        at = to;
    }
}

/// The thread id a `KILL [HARD|SOFT] [CONNECTION|QUERY] id` statement names.
fn killed_thread(sql: &[u8]) -> Option<u64> {
    let sql = std::str::from_utf8(sql).ok()?;
    let mut words = sql.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("kill") {
        return None;
    }
    let mut word = words.next()?;
    for optional in [["hard", "soft"], ["connection", "query"]] {
        if optional.iter().any(|o| word.eq_ignore_ascii_case(o)) {
            word = words.next()?;
        }
    }
    let id = word.trim_end_matches(';').parse().ok()?;
    words.next().is_none().then_some(id)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Output;

    /// A command packet: header, command byte, argument.
    pub(crate) fn packet(cmd: u8, arg: &[u8]) -> Vec<u8> {
        let mut p = ((arg.len() + 1) as u32).to_le_bytes()[..3].to_vec();
        p.push(0);
        p.push(cmd);
        p.extend_from_slice(arg);
        p
    }

    /// The stream with `Q` for each COM_QUIT, `C` / `c` for each end (ended or not).
    pub(crate) fn flatten(out: Vec<Output>) -> Vec<u8> {
        out.into_iter()
            .flat_map(|o| match o {
                Output::Data(d) => d.to_vec(),
                Output::Quit => b"Q".to_vec(),
                Output::Closed { ended: true } => b"C".to_vec(),
                Output::Closed { ended: false } => b"c".to_vec(),
                Output::Attributes(_) => b"A".to_vec(),
            })
            .collect()
    }

    /// A COM_STMT_PREPARE_OK reply head: statement `id`, `params` parameters.
    pub(crate) fn prepare_ok(id: u32, params: u16) -> Vec<u8> {
        let mut h = vec![12, 0, 0, 1, 0];
        h.extend_from_slice(&id.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&params.to_le_bytes());
        h.extend_from_slice(&[0, 0, 0]);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};
    use crate::types::SessionKey;

    /// One connection's follower, fed in-order bytes as the flow table feeds it.
    #[derive(Default)]
    struct Conn {
        follower: Follower,
        policy: Policy,
        next: u32,
    }

    impl Conn {
        fn new(include_replication: bool) -> Self {
            let mut conn = Self::default();
            conn.policy.include_replication = include_replication;
            conn
        }

        fn set_prepared(&mut self, on: bool) {
            self.policy.prepared = on;
        }

        fn reply(&mut self, client: SessionKey, awaiting: u8, head: &[u8], c: &PipelineCounters) {
            self.follower.reply(client, awaiting, head, false, c);
        }
    }

    fn key() -> SessionKey {
        ("198.18.0.2".parse().unwrap(), 40000)
    }

    /// Feeds (seq, bytes), each right after the one before; returns the published stream
    /// with `Q` for each COM_QUIT.
    fn feed(f: &mut Conn, c: &PipelineCounters, segs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, data) in segs {
            assert_eq!(*seq, f.next, "in-order bytes only");
            f.next = seq.wrapping_add(data.len() as u32);
            f.follower
                .feed(Bytes::copy_from_slice(data), &f.policy, c, &mut out);
        }
        flatten(out)
    }

    #[test]
    fn replication_is_left_out_unless_included() {
        let q = packet(command::QUERY, b"SET @master_heartbeat_period=1");
        let mut ack = packet(SEMI_SYNC_ACK, &[0x38, 0x40, 1, 0, 0, 0, 0, 0]);
        ack.extend_from_slice(b"mysql-bin.001516");
        ack[0] += 16;
        let dump = packet(command::BINLOG_DUMP, &[4, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
        let register = packet(command::REGISTER_SLAVE, &[1, 0, 0, 0]);
        // An ACK between two queries, in one segment: the queries stay.
        let stream = [q.clone(), ack.clone(), q.clone()].concat();
        for include in [false, true] {
            let c = PipelineCounters::default();
            let mut f = Conn::new(include);
            let got = feed(&mut f, &c, &[(0, &stream)]);
            if include {
                assert_eq!(got, stream);
            } else {
                assert_eq!(got, [q.clone(), q.clone()].concat());
                let l = c.load();
                assert_eq!(
                    (l.semi_sync_acks, l.replication_bytes),
                    (1, ack.len() as u64)
                );
            }
        }
        // A replica: what came before stays, a quit ends it, nothing after is published.
        let c = PipelineCounters::default();
        let mut f = Conn::default();
        let replica = [q.clone(), register, dump].concat();
        let got = feed(&mut f, &c, &[(0, &replica), (replica.len() as u32, &q)]);
        assert_eq!(got, [&q[..], b"Q"].concat());
        assert_eq!(c.load().replication_sessions, 1);

        // A KILL of a replica's dump thread is left out; other KILLs are not.
        let c = PipelineCounters::default();
        let mut f = Conn::default();
        f.policy.replica_ids = [8].into_iter().collect();
        let kill_dump = packet(command::QUERY, b"KILL 8");
        let kill_other = packet(command::QUERY, b"kill connection 9");
        let got = feed(
            &mut f,
            &c,
            &[(0, &[kill_other.clone(), kill_dump, q.clone()].concat())],
        );
        assert_eq!(got, [kill_other, q.clone()].concat());
        assert_eq!(c.load().replica_kills, 1);
    }

    #[test]
    fn kill_statements_name_their_thread() {
        for (sql, id) in [
            (&b"KILL 8"[..], Some(8)),
            (b"kill  HARD connection 12;", Some(12)),
            (b"KILL QUERY 3", Some(3)),
            (b"KILL USER bob", None),
            (b"KILL 8 9", None),
            (b"SELECT 8", None),
        ] {
            assert_eq!(killed_thread(sql), id, "{}", String::from_utf8_lossy(sql));
        }
    }

    /// A COM_STMT_EXECUTE of statement `id` with one LONG parameter bound.
    fn execute_long(id: u32, v: i32) -> Vec<u8> {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 3, 0]);
        b.extend_from_slice(&v.to_le_bytes());
        packet(0x17, &b)
    }

    fn prepared_flows() -> Conn {
        let mut f = Conn::default();
        f.set_prepared(true);
        f
    }

    /// The stream cut at every byte: PREPARE, its reply, two EXECUTEs (the second rebinding no
    /// types), long data, CLOSE and a query; published: the executes as COM_QUERY packets and
    /// the query, in order, whatever the cuts.
    #[test]
    fn statements_become_queries_wherever_the_segments_are_cut() {
        let prepare = packet(0x16, b"SELECT ?, '?'");
        let rest = [
            execute_long(5, -7),
            packet(0x18, &[5, 0, 0, 0, 0, 0, b'x']),
            packet(0x1a, &[5, 0, 0, 0]),
            {
                let mut b = 5u32.to_le_bytes().to_vec();
                b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0]);
                b.extend_from_slice(&8i32.to_le_bytes());
                packet(0x17, &b)
            },
            packet(0x19, &[5, 0, 0, 0]),
            execute_long(5, 9),
            packet(command::QUERY, b"SELECT 2"),
        ]
        .concat();
        let want = [
            protocol::command_packets(command::QUERY, b"SELECT -7, '?'"),
            protocol::command_packets(command::QUERY, b"SELECT 8, '?'"),
            packet(command::QUERY, b"SELECT 2"),
        ]
        .concat();
        for cut in 1..rest.len() {
            let c = PipelineCounters::default();
            let mut f = prepared_flows();
            let mut got = feed(&mut f, &c, &[(0, &prepare)]);
            f.reply(key(), 1, &prepare_ok(5, 1), &c);
            let n = prepare.len() as u32;
            got.extend(feed(
                &mut f,
                &c,
                &[(n, &rest[..cut]), (n + cut as u32, &rest[cut..])],
            ));
            assert_eq!(got, want, "cut at {cut}");
            let l = c.load();
            assert_eq!(
                (
                    l.stmt_commands,
                    l.stmt_prepares,
                    l.stmt_known,
                    l.stmt_rendered
                ),
                (7, 1, 1, 2),
                "cut at {cut}"
            );
            // The execute after CLOSE: its statement is gone.
            assert_eq!(l.stmt_unknown, 1, "cut at {cut}");
        }
    }

    /// An EXECUTE of statement `id` binding one string.
    fn execute_str(id: u32, s: &[u8]) -> Vec<u8> {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 0xfd, 0, 0xfc]);
        b.extend_from_slice(&(s.len() as u16).to_le_bytes());
        b.extend_from_slice(s);
        packet(0x17, &b)
    }

    /// Commands collected whole, and long data, take from the command budget and give it
    /// back: an execute larger than the budget is given up (`command_mem_limit`, and
    /// `stmt_too_large`), a smaller one renders; long data past the budget is given up and
    /// its execute not rendered; a follower that goes gives back what it held.
    #[test]
    fn collected_commands_and_long_data_stay_inside_the_budget() {
        let c = PipelineCounters::default();
        let mut f = prepared_flows();
        let budget = Arc::new(MemoryBudget::new(1000));
        f.policy.commands = Some(budget.clone());
        let prepare = packet(0x16, b"SELECT ?");
        let mut at = 0u32;
        let mut send = |f: &mut Conn, p: &[u8]| {
            let got = feed(f, &c, &[(at, p)]);
            at += p.len() as u32;
            got
        };
        send(&mut f, &prepare);
        f.reply(key(), 1, &prepare_ok(5, 1), &c);
        assert!(send(&mut f, &execute_str(5, &[b'a'; 2000])).is_empty());
        assert_eq!(budget.used(), 0);
        let small = send(&mut f, &execute_str(5, &[b'b'; 100]));
        let want = format!("SELECT '{}'", "b".repeat(100));
        assert_eq!(
            small,
            protocol::command_packets(command::QUERY, want.as_bytes())
        );
        assert_eq!(budget.used(), 0);
        let long_data =
            |n: usize| packet(0x18, &[&[5, 0, 0, 0, 0, 0][..], &vec![b'x'; n]].concat());
        send(&mut f, &long_data(600));
        assert_eq!(budget.used(), 600);
        send(&mut f, &long_data(600));
        assert!(send(&mut f, &execute_long(5, 1)).is_empty());
        assert_eq!(budget.used(), 0);
        send(&mut f, &long_data(300));
        assert_eq!(budget.used(), 300);
        let l = c.load();
        assert_eq!(
            (
                l.command_mem_limit,
                l.stmt_too_large,
                l.stmt_unrenderable,
                l.stmt_rendered
            ),
            (2, 2, 1, 1)
        );
        drop(f);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn without_prepared_statements_the_packets_pass_as_they_are() {
        let c = PipelineCounters::default();
        let mut f = Conn::default();
        let stream = [packet(0x16, b"SELECT ?"), execute_long(1, 1)].concat();
        assert_eq!(feed(&mut f, &c, &[(0, &stream)]), stream);
        assert_eq!(c.load().stmt_commands, 0);
    }

    /// PREPAREs whose replies are never seen (asymmetric routing): at most
    /// [`crate::prepared::MAX_AWAITING`] wait per connection, the older given up and counted;
    /// a reply then still pairs with the latest.
    #[test]
    fn prepares_without_replies_are_bounded_and_counted() {
        let c = PipelineCounters::default();
        let mut f = prepared_flows();
        let n = crate::prepared::MAX_AWAITING + 100;
        let mut at = 0u32;
        for i in 0..n {
            let p = packet(0x16, format!("SELECT ? + {i}").as_bytes());
            feed(&mut f, &c, &[(at, &p)]);
            at += p.len() as u32;
        }
        let l = c.load();
        assert_eq!((l.stmt_prepares, l.stmt_reply_lost), (n as u64, 100));
        f.reply(key(), 1, &prepare_ok(7, 1), &c);
        let got = feed(&mut f, &c, &[(at, &execute_long(7, 5))]);
        let last = format!("SELECT 5 + {}", n - 1);
        assert_eq!(
            got,
            protocol::command_packets(command::QUERY, last.as_bytes())
        );
        assert_eq!(
            c.load().stmt_reply_lost,
            100 + crate::prepared::MAX_AWAITING as u64 - 1
        );
    }

    /// A reply pairs with the latest PREPARE when the kernel counted one since the reply
    /// before; anything else gives no id. Then MariaDB's "last prepared" id, an older PREPARE
    /// whose reply was missed, a command over 16 MiB (continuation packets).
    #[test]
    fn replies_pair_with_their_prepares_or_with_none() {
        let c = PipelineCounters::default();
        let mut f = prepared_flows();
        // Two PREPAREs before any reply (pipelined): neither is paired.
        let stream = [packet(0x16, b"SELECT ?"), packet(0x16, b"SELECT ?+1")].concat();
        feed(&mut f, &c, &[(0, &stream)]);
        f.reply(key(), 2, &prepare_ok(1, 1), &c);
        // A reply nobody waits for.
        f.reply(key(), 1, &prepare_ok(2, 1), &c);
        let mut at = stream.len() as u32;
        // One whose parameter count is not its statement's; then two that pair.
        for (sql, id) in [(&b"SELECT 1"[..], 3), (b"SELECT ?", 4), (b"SELECT ?+1", 5)] {
            let p = packet(0x16, sql);
            feed(&mut f, &c, &[(at, &p)]);
            at += p.len() as u32;
            f.reply(key(), 1, &prepare_ok(id, 1), &c);
        }
        let l = c.load();
        assert_eq!(
            (l.stmt_known, l.stmt_reply_unmatched, l.stmt_reply_lost),
            (2, 3, 2)
        );
        let execs = [
            execute_long(1, 0),
            execute_long(3, 0),
            execute_long(4, 10),
            execute_long(5, 20),
        ]
        .concat();
        let got = feed(&mut f, &c, &[(at, &execs)]);
        at += execs.len() as u32;
        assert_eq!(
            got,
            [
                protocol::command_packets(command::QUERY, b"SELECT 10"),
                protocol::command_packets(command::QUERY, b"SELECT 20+1"),
            ]
            .concat()
        );
        assert_eq!(c.load().stmt_unknown, 2);

        // PREPARE and EXECUTE(-1) together, before the reply; then a reply lost (an older
        // PREPARE left waiting is dropped when a newer one's reply comes).
        let direct = [packet(0x16, b"SELECT ? AS d"), execute_long(u32::MAX, 3)].concat();
        let got = feed(&mut f, &c, &[(at, &direct)]);
        at += direct.len() as u32;
        assert_eq!(
            got,
            protocol::command_packets(command::QUERY, b"SELECT 3 AS d")
        );
        let two = [packet(0x16, b"SELECT ?"), packet(0x16, b"SELECT ?, ?")].concat();
        feed(&mut f, &c, &[(at, &two)]);
        at += two.len() as u32;
        f.reply(key(), 1, &prepare_ok(9, 2), &c);
        // The two pipelined before, and the direct one and "SELECT ?" now.
        assert_eq!(c.load().stmt_reply_lost, 4);
        let mut b = 9u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 3, 0, 3, 0]);
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&2i32.to_le_bytes());
        // An execute of 16 MiB and more: three packets, the last empty.
        let mut big = b.clone();
        big.resize(0xff_ffff * 2 - 1, 0);
        let cmd = protocol::command_packets(0x17, &big);
        assert_eq!(cmd.len(), 3 * 4 + 0xff_ffff * 2);
        let got = feed(&mut f, &c, &[(at, &cmd)]);
        // The bytes after the values are ignored, as the server does.
        assert_eq!(
            got,
            protocol::command_packets(command::QUERY, b"SELECT 1, 2")
        );
    }
}

#[cfg(test)]
mod modern_tests {
    use mysql_common::constants::CapabilityFlags as F;

    use super::{attributes::tests::body as attrs, test_support::*, wire::tests::frame, *};
    use crate::protocol::test_support::handshake;

    /// Feeds `stream` as two segments cut at `cut`; the published stream (`Q`: a COM_QUIT).
    fn two_segments(stream: &[u8], cut: usize, c: &PipelineCounters) -> Vec<u8> {
        let (mut f, policy, mut out) = (Follower::default(), Policy::default(), Vec::new());
        for part in [&stream[..cut], &stream[cut..]] {
            f.feed(Bytes::copy_from_slice(part), &policy, c, &mut out);
        }
        flatten(out)
    }

    fn change_user(db: &[u8]) -> Vec<u8> {
        let body = [&b"bob\0"[..], &[2, 9, 9], db, b"\0", &[33, 0]].concat();
        packet(command::CHANGE_USER, &body)
    }

    /// A MySQL 8 client's session: compressed (zlib, zstd and frames sent as they are), query
    /// attributes, a change of user. Published: the handshake without those capabilities, the
    /// authentication, the commands inflated, the SQL without attributes, the new database.
    #[test]
    fn a_modern_session_is_published_as_a_player_replays_it_wherever_it_is_cut() {
        let base = (F::CLIENT_PROTOCOL_41
            | F::CLIENT_SECURE_CONNECTION
            | F::CLIENT_CONNECT_WITH_DB
            | F::CLIENT_PLUGIN_AUTH)
            .bits();
        let caps = base | (F::CLIENT_QUERY_ATTRIBUTES | F::CLIENT_COMPRESS).bits();
        let q1 = packet(command::QUERY, &attrs(&[], b"SELECT 1"));
        let q2 = packet(
            command::QUERY,
            &attrs(&[("n", 0x08, &7u64.to_le_bytes())], b"SELECT @n"),
        );
        let stream = [
            protocol::packet(1, &handshake(caps, &[7; 20], Some(b"shop"))),
            protocol::packet(3, &[5; 32]),
            frame(0, &q1, "zlib"),
            frame(0, &[q2.clone(), change_user(b"other")].concat(), "plain"),
            frame(0, &packet(command::QUIT, b""), "zstd"),
        ]
        .concat();
        let want = [
            protocol::packet(1, &handshake(base, &[7; 20], Some(b"shop"))),
            protocol::packet(3, &[5; 32]),
            packet(command::QUERY, b"SELECT 1"),
            packet(command::QUERY, b"SELECT @n"),
            change_user(b"other"),
            packet(command::INIT_DB, b"other"),
            packet(command::QUIT, b""),
        ]
        .concat();
        for cut in 0..stream.len() {
            let c = PipelineCounters::default();
            assert_eq!(two_segments(&stream, cut, &c), want, "cut at {cut}");
            let l = c.load();
            assert_eq!(
                (l.compressed_sessions, l.query_attributes, l.change_user_dbs),
                (1, 2, 1),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn tls_sessions_publish_nothing_and_are_counted() {
        let tls = (F::CLIENT_PROTOCOL_41 | F::CLIENT_SSL).bits();
        let mut request = tls.to_le_bytes().to_vec();
        request.resize(32, 0);
        let hello = [0x16, 3, 1, 0, 4, 1, 0, 0, 0];
        let stream = [protocol::packet(1, &request), hello.to_vec()].concat();
        for cut in 0..stream.len() {
            let c = PipelineCounters::default();
            assert_eq!(two_segments(&stream, cut, &c), b"", "cut at {cut}");
            let l = c.load();
            assert_eq!((l.tls_sessions, l.tls_bytes), (1, stream.len() as u64));
        }
        // Joined mid-stream: TLS records from the first byte.
        let c = PipelineCounters::default();
        let records = [0x17, 3, 3, 0, 2, 0xab, 0xcd].repeat(3);
        assert_eq!(two_segments(&records, 7, &c), b"");
        assert_eq!(c.load().tls_sessions, 1);
    }

    /// A TLS session read where the server decrypts it: the ciphertext left out, the
    /// plaintext published from its handshake response (sequence 1, CLIENT_SSL cleared), in the
    /// order the server read it, however the reads cut it; also for a session encrypted
    /// before capture began, from its first command.
    #[test]
    fn tls_plaintext_is_published_and_ciphertext_is_not() {
        let base = (F::CLIENT_PROTOCOL_41 | F::CLIENT_SECURE_CONNECTION).bits();
        let mut request = (base | F::CLIENT_SSL.bits()).to_le_bytes().to_vec();
        request.resize(32, 0);
        let hs = handshake(base | F::CLIENT_SSL.bits(), &[3; 20], Some(b"shop"));
        let q = packet(command::QUERY, b"INSERT INTO t VALUES (1)");
        let plain = [protocol::packet(2, &hs), q.clone()].concat();
        let want = [
            protocol::packet(1, &handshake(base, &[3; 20], Some(b"shop"))),
            q.clone(),
        ]
        .concat();
        let policy = Policy::default();
        for cut in 0..plain.len() {
            let c = PipelineCounters::default();
            let (mut f, mut out) = (Follower::default(), Vec::new());
            f.feed(
                Bytes::from(protocol::packet(1, &request)),
                &policy,
                &c,
                &mut out,
            );
            f.feed(
                Bytes::from_static(&[0x16, 3, 1, 0, 2, 1, 0]),
                &policy,
                &c,
                &mut out,
            );
            f.plaintext(Bytes::copy_from_slice(&plain[..cut]), &policy, &c, &mut out);
            f.feed(
                Bytes::from_static(&[0x17, 3, 3, 0, 2, 9, 9]),
                &policy,
                &c,
                &mut out,
            );
            f.plaintext(Bytes::copy_from_slice(&plain[cut..]), &policy, &c, &mut out);
            assert_eq!(flatten(out), want, "cut at {cut}");
            let l = c.load();
            assert_eq!((l.tls_sessions, l.tls_read_sessions), (1, 1));
            assert_eq!(l.tls_plain_bytes, plain.len() as u64);
        }
        // Encrypted before capture: the read of a payload's middle is left out, the next
        // header starts it.
        let c = PipelineCounters::default();
        let (mut f, mut out) = (Follower::default(), Vec::new());
        f.feed(
            Bytes::from_static(&[0x17, 3, 3, 0, 2, 9, 9]),
            &policy,
            &c,
            &mut out,
        );
        f.plaintext(Bytes::from_static(b"LECT 1"), &policy, &c, &mut out);
        f.plaintext(Bytes::copy_from_slice(&q[..4]), &policy, &c, &mut out);
        f.plaintext(Bytes::copy_from_slice(&q[4..]), &policy, &c, &mut out);
        assert_eq!(flatten(out), q);
    }

    /// Joined mid-stream: attributes and compression are recognised from the bytes; a frame
    /// that does not inflate ends the session with a COM_QUIT, and nothing after it goes out.
    #[test]
    fn sessions_joined_mid_stream_are_recognised_and_bad_frames_end_them() {
        let c = PipelineCounters::default();
        let q = packet(command::QUERY, &attrs(&[], b"SELECT 2"));
        let plain = packet(command::QUERY, b"SELECT 3");
        let got = two_segments(&[q.clone(), plain.clone()].concat(), q.len(), &c);
        assert_eq!(got, [packet(command::QUERY, b"SELECT 2"), plain].concat());

        let c = PipelineCounters::default();
        let mut bad = frame(0, &q, "zlib");
        let n = bad.len();
        bad[n - 2] ^= 0x55;
        let stream = [frame(0, &q, "zlib"), bad, frame(0, &q, "plain")].concat();
        let got = two_segments(&stream, stream.len(), &c);
        assert_eq!(
            got,
            [&packet(command::QUERY, b"SELECT 2")[..], b"Q"].concat()
        );
        let l = c.load();
        assert_eq!((l.compressed_sessions, l.unreplayable_frames), (1, 1));
        assert!(l.unreplayable_bytes > 0);
    }
}
