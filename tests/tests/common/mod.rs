//! Shared test fixtures: an in-process capture, network namespaces with veth pairs (RAII: they
//! are removed on drop, also when a test panics), a recording TCP relay, and a sink server.
#![allow(dead_code)]

pub mod agent;
pub mod broker;
pub mod frames;
pub mod mariadb;
pub mod replay;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use collector::capture::{Capture, CaptureConfig, Record, RecordSink};
use collector_common::{Counter, Counters};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

pub const MYSQL_ADDR: &str = "127.0.0.1:3306";
pub const MYSQL_USER: &str = "mrte";
pub const MYSQL_PASSWORD: &str = "mrte";

/// Connection options for the test user through `addr` (MariaDB itself or a relay).
pub fn mysql_opts(addr: SocketAddr) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some(MYSQL_USER))
        .pass(Some(MYSQL_PASSWORD))
        .prefer_socket(false)
        .into()
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A name unique to this test process (interface names must stay under 16 bytes).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Forwards records into a channel (the test side of the pipeline).
struct ChannelSink(mpsc::UnboundedSender<Record>);

impl RecordSink for ChannelSink {
    fn push(&mut self, record: Record) {
        let _ = self.0.send(record);
    }
}

/// The capture program attached in this process, its records collected in the background.
pub struct TestCapture {
    pub capture: Capture,
    rx: mpsc::UnboundedReceiver<Record>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub records: Vec<Record>,
}

impl TestCapture {
    pub fn start(interface: &str, ports: &[u16]) -> Self {
        Self::start_with(CaptureConfig::new(interface, ports.to_vec()))
    }

    pub fn start_with(cfg: CaptureConfig) -> Self {
        let mut capture = Capture::attach(&cfg).expect("attach capture");
        let mut drain = capture.take_drain().unwrap().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut sink = ChannelSink(tx);
            drain
                .run(&mut sink, async {
                    let _ = stopped.await;
                })
                .await
                .expect("drain");
        });
        Self {
            capture,
            rx,
            stop: Some(stop),
            task: Some(task),
            records: Vec::new(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.capture.read_counters().unwrap()
    }

    /// Moves what has arrived so far into `records`.
    pub fn collect(&mut self) {
        while let Ok(r) = self.rx.try_recv() {
            self.records.push(r);
        }
    }

    /// Collects until `done` says so, or panics after `timeout`.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Record], &Counters) -> bool,
    ) {
        let start = Instant::now();
        loop {
            self.collect();
            let c = self.counters();
            if done(&self.records, &c) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; {} records, counters {:?}",
                self.records.len(),
                collector::capture::named(&c)
                    .filter(|(_, v)| *v != 0)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops draining (draining what is left) and returns every record.
    pub async fn stop(mut self) -> (Vec<Record>, Counters, Capture) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        self.collect();
        let c = self.counters();
        let TestCapture {
            capture, records, ..
        } = self;
        (records, c, capture)
    }
}

/// Reassembles each client's stream, keyed by (client address, client port), from records in
/// sequence order. Overlapping bytes must agree; a hole panics.
pub fn streams(records: &[Record], dport: u16) -> HashMap<(IpAddr, u16), Vec<u8>> {
    let mut per: HashMap<(IpAddr, u16), Vec<&Record>> = HashMap::new();
    for r in records.iter().filter(|r| r.dport == dport) {
        if r.data.is_empty() {
            // Header-only records: the connection's SYN, FIN and RST, nothing else.
            assert!(
                r.tcp_flags & 0x07 != 0 && r.segment_len == 0,
                "a payload-less record without SYN/FIN/RST reached user space"
            );
            continue;
        }
        per.entry((r.src, r.sport)).or_default().push(r);
    }
    per.into_iter()
        .map(|(k, recs)| {
            let base = recs[0].seq;
            let mut pieces: BTreeMap<u32, &[u8]> = BTreeMap::new();
            for r in &recs {
                let rel = r.seq.wrapping_sub(base);
                // Segments before the first one seen would wrap to huge offsets: none on these
                // paths, where the first record is the first payload.
                assert!(rel < 1 << 31, "record before the first one for {k:?}");
                if let Some(prev) = pieces.insert(rel, &r.data) {
                    assert_eq!(
                        prev,
                        &r.data[..],
                        "retransmission differs at {rel} for {k:?}"
                    );
                }
            }
            let mut out = Vec::new();
            for (rel, data) in pieces {
                let rel = rel as usize;
                assert!(rel <= out.len(), "hole before offset {rel} for {k:?}");
                let overlap = out.len() - rel;
                if overlap < data.len() {
                    assert_eq!(&out[rel..], &data[..overlap], "overlap differs for {k:?}");
                    out.extend_from_slice(&data[overlap..]);
                } else {
                    assert_eq!(
                        &out[rel..rel + data.len()],
                        data,
                        "overlap differs for {k:?}"
                    );
                }
            }
            (k, out)
        })
        .collect()
}

/// A TCP relay in front of `upstream` that records every byte each client sent, keyed by the
/// relay's own source port towards `upstream` (the port the capture sees).
pub struct Relay {
    pub addr: SocketAddr,
    pub sent: Arc<Mutex<HashMap<u16, Vec<u8>>>>,
    /// Connections whose both directions have ended.
    closed: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_chunked(upstream, None).await
    }

    /// A relay that sends what clients send in pieces of at most `chunk` bytes, each its
    /// own TCP segment (no Nagle, a pause between pieces): a statement over many segments.
    pub async fn start_chunked(upstream: SocketAddr, chunk: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent: Arc<Mutex<HashMap<u16, Vec<u8>>>> = Arc::default();
        let sent2 = sent.clone();
        let closed: Arc<AtomicU32> = Arc::default();
        let closed2 = closed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = TcpStream::connect(upstream).await.unwrap();
                server.set_nodelay(true).unwrap();
                let port = server.local_addr().unwrap().port();
                sent2.lock().unwrap().insert(port, Vec::new());
                let sent = sent2.clone();
                let closed = closed2.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            sent.lock()
                                .unwrap()
                                .get_mut(&port)
                                .unwrap()
                                .extend_from_slice(&buf[..n]);
                            let piece = chunk.unwrap_or(n);
                            let mut failed = false;
                            for p in buf[..n].chunks(piece) {
                                if sw.write_all(p).await.is_err() {
                                    failed = true;
                                    break;
                                }
                                if chunk.is_some() {
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                            }
                            if failed {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            sent,
            closed,
            task,
        }
    }

    /// Waits until `n` relayed connections have ended, then returns what each client sent.
    pub async fn sent_when_closed(&self, n: u32) -> HashMap<u16, Vec<u8>> {
        let start = Instant::now();
        while self.closed.load(Ordering::SeqCst) < n {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "relayed connections did not close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sent.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that reads and discards everything (a stand-in for MySQL where only the client's
/// bytes matter).
pub struct Sink {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sink {
    pub async fn start(bind: SocketAddr) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A network namespace with a veth pair: `host` stays in this namespace, `peer` is moved into
/// the new one. Dropping it deletes the namespace, which deletes the pair.
pub struct NetNs {
    pub name: String,
    pub host: String,
    pub peer: String,
}

impl NetNs {
    pub fn new() -> Self {
        let name = unique("mrte-t");
        let host = unique("mth");
        let peer = unique("mtp");
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name, host, peer };
        sh(&[
            "ip", "link", "add", &ns.host, "type", "veth", "peer", "name", &ns.peer, "netns",
            &ns.name,
        ]);
        ns
    }

    /// Runs `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl NetNs {
    /// A namespace whose veth pair is up with IPv4 addresses: host side 198.18.`net`.1/24,
    /// peer side .2.
    pub fn addressed(net: u8) -> Self {
        let ns = Self::new();
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            &ns.host,
        ]);
        sh(&["ip", "link", "set", &ns.host, "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.18.{net}.2/24"),
            "dev",
            &ns.peer,
        ]);
        ns.ip(&["link", "set", &ns.peer, "up"]);
        ns
    }

    /// Sends `frame` (Ethernet header and all) from the peer side with an AF_PACKET socket; it
    /// arrives on the host side's ingress.
    pub fn inject(&self, frame: Vec<u8>) {
        self.inject_all(vec![frame]);
    }

    /// [`Self::inject`] for many frames, through one socket.
    pub fn inject_all(&self, frames: Vec<Vec<u8>>) {
        let peer = self.peer.clone();
        self.run(move || {
            use nix::sys::socket::*;
            let ifindex = nix::net::if_::if_nametoindex(peer.as_str()).unwrap();
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            for frame in frames {
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_ifindex = ifindex as i32;
                sll.sll_halen = 6;
                sll.sll_addr[..6].copy_from_slice(&frame[..6]);
                let addr = unsafe {
                    LinkAddr::from_raw(
                        &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                        Some(std::mem::size_of::<libc::sockaddr_ll>() as u32),
                    )
                }
                .unwrap();
                // A full device queue: a moment, then again.
                while let Err(e) = sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &frame,
                    &addr,
                    MsgFlags::empty(),
                ) {
                    assert_eq!(e, nix::errno::Errno::ENOBUFS, "AF_PACKET send");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Value of one counter in `after` minus `before`.
pub fn delta(before: &Counters, after: &Counters, c: Counter) -> u64 {
    after.get(c) - before.get(c)
}

/// `SELECT s, n`: query `n` of test session `s`, as a COM_QUERY packet.
pub fn numbered_query(s: usize, n: u32) -> Vec<u8> {
    let sql = format!("SELECT {s}, {n}");
    let mut p = ((sql.len() + 1) as u32).to_le_bytes()[..3].to_vec();
    p.extend_from_slice(&[0, collector::protocol::command::QUERY]);
    p.extend_from_slice(sql.as_bytes());
    p
}

/// The published stream of test session `s` as its commands: the number of each
/// [`numbered_query`], or None for a COM_QUIT.
pub fn numbered_commands(stream: &[u8], s: usize) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < stream.len() {
        let len = u32::from_le_bytes([stream[i], stream[i + 1], stream[i + 2], 0]) as usize;
        let packet = &stream[i..i + 4 + len];
        if packet == collector::encode::COM_QUIT {
            out.push(None);
        } else {
            let sql = std::str::from_utf8(&packet[5..]).unwrap();
            let (who, n) = sql["SELECT ".len()..].split_once(", ").unwrap();
            assert_eq!(
                who.parse::<usize>().unwrap(),
                s,
                "a unit of another session"
            );
            out.push(Some(n.parse().unwrap()));
        }
        i += 4 + len;
    }
    out
}

/// Checks the commands of a session that lost units on the way: in order, a jump only right
/// after a COM_QUIT of the agent's, its last query `sent - 1`, its own COM_QUIT last. Returns
/// how many COM_QUITs stood for losses.
pub fn check_ended_at_losses(got: &[Option<u32>], sent: u32, what: &str) -> u64 {
    ended_at_losses(got, sent, what).unwrap_or_else(|e| panic!("{e}"))
}

/// [`check_ended_at_losses`], with what went wrong (and the commands around it) as the error.
pub fn ended_at_losses(got: &[Option<u32>], sent: u32, what: &str) -> Result<u64, String> {
    let around = |i: usize| format!("{:?}", &got[i.saturating_sub(8)..(i + 8).min(got.len())]);
    let mut next = 0;
    let mut after_quit = false;
    let mut quits = 0;
    for (i, c) in got.iter().enumerate() {
        match c {
            Some(n) => {
                if !(*n == next || (after_quit && *n > next)) {
                    return Err(format!(
                        "{what}: query {n} at {i}, expected {next}; around it: {}",
                        around(i)
                    ));
                }
                next = n + 1;
                after_quit = false;
            }
            None if i + 1 == got.len() => {}
            None => {
                quits += 1;
                after_quit = true;
            }
        }
    }
    if next != sent {
        return Err(format!("{what}: its last query {next} arrived, not {sent}"));
    }
    if got.last() != Some(&None) {
        return Err(format!("{what}: does not end with its own quit"));
    }
    Ok(quits)
}

/// Whether the kernel lets tracing programs attach to `tcp_recvmsg`: ftrace lists it among
/// the functions it can trace. This project's sandboxed kernel lists none, and refuses fentry,
/// kprobes and uprobes to anything less than CAP_SYS_ADMIN; a stock kernel (the matrix's
/// Debian 6.1) lists them all. tracefs is mounted for the
/// look if it is not, and unmounted again.
pub fn tcp_recvmsg_traceable() -> bool {
    const DIR: &str = "/sys/kernel/tracing";
    let file = format!("{DIR}/available_filter_functions");
    let mounted = std::path::Path::new(&file).exists();
    if !mounted {
        let ok = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", DIR])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount tracefs on {DIR}");
    }
    let listed = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().next() == Some("tcp_recvmsg"));
    if !mounted {
        let _ = Command::new("umount").arg(DIR).status();
    }
    listed
}
