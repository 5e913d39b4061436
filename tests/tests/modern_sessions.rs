//! Sessions as MySQL 8-era clients make them, against a MariaDB of the test's own that offers
//! TLS (a certificate made by `openssl req -x509`): compressed sessions (mysql_async's zlib
//! compression, `mariadb --compress`), opened before and after the agent; a COM_CHANGE_USER to
//! another database; TLS sessions before and after the agent. Replayed from the queue into a
//! second server as MRTE-Player does, the tables are identical: the TLS sessions' plaintext is
//! read where the server decrypts it (`--tls=auto`). With `--tls=off` the TLS sessions publish
//! nothing (no ciphertext framed as commands) and are counted.

mod common;

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
};

use common::{
    agent::{Agent, local_server_args, totals},
    broker::TestExchange,
    mariadb::TestServer,
    replay::{dump, replay},
};
use mysql_async::{ChangeUserOpts, Compression, Conn, OptsBuilder, prelude::*};

const SCHEMA: &str = "
    CREATE DATABASE shop; CREATE DATABASE crm;
    CREATE TABLE shop.orders (id INT PRIMARY KEY, who VARCHAR(20), note MEDIUMTEXT);
    CREATE TABLE crm.notes (id INT PRIMARY KEY, body TEXT);
    CREATE TABLE shop.secret (id INT PRIMARY KEY, who VARCHAR(20));";

/// A self-signed certificate and its key in `dir`.
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (cert.display().to_string(), key.display().to_string())
}

/// None of `counters` moved: the exit summary leaves out what is zero.
fn none_of(t: &common::agent::Totals, counters: &[&str], stdout: &str) {
    for c in counters {
        assert_eq!(t.get(c), 0, "{c}: {stdout}");
    }
}

/// A source server with a certificate (TLS offered) and a plain target, both with `schema`;
/// the certificate's directory is removed on drop.
struct TlsPair {
    source: TestServer,
    target: TestServer,
    dir: std::path::PathBuf,
}

impl TlsPair {
    fn start(schema: &str) -> Self {
        let dir = std::env::temp_dir().join(common::unique("mrte-tls-"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = certificate(&dir);
        // The CA too: sysbench presents the same pair as its client certificate.
        let source = TestServer::start(&[
            &format!("--ssl-cert={cert}"),
            &format!("--ssl-key={key}"),
            &format!("--ssl-ca={cert}"),
        ]);
        // sysbench's --mysql-ssl=on loads these from its working directory.
        for (from, to) in [
            (&cert, "cacert.pem"),
            (&cert, "client-cert.pem"),
            (&key, "client-key.pem"),
        ] {
            std::fs::copy(from, dir.join(to)).unwrap();
        }
        let target = TestServer::start(&[]);
        source.root_sql(schema);
        target.root_sql(schema);
        Self {
            source,
            target,
            dir,
        }
    }
}

impl Drop for TlsPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(server: &TestServer, db: &str, compress: bool) -> Conn {
    let opts = OptsBuilder::from_opts(server.opts())
        .db_name(Some(db))
        .compression(compress.then(Compression::fast));
    Conn::new(opts).await.unwrap()
}

/// The `mariadb` client over TLS, reading statements from its stdin (killed on drop).
struct TlsClient(Child);

impl TlsClient {
    fn start(port: u16) -> Self {
        let child = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &format!("-P{port}"),
                "-umrte",
                "-pmrte",
                "-Dshop",
            ])
            .args(["--ssl", "--ssl-verify-server-cert=0", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn sql(&mut self, sql: &str) {
        let stdin = self.0.stdin.as_mut().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        drop(self.0.stdin.take());
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_compressed_and_change_user_sessions_replay_identically() {
    workload(true, None).await;
}

/// The same with reads tied to their sockets by the fallback, the `sys_enter` raw tracepoint
/// (what `auto` takes where the kernel refuses fentry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_replay_identically_through_the_sys_enter_hook() {
    workload(true, Some("sys_enter")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_off_tls_sessions_publish_nothing_and_the_rest_replays() {
    workload(false, None).await;
}

async fn workload(read_tls: bool, hook: Option<&str>) {
    let mq = TestExchange::new("modern");
    let TlsPair { source, target, .. } = &TlsPair::start(SCHEMA);
    let have_ssl = source.root_sql("SHOW GLOBAL VARIABLES LIKE 'have_ssl'");
    assert!(have_ssl.contains("YES"), "{have_ssl}");

    // Open before the agent: a compressed session and a TLS one.
    let mut compressed_before = connect(source, "shop", true).await;
    compressed_before
        .query_drop("INSERT INTO orders VALUES (1, 'before', 'x')")
        .await
        .unwrap();
    // Not captured: the target gets it as part of its starting point.
    target.root_sql("INSERT INTO shop.orders VALUES (1, 'before', 'x')");
    let mut tls_before = TlsClient::start(source.port);
    tls_before.sql("INSERT INTO secret VALUES (1, 'before');");
    // Done before the agent starts, so not captured: the target starts with it.
    while !source
        .root_sql("SELECT COUNT(*) FROM shop.secret")
        .contains('1')
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    target.root_sql("INSERT INTO shop.secret VALUES (1, 'before')");

    let mut args = local_server_args(source.port, &mq.exchange);
    if !read_tls {
        args.push("--tls=off".into());
    }
    if let Some(hook) = hook {
        args.push(format!("--tls_hook={hook}"));
    }
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    if read_tls {
        agent.wait_log("TLS probes attached").await;
        // auto: fentry wherever the kernel can trace tcp_recvmsg, the raw tracepoint (said in
        // the log) only where it cannot.
        let want = if hook.is_none() && common::tcp_recvmsg_traceable() {
            "fentry/tcp_recvmsg"
        } else {
            "raw_tracepoint/sys_enter"
        };
        let line = agent.log_line("TLS probes attached").unwrap();
        assert!(line.contains(&format!("socket_hook=\"{want}\"")), "{line}");
        if hook.is_none() && want != "fentry/tcp_recvmsg" {
            assert!(
                agent
                    .log_line("fentry on tcp_recvmsg is not available")
                    .is_some(),
                "the fallback is not told"
            );
        }
    }

    // Compressed, after: small statements (frames sent as they are) and a large one (zlib,
    // several frames).
    let mut compressed = connect(source, "shop", true).await;
    for i in 0..50 {
        compressed
            .query_drop(format!(
                "INSERT INTO orders VALUES ({}, 'zlib', 'n{i}')",
                100 + i
            ))
            .await
            .unwrap();
        compressed_before
            .query_drop(format!(
                "INSERT INTO orders VALUES ({}, 'before', 'm{i}')",
                200 + i
            ))
            .await
            .unwrap();
    }
    let big: String = (0..40_000).map(|i| format!("{:x}", i % 16)).collect();
    compressed
        .query_drop(format!(
            "INSERT INTO orders VALUES (1000, 'big', '{big}{big}{big}{big}{big}')"
        ))
        .await
        .unwrap();
    compressed
        .query_drop("UPDATE orders SET note = CONCAT(note, '+') WHERE who = 'zlib'")
        .await
        .unwrap();
    // The mariadb client's compressed protocol.
    let cli = Command::new("mariadb")
        .args(["-h127.0.0.1", &format!("-P{}", source.port), "-umrte", "-pmrte", "-Dcrm"])
        .args(["--compress", "--ssl=0"])
        .args(["-e", "INSERT INTO notes VALUES (1, 'cli compressed'); use shop; INSERT INTO orders VALUES (2000, 'cli', 'c');"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    // A change of user to another database: the statements after it name no database.
    let mut changes = connect(source, "shop", false).await;
    changes
        .query_drop("INSERT INTO orders VALUES (3000, 'changes', 'in shop')")
        .await
        .unwrap();
    changes
        .change_user(ChangeUserOpts::default().with_db_name(Some("crm".into())))
        .await
        .unwrap();
    for i in 0..5 {
        changes
            .query_drop(format!(
                "INSERT INTO notes VALUES ({}, 'after change_user')",
                10 + i
            ))
            .await
            .unwrap();
    }
    // TLS, after the agent, and the one from before writing again.
    let mut tls_after = TlsClient::start(source.port);
    for i in 0..20 {
        tls_after.sql(&format!(
            "INSERT INTO secret VALUES ({}, 'after');",
            100 + i
        ));
        tls_before.sql(&format!(
            "INSERT INTO secret VALUES ({}, 'before');",
            200 + i
        ));
    }
    tls_after.finish();
    tls_before.finish();
    for c in [compressed, compressed_before, changes] {
        c.disconnect().await.unwrap();
    }
    let secret_rows = source.root_sql("SELECT COUNT(*) FROM shop.secret");
    assert!(secret_rows.contains("41"), "{secret_rows}");
    // The agent's own connection is all that is left.
    tokio::task::block_in_place(|| source.wait_connections(1));

    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| t.printed(k).unwrap_or_else(|| panic!("{k} in {stdout}"));
    assert!(get("tls_sessions") >= 2, "{stdout}");
    assert!(get("tls_bytes") > 0, "{stdout}");
    if read_tls {
        assert!(get("tls_read_sessions") >= 2, "{stdout}");
        assert!(get("tls_reads") >= 42, "{stdout}");
        assert_eq!(t.get("tls_no_socket"), 0, "{stdout}");
    } else {
        assert_eq!(t.get("tls_read_sessions"), 0, "{stdout}");
    }
    // mysql_async's two and the mariadb client's.
    assert!(get("compressed_sessions") >= 3, "{stdout}");
    assert!(get("inflated_bytes") > 200_000, "{stdout}");
    assert_eq!(get("change_user_dbs"), 1, "{stdout}");
    none_of(
        &t,
        &[
            "unreplayable_frames",
            "unreplayable_attributes",
            "seq_gaps",
            "queue_full",
        ],
        &stdout,
    );

    let messages = mq.take_all();
    // No unit starts a TLS record or a compressed frame where a command would be.
    for m in &messages {
        for u in collector::encode::decode_message(&m.data).unwrap().units {
            assert!(
                !collector::session::starts_tls_record(&u.data),
                "{:02x?}",
                &u.data[..8]
            );
        }
    }
    let replayed = replay(&messages, target.opts()).await;
    assert!(replayed.errors.is_empty(), "{:#?}", replayed.errors);
    let (want, got) = (
        dump(source.opts(), &["shop", "crm"]).await,
        dump(target.opts(), &["shop", "crm"]).await,
    );
    for ((table, a), (_, b)) in want.iter().zip(&got) {
        if table.ends_with("secret") && !read_tls {
            // The TLS sessions' rows: none replayed (the target has the one from before).
            assert_eq!((a.len(), b.len()), (41, 1), "{table}");
            continue;
        }
        assert!(a == b, "{table}: {} rows vs {} replayed", a.len(), b.len());
    }
    let rows: usize = want.iter().map(|(_, r)| r.len()).sum();
    assert!(rows >= 41 + 100 + 1 + 2 + 6, "{rows}");
}

/// A stand-in for a MySQL 8.0.23+ server: greets each client offering CLIENT_QUERY_ATTRIBUTES,
/// answers a COM_STMT_PREPARE with statement 1 of one parameter, reads everything else.
async fn attributes_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let caps = mysql8_caps();
                let mut greeting = vec![10];
                greeting.extend_from_slice(b"8.4.0-test\0");
                greeting.extend_from_slice(&7u32.to_le_bytes());
                greeting.extend_from_slice(&[1; 8]);
                greeting.push(0);
                greeting.extend_from_slice(&(caps as u16).to_le_bytes());
                greeting.extend_from_slice(&[255, 2, 0]);
                greeting.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
                greeting.push(21);
                greeting.extend_from_slice(&[0; 10]);
                greeting.extend_from_slice(&[2; 13]);
                greeting.extend_from_slice(b"mysql_native_password\0");
                if s.write_all(&packet(0, &greeting)).await.is_err() {
                    return;
                }
                let mut head = [0u8; 4];
                while s.read_exact(&mut head).await.is_ok() {
                    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
                    let mut payload = vec![0; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let reply = match (head[3], payload.as_slice().first().copied()) {
                        (0, Some(0x16)) => {
                            let mut ok = vec![0];
                            ok.extend_from_slice(&1u32.to_le_bytes());
                            ok.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
                            packet(1, &ok)
                        }
                        (_, Some(0x01)) => return,
                        (seq, _) => packet(seq.wrapping_add(1), &[0, 0, 0, 2, 0, 0, 0]),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// What a MySQL 8.0.23+ server offers and its clients take: query attributes among them.
fn mysql8_caps() -> u32 {
    (F::CLIENT_PROTOCOL_41
        | F::CLIENT_SECURE_CONNECTION
        | F::CLIENT_PLUGIN_AUTH
        | F::CLIENT_CONNECT_WITH_DB
        | F::CLIENT_QUERY_ATTRIBUTES)
        .bits()
}

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    collector::protocol::packet(seq, payload)
}

/// A COM_QUERY body with query attributes (name, type, value bytes), then the SQL.
fn with_attributes(attrs: &[(&str, u8, Vec<u8>)], sql: &str) -> Vec<u8> {
    let mut b = vec![attrs.len() as u8, 1];
    if !attrs.is_empty() {
        // The NULL bitmap: a value of no bytes is NULL.
        let mut nulls = vec![0u8; attrs.len().div_ceil(8)];
        for (i, (_, _, v)) in attrs.iter().enumerate() {
            if v.is_empty() {
                nulls[i / 8] |= 1 << (i % 8);
            }
        }
        b.extend_from_slice(&nulls);
        b.push(1);
        for (name, ty, _) in attrs {
            b.extend_from_slice(&[*ty, 0, name.len() as u8]);
            b.extend_from_slice(name.as_bytes());
        }
        for (_, _, v) in attrs {
            b.extend_from_slice(v);
        }
    }
    b.extend_from_slice(sql.as_bytes());
    [&[3u8][..], &b].concat()
}

/// A client of `server` writing each of `packets` on its own (a segment each, mostly).
struct RawClient(tokio::net::TcpStream);

impl RawClient {
    async fn connect(server: std::net::SocketAddr, caps: u32) -> (Self, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut greeting = [0u8; 512];
        let n = s.read(&mut greeting).await.unwrap();
        assert!(n > 4, "a greeting");
        let mut hs = caps.to_le_bytes().to_vec();
        hs.extend_from_slice(&(1u32 << 24).to_le_bytes());
        hs.push(45);
        hs.extend_from_slice(&[0; 23]);
        hs.extend_from_slice(b"app\0");
        hs.push(20);
        hs.extend_from_slice(&[9; 20]);
        hs.extend_from_slice(b"shop\0mysql_native_password\0");
        let hs = packet(1, &hs);
        let mut c = Self(s);
        c.send(&hs).await;
        (c, hs)
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

use mysql_async::consts::CapabilityFlags as F;

/// What MySQL 8.0.23+ clients send when the server offers query attributes, through a server
/// that offers them (no MySQL 8 server installs here): every COM_QUERY published as its SQL,
/// the handshake without CLIENT_QUERY_ATTRIBUTES; also for a session whose handshake came
/// before the agent, and for an execute that carries attributes after its parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_attributes_are_removed_before_publishing() {
    let mq = TestExchange::new("attrs");
    let (server, task) = attributes_server().await;
    let caps = mysql8_caps();
    let sql = [
        "SELECT 1",
        "SELECT @@version",
        "INSERT INTO t VALUES ('a', \"b\")",
        "SELECT 4",
    ];
    let typed: Vec<(&str, u8, Vec<u8>)> = vec![
        ("number1", 0x08, 42u64.to_le_bytes().to_vec()),
        ("string1", 0xfe, b"\x05hello".to_vec()),
        ("date1", 0x0a, vec![4, 0xe8, 0x07, 12, 3]),
        ("datetime1", 0x0c, vec![7, 0xe8, 0x07, 12, 3, 11, 30, 5]),
        ("nothing", 0x06, vec![]),
    ];
    let queries = |sql: &[&str]| -> Vec<Vec<u8>> {
        sql.iter()
            .enumerate()
            .map(|(i, q)| {
                let attrs = match i {
                    0 => vec![],
                    1 => typed[..1].to_vec(),
                    _ => typed.clone(),
                };
                packet(0, &with_attributes(&attrs, q))
            })
            .collect()
    };
    // Its handshake before the agent: its queries' attributes are seen in their bytes.
    let (mut before, _) = RawClient::connect(server, caps).await;

    // The MariaDB of setup.sh for the process list; the capture on the stand-in's port.
    let args = [
        "--interface=lo".to_string(),
        format!("--port={}", server.port()),
        "--mysql_port=3306".into(),
        format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--read_timeout=20".into(),
    ];
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();

    let (mut after, hs) = RawClient::connect(server, caps).await;
    let (mut old, old_hs) =
        RawClient::connect(server, caps & !F::CLIENT_QUERY_ATTRIBUTES.bits()).await;
    for q in queries(&sql) {
        after.send(&q).await;
        before.send(&q).await;
        // A query cut inside its attribute block.
        let (a, b) = q.split_at(q.len().min(9));
        after.send(a).await;
        after.send(b).await;
    }
    for q in &sql {
        old.send(&packet(0, &[&[3u8][..], q.as_bytes()].concat()))
            .await;
    }
    // A prepared statement: its execute carries an attribute after the parameter.
    after.send(&packet(0, b"\x16SELECT ?")).await;
    let mut exec = 1u32.to_le_bytes().to_vec();
    exec.extend_from_slice(&[0x08, 1, 0, 0, 0, 2, 0, 1]);
    exec.extend_from_slice(&[0x08, 0, 0, 0xfe, 0, 5]);
    exec.extend_from_slice(b"trace");
    exec.extend_from_slice(&7i64.to_le_bytes());
    exec.extend_from_slice(b"\x03abc");
    after
        .send(&packet(0, &[&[0x17u8][..], &exec].concat()))
        .await;
    for c in [&mut after, &mut before, &mut old] {
        c.send(&packet(0, &[1])).await;
    }
    // No reply is awaited here: time for the last segments to pass the capture.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stdout = agent.stop();
    task.abort();

    let t = totals(&stdout);
    // Five in `after` (four, and each again cut), four in `before`.
    assert_eq!(t.printed("query_attributes"), Some(12), "{stdout}");
    assert_eq!(t.printed("stmt_rendered"), Some(1), "{stdout}");
    let units = mq.units_by_port();
    let stream =
        |port: u16| -> Vec<u8> { units[&port].iter().flat_map(|u| u.data.clone()).collect() };
    let plain = |sql: &[&str]| -> Vec<u8> {
        sql.iter()
            .flat_map(|q| packet(0, &[&[3u8][..], q.as_bytes()].concat()))
            .collect()
    };
    let quit = packet(0, &[1]);
    let port = |c: &RawClient| c.0.local_addr().unwrap().port();
    // The handshake without the capability, then the SQL alone, each query twice.
    let mut want_hs = hs.clone();
    want_hs[4..8].copy_from_slice(&(caps & !F::CLIENT_QUERY_ATTRIBUTES.bits()).to_le_bytes());
    let twice: Vec<&str> = sql.iter().flat_map(|q| [*q, *q]).collect();
    let want_after = [want_hs, plain(&twice), plain(&["SELECT 7"]), quit.clone()].concat();
    assert!(
        stream(port(&after)) == want_after,
        "{:?}",
        String::from_utf8_lossy(&stream(port(&after)))
    );
    assert_eq!(stream(port(&before)), [plain(&sql), quit.clone()].concat());
    assert_eq!(stream(port(&old)), [old_hs, plain(&sql), quit].concat());
}

/// The TLS programs still loaded once the kernel has had time to release them: a uprobe's or
/// raw tracepoint's program outlives its last descriptor until deferred work frees the perf
/// event (longer on a loaded machine), so this waits up to 60 s for the count to reach 0.
fn tls_programs_released() -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = tls_programs_loaded();
        if n == 0 || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// TLS sessions on the server's unix socket (the `mariadb` client uses TLS there by default
/// when the server offers it) after TLS sessions over TCP: the server's reads of them are
/// nobody's to publish. Each TCP session's SSL object is freed when it ends, and the next one
/// is often allocated at the same address: before `SSL_free` was probed, the unix session's
/// plaintext was taken for the old TCP client's (counted as its reads, not as `tls_no_socket`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_on_the_unix_socket_are_not_taken_for_an_ended_tcp_one() {
    const ROUNDS: usize = 10;
    let mq = TestExchange::new("tls_unix");
    let TlsPair { source, .. } = &TlsPair::start(SCHEMA);
    let args = local_server_args(source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    agent.wait_log("TLS probes attached").await;
    for i in 0..ROUNDS {
        let mut tcp = TlsClient::start(source.port);
        tcp.sql(&format!("INSERT INTO orders VALUES ({i}, 'tcp', 'x');"));
        tokio::task::block_in_place(|| tcp.finish());
        let out = source.root_sql_with(
            &["--ssl"],
            &format!("SELECT 'unix-{i}'; SHOW SESSION STATUS LIKE 'Ssl_cipher'"),
        );
        assert!(
            out.contains("unix-") && out.contains("TLS"),
            "not over TLS: {out}"
        );
    }
    tokio::task::block_in_place(|| source.wait_connections(1));
    let stdout = agent.stop();
    let t = totals(&stdout);
    let published: Vec<u8> = mq
        .take_all()
        .iter()
        .flat_map(|m| collector::encode::decode_message(&m.data).unwrap().units)
        .flat_map(|u| u.data)
        .collect();
    let has = |needle: &[u8]| published.windows(needle.len()).any(|w| w == needle);
    for i in 0..ROUNDS {
        let insert = format!("INSERT INTO orders VALUES ({i}, 'tcp', 'x')");
        assert!(
            has(insert.as_bytes()),
            "TCP session {i} not published: {stdout}"
        );
    }
    assert!(
        !has(b"unix-"),
        "a unix-socket session was published: {stdout}"
    );
    eprintln!(
        "tls_no_socket {} for {ROUNDS} unix-socket sessions, tls_read_sessions {}",
        t.get("tls_no_socket"),
        t.get("tls_read_sessions")
    );
    // Every read of the unix sessions (login, query, status, quit: four at least) is counted
    // as one with no connection of the captured port's.
    assert!(
        t.get("tls_no_socket") >= 4 * ROUNDS as u64,
        "{}",
        t.get("tls_no_socket")
    );
    assert!(t.get("tls_read_sessions") >= ROUNDS as u64, "{stdout}");
}

/// The TLS programs loaded in the kernel now (any process's): by name.
fn tls_programs_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str().is_some_and(|n| {
                n.starts_with("mrte_ssl_read") || n == "mrte_sys_enter" || n == "mrte_tcp_recv"
            })
        })
        .count()
}

/// The newest loaded `SSL_CALLS_OPEN` map's count (the running agent's): `SSL_read`s under way.
fn ssl_calls_open() -> u64 {
    let info = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("SSL_CALLS_OPEN"))
        .max_by_key(|m| m.id())
        .expect("no SSL_CALLS_OPEN map loaded");
    let map =
        aya::maps::Map::from_map_data(aya::maps::MapData::from_id(info.id()).unwrap()).unwrap();
    let count: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map).unwrap();
    count.get(&0, 0).unwrap()
}

/// The uprobe path under churn: 200 TLS connections of the `mariadb` client open, write and
/// close (four at a time) while 4 long-lived TLS sessions write beside them. Replayed, every
/// row is there (each session's plaintext exact, in order, however the descriptors and SSL
/// objects were reused); after the agent exits no TLS program is left in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_under_churn_replay_exactly_and_nothing_stays_attached() {
    let mq = TestExchange::new("tls_churn");
    let TlsPair { source, target, .. } = &TlsPair::start(
        "CREATE DATABASE shop;
         CREATE TABLE shop.churn (id INT PRIMARY KEY, k INT);
         CREATE TABLE shop.steady (id INT PRIMARY KEY, who INT);",
    );
    assert_eq!(tls_programs_released(), 0, "TLS programs of another run");

    let args = local_server_args(source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    agent.wait_log("TLS probes attached").await;
    assert!(tls_programs_loaded() >= 4);

    let mut steady: Vec<TlsClient> = (0..4).map(|_| TlsClient::start(source.port)).collect();
    let port = source.port;
    let churn = std::thread::spawn(move || {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let id = w * 1000 + i;
                        let out = Command::new("mariadb")
                            .args(["-h127.0.0.1", &format!("-P{port}"), "-umrte", "-pmrte"])
                            .args(["-Dshop", "--ssl", "--ssl-verify-server-cert=0"])
                            .args([
                                "-e",
                                &format!(
                                    "INSERT INTO churn VALUES ({id}, 0); \
                                 UPDATE churn SET k = k + {i} WHERE id = {id};"
                                ),
                            ])
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{out:?}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
    let mut n = 0;
    while !churn.is_finished() {
        for (k, c) in steady.iter_mut().enumerate() {
            c.sql(&format!("INSERT INTO steady VALUES ({}, {k});", n * 10 + k));
        }
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    churn.join().unwrap();
    for c in steady {
        c.finish();
    }
    tokio::task::block_in_place(|| source.wait_connections(1));
    // Every connection has ended, so no SSL_read is under way: the count that spares the
    // socket hook its lookup is back at 0 (one left high would cost every read a lookup).
    assert_eq!(ssl_calls_open(), 0, "SSL_read calls counted as under way");
    let stdout = agent.stop();
    assert_eq!(tls_programs_released(), 0, "TLS programs left after exit");

    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert!(get("tls_read_sessions") >= 204, "{stdout}");
    none_of(
        &t,
        &[
            "tls_no_socket",
            "tls_truncated",
            "tls_read_failed",
            "unreplayable_frames",
        ],
        &stdout,
    );
    let replayed = replay(&mq.take_all(), target.opts()).await;
    assert!(replayed.errors.is_empty(), "{:#?}", replayed.errors);
    let (want, got) = (
        dump(source.opts(), &["shop"]).await,
        dump(target.opts(), &["shop"]).await,
    );
    assert_eq!(want[0].1.len(), 200, "{:?}", want[0].0);
    assert!(want[1].1.len() >= 40, "{:?}", want[1].0);
    for ((table, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{table}: {} rows vs {} replayed", a.len(), b.len());
    }
}

/// Server-side prepared statements over TLS (sysbench `oltp_write_only`, one thread, with
/// `--mysql-ssl=on`): the PREPAREs are seen in the plaintext reads, their replies' heads taken
/// from the server's `SSL_write`, and every execute published as text. Replayed: identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_over_tls_replay_identically() {
    let mq = TestExchange::new("tls_prepared");
    let pair = TlsPair::start("CREATE DATABASE sbtest");
    let sysbench = |port: u16, tls: bool, action: &str| {
        let out = Command::new("sysbench")
            .current_dir(&pair.dir)
            .args([
                "oltp_write_only",
                "--db-driver=mysql",
                "--mysql-host=127.0.0.1",
            ])
            .args([
                &format!("--mysql-port={port}"),
                "--mysql-user=mrte",
                "--mysql-password=mrte",
            ])
            .args([
                "--mysql-db=sbtest",
                "--tables=1",
                "--table-size=200",
                "--threads=1",
            ])
            .args([
                "--time=3",
                &format!("--mysql-ssl={}", if tls { "on" } else { "off" }),
            ])
            .arg(action)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // sysbench fills its table with random strings: the target starts from a copy.
    sysbench(pair.source.port, false, "prepare");
    let login = |port: u16| {
        [
            "-h127.0.0.1".to_string(),
            format!("-P{port}"),
            "-umrte".into(),
            "-pmrte".into(),
        ]
    };
    let dump = Command::new("mariadb-dump")
        .args(login(pair.source.port))
        .arg("sbtest")
        .output()
        .unwrap();
    assert!(dump.status.success(), "{dump:?}");
    let mut load = Command::new("mariadb")
        .args(login(pair.target.port))
        .arg("sbtest")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    load.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    assert!(load.wait().unwrap().success());
    let args = local_server_args(pair.source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    agent.wait_log("TLS probes attached").await;
    let report = sysbench(pair.source.port, true, "run");
    tokio::task::block_in_place(|| pair.source.wait_connections(1));
    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert!(get("tls_read_sessions") >= 1, "{stdout}");
    assert!(
        get("tls_replies") >= 4 && get("stmt_known") >= 4,
        "{stdout}"
    );
    assert!(get("stmt_rendered") >= 100, "{stdout}\n{report}");
    none_of(
        &t,
        &["stmt_unknown", "stmt_unrenderable", "tls_no_socket"],
        &stdout,
    );
    let replayed = replay(&mq.take_all(), pair.target.opts()).await;
    assert!(replayed.errors.is_empty(), "{:#?}", replayed.errors);
    let (want, got) = (
        common::replay::dump(pair.source.opts(), &["sbtest"]).await,
        common::replay::dump(pair.target.opts(), &["sbtest"]).await,
    );
    assert_eq!(want.len(), 1);
    if want != got {
        // What differs, and what the agent counted, for the next look.
        let (a, b) = (&want[0].1, &got[0].1);
        let only = |x: &Vec<String>, y: &Vec<String>| -> Vec<String> {
            x.iter()
                .filter(|r| !y.contains(r))
                .take(5)
                .cloned()
                .collect()
        };
        panic!(
            "sbtest1 differs after the replay: {} rows vs {} replayed; only in the source: \
             {:?}; only in the replay: {:?}; replayed {} sessions, {} queries, {} quits\n{stdout}",
            a.len(),
            b.len(),
            only(a, b),
            only(b, a),
            replayed.sessions,
            replayed.queries,
            replayed.quits,
        );
    }
}

/// The `mariadb` client over TLS with `SELECT 0, n` queries: its stdout read in a thread,
/// which counts the rows that came back (the queries the server answered).
struct CountingClient {
    client: TlsClient,
    answered: std::sync::Arc<std::sync::atomic::AtomicU32>,
    sent: u32,
}

impl CountingClient {
    fn start(port: u16) -> Self {
        let mut child = Command::new("mariadb")
            .args(["-h127.0.0.1", &format!("-P{port}"), "-umrte", "-pmrte"])
            .args(["--ssl", "--ssl-verify-server-cert=0", "--batch"])
            .args(["--skip-column-names", "--unbuffered"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let answered = std::sync::Arc::<std::sync::atomic::AtomicU32>::default();
        let a = answered.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                if line.is_err() {
                    break;
                }
                a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        Self {
            client: TlsClient(child),
            answered,
            sent: 0,
        }
    }

    /// Sends queries up to `n` (not included) and waits until the server answered them all
    /// (while it keeps answering: a slow machine only makes this slower).
    fn query_until(&mut self, n: u32) {
        let mut batch = String::new();
        for i in self.sent..n {
            batch.push_str(&format!("SELECT 0, {i};\n"));
        }
        self.client.sql(&batch);
        self.sent = n;
        let (mut last, mut since) = (0, std::time::Instant::now());
        loop {
            let now = self.answered.load(std::sync::atomic::Ordering::Relaxed);
            if now >= n {
                return;
            }
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            }
            assert!(
                since.elapsed() < std::time::Duration::from_secs(60),
                "the server stopped answering at {now} of {n}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The commands of the session whose queries are `SELECT 0, n`: each n, None for a COM_QUIT
/// (its handshake response and any other command left out); and the session's port.
fn counted_session(
    units: &std::collections::HashMap<u16, Vec<collector::encode::Unit>>,
) -> (u16, Vec<Option<u32>>) {
    for (&port, units) in units {
        let mut packets = collector::protocol::Packets::default();
        let mut got = Vec::new();
        for u in units {
            packets.push(&u.data);
        }
        while let Some(p) = packets.next_packet() {
            match p.payload.split_first() {
                Some((&collector::protocol::command::QUIT, [])) => got.push(None),
                Some((&collector::protocol::command::QUERY, sql)) => {
                    let sql = String::from_utf8_lossy(sql);
                    if let Some(n) = sql.strip_prefix("SELECT 0, ") {
                        got.push(Some(n.parse().expect("a whole query")));
                    }
                }
                _ => {}
            }
        }
        if got.iter().any(Option::is_some) {
            return (port, got);
        }
    }
    panic!("no session with the test's queries was published");
}

/// TLS reads lost in the kernel (the agent stopped, its 1 MiB ring full): the plaintext has
/// no TCP sequence numbers, so the kernel numbers it; the hole shows as a jump, the session
/// gets a COM_QUIT there (`tls_gaps`) and is published again from the next command. Every
/// query published is whole and in order; none is missing without a COM_QUIT before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reads_lost_to_a_full_ring_end_the_session_at_the_hole() {
    let mq = TestExchange::new("tls_loss");
    let TlsPair { source, .. } = &TlsPair::start("CREATE DATABASE shop");
    let mut args = local_server_args(source.port, &mq.exchange);
    args.push("--ring_buffer_mb=1".into());
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    agent.wait_log("TLS probes attached").await;

    let mut client = CountingClient::start(source.port);
    let mut units: std::collections::HashMap<u16, Vec<collector::encode::Unit>> =
        Default::default();
    let take = |units: &mut std::collections::HashMap<_, Vec<_>>| {
        for (port, u) in tokio::task::block_in_place(|| mq.units_by_port()) {
            units.entry(port).or_default().extend(u);
        }
    };
    // Published in full while the agent drains.
    tokio::task::block_in_place(|| client.query_until(100));
    let start = std::time::Instant::now();
    loop {
        take(&mut units);
        let seen = units
            .values()
            .flatten()
            .filter(|u| u.data.windows(10).any(|w| w == b"SELECT 0, "))
            .count();
        if seen >= 100 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the first queries were not published: {seen}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Nothing drains the ring: some 3,000 records fit, a query makes three.
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::task::block_in_place(|| client.query_until(6_100));
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    tokio::task::block_in_place(|| client.query_until(6_200));
    tokio::task::block_in_place(|| client.client.finish());

    let start = std::time::Instant::now();
    let (port, _) = loop {
        take(&mut units);
        let (port, got) = counted_session(&units);
        if got.last() == Some(&None) && got.iter().rev().flatten().next() == Some(&6_199) {
            break (port, got);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the session's end was not published: {:?}",
            &got[got.len().saturating_sub(5)..]
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // Two process-list reads after the session left it: the GC must not end it again (its
    // ciphertext FIN waits behind the TCP gap the full ring left, so its flow is still open).
    let reads = |agent: &Agent| {
        agent
            .log
            .lock()
            .unwrap()
            .matches("read the MySQL process list")
            .count()
    };
    let seen = reads(&agent);
    let start = std::time::Instant::now();
    while reads(&agent) < seen + 2 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the bootstrap stopped reading the process list"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let stdout = agent.stop();
    take(&mut units);
    let (_, got) = counted_session(&units);
    assert_eq!(
        &got[got.len() - 2..],
        [Some(6_199), None],
        "the session's end, once"
    );
    let t = totals(&stdout);
    assert!(t.get("ring_full") > 0, "{stdout}");
    assert!(t.get("tls_gaps") >= 1, "{stdout}");
    // In order, whole; a jump only right after a COM_QUIT of the agent's.
    let quits = common::check_ended_at_losses(&got, 6_200, &format!("session {port}"));
    assert!(quits >= 1, "no COM_QUIT at the hole");
    assert!(
        quits <= t.get("tls_gaps") + t.get("mq_lost_sessions"),
        "a COM_QUIT nothing counted: {stdout}"
    );
    let published = got.iter().flatten().count();
    assert!(published < 6_200, "nothing was lost: {stdout}");
    eprintln!(
        "published {published} of 6200 queries, {quits} COM_QUIT at holes; ring_full {}, \
         tls_gaps {}, gap_bytes {}",
        t.get("ring_full"),
        t.get("tls_gaps"),
        t.get("gap_bytes")
    );
}
