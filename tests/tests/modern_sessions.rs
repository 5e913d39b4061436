//! Sessions as MySQL 8-era clients make them, against a MariaDB of the test's own that offers
//! TLS (a certificate made by `openssl req -x509`): compressed sessions (mysql_async's zlib
//! compression, `mariadb --compress`), opened before and after the agent; a COM_CHANGE_USER to
//! another database; TLS sessions before and after the agent. Replayed from the queue into a
//! second server as MRTE-Player does, the plain and compressed sessions' tables are identical;
//! the TLS sessions publish nothing (no ciphertext framed as commands) and are counted.

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
async fn compressed_and_change_user_sessions_replay_and_tls_sessions_publish_nothing() {
    let dir = std::env::temp_dir().join(common::unique("mrte-tls-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate(&dir);
    let mq = TestExchange::new("modern");
    let source = TestServer::start(&[&format!("--ssl-cert={cert}"), &format!("--ssl-key={key}")]);
    let target = TestServer::start(&[]);
    source.root_sql(SCHEMA);
    target.root_sql(SCHEMA);
    let have_ssl = source.root_sql("SHOW GLOBAL VARIABLES LIKE 'have_ssl'");
    assert!(have_ssl.contains("YES"), "{have_ssl}");

    // Open before the agent: a compressed session and a TLS one.
    let mut compressed_before = connect(&source, "shop", true).await;
    compressed_before
        .query_drop("INSERT INTO orders VALUES (1, 'before', 'x')")
        .await
        .unwrap();
    // Not captured: the target gets it as part of its starting point.
    target.root_sql("INSERT INTO shop.orders VALUES (1, 'before', 'x')");
    let mut tls_before = TlsClient::start(source.port);
    tls_before.sql("INSERT INTO secret VALUES (1, 'before');");

    let args = local_server_args(source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();

    // Compressed, after: small statements (frames sent as they are) and a large one (zlib,
    // several frames).
    let mut compressed = connect(&source, "shop", true).await;
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
    let mut changes = connect(&source, "shop", false).await;
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
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| *t.get(k).unwrap_or_else(|| panic!("{k} in {stdout}"));
    assert!(get("tls_sessions") >= 2, "{stdout}");
    assert!(get("tls_bytes") > 0, "{stdout}");
    // mysql_async's two and the mariadb client's.
    assert!(get("compressed_sessions") >= 3, "{stdout}");
    assert!(get("inflated_bytes") > 200_000, "{stdout}");
    assert_eq!(get("change_user_dbs"), 1, "{stdout}");
    // The summary leaves out what is zero.
    for zero in [
        "unreplayable_frames",
        "unreplayable_attributes",
        "seq_gaps",
        "queue_full",
    ] {
        assert!(!t.contains_key(zero), "{zero}: {stdout}");
    }

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
        if table.ends_with("secret") {
            // The TLS sessions' rows: none replayed.
            assert_eq!((a.len(), b.len()), (41, 0), "{table}");
            continue;
        }
        assert!(a == b, "{table}: {} rows vs {} replayed", a.len(), b.len());
    }
    let rows: usize = want.iter().map(|(_, r)| r.len()).sum();
    assert!(rows >= 41 + 100 + 1 + 2 + 6, "{rows}");
    let _ = std::fs::remove_dir_all(&dir);
}
