//! `publish-file`: a recording (`--output file:PATH`) published to RabbitMQ later, or a
//! tcpdump/Wireshark capture taken through the flow and session stages and published as the
//! agent would have published it live.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use foldhash::HashSet;
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

use super::{Broker, BrokerConfig, message_properties};
use crate::{
    capture::{
        Record, RecordKind, RecordSink,
        pcap::{self, PcapStats},
    },
    encode::{self, Unit},
    recording::Reader,
    session::Output,
    status::{PipelineCounters, PipelineTotals},
    tcp::{Flows, Segment},
    types::{FlowKey, SessionKey},
};

/// A broker operation under the `--rabbitmq_timeout` deadline.
async fn within<T>(
    timeout: Duration,
    f: impl Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("no answer within {timeout:?} (--rabbitmq_timeout)"),
    }
}

/// `publish-file`: every message of the recording to the exchange, in the recorded order, on
/// one channel (so every session's order is kept). The whole recording is checked before the
/// first message goes out: a cut or damaged recording publishes nothing.
pub async fn publish_file(path: &Path, cfg: &BrokerConfig) -> anyhow::Result<()> {
    let (mut messages, mut units, mut bytes) = (0u64, 0u64, 0u64);
    let mut check = Reader::open(path)?;
    while let Some(m) = check.next_message()? {
        messages += 1;
        units += encode::decode_message(&m).map_or(0, |m| m.units.len() as u64);
        bytes += m.len() as u64;
    }
    let files = check.files;
    let mut out = InOrder::start(cfg).await?;
    let mut reader = Reader::open(path)?;
    while let Some(m) = reader.next_message()? {
        out.publish(&m).await?;
    }
    let addr = out.finish(messages).await?;
    println!(
        "published {messages} messages ({units} units, {bytes} bytes) from {files} file(s) of \
         {} to exchange {:?} at {addr}",
        path.display(),
        cfg.exchange,
    );
    Ok(())
}

/// `publish-file --pcap`: what to read.
#[derive(Debug, Clone)]
pub struct FromPcap {
    pub path: PathBuf,
    pub ports: Vec<u16>,
    pub prepared: bool,
    pub include_replication: bool,
}

/// `publish-file --pcap`: the capture through the flow and session stages, as MRTE messages
/// in capture order, published on one channel. The whole file is read before the first
/// message goes out: a capture that cannot be read publishes nothing.
pub async fn publish_pcap(from: &FromPcap, cfg: &BrokerConfig) -> anyhow::Result<()> {
    let converted = pcap_messages(from)?;
    let mut out = InOrder::start(cfg).await?;
    for m in &converted.messages {
        out.publish(m).await?;
    }
    let messages = converted.messages.len() as u64;
    let addr = out.finish(messages).await?;
    let c = &converted.counters;
    println!(
        "published {messages} messages ({} units) of {} sessions from {} to exchange {:?} at \
         {addr}; {} packets, {} records; left out: {} not TCP, {} other ports or ACKs, {} \
         truncated, {} units of IPv6 clients; TLS sessions {}, compressed sessions {}, query \
         attributes removed {}, sessions ended unreplayable {}, gaps given up {}",
        converted.units,
        converted.sessions,
        from.path.display(),
        cfg.exchange,
        converted.stats.packets,
        converted.stats.records,
        converted.stats.not_tcp,
        converted.stats.skipped,
        converted.stats.truncated,
        converted.ipv6_units,
        c.tls_sessions,
        c.compressed_sessions,
        c.query_attributes,
        c.unreplayable_frames + c.unreplayable_attributes,
        c.gap_timeouts + c.gap_overflow,
    );
    Ok(())
}

/// A capture file as MRTE messages, and what it took.
pub struct Converted {
    pub messages: Vec<Vec<u8>>,
    pub units: u64,
    pub sessions: usize,
    /// Units of IPv6 clients, which the MRTE format cannot carry.
    pub ipv6_units: u64,
    pub stats: PcapStats,
    pub counters: PipelineTotals,
}

/// Units per message, and bytes: the agent's default batch caps.
const MESSAGE_UNITS: usize = 1000;
const MESSAGE_BYTES: usize = 256 << 10;

/// Reads a capture through the flow and session stages into MRTE messages.
pub fn pcap_messages(from: &FromPcap) -> anyhow::Result<Converted> {
    let mut sink = Units {
        flows: Flows::new(from.include_replication),
        counters: PipelineCounters::default(),
        clock: pcap::Clock::default(),
        out: Vec::new(),
        units: Vec::new(),
        sessions: HashSet::default(),
        ipv6_units: 0,
        local_ip: None,
    };
    sink.flows.set_prepared(from.prepared);
    let stats = pcap::read(&from.path, &from.ports, &mut sink)?;
    sink.timeouts(true);
    let local_ip = sink.local_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut messages = Vec::new();
    let (mut at, units) = (0, sink.units.len() as u64);
    while at < sink.units.len() {
        let (mut n, mut bytes) = (0, 0);
        while at + n < sink.units.len() && n < MESSAGE_UNITS && (n == 0 || bytes < MESSAGE_BYTES) {
            bytes += sink.units[at + n].data.len();
            n += 1;
        }
        messages.push(encode::encode_message(local_ip, &sink.units[at..at + n]).to_vec());
        at += n;
    }
    Ok(Converted {
        messages,
        units,
        sessions: sink.sessions.len(),
        ipv6_units: sink.ipv6_units,
        stats,
        counters: sink.counters.load(),
    })
}

/// The record sink of a capture file: flows and sessions, then units in order.
struct Units {
    flows: Flows,
    counters: PipelineCounters,
    clock: pcap::Clock,
    out: Vec<Output>,
    units: Vec<Unit>,
    sessions: HashSet<SessionKey>,
    ipv6_units: u64,
    /// The server's address, for the messages' LOCAL_IP.
    local_ip: Option<Ipv4Addr>,
}

impl Units {
    fn unit(&mut self, client: SessionKey, data: &[u8]) {
        let IpAddr::V4(ip) = client.0 else {
            self.ipv6_units += 1;
            return;
        };
        self.sessions.insert(client);
        self.units.push(Unit {
            ip,
            port: client.1,
            data: data.to_vec(),
        });
    }

    fn emit(&mut self, client: SessionKey, o: Output) {
        match o {
            Output::Data(d) => self.unit(client, &d),
            Output::Quit => self.unit(client, &encode::COM_QUIT),
            // Nobody else knows the session: nothing to end.
            Output::Closed { .. } | Output::Attributes(_) => {}
        }
    }

    fn timeouts(&mut self, all: bool) {
        let mut out = Vec::new();
        self.flows
            .on_timeout(self.clock.now(), all, &self.counters, &mut out);
        for (k, o) in out {
            self.emit(k.client, o);
        }
    }
}

impl RecordSink for Units {
    fn push(&mut self, r: Record) {
        self.clock.at(r.ts_ns);
        if self
            .flows
            .next_deadline()
            .is_some_and(|d| self.clock.now() >= d)
        {
            self.timeouts(false);
        }
        let key = FlowKey {
            client: r.client(),
            server: if r.is_client() {
                (r.dst, r.dport)
            } else {
                (r.src, r.sport)
            },
        };
        if let RecordKind::PrepareReply { awaiting } = r.kind {
            self.flows.reply(key, awaiting, &r.data, &self.counters);
            return;
        }
        if let (None, IpAddr::V4(server)) = (self.local_ip, r.dst) {
            self.local_ip = Some(server);
        }
        let seg = Segment::new(r.seq, r.offset, r.segment_len, r.tcp_flags, r.data);
        let mut out = std::mem::take(&mut self.out);
        self.flows
            .accept(key, seg, self.clock.now(), &self.counters, &mut out);
        for o in out.drain(..) {
            self.emit(key.client, o);
        }
        self.out = out;
    }
}

/// Messages published in order on one channel, with confirms if asked.
struct InOrder {
    broker: std::sync::Arc<Broker>,
    channel: lapin::Channel,
    props: BasicProperties,
    confirms: Vec<lapin::PublisherConfirm>,
    cfg: BrokerConfig,
}

impl InOrder {
    async fn start(cfg: &BrokerConfig) -> anyhow::Result<Self> {
        let broker = Broker::connect(cfg, Default::default()).await?;
        let channel = broker.open_channel().await?;
        if cfg.confirm {
            within(
                cfg.timeout,
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await
            .context("turning on publisher confirms")?;
        }
        Ok(Self {
            broker,
            channel,
            props: message_properties(),
            confirms: Vec::new(),
            cfg: cfg.clone(),
        })
    }

    async fn publish(&mut self, m: &[u8]) -> anyhow::Result<()> {
        let publish = self.channel.basic_publish(
            self.cfg.exchange.as_str().into(),
            self.cfg.routing_key.as_str().into(),
            // With confirms, a message no queue takes comes back and is reported.
            BasicPublishOptions {
                mandatory: self.cfg.confirm,
                ..Default::default()
            },
            m,
            self.props.clone(),
        );
        let confirm = within(self.cfg.timeout, publish)
            .await
            .with_context(|| format!("publishing to {}", self.broker.addr()))?;
        if self.cfg.confirm {
            self.confirms.push(confirm);
        }
        Ok(())
    }

    /// Waits for the confirms of all `messages`; the broker's address.
    async fn finish(self, messages: u64) -> anyhow::Result<String> {
        let (mut nacked, mut unroutable) = (0, 0);
        for c in self.confirms {
            match within(self.cfg.timeout, c)
                .await
                .context("waiting for the broker's confirms")?
            {
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => unroutable += 1,
                Confirmation::Nack(None) => nacked += 1,
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
            }
        }
        let addr = self.broker.addr().to_string();
        self.broker.close().await;
        if nacked > 0 {
            anyhow::bail!("the broker nacked {nacked} of {messages} messages");
        }
        if unroutable > 0 {
            anyhow::bail!(
                "the broker routed {unroutable} of {messages} messages to no queue: bind a queue \
                 to exchange {:?} (or pass --rabbitmq_declare --rabbitmq_queue=NAME)",
                self.cfg.exchange
            );
        }
        Ok(addr)
    }
}
