//! Real captures made by others (`../shared/pcaps/`: MySQL 5.0 to 9.0, MariaDB, TLS,
//! compression, query attributes, prepared statements, mid-stream starts) published with
//! `publish-file --pcap` to a real RabbitMQ and read back from the queue. Each session's
//! published commands are checked against what Wireshark's dissector (`tshark`) decodes of what
//! the client sent: its decoded commands come out in the same order with the same SQL;
//! nothing published is an attribute block, a compressed frame or ciphertext; TLS sessions
//! publish nothing and are counted.
//!
//! These captures hold other hosts' addresses: they are only read here, never sent.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use collector::protocol::{Packets, change_user_database};
use common::{agent::binary, broker::TestExchange};
use mysql_async::consts::CapabilityFlags as F;

/// The server ports the captures use.
const PORTS: &str = "3306,20130,30130,6033,2883";
/// tshark joins several occurrences of a field with this.
const JOIN: char = '\u{1e}';

fn captures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/pcaps");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "pcap" || x == "pcapng") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// One client command: its byte and, for COM_QUERY and COM_INIT_DB, its text.
type Cmd = (u8, String);

/// What tshark decodes of the commands each client port sent, in order. A COM_QUERY whose SQL
/// tshark could not find (typed query attributes, which Wireshark 4.0 does not read) has
/// `None` text.
fn tshark_commands(file: &Path) -> BTreeMap<u16, Vec<(u8, Option<String>)>> {
    let mut args = vec!["-r".to_string(), file.display().to_string()];
    for p in PORTS.split(',') {
        args.extend(["-d".into(), format!("tcp.port=={p},mysql")]);
    }
    args.extend(
        [
            "-Y",
            "mysql.command",
            "-T",
            "fields",
            "-E",
            &format!("aggregator={JOIN}"),
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "mysql.command",
            "-e",
            "mysql.query",
            "-e",
            "mysql.schema",
        ]
        .map(String::from),
    );
    let out = Command::new("tshark").args(&args).output().expect("tshark");
    assert!(out.status.success(), "{out:?}");
    let ports: Vec<u16> = PORTS.split(',').map(|p| p.parse().unwrap()).collect();
    let mut by_port: BTreeMap<u16, Vec<(u8, Option<String>)>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (Ok(sport), Ok(dport)) = (f[0].parse::<u16>(), f[1].parse::<u16>()) else {
            continue;
        };
        if !ports.contains(&dport) {
            continue;
        }
        let split = |s: &str| -> Vec<String> {
            if s.is_empty() {
                Vec::new()
            } else {
                s.split(JOIN).map(String::from).collect()
            }
        };
        let (mut queries, mut schemas) = (split(f[3]).into_iter(), split(f[4]).into_iter());
        for c in split(f[2]) {
            // What tshark takes for a command in a stream it lost track of (compressed frames
            // it could not inflate, data packets) is no command a client sends.
            let Ok(cmd) = c.parse::<u8>() else { continue };
            if !(1..=0x1f).contains(&cmd) && cmd != 0xfa {
                continue;
            }
            let text = match cmd {
                3 => queries.next().filter(|q| !q.is_empty()),
                2 => schemas.next(),
                _ => None,
            };
            by_port.entry(sport).or_default().push((cmd, text));
        }
    }
    by_port
}

/// What a session's published stream holds: the handshake's capabilities, if it was
/// published, and the commands.
#[derive(Debug, Default)]
struct Published {
    handshake_caps: Option<u32>,
    commands: Vec<Cmd>,
}

fn published(units: &[collector::encode::Unit]) -> Published {
    let mut packets = Packets::default();
    for u in units {
        packets.push(&u.data);
    }
    let mut out = Published::default();
    let mut first = true;
    let mut long: Option<Vec<u8>> = None;
    while let Some(p) = packets.next_packet() {
        let is_first = std::mem::replace(&mut first, false);
        if is_first && p.seq == 1 && p.payload.len() > 32 {
            out.handshake_caps = Some(u32::from_le_bytes(p.payload[..4].try_into().unwrap()));
            continue;
        }
        let payload = match long.take() {
            Some(mut so_far) => {
                so_far.extend_from_slice(&p.payload);
                so_far
            }
            None if p.seq != 0 || p.payload.is_empty() => continue,
            None => p.payload,
        };
        if payload.len() % 0xff_ffff == 0 {
            long = Some(payload);
            continue;
        }
        let text = match payload[0] {
            2 | 3 => String::from_utf8_lossy(&payload[1..]).into_owned(),
            0x11 => change_user_database(&payload[1..])
                .map(|db| String::from_utf8_lossy(&db).into_owned())
                .unwrap_or_default(),
            _ => String::new(),
        };
        out.commands.push((payload[0], text));
    }
    assert_eq!(
        packets.pending(),
        0,
        "a packet cut at the end of a published session"
    );
    out
}

/// `publish-file --pcap` to a queue of the test's own; what it printed and the messages.
fn publish(file: &Path) -> (String, HashMap<u16, Vec<collector::encode::Unit>>) {
    let mq = TestExchange::new("pcap");
    let out = Command::new(binary())
        .args([
            "publish-file",
            "--pcap",
            &file.display().to_string(),
            &format!("--port={PORTS}"),
            &format!("--rabbitmq_exchange_name={}", mq.exchange),
            "--rabbitmq_confirm",
            // The commands as the client sent them (prepared statements are checked in
            // prepared_render and prepared_replay).
            "--prepared_statements=off",
        ])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}: {printed}{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (printed, mq.units_by_port())
}

/// A figure of `publish-file`'s summary line, by the words before it.
fn figure(printed: &str, words: &str) -> u64 {
    let at = printed
        .find(words)
        .unwrap_or_else(|| panic!("{words:?} in {printed}"));
    printed[at + words.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Text as tshark prints a field: line breaks and tabs escaped (backslashes not), cut at the
/// first NUL.
fn as_tshark_prints(t: &str) -> String {
    let t = t.split('\0').next().unwrap_or_default();
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Whether `want` appears in `got` in order (other commands may come between).
fn in_order(want: &[(u8, Option<String>)], got: &[Cmd]) -> Result<(), String> {
    let mut it = got.iter();
    for (cmd, text) in want {
        let found = it.any(|(c, t)| {
            c == cmd
                && text
                    .as_ref()
                    .is_none_or(|text| as_tshark_prints(t).starts_with(text.as_str()))
        });
        if !found {
            return Err(format!("0x{cmd:02x} {text:?} not published in order"));
        }
    }
    Ok(())
}

#[test]
fn every_real_capture_publishes_what_the_client_sent_and_nothing_unreplayable() {
    let files = captures();
    assert!(files.len() >= 50, "{} captures", files.len());
    let (mut sessions, mut commands, mut tls, mut compressed, mut attributes) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for file in &files {
        let name = file.display().to_string();
        let want = tshark_commands(file);
        let (printed, units) = publish(file);
        tls += figure(&printed, "TLS sessions");
        compressed += figure(&printed, "compressed sessions");
        attributes += figure(&printed, "query attributes removed");
        for (port, units) in &units {
            let p = published(units);
            sessions += 1;
            commands += p.commands.len();
            if let Some(caps) = p.handshake_caps {
                let not_replayed = F::CLIENT_SSL
                    | F::CLIENT_COMPRESS
                    | F::CLIENT_QUERY_ATTRIBUTES
                    | F::CLIENT_ZSTD_COMPRESSION_ALGORITHM;
                if F::from_bits_retain(caps).intersects(not_replayed) {
                    failures.push(format!("{name} :{port}: handshake caps {caps:#x}"));
                }
            }
            for (cmd, text) in &p.commands {
                // Every command byte a client sends, and SQL that starts as SQL: no attribute
                // block, no compressed frame, no TLS record.
                let sql_start = text.as_bytes().first().copied();
                if *cmd > 0x1f && *cmd != 0xfa
                    || *cmd == 3 && sql_start.is_some_and(|b| b < 0x20 && !b" \t\r\n".contains(&b))
                {
                    failures.push(format!("{name} :{port}: published 0x{cmd:02x} {text:?}"));
                }
            }
            let told = want.get(port).map(Vec::as_slice).unwrap_or_default();
            if let Err(e) = in_order(told, &p.commands) {
                let shown: Vec<_> = p
                    .commands
                    .iter()
                    .map(|(c, t)| (c, t.chars().take(80).collect::<String>()))
                    .collect();
                failures.push(format!("{name} :{port}: {e}; published {shown:?}"));
            }
            // A COM_INIT_DB of the new database follows each COM_CHANGE_USER that names one.
            for (i, (cmd, db)) in p.commands.iter().enumerate() {
                if *cmd == 0x11 && !db.is_empty() && p.commands.get(i + 1) != Some(&(2, db.clone()))
                {
                    failures.push(format!(
                        "{name} :{port}: no COM_INIT_DB {db} after COM_CHANGE_USER"
                    ));
                }
            }
        }
        // Sessions tshark decodes commands of but nothing was published for: only TLS ones.
        for (port, told) in &want {
            if !units.contains_key(port) && told.iter().any(|(c, _)| *c != 1) {
                failures.push(format!("{name} :{port}: nothing published of {told:?}"));
            }
        }
        // TLS: the encrypted captures publish nothing at all, and say so.
        if name.contains("encrypted") || name.contains("tls-1") {
            assert!(units.is_empty(), "{name}: {units:?}");
            assert_eq!(figure(&printed, "TLS sessions"), 1, "{name}: {printed}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // What the captures hold (shared/pcaps/README.md): TLS, compression, query attributes.
    assert_eq!(tls, 3, "TLS sessions");
    assert!(compressed >= 6, "compressed sessions: {compressed}");
    assert!(attributes >= 17, "queries with attributes: {attributes}");
    assert!(
        sessions >= 170 && commands >= 800,
        "{sessions} sessions, {commands} commands"
    );
    eprintln!(
        "{} captures: {sessions} sessions, {commands} commands published; {tls} TLS sessions, \
         {compressed} compressed, {attributes} queries' attributes removed",
        files.len()
    );
}

/// `inspect --from_pcap` shows the query attributes the published stream leaves out: a MySQL 9
/// client's typed attributes, decoded.
#[test]
fn inspect_shows_the_query_attributes_a_mysql_9_client_sent() {
    let file = captures()
        .into_iter()
        .find(|f| f.ends_with("zeek/mysql-9.0.0-query-attributes.pcap"))
        .unwrap();
    let out = Command::new(binary())
        .args([
            "inspect",
            "--json",
            "--from_pcap",
            &file.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let query: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["command"] == "COM_QUERY")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(query["sql"], "SELECT version()");
    assert_eq!(
        query["attributes"],
        serde_json::json!({
            "number1": "42",
            "string1": "'a string'",
            "date1": "'1987-10-18'",
            "datetime1": "'1990-09-26 12:13:14'",
        })
    );
}
