//! `mrte-collector inspect`: what is captured, one line per client command, like tcpdump but
//! MySQL-aware. Segments go through the same flow code as the agent's ([`crate::flow`]: order,
//! retransmissions, gaps), then each session's byte stream is cut into MySQL packets and every
//! command is described. It can also read MRTE messages from a RabbitMQ queue or a recording,
//! where each unit is a piece of its session's stream.

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use chrono::{DateTime, Local};
use collector_common::Counter;
use foldhash::HashMap;
use futures_util::StreamExt as _;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use mysql_common::constants::CapabilityFlags;
use serde_json::{Map, Value};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use crate::{
    capture::{self, Capture, CaptureConfig, Record, RecordSink},
    encode,
    protocol::{self, HandshakeResponse, Packets},
    publish::{self, BrokerConfig},
    recording::Reader,
    session::{Output, SEMI_SYNC_ACK},
    status::PipelineCounters,
    tcp::{Flows, Segment},
    types::{FlowKey, SessionKey},
};

/// A packet of this payload length is continued by the next one.
const MAX_PAYLOAD: usize = 0xff_ffff;
/// Bytes a session may buffer for one (multi-packet) command before it is skipped.
const MAX_COMMAND: usize = 64 << 20;

/// One line of the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// When the segment that completed the command was captured (live capture only).
    pub time: Option<DateTime<Local>>,
    pub client: SessionKey,
    pub command: String,
    /// The argument as text: SQL, a name, or `key=value` pairs.
    pub args: String,
    /// The same, structured, for `--json`.
    pub fields: Map<String, Value>,
}

impl Line {
    fn new(
        time: Option<DateTime<Local>>,
        client: SessionKey,
        command: String,
        args: String,
        fields: Map<String, Value>,
    ) -> Self {
        Self {
            time,
            client,
            command,
            args,
            fields,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Plain,
    /// After a TLS request, or with the compressed protocol: nothing more can be read.
    Opaque,
}

#[derive(Debug, Default)]
struct Session {
    packets: Packets,
    /// A packet was seen: the next ones are not the handshake.
    seen: bool,
    /// The packets of a command longer than one packet, so far.
    long: Option<(u8, Vec<u8>)>,
    state: State,
    /// The query attributes taken off the next COM_QUERY.
    attributes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Cuts each session's stream into packets and describes the commands.
#[derive(Debug, Default)]
pub struct Decoder {
    sessions: HashMap<SessionKey, Session>,
    /// Packets that are not commands (authentication exchanges, LOAD DATA LOCAL contents).
    pub other_packets: u64,
    /// Bytes of sessions that cannot be read (TLS, compression) or commands too long to keep.
    pub unreadable_bytes: u64,
    /// Queue messages that are not MRTE messages (skipped).
    pub bad_messages: u64,
}

impl Decoder {
    /// The next bytes of `client`'s stream.
    pub fn feed(
        &mut self,
        client: SessionKey,
        data: &[u8],
        time: Option<DateTime<Local>>,
        out: &mut Vec<Line>,
    ) {
        let s = self.sessions.entry(client).or_default();
        if s.state == State::Opaque {
            self.unreadable_bytes += data.len() as u64;
            return;
        }
        s.packets.push(data);
        while let Some(p) = s.packets.next_packet() {
            let first = !std::mem::replace(&mut s.seen, true);
            // A command of 16 MiB or more comes in several packets.
            let (seq, payload) = match s.long.take() {
                Some((seq, mut so_far)) => {
                    so_far.extend_from_slice(&p.payload);
                    (seq, so_far)
                }
                None => (p.seq, p.payload),
            };
            if payload.len() % MAX_PAYLOAD == 0 && !payload.is_empty() {
                if payload.len() > MAX_COMMAND {
                    self.unreadable_bytes += payload.len() as u64;
                } else {
                    s.long = Some((seq, payload));
                }
                continue;
            }
            match describe(seq, &payload, first) {
                Described::Command(command, mut args, mut fields) => {
                    if command == "COM_QUERY" && !s.attributes.is_empty() {
                        let attrs = std::mem::take(&mut s.attributes);
                        let mut shown = Map::new();
                        for (name, value) in &attrs {
                            let _ = write!(args, " /* {}={} */", text(name), text(value));
                            shown.insert(text(name), text(value).into());
                        }
                        fields.insert("attributes".into(), shown.into());
                    }
                    out.push(Line::new(time, client, command, args, fields));
                }
                Described::Opaque(command, args, fields) => {
                    s.state = State::Opaque;
                    self.unreadable_bytes += s.packets.pending() as u64;
                    s.packets = Packets::default();
                    out.push(Line::new(time, client, command, args, fields));
                    return;
                }
                Described::Other => self.other_packets += 1,
            }
        }
    }

    /// The query attributes the session stage took off `client`'s next COM_QUERY: shown on its
    /// line.
    pub fn attributes(&mut self, client: SessionKey, attributes: Vec<(Vec<u8>, Vec<u8>)>) {
        self.sessions.entry(client).or_default().attributes = attributes;
    }

    /// The session ended (`why`): a line saying so; its state is forgotten.
    pub fn end(
        &mut self,
        client: SessionKey,
        why: &str,
        time: Option<DateTime<Local>>,
        out: &mut Vec<Line>,
    ) {
        if let Some(s) = self.sessions.remove(&client) {
            self.unreadable_bytes += s.packets.pending() as u64;
        }
        out.push(Line {
            time,
            client,
            command: why.to_owned(),
            args: String::new(),
            fields: Map::new(),
        });
    }

    /// A gap: what was waiting for the rest of a packet is dropped, the session starts again
    /// at its next command.
    fn gap(&mut self, client: SessionKey, time: Option<DateTime<Local>>, out: &mut Vec<Line>) {
        if let Some(s) = self.sessions.get_mut(&client) {
            self.unreadable_bytes += s.packets.pending() as u64;
            s.packets = Packets::default();
            s.long = None;
        }
        out.push(Line {
            time,
            client,
            command: "(gap)".into(),
            args: "bytes lost: the session resumes at its next command".into(),
            fields: Map::new(),
        });
    }
}

enum Described {
    Command(String, String, Map<String, Value>),
    /// The rest of the session cannot be read.
    Opaque(String, String, Map<String, Value>),
    Other,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn le(b: &[u8], at: usize, width: usize) -> Option<u64> {
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(b.get(at..at + width)?);
    Some(u64::from_le_bytes(v))
}

/// The bytes up to a NUL, or all of them.
fn up_to_nul(b: &[u8]) -> &[u8] {
    b.split(|&x| x == 0).next().unwrap_or(b)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Describes one whole packet (`first`: the session's first one seen).
fn describe(seq: u8, p: &[u8], first: bool) -> Described {
    let mut f = Map::new();
    if seq == 1 && first && p.len() >= 32 {
        let caps = le(p, 0, 4).unwrap_or(0) as u32;
        if p.len() == 32 && caps & CapabilityFlags::CLIENT_SSL.bits() != 0 {
            return Described::Opaque(
                "TLS_REQUEST".into(),
                "the session is encrypted from here".into(),
                f,
            );
        }
        if let Some(h) = HandshakeResponse::parse(p) {
            let user = text(&h.user);
            let db = h.database.as_deref().map(text);
            let mut args = format!("user={user}");
            if let Some(db) = &db {
                let _ = write!(args, " db={db}");
            }
            f.insert("user".into(), user.into());
            f.insert("database".into(), db.into());
            f.insert("capabilities".into(), h.capabilities.into());
            if h.capabilities & CapabilityFlags::CLIENT_COMPRESS.bits() != 0 {
                args.push_str(" (compressed protocol: the session cannot be read further)");
                return Described::Opaque("HANDSHAKE_RESPONSE".into(), args, f);
            }
            return Described::Command("HANDSHAKE_RESPONSE".into(), args, f);
        }
    }
    if seq != 0 || p.is_empty() {
        return Described::Other;
    }
    let (cmd, body) = (p[0], &p[1..]);
    if cmd == SEMI_SYNC_ACK {
        // magic, binlog position (u64le), binlog file name.
        let (Some(pos), Some(file)) = (le(body, 0, 8), body.get(8..)) else {
            return Described::Other;
        };
        let file = text(file);
        f.insert("binlog_file".into(), file.clone().into());
        f.insert("binlog_pos".into(), pos.into());
        return Described::Command("SEMI_SYNC_ACK".into(), format!("{file}:{pos}"), f);
    }
    let Some(name) = protocol::command::name(cmd) else {
        f.insert("command_byte".into(), cmd.into());
        return Described::Command(
            format!("COM_0x{cmd:02X}"),
            format!("{} bytes", body.len()),
            f,
        );
    };
    let mut kv = |k: &str, v: Value| {
        f.insert(k.into(), v);
    };
    // A command whose argument is one little-endian number of `width` bytes.
    let leading_number = |kv: &mut dyn FnMut(&str, Value), key: &str, width: usize| {
        let v = le(body, 0, width).unwrap_or(0);
        kv(key, v.into());
        format!("{key}={v}")
    };
    let args = match cmd {
        0x03 | 0x16 => {
            kv("sql", text(body).into());
            text(body)
        }
        0x02 | 0x04 | 0x05 | 0x06 => {
            let name = text(up_to_nul(body));
            kv("name", name.clone().into());
            name
        }
        0x11 => {
            let user = text(up_to_nul(body));
            kv("user", user.clone().into());
            format!("user={user}")
        }
        0x0c => leading_number(&mut kv, "connection_id", 4),
        0x1b => leading_number(&mut kv, "option", 2),
        0x19 | 0x1a => leading_number(&mut kv, "stmt_id", 4),
        0x1c => {
            let (id, rows) = (le(body, 0, 4).unwrap_or(0), le(body, 4, 4).unwrap_or(0));
            kv("stmt_id", id.into());
            kv("rows", rows.into());
            format!("stmt_id={id} rows={rows}")
        }
        0x17 | 0xfa => {
            // stmt id u32, flags u8, iteration count u32; then the parameters, which only
            // the statement's parameter count (in the server's reply) tells how to read.
            let id = le(body, 0, 4).unwrap_or(0);
            let flags = body.get(4).copied().unwrap_or(0);
            let params = body.get(9..).unwrap_or_default();
            kv("stmt_id", id.into());
            kv("flags", flags.into());
            kv("params_hex", hex(params).into());
            format!(
                "stmt_id={id} flags={flags} params=({} bytes) {}",
                params.len(),
                hex(params)
            )
        }
        0x18 => {
            let (id, param) = (le(body, 0, 4).unwrap_or(0), le(body, 4, 2).unwrap_or(0));
            let data = body.get(6..).unwrap_or_default();
            kv("stmt_id", id.into());
            kv("param", param.into());
            kv("data_bytes", data.len().into());
            format!("stmt_id={id} param={param} data=({} bytes)", data.len())
        }
        0x12 => {
            let (pos, server_id) = (le(body, 0, 4).unwrap_or(0), le(body, 6, 4).unwrap_or(0));
            let file = text(body.get(10..).unwrap_or_default());
            kv("binlog_file", file.clone().into());
            kv("binlog_pos", pos.into());
            kv("server_id", server_id.into());
            format!("{file}:{pos} server_id={server_id}")
        }
        0x1e => {
            let server_id = le(body, 2, 4).unwrap_or(0);
            let name_len = le(body, 6, 4).unwrap_or(0) as usize;
            let file = text(body.get(10..10 + name_len).unwrap_or_default());
            let pos = le(body, 10 + name_len, 8).unwrap_or(0);
            kv("binlog_file", file.clone().into());
            kv("binlog_pos", pos.into());
            kv("server_id", server_id.into());
            format!("{file}:{pos} server_id={server_id}")
        }
        0x15 => leading_number(&mut kv, "server_id", 4),
        _ => String::new(),
    };
    Described::Command(name.into(), args, f)
}

/// Writes lines as text (cut to `width`, if any) or JSON.
pub struct Printer {
    json: bool,
    width: Option<usize>,
    pub lines: u64,
}

impl Printer {
    pub fn new(json: bool, full: bool) -> Self {
        let width = (!json && !full && std::io::stdout().is_terminal())
            .then(|| terminal_size::terminal_size().map(|(w, _)| w.0 as usize))
            .flatten();
        Self {
            json,
            width,
            lines: 0,
        }
    }

    /// Writes the lines; false once stdout is closed (the reader went away).
    pub fn print(&mut self, lines: &mut Vec<Line>) -> bool {
        if lines.is_empty() {
            return true;
        }
        let mut out = std::io::stdout().lock();
        for l in lines.drain(..) {
            let s = if self.json {
                to_json(&l)
            } else {
                to_text(&l, self.width)
            };
            if writeln!(out, "{s}").is_err() {
                return false;
            }
            self.lines += 1;
        }
        out.flush().is_ok()
    }
}

/// `TIME CLIENT COMMAND ARGS`, control characters escaped so that a command is one line.
pub fn to_text(l: &Line, width: Option<usize>) -> String {
    let mut s = String::new();
    if let Some(t) = l.time {
        let _ = write!(s, "{} ", t.format("%H:%M:%S%.6f"));
    }
    let _ = write!(s, "{}:{} {}", l.client.0, l.client.1, l.command);
    if !l.args.is_empty() {
        s.push(' ');
        for c in l.args.chars() {
            match c {
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                '\t' => s.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
                c => s.push(c),
            }
        }
    }
    if let Some(w) = width
        && s.chars().count() > w
    {
        s = s.chars().take(w.saturating_sub(1)).collect();
        s.push('…');
    }
    s
}

pub fn to_json(l: &Line) -> String {
    let mut o = Map::new();
    o.insert(
        "time".into(),
        l.time
            .map(|t| t.to_rfc3339())
            .map_or(Value::Null, Value::from),
    );
    o.insert(
        "client".into(),
        format!("{}:{}", l.client.0, l.client.1).into(),
    );
    o.insert("command".into(), l.command.clone().into());
    o.insert("args".into(), l.args.clone().into());
    o.extend(l.fields.clone());
    Value::Object(o).to_string()
}

/// Where `inspect` reads from.
pub enum Source {
    /// The kernel: the capture programs attached with this configuration.
    Kernel(CaptureConfig),
    /// MRTE messages consumed from a queue.
    Queue { queue: String, broker: BrokerConfig },
    /// A recording (its first file).
    File(PathBuf),
    /// A tcpdump or Wireshark capture, and the server ports in it.
    Pcap { path: PathBuf, ports: Vec<u16> },
}

/// What `inspect` does.
pub struct InspectConfig {
    pub source: Source,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Whole SQL text and arguments, not cut to the terminal width.
    pub full: bool,
}

/// `inspect`: from the kernel, a queue or a recording.
pub async fn run(cfg: InspectConfig) -> anyhow::Result<()> {
    let mut printer = Printer::new(cfg.json, cfg.full);
    let mut decoder = Decoder::default();
    match &cfg.source {
        Source::File(path) => {
            let mut reader = Reader::open(path)?;
            let mut lines = Vec::new();
            while let Some(m) = reader.next_message()? {
                feed_message(&mut decoder, &m, &mut lines);
                if !printer.print(&mut lines) {
                    break;
                }
            }
        }
        Source::Queue { queue, broker } => {
            from_queue(broker, queue, &mut decoder, &mut printer).await?
        }
        Source::Kernel(capture) => live(capture, &mut decoder, &mut printer).await?,
        Source::Pcap { path, ports } => from_pcap(path, ports, &mut decoder, &mut printer)?,
    }
    tracing::info!(
        lines = printer.lines,
        other_packets = decoder.other_packets,
        unreadable_bytes = decoder.unreadable_bytes,
        bad_messages = decoder.bad_messages,
        "inspect done"
    );
    Ok(())
}

/// The units of one MRTE message, each a piece of its session's stream.
fn feed_message(decoder: &mut Decoder, message: &[u8], lines: &mut Vec<Line>) {
    // Checked by the reader (recordings) or skipped with a warning (queues) before.
    let Ok(m) = encode::decode_message(message) else {
        return;
    };
    for u in m.units {
        decoder.feed((IpAddr::V4(u.ip), u.port), &u.data, None, lines);
    }
}

async fn from_queue(
    cfg: &BrokerConfig,
    queue: &str,
    decoder: &mut Decoder,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let conn = publish::login(cfg).await?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "mrte-collector-inspect".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!(
                "consuming queue {queue:?} at {}: does it exist on vhost {:?}? (--from_queue, \
                 --rabbitmq_vhost)",
                cfg.addr(),
                cfg.vhost
            )
        })?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut lines = Vec::new();
    loop {
        tokio::select! {
            d = consumer.next() => {
                let Some(d) = d else { break };
                let d = d.context("receiving from the queue")?;
                if let Err(e) = encode::decode_message(&d.data) {
                    decoder.bad_messages += 1;
                    tracing::warn!("a message of {} bytes is not MRTE: {e}", d.data.len());
                } else {
                    feed_message(decoder, &d.data, &mut lines);
                }
                d.ack(BasicAckOptions::default()).await.context("acknowledging")?;
                if !printer.print(&mut lines) {
                    break;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let _ = conn.close(200, "inspect done".into()).await;
    Ok(())
}

/// What the live view does with each record: flows, then the decoder.
struct Live<'a> {
    flows: Flows,
    decoder: &'a mut Decoder,
    counters: Arc<PipelineCounters>,
    out: Vec<Output>,
    lines: Vec<Line>,
    now: Instant,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date the kernel's record times (0 for a capture
    /// file, whose times are wall-clock times).
    realtime_offset: i64,
    /// A capture file's clock, in place of the machine's.
    file_clock: Option<capture::pcap::Clock>,
}

impl<'a> Live<'a> {
    fn new(
        decoder: &'a mut Decoder,
        realtime_offset: i64,
        file_clock: Option<capture::pcap::Clock>,
    ) -> Self {
        // Replication stays in: the view shows replicas' dumps and semi-sync ACKs.
        let mut flows = Flows::new(true);
        flows.describe_attributes();
        Self {
            flows,
            decoder,
            counters: Arc::new(PipelineCounters::default()),
            out: Vec::new(),
            lines: Vec::new(),
            now: Instant::now(),
            realtime_offset,
            file_clock,
        }
    }

    fn wall(&self, mono_ns: u64) -> DateTime<Local> {
        DateTime::from_timestamp_nanos(mono_ns as i64 + self.realtime_offset).with_timezone(&Local)
    }

    fn emit(&mut self, client: SessionKey, o: Output, time: Option<DateTime<Local>>) {
        match o {
            Output::Data(d) => self.decoder.feed(client, &d, time, &mut self.lines),
            Output::Quit => self.decoder.gap(client, time, &mut self.lines),
            Output::Closed { .. } => self.decoder.end(client, "(closed)", time, &mut self.lines),
            Output::Attributes(a) => self.decoder.attributes(client, a),
        }
    }

    fn timeouts(&mut self, all: bool) {
        if self.file_clock.is_none() {
            self.now = Instant::now();
        }
        let mut out = Vec::new();
        self.flows
            .on_timeout(self.now, all, &self.counters, &mut out);
        let time = Some(Local::now());
        for (k, o) in out {
            self.emit(k.client, o, time);
        }
    }
}

impl RecordSink for Live<'_> {
    fn push(&mut self, r: Record) {
        if let Some(clock) = self.file_clock.as_mut() {
            clock.at(r.ts_ns);
            self.now = clock.now();
            if self.flows.next_deadline().is_some_and(|d| self.now >= d) {
                self.timeouts(false);
            }
        }
        let key = FlowKey {
            client: (r.src, r.sport),
            server: (r.dst, r.dport),
        };
        let time = Some(self.wall(r.ts_ns));
        if r.kind == capture::RecordKind::TlsPlain {
            let mut out = std::mem::take(&mut self.out);
            self.flows
                .plaintext(key, r.seq, r.data, self.now, &self.counters, &mut out);
            for o in out.drain(..) {
                self.emit(key.client, o, time);
            }
            self.out = out;
            return;
        }
        if !r.is_client() {
            // Prepared-statement replies (capture files only): the view shows the commands.
            return;
        }
        let seg = Segment::new(r.seq, r.offset, r.segment_len, r.tcp_flags, r.data);
        let mut out = std::mem::take(&mut self.out);
        self.flows
            .accept(key, seg, self.now, &self.counters, &mut out);
        for o in out.drain(..) {
            self.emit(key.client, o, time);
        }
        self.out = out;
    }

    fn begin(&mut self) {
        if self.file_clock.is_none() {
            self.now = Instant::now();
        }
    }
}

/// `inspect --from_pcap`: a capture file through the same flows as live capture.
fn from_pcap(
    path: &std::path::Path,
    ports: &[u16],
    decoder: &mut Decoder,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut sink = Live::new(decoder, 0, Some(Default::default()));
    let stats = capture::pcap::read(path, ports, &mut sink)?;
    sink.timeouts(true);
    printer.print(&mut sink.lines);
    let p = sink.counters.load();
    tracing::info!(
        packets = stats.packets,
        records = stats.records,
        not_tcp = stats.not_tcp,
        truncated = stats.truncated,
        tls_sessions = p.tls_sessions,
        compressed_sessions = p.compressed_sessions,
        query_attributes = p.query_attributes,
        unreplayable = p.unreplayable_frames + p.unreplayable_attributes,
        gaps_lost = p.gap_timeouts + p.gap_overflow + p.tls_gaps,
        "capture file read"
    );
    Ok(())
}

async fn live(
    cfg: &CaptureConfig,
    decoder: &mut Decoder,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    cfg.check()?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let realtime = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let mut capture = Capture::attach(cfg)?;
    let offset = realtime - crate::types::monotonic_ns() as i64;
    let mut sink = Live::new(decoder, offset, None);
    tracing::info!(interface = %cfg.interface, ports = ?cfg.ports, "inspecting; Ctrl-C stops");
    let result = async {
        let mut drain = capture.take_drain()?.expect("fresh capture has its ring");
        loop {
            let due = sink.flows.next_deadline();
            tokio::select! {
                r = drain.drain_once(&mut sink) => { r?; }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    sink.timeouts(false);
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                // Lines are printed at least this often when records trickle in.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if !printer.print(&mut sink.lines) {
                break;
            }
        }
        drain.drain_now(&mut sink);
        sink.timeouts(true);
        printer.print(&mut sink.lines);
        // What the view could not show: lost before user space, or behind given-up gaps.
        let kernel = capture.read_counters()?;
        let d = drain.shared_stats().load();
        let p = sink.counters.load();
        tracing::info!(
            ring_full = kernel.get(Counter::RingFull),
            truncated = kernel.get(Counter::Truncated),
            load_failed = kernel.get(Counter::LoadFailed),
            drain_lost = d.lost,
            malformed = d.malformed,
            gaps_lost = p.gap_timeouts + p.gap_overflow + p.tls_gaps,
            gap_bytes = p.gap_bytes,
            "capture losses"
        );
        anyhow::Ok(())
    }
    .await;
    let added_clsact = capture.added_clsact();
    capture.detach()?;
    if added_clsact {
        capture::remove_clsact_if_unused(&cfg.interface);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    use crate::protocol::packet;

    fn client() -> SessionKey {
        (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 40000)
    }

    fn texts(lines: &[Line]) -> Vec<String> {
        lines.iter().map(|l| to_text(l, None)).collect()
    }

    #[test]
    fn commands_are_described_however_the_stream_is_cut() {
        let mut ack = vec![SEMI_SYNC_ACK];
        ack.extend_from_slice(&81976u64.to_le_bytes());
        ack.extend_from_slice(b"mysql-bin.001516");
        let mut execute = vec![0x17];
        execute.extend_from_slice(&7u32.to_le_bytes());
        execute.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 8, 0, 42, 0, 0, 0, 0, 0, 0, 0]);
        let stream = [
            packet(0, b"\x03SELECT 'a\nb'"),
            packet(0, b"\x16INSERT INTO t VALUES (?)"),
            packet(0, &execute),
            packet(0, b"\x19\x07\0\0\0"),
            packet(0, b"\x02shop"),
            packet(0, &ack),
            packet(0, b"\x0e"),
            packet(0, b"\x01"),
        ]
        .concat();
        let want = [
            "198.18.0.2:40000 COM_QUERY SELECT 'a\\nb'",
            "198.18.0.2:40000 COM_STMT_PREPARE INSERT INTO t VALUES (?)",
            "198.18.0.2:40000 COM_STMT_EXECUTE stmt_id=7 flags=0 params=(12 bytes) \
             000108002a00000000000000",
            "198.18.0.2:40000 COM_STMT_CLOSE stmt_id=7",
            "198.18.0.2:40000 COM_INIT_DB shop",
            "198.18.0.2:40000 SEMI_SYNC_ACK mysql-bin.001516:81976",
            "198.18.0.2:40000 COM_PING",
            "198.18.0.2:40000 COM_QUIT",
        ];
        for step in [1, 3, 7, stream.len()] {
            let mut d = Decoder::default();
            let mut lines = Vec::new();
            for piece in stream.chunks(step) {
                d.feed(client(), piece, None, &mut lines);
            }
            assert_eq!(texts(&lines), want, "pieces of {step}");
        }
    }

    #[test]
    fn the_handshake_names_user_and_database_and_tls_ends_the_view() {
        let mut hs = (CapabilityFlags::CLIENT_PROTOCOL_41.bits()
            | CapabilityFlags::CLIENT_SECURE_CONNECTION.bits()
            | CapabilityFlags::CLIENT_CONNECT_WITH_DB.bits())
        .to_le_bytes()
        .to_vec();
        hs.extend_from_slice(&[0, 0, 0, 1, 45]);
        hs.extend_from_slice(&[0; 23]);
        hs.extend_from_slice(b"app\0\x02xy");
        hs.extend_from_slice(b"shop\0");
        let mut d = Decoder::default();
        let mut lines = Vec::new();
        d.feed(client(), &packet(1, &hs), None, &mut lines);
        // An authentication exchange is not a command.
        d.feed(client(), &packet(3, b"scramble"), None, &mut lines);
        d.feed(client(), &packet(0, b"\x03SELECT 1"), None, &mut lines);
        assert_eq!(
            texts(&lines),
            [
                "198.18.0.2:40000 HANDSHAKE_RESPONSE user=app db=shop",
                "198.18.0.2:40000 COM_QUERY SELECT 1"
            ]
        );
        assert_eq!(d.other_packets, 1);

        let tls = (CapabilityFlags::CLIENT_PROTOCOL_41.bits() | CapabilityFlags::CLIENT_SSL.bits())
            .to_le_bytes();
        let mut req = tls.to_vec();
        req.extend_from_slice(&[0; 28]);
        let other = (client().0, 40001);
        let mut lines = Vec::new();
        d.feed(other, &packet(1, &req), None, &mut lines);
        d.feed(other, b"\x16\x03\x03 encrypted", None, &mut lines);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].command, "TLS_REQUEST");
        assert_eq!(d.unreadable_bytes, 13);
    }

    #[test]
    fn a_command_over_several_packets_is_one_line() {
        let sql = vec![b'x'; MAX_PAYLOAD + 10];
        let mut payload = vec![0x03];
        payload.extend_from_slice(&sql);
        let mut stream = packet(0, &payload[..MAX_PAYLOAD]);
        stream.extend(packet(1, &payload[MAX_PAYLOAD..]));
        let mut d = Decoder::default();
        let mut lines = Vec::new();
        d.feed(client(), &stream, None, &mut lines);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].command, "COM_QUERY");
        assert_eq!(lines[0].args.len(), sql.len());
    }

    #[test]
    fn text_is_cut_to_the_width_and_json_is_structured() {
        let l = Line {
            time: None,
            client: client(),
            command: "COM_QUERY".into(),
            args: "SELECT 1234567890".into(),
            fields: [("sql".to_string(), Value::from("SELECT 1234567890"))]
                .into_iter()
                .collect(),
        };
        assert_eq!(to_text(&l, Some(30)), "198.18.0.2:40000 COM_QUERY SE…");
        let j: Value = serde_json::from_str(&to_json(&l)).unwrap();
        assert_eq!(j["command"], "COM_QUERY");
        assert_eq!(j["sql"], "SELECT 1234567890");
        assert_eq!(j["client"], "198.18.0.2:40000");
        assert_eq!(j["time"], Value::Null);
    }
}
