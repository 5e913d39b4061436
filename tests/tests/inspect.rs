//! `mrte-collector inspect` on the real kernel: a scripted session against a MariaDB of the
//! test's own, sent through a relay that cuts everything the client sends into 100-byte
//! segments, shows exactly the expected command lines (golden output), including a query of
//! 3 KiB over 30 segments and a server-side prepared statement.

mod common;

use common::{Relay, agent::Agent, mariadb::TestServer, mysql_opts};
use mysql_async::{Conn, OptsBuilder, prelude::*};

/// The lines of the scripted session, time and client address left out.
fn golden(long: &str) -> Vec<String> {
    [
        "HANDSHAKE_RESPONSE user=mrte db=inspect_db",
        // mysql_async's own, as it connects.
        "COM_QUERY SELECT @@max_allowed_packet,@@wait_timeout",
        "COM_QUERY SELECT 1",
        &format!("COM_QUERY SELECT '{long}' AS long_one"),
        "COM_QUERY SELECT 'it''s', \"a\\\\b\", 'line\\none'",
        "COM_QUERY USE mysql",
        "COM_STMT_PREPARE SELECT ? + ? AS s",
        // stmt 1, no cursor, 1 iteration; null bitmap 0, new params bound with their types
        // (two LONGLONGs), the values 40 and 2.
        "COM_STMT_EXECUTE stmt_id=1 flags=0 params=(22 bytes) \
         00010800080028000000000000000200000000000000",
        "COM_STMT_CLOSE stmt_id=1",
        "COM_PING",
        "COM_QUIT",
        "(closed)",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_each_command_of_a_scripted_session() {
    let server = TestServer::start(&[]);
    server.root_sql("CREATE DATABASE inspect_db; GRANT ALL ON *.* TO 'mrte'@'%'");
    let relay = Relay::start_chunked(server.addr(), Some(100)).await;
    let port = server.port.to_string();
    let mut inspect = Agent::start(&["inspect", "--interface=lo", "--port", &port, "--full"]);
    inspect.wait_attached();

    let long: String = (0..3000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let mut conn =
        Conn::new(OptsBuilder::from_opts(mysql_opts(relay.addr)).db_name(Some("inspect_db")))
            .await
            .unwrap();
    conn.query_drop("SELECT 1").await.unwrap();
    let got: String = conn
        .query_first(format!("SELECT '{long}' AS long_one"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, long);
    conn.query_drop("SELECT 'it''s', \"a\\\\b\", 'line\none'")
        .await
        .unwrap();
    conn.query_drop("USE mysql").await.unwrap();
    let stmt = conn.prep("SELECT ? + ? AS s").await.unwrap();
    let s: i64 = conn.exec_first(&stmt, (40, 2)).await.unwrap().unwrap();
    assert_eq!(s, 42);
    conn.close(stmt).await.unwrap();
    conn.ping().await.unwrap();
    conn.disconnect().await.unwrap();
    let sent = relay.sent_when_closed(1).await;
    let client_port = *sent.keys().next().unwrap();
    // Every byte the client sent went out in pieces of 100 at most.
    assert!(sent[&client_port].len() > 3000);

    // The view prints within 50 ms of a record; give the FIN's line time to come.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let out = inspect.stop();
    let prefix = format!("127.0.0.1:{client_port} ");
    let lines: Vec<String> = out
        .lines()
        .filter_map(|l| {
            // "HH:MM:SS.micro CLIENT COMMAND ARGS"
            let (time, rest) = l.split_once(' ')?;
            let ok = time.len() == 15 && time.as_bytes()[2] == b':';
            ok.then(|| rest.strip_prefix(&prefix))?.map(String::from)
        })
        .collect();
    let want = golden(&long);
    let short = |l: &String| l.chars().take(160).collect::<String>();
    assert_eq!(
        lines.iter().map(short).collect::<Vec<_>>(),
        want.iter().map(short).collect::<Vec<_>>(),
        "inspect printed:\n{out}"
    );
    assert_eq!(lines, want);
}
