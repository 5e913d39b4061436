//! The MySQL session stage: follows the packets of one connection's client stream, in order
//! and exactly once as [`crate::tcp`] hands it over, and decides what of it is published.
//!
//! Replication is kept out of the replay: a session that sends COM_REGISTER_SLAVE,
//! COM_BINLOG_DUMP or COM_BINLOG_DUMP_GTID is a replica (a COM_QUIT ends what was published of
//! it, nothing more is), and semi-sync ACK packets (`0xef` after the header) are left out,
//! unless `--include_replication`. With prepared statements followed, COM_STMT_* commands are
//! collected and each execute is published as the text query it stands for ([`crate::prepared`]).
//! After a gap given up, bytes are left out until a segment starts with a command.

use std::time::Duration;

use bytes::Bytes;
use foldhash::HashSet;

use crate::{
    prepared::{MAX_COMMAND, Reply, StatementError, Statements},
    protocol::{
        self, HEADER,
        command::{self, is_statement},
        starts_command,
    },
    status::PipelineCounters,
    types::SessionKey,
};

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
}

/// The semi-sync ACK's magic byte, where a command byte would be.
pub const SEMI_SYNC_ACK: u8 = 0xef;

/// What leaves the session stage for a connection, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Data(Bytes),
    /// The session ends here for the consumer: a synthetic COM_QUIT.
    Quit,
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
    /// Collected whole for the connection's prepared statements, not published as it is.
    Collect,
}

/// Where a connection is in its MySQL packets: the session stage's state of one connection.
#[derive(Debug, Default)]
pub(crate) struct Follower {
    /// Bytes left of the current packet's payload; 0 at a packet start.
    left: usize,
    /// The start of a packet (header and command byte) cut by a segment end: not published
    /// until the packet's fate is known (with prepared statements followed).
    head: Vec<u8>,
    /// Bytes of `head` published already (prepared statements not followed).
    head_published: usize,
    mode: Mode,
    /// The current packet is 0xffffff bytes long: the next one continues its command.
    continues: bool,
    /// The command being collected (command byte and body, over continuation packets).
    collect: Vec<u8>,
    /// It passed [`MAX_COMMAND`]; the rest is not kept.
    collect_over: bool,
    /// A replica's session: everything is left out.
    replica: bool,
    /// After a gap given up: bytes are left out until a segment starts with a command.
    resync: bool,
    /// The last command the client sent was COM_QUIT.
    quit: bool,
    /// The connection's prepared statements (created at its first statement command).
    statements: Option<Box<Statements>>,
}

impl Follower {
    /// The consumer's session has ended: the client's COM_QUIT, or a synthetic one.
    pub(crate) fn ended(&self) -> bool {
        self.quit || self.replica || self.resync
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
        self.resync = true;
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
    /// Follows `data` through the packets; appends the bytes to publish.
    pub(crate) fn feed(
        &mut self,
        data: Bytes,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        if self.resync {
            if !starts_command(&data) {
                PipelineCounters::add(&c.gap_bytes, data.len() as u64);
                return;
            }
            // The statements stay: the server still has them. PREPAREs whose bytes were
            // lost will never have their replies paired.
            let mut statements = self.statements.take();
            if let Some(s) = statements.as_mut() {
                PipelineCounters::add(&c.stmt_reply_lost, s.forget_awaiting() as u64);
            }
            *self = Self {
                replica: self.replica,
                statements,
                ..Default::default()
            };
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
                    self.packet_end(&mut kept, c, out);
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
                // The segment ends inside the packet's start. Without prepared statements
                // nothing depends on it being held: published now, as it came (a replication
                // packet cut there keeps its start).
                if !policy.prepared {
                    kept.keep(head_from, i, out);
                    self.head_published = self.head.len();
                }
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
            let published = std::mem::take(&mut self.head_published);
            match self.mode {
                Mode::Keep => {
                    if carried > published {
                        kept.flush(out);
                        let rest = Bytes::copy_from_slice(&head[published..carried]);
                        out.push(Output::Data(rest));
                    }
                    kept.keep(head_from, i, out);
                }
                Mode::Drop => {
                    let n = head.len() - published;
                    PipelineCounters::add(&c.replication_bytes, n as u64);
                }
                Mode::Collect => self.collect_bytes(&head[HEADER..]),
            }
            carried = 0;
            self.left = len - (head.len() - HEADER);
            self.head = head;
            self.head.clear();
            if self.left == 0 {
                self.packet_end(&mut kept, c, out);
            }
        }
        kept.flush(out);
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
        if policy.prepared && seq == 0 && is_statement(cmd) {
            self.collect.clear();
            self.collect_over = false;
            return Mode::Collect;
        }
        Mode::Keep
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
            Mode::Collect => self.collect_bytes(&kept.data[from..to]),
        }
    }

    fn collect_bytes(&mut self, bytes: &[u8]) {
        if self.collect.len() + bytes.len() > MAX_COMMAND {
            self.collect_over = true;
        }
        if !self.collect_over {
            self.collect.extend_from_slice(bytes);
        }
    }

    /// The current packet is complete; so is its command unless the next packet continues it.
    fn packet_end(&mut self, kept: &mut Kept, c: &PipelineCounters, out: &mut Vec<Output>) {
        if self.continues {
            return;
        }
        if self.mode == Mode::Collect {
            // What was kept before the command goes first.
            kept.flush(out);
            self.statement_command(c, out);
        }
        self.mode = Mode::Keep;
    }

    /// A whole prepared-statement command, collected.
    fn statement_command(&mut self, c: &PipelineCounters, out: &mut Vec<Output>) {
        PipelineCounters::add(&c.stmt_commands, 1);
        let body = std::mem::take(&mut self.collect);
        let over = std::mem::replace(&mut self.collect_over, false);
        let statements = self.statements.get_or_insert_with(Default::default);
        let cmd = body[0];
        if over {
            PipelineCounters::add(&c.stmt_too_large, 1);
            tracing::warn!(
                command = format_args!("0x{cmd:02x}"),
                "a prepared-statement command passed {MAX_COMMAND} bytes: not kept"
            );
            if cmd == command::STMT_PREPARE {
                statements.prepare(None);
            }
            return;
        }
        if cmd == command::STMT_PREPARE {
            PipelineCounters::add(&c.stmt_prepares, 1);
            statements.prepare(Some(&body[1..]));
            return;
        }
        match statements.command(cmd, &body[1..]) {
            Ok(None) => {}
            Ok(Some(sql)) => {
                PipelineCounters::add(&c.stmt_rendered, 1);
                let packet = Bytes::from(protocol::into_command_packets(command::QUERY, sql));
                let mut at = 0;
                while at < packet.len() {
                    let to = (at + SYNTHETIC_UNIT).min(packet.len());
                    out.push(Output::Data(packet.slice(at..to)));
                    at = to;
                }
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

    #[test]
    fn without_prepared_statements_the_packets_pass_as_they_are() {
        let c = PipelineCounters::default();
        let mut f = Conn::default();
        let stream = [packet(0x16, b"SELECT ?"), execute_long(1, 1)].concat();
        assert_eq!(feed(&mut f, &c, &[(0, &stream)]), stream);
        assert_eq!(c.load().stmt_commands, 0);
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
