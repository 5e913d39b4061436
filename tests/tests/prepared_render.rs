//! The text rendering of server-side prepared statements (`collector::prepared`, the user-side
//! half of issue 9) against a real MariaDB: a client inserts rows of every parameter type with
//! mysql_async's binary protocol through a recording relay; the recorded COM_STMT_PREPARE,
//! COM_STMT_SEND_LONG_DATA and COM_STMT_EXECUTE packets are rendered as text statements into a
//! second table, and both tables are identical. (The statement's parameter count comes from
//! the client library here; the agent will take it from the server's reply.)

mod common;

use common::{Relay, mariadb::TestServer, mysql_opts};
use mysql_async::{Conn, Value, prelude::*};

const COLUMNS: &str = "id INT PRIMARY KEY, i8 TINYINT, u8 TINYINT UNSIGNED, i16 SMALLINT, \
    i32 INT, u32 INT UNSIGNED, i64 BIGINT, u64 BIGINT UNSIGNED, f FLOAT, d DOUBLE, \
    dec1 DECIMAL(20,6), s VARCHAR(200) CHARACTER SET utf8mb4, b BLOB, dt DATE, \
    ts DATETIME(6), tm TIME(6), n INT, big LONGBLOB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_statements_insert_the_same_rows() {
    let server = TestServer::start(&["--max-allowed-packet=64M"]);
    server.root_sql(&format!(
        "CREATE DATABASE p; CREATE TABLE p.bin ({COLUMNS}); CREATE TABLE p.txt ({COLUMNS}); \
         GRANT ALL ON p.* TO 'mrte'@'%'"
    ));
    let relay = Relay::start(server.addr()).await;
    let mut conn = Conn::new(mysql_opts(relay.addr)).await.unwrap();
    let sql = "INSERT INTO p.bin VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";
    let stmt = conn.prep(sql).await.unwrap();
    let strings = [
        "plain",
        "it's",
        "back\\slash",
        "nul\0byte",
        "new\nline\r\u{1a}",
        "ütf-8 ✓ 😀",
        "",
        "?",
        "' OR 1=1 -- ",
    ];
    for (id, s) in strings.iter().enumerate() {
        let id = id as i64;
        let row: Vec<Value> = vec![
            id.into(),
            (-128 + id).into(),
            (255u64 - id as u64).into(),
            (-32768 + id).into(),
            (i32::MIN as i64 + id).into(),
            (u32::MAX as u64 - id as u64).into(),
            (i64::MIN + id).into(),
            (u64::MAX - id as u64).into(),
            Value::Float(1.5e-7 * (id as f32 + 1.0)),
            Value::Double(0.1 + id as f64 * 1e300),
            Value::Bytes(format!("-{id}2345678901.123456").into_bytes()),
            (*s).into(),
            Value::Bytes(vec![0, 0xff, b'\'', b'\\', id as u8]),
            Value::Date(2024, 2, 29, 0, 0, 0, 0),
            Value::Date(1999, 12, 31, 23, 59, 58, 123_456 + id as u32),
            Value::Time(id % 2 == 1, 1, 2, 3, 4, 5),
            Value::NULL,
            // Past one packet on the first row: mysql_async sends that row's byte values as
            // long data.
            Value::Bytes(vec![b'x'; if id == 0 { 17 << 20 } else { 10 }]),
        ];
        conn.exec_drop(&stmt, row).await.unwrap();
    }
    let params = stmt.num_params() as usize;
    conn.close(stmt).await.unwrap();
    conn.disconnect().await.unwrap();
    let sent = relay.sent_when_closed(1).await;
    let stream = sent.into_values().next().unwrap();

    // The client's packets, rendered.
    let mut packets = collector::protocol::Packets::default();
    packets.push(&stream);
    let mut statement = None;
    let mut rendered = Vec::new();
    let mut kinds = Vec::new();
    while let Some(mut p) = packets.next_packet() {
        if p.seq != 0 || p.payload.is_empty() {
            continue;
        }
        // A command of 16 MiB or more goes on in the next packets.
        let mut last = p.payload.len();
        while last == 0xff_ffff {
            let more = packets.next_packet().unwrap();
            last = more.payload.len();
            p.payload.extend_from_slice(&more.payload);
        }
        let body = &p.payload[1..];
        kinds.push(p.payload[0]);
        match p.payload[0] {
            0x16 => {
                statement = Some(collector::prepared::Statement::new(body.to_vec(), params));
            }
            0x18 => {
                let param = u16::from_le_bytes([body[4], body[5]]) as usize;
                statement.as_mut().unwrap().long_data(param, &body[6..]);
            }
            0x17 => rendered.push(statement.as_mut().unwrap().execute(body, false).unwrap()),
            _ => {}
        }
    }
    assert_eq!(rendered.len(), strings.len(), "commands: {kinds:x?}");
    assert!(kinds.contains(&0x18), "no long data was sent: {kinds:x?}");

    let mut direct = Conn::new(mysql_opts(server.addr())).await.unwrap();
    for sql in &rendered {
        // Binary values go into the text as the bytes they are, as a client's escaping does.
        let prefix = b"INSERT INTO p.bin";
        assert!(sql.starts_with(prefix));
        let mut text = b"INSERT INTO p.txt".to_vec();
        text.extend_from_slice(&sql[prefix.len()..]);
        direct.query_drop(text).await.unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                String::from_utf8_lossy(&sql[..sql.len().min(600)])
            )
        });
    }
    let dump = |t: &str| {
        server.root_sql(&format!(
            "SELECT id, i8, u8, i16, i32, u32, i64, u64, CAST(f AS DOUBLE), d, dec1, HEX(s), HEX(b), \
             dt, ts, tm, n, MD5(big), LENGTH(big) FROM p.{t} ORDER BY id"
        ))
    };
    let (bin, txt) = (dump("bin"), dump("txt"));
    assert_eq!(bin.lines().count(), strings.len());
    assert_eq!(bin, txt);
}
