//! The memory plan under floods, with the default `--max_mem_mb`: the agent's peak RSS (the
//! kernel's VmHWM) stays within it, and every drop is counted.
//! - The flow table: a SYN flood and 20,000 idle connections on a veth; the table stays within
//!   its cap, every flow given up for room is counted (`flow_evicted`), and a session that
//!   published keeps being captured.
//! - Commands collected whole: many MariaDB sessions with prepared-statement executes and long
//!   data of megabytes in progress at once; what the budget cannot hold is given up and counted
//!   (`command_mem_limit`), the rest published, and every session goes on being captured.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use collector::{
    capture::Transport,
    memory::MemoryPlan,
    protocol::{Packets, packet},
};
use common::{
    NetNs,
    agent::Agent,
    broker::TestExchange,
    frames::{self, PORT},
    numbered_query,
};

const IDLE: usize = 20_000;
/// Connections per helper process: the file descriptor limit here is 20,000 a process, and
/// raising it needs CAP_SYS_RESOURCE, which this machine's root does not have.
const PER_HELPER: usize = 10_000;
const FLOOD: usize = 200_000;

/// A SYN from `198.18.7.(100 + i / 60000)` (not the idle connections' address), port
/// `1024 + i % 60000`, to the captured port.
fn syn(i: usize) -> Vec<u8> {
    let mut f = frames::frame(
        0x0800,
        &frames::ipv4(5, 6, 0, None, &frames::tcp(PORT, 5, 0x02, &[])),
    );
    // IPv4 source (14 + 12) and TCP source port (14 + 20); the checksums stay zero, so the
    // stack drops what the capture saw: no SYN-ACK.
    f[29] = 100 + (i / 60_000) as u8;
    f[34..36].copy_from_slice(&(1024 + (i % 60_000) as u16).to_be_bytes());
    f
}

/// Prints the agent's RSS now and its peak, `when`.
fn rss(agent: &Agent, when: &str) {
    eprintln!(
        "agent RSS {when}: {} KiB (peak {} KiB)",
        agent.proc_status_bytes("VmRSS") >> 10,
        agent.proc_status_bytes("VmHWM") >> 10
    );
}

/// Holds TCP connections in a process of its own: `serve` accepts (SO_REUSEPORT, so that two
/// share the port) and keeps what it accepted, `connect` opens N; each says `held N` once it
/// has them (a server: each time it reaches another thousand), and exits when its stdin closes.
const HOLDER: &str = r#"
import socket, sys
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
held = []
if mode == "serve":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(4096)
    print("listening", flush=True)
    while len(held) < n:
        held.append(s.accept()[0])
else:
    for _ in range(n):
        held.append(socket.create_connection((host, port)))
print("held", len(held), flush=True)
sys.stdin.read()
"#;

/// The helper processes, killed when dropped (also when the test fails).
struct Holders(Vec<Child>);

impl Holders {
    /// Starts a holder (`prefix` runs it, e.g. in the namespace) and waits for `until`.
    fn start(&mut self, prefix: &[&str], args: &[&str], until: &str) {
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .args(["python3", "-c", HOLDER])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        self.0.push(child);
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with(until), "{args:?}: {line:?}");
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syn_flood_and_20000_idle_connections_stay_inside_the_memory_plan() {
    let ns = NetNs::addressed(7);
    let mq = TestExchange::new("flood");
    let port = PORT.to_string();
    let mut holders = Holders(Vec::new());
    // Two servers share the port; each may take up to all of the connections.
    let most = (IDLE + 1).to_string();
    for _ in 0..2 {
        holders.start(
            &["env"],
            &["serve", "198.18.7.1", &port, &most],
            "listening",
        );
    }
    let mut agent = Agent::start(&[
        &format!("--interface={}", ns.host),
        &format!("--port={PORT}"),
        "--local_ip=198.18.7.1",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--status_interval=1",
        "--status_format=json",
    ]);
    let lines = agent.take_stdout_lines();
    agent.wait_attached();
    // The totals of the last JSON line (a status line, or the exit summary), every key there.
    let last = |lines: &std::sync::Mutex<Vec<String>>| -> Option<serde_json::Value> {
        let lines = lines.lock().unwrap();
        lines.last().map(|l| serde_json::from_str(l).unwrap())
    };
    let get = |v: &serde_json::Value, k: &str| -> u64 {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("no {k} in {v}"))
    };
    let cap = MemoryPlan::new(64, 8, Transport::RingClasses)
        .unwrap()
        .max_flows();

    // A session that publishes before and after everything else.
    rss(&agent, "attached");
    let mut steady = ns.run(|| TcpStream::connect(("198.18.7.1", PORT)).unwrap());
    steady.write_all(&numbered_query(0, 0)).unwrap();
    let steady_port = steady.local_addr().unwrap().port();

    let per = PER_HELPER.to_string();
    tokio::task::block_in_place(|| {
        for _ in 0..IDLE / PER_HELPER {
            let held = format!("held {per}");
            holders.start(
                &["ip", "netns", "exec", &ns.name],
                &["connect", "198.18.7.1", &port, &per],
                &held,
            );
        }
        rss(&agent, "with the idle connections");
        ns.inject_all((0..FLOOD).map(syn).collect())
    });
    rss(&agent, "after the flood");
    steady.write_all(&numbered_query(0, 1)).unwrap();
    // Until the agent has taken (or counted lost) every SYN sent: a status line says so.
    let sent = (IDLE + FLOOD + 1) as u64;
    let start = std::time::Instant::now();
    let mut max_flows = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(line) = last(&lines) {
            let t = &line["totals"];
            max_flows = max_flows.max(get(t, "flows"));
            // Every SYN the kernel handed over, taken: a flow opened, or a retransmitted SYN.
            let taken = get(t, "syn_opened") + get(t, "syn_retransmitted") + get(t, "ring_full");
            if get(t, "control") >= sent && taken >= get(t, "control") {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{:?}",
            last(&lines)
        );
    }
    let peak = agent.proc_status_bytes("VmHWM");
    let log = agent.stop();
    drop(holders);
    let line = last(&lines).unwrap();
    let t = &line["totals"];
    let all = format!("{}\n{log}", lines.lock().unwrap().join("\n"));
    let (opened, evicted) = (get(t, "syn_opened"), get(t, "flow_evicted"));
    eprintln!(
        "SYNs taken {opened} of {sent}, flows evicted {evicted}, cap {cap}, most flows on a \
         status line {max_flows}, peak RSS {} MiB",
        peak >> 20
    );
    // Every SYN opened a flow, was a retransmission (a client whose SYN-ACK the full accept
    // queue held back), or was counted where it was lost (the kernel's ring).
    assert_eq!(
        opened + get(t, "syn_retransmitted") + get(t, "ring_full"),
        get(t, "control"),
        "{all}"
    );
    assert!(opened + get(t, "ring_full") >= sent, "{all}");
    assert!(max_flows <= cap as u64, "{all}");
    assert!(evicted >= opened - cap as u64, "{all}");
    assert!(peak <= 64 << 20, "peak RSS {} KiB: {all}", peak >> 10);
    assert!(get(t, "rss_peak_bytes") <= 64 << 20, "{all}");
    // The session that published was never the one to go: both its queries are there, and
    // no COM_QUIT between them.
    let units = mq.units_by_port();
    let got: Vec<u8> = units
        .get(&steady_port)
        .map(|us| us.iter().flat_map(|u| u.data.iter().copied()).collect())
        .unwrap_or_default();
    let want = [numbered_query(0, 0), numbered_query(0, 1)].concat();
    assert!(
        got.starts_with(&want),
        "{} bytes for the steady session",
        got.len()
    );
}

/// A MySQL client speaking the wire directly, so that a command can stop half-way: a user
/// with no password (no scramble to compute), no capabilities beyond protocol 4.1.
struct Raw {
    s: TcpStream,
    port: u16,
    stmt: u32,
}

fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    use std::io::Read as _;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let mut body = vec![0; u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize];
    s.read_exact(&mut body).unwrap();
    body
}

impl Raw {
    /// Logs in as `user` and prepares `SELECT ?`; what the server sends after that is read
    /// and dropped on a thread of its own (result sets of megabytes).
    fn connect(addr: std::net::SocketAddr, user: &str) -> Self {
        let mut s = TcpStream::connect(addr).unwrap();
        read_packet(&mut s);
        // CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION.
        let mut hello = (0x0001u32 | 0x0200 | 0x8000).to_le_bytes().to_vec();
        hello.extend_from_slice(&(64u32 << 20).to_le_bytes());
        hello.push(33);
        hello.extend_from_slice(&[0; 23]);
        hello.extend_from_slice(user.as_bytes());
        hello.extend_from_slice(&[0, 0]);
        s.write_all(&packet(1, &hello)).unwrap();
        let ok = read_packet(&mut s);
        assert_eq!(ok[0], 0, "login: {}", String::from_utf8_lossy(&ok));
        s.write_all(&packet(0, b"\x16SELECT ?")).unwrap();
        let ok = read_packet(&mut s);
        assert_eq!(ok[0], 0, "prepare: {}", String::from_utf8_lossy(&ok));
        let stmt = u32::from_le_bytes(ok[1..5].try_into().unwrap());
        let columns = u16::from_le_bytes([ok[5], ok[6]]) as usize;
        let params = u16::from_le_bytes([ok[7], ok[8]]) as usize;
        // Definitions, each list closed by an EOF packet (no CLIENT_DEPRECATE_EOF).
        for n in [params, columns] {
            for _ in 0..n + usize::from(n > 0) {
                read_packet(&mut s);
            }
        }
        let mut drain = s.try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
        let port = s.local_addr().unwrap().port();
        Self { s, port, stmt }
    }

    /// A COM_STMT_EXECUTE of the statement binding one string: `value`, or (none) the long
    /// data sent for it.
    fn execute(&self, value: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![0x17];
        b.extend_from_slice(&self.stmt.to_le_bytes());
        // No cursor, one iteration, no NULL, types bound: MYSQL_TYPE_STRING.
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 1, 0xfe, 0]);
        if let Some(v) = value {
            b.push(0xfd);
            b.extend_from_slice(&(v.len() as u32).to_le_bytes()[..3]);
            b.extend_from_slice(v);
        }
        packet(0, &b)
    }

    /// A COM_STMT_SEND_LONG_DATA of `data` for the statement's parameter.
    fn long_data(&self, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0x18];
        b.extend_from_slice(&self.stmt.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(data);
        packet(0, &b)
    }
}

/// Writes each session's bytes in 64 KiB pieces, a piece of each in turn, at some 25 MB/s
/// (what the default 8 MiB ring takes in on a loaded machine: the test is about memory, not
/// the ring).
fn send_interleaved(sessions: &mut [Raw], bytes: &[Vec<u8>]) {
    const PIECE: usize = 64 << 10;
    let most = bytes.iter().map(Vec::len).max().unwrap_or(0);
    for at in (0..most).step_by(PIECE) {
        for (r, b) in sessions.iter_mut().zip(bytes) {
            if at < b.len() {
                r.s.write_all(&b[at..b.len().min(at + PIECE)]).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(
            (sessions.len() * PIECE / 25_000) as u64,
        ));
    }
}

/// The COM_QUERY payloads (command byte on) published per client port, taken from the queue
/// as they come.
#[derive(Default)]
struct Published(std::collections::HashMap<u16, (Packets, Vec<Vec<u8>>)>);

impl Published {
    fn take(&mut self, mq: &TestExchange) {
        for (port, units) in mq.units_by_port() {
            let (packets, queries) = self.0.entry(port).or_default();
            for u in units {
                packets.push(&u.data);
                while let Some(p) = packets.next_packet() {
                    if p.payload.first() == Some(&0x03) {
                        queries.push(p.payload);
                    }
                }
            }
        }
    }

    fn of(&self, port: u16) -> &[Vec<u8>] {
        self.0.get(&port).map_or(&[], |(_, queries)| queries)
    }

    fn has(&self, port: u16, query: &str) -> bool {
        self.of(port).iter().any(|q| q == query.as_bytes())
    }
}

#[test]
fn huge_commands_in_many_sessions_stay_inside_the_memory_plan() {
    // 32 executes of 2 MiB each stopped 7/8 of the way, and 4 x 4 MiB of long data, held at
    // once: 72 MiB, where the default budget leaves some 6 MiB for commands and queued batches.
    const PARTIAL: usize = 32;
    const LONG: usize = 4;
    const VALUE: usize = 2 << 20;
    let db = common::mariadb::TestServer::start(&[]);
    db.root_sql("CREATE USER 'big'@'localhost'; CREATE USER 'big'@'%';");
    let mq = TestExchange::new("huge");
    let args = common::agent::local_server_args(db.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    rss(&agent, "attached");

    let mut marker = Raw::connect(db.addr(), "big");
    let mut published = Published::default();
    // Until the marker query `n` is published: the drain has taken every byte sent before it.
    let settled = |published: &mut Published, marker: &mut Raw, n: usize| {
        let q = format!("\x03SELECT 'marker-{n}'");
        marker.s.write_all(&packet(0, q.as_bytes())).unwrap();
        let start = std::time::Instant::now();
        loop {
            published.take(&mq);
            if published.has(marker.port, &q) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "marker {n}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut sessions: Vec<Raw> = (0..PARTIAL + LONG)
        .map(|_| Raw::connect(db.addr(), "big"))
        .collect();
    let value = |i: usize| vec![b'a' + (i % 26) as u8; VALUE];
    let executes: Vec<Vec<u8>> = sessions[..PARTIAL]
        .iter()
        .enumerate()
        .map(|(i, r)| r.execute(Some(&value(i))))
        .collect();
    let cut = VALUE * 7 / 8;
    let mut first: Vec<Vec<u8>> = executes.iter().map(|e| e[..cut].to_vec()).collect();
    first.extend(sessions[PARTIAL..].iter().enumerate().map(|(i, r)| {
        (0..4)
            .flat_map(|_| r.long_data(&value(PARTIAL + i)[..1 << 20]))
            .collect()
    }));
    send_interleaved(&mut sessions, &first);
    settled(&mut published, &mut marker, 1);
    let held = agent.proc_status_bytes("VmRSS");
    rss(&agent, "with the commands in progress");
    let mut rest: Vec<Vec<u8>> = executes.iter().map(|e| e[cut..].to_vec()).collect();
    rest.extend(sessions[PARTIAL..].iter().map(|r| r.execute(None)));
    send_interleaved(&mut sessions, &rest);
    settled(&mut published, &mut marker, 2);
    rss(&agent, "with the commands done");
    // Every session is still followed: a small execute of each is published.
    for (i, r) in sessions.iter_mut().enumerate() {
        let e = r.execute(Some(format!("small-{i}").as_bytes()));
        r.s.write_all(&e).unwrap();
    }
    settled(&mut published, &mut marker, 3);
    let start = std::time::Instant::now();
    let small = |published: &Published, i: usize, r: &Raw| {
        published.has(r.port, &format!("\x03SELECT 'small-{i}'"))
    };
    loop {
        published.take(&mq);
        let all = sessions
            .iter()
            .enumerate()
            .all(|(i, r)| small(&published, i, r));
        if all || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak = agent.proc_status_bytes("VmHWM");
    let out = agent.stop();
    let t = common::agent::totals(&out);
    let big = |r: &Raw| {
        published
            .of(r.port)
            .iter()
            .filter(|q| q.len() > VALUE && q.starts_with(b"\x03SELECT "))
            .count()
    };
    let partial = sessions[..PARTIAL].iter().map(big).sum::<usize>() as u64;
    let long = sessions[PARTIAL..].iter().map(big).sum::<usize>() as u64;
    let (too_large, unrenderable, over_budget) = (
        t["stmt_too_large"],
        t["stmt_unrenderable"],
        t["command_mem_limit"],
    );
    eprintln!(
        "RSS with the commands in progress {} MiB, peak {} MiB; executes published: {partial} \
         of {PARTIAL} partial ones, {long} of {LONG} with long data; stmt_too_large \
         {too_large}, stmt_unrenderable {unrenderable}, command_mem_limit {over_budget}, \
         mem_limit {}",
        held >> 20,
        peak >> 20,
        t["mem_limit"],
    );
    assert!(peak <= 64 << 20, "peak RSS {} KiB: {out}", peak >> 10);
    assert!(t["rss_peak_mb"] <= 64, "{out}");
    // Some fit and are published whole.
    assert!(partial + long >= 1, "{out}");
    // Each partial execute not published was given up for the budget (none passed 64 MiB);
    // each execute with long data not published lost a piece of it (given up whole, or not
    // kept with the statement), and was not rendered. A rendered one may still be dropped on
    // the way to the broker (mem_limit).
    let (lost_partial, lost_long) = (PARTIAL as u64 - partial, LONG as u64 - long);
    assert!(
        unrenderable <= lost_long && unrenderable + t["mem_limit"] >= lost_long,
        "{out}"
    );
    assert!(
        too_large >= lost_partial && too_large <= over_budget,
        "{out}"
    );
    assert!(over_budget >= lost_partial + unrenderable, "{out}");
    assert!(over_budget <= lost_partial + 4 * LONG as u64, "{out}");
    for (i, r) in sessions.iter().enumerate() {
        assert!(small(&published, i, r), "session {i}: {out}");
    }
}
