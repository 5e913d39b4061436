//! The few pieces of the MySQL client/server protocol the collector (and a consumer replaying
//! its stream) must understand: packet framing, command bytes, and the client's handshake
//! response, which names the session's initial database.

use mysql_common::{constants::CapabilityFlags, io::ParseBuf, packets};

/// Command bytes, the first payload byte of a packet with sequence number 0.
pub mod command {
    use mysql_common::constants::Command as C;

    pub const QUIT: u8 = C::COM_QUIT as u8;
    pub const INIT_DB: u8 = C::COM_INIT_DB as u8;
    pub const QUERY: u8 = C::COM_QUERY as u8;
    pub const PING: u8 = C::COM_PING as u8;
    pub const CHANGE_USER: u8 = C::COM_CHANGE_USER as u8;
    pub const BINLOG_DUMP: u8 = C::COM_BINLOG_DUMP as u8;
    pub const REGISTER_SLAVE: u8 = C::COM_REGISTER_SLAVE as u8;
    pub const BINLOG_DUMP_GTID: u8 = C::COM_BINLOG_DUMP_GTID as u8;
    pub const STMT_PREPARE: u8 = C::COM_STMT_PREPARE as u8;
    pub const STMT_EXECUTE: u8 = C::COM_STMT_EXECUTE as u8;
    pub const STMT_SEND_LONG_DATA: u8 = C::COM_STMT_SEND_LONG_DATA as u8;
    pub const STMT_CLOSE: u8 = C::COM_STMT_CLOSE as u8;
    pub const STMT_RESET: u8 = C::COM_STMT_RESET as u8;
    pub const STMT_FETCH: u8 = C::COM_STMT_FETCH as u8;
    /// MariaDB's array binding (many rows in one command).
    pub const STMT_BULK_EXECUTE: u8 = C::COM_STMT_BULK_EXECUTE as u8;

    /// The commands a connection's prepared statements take out of the stream.
    pub fn is_statement(cmd: u8) -> bool {
        matches!(
            cmd,
            STMT_PREPARE
                | STMT_EXECUTE
                | STMT_SEND_LONG_DATA
                | STMT_CLOSE
                | STMT_RESET
                | STMT_FETCH
                | STMT_BULK_EXECUTE
        )
    }

    /// Every command's name, by its byte (0x08, which mysql_common calls deprecated, by the
    /// name servers and their docs give it).
    const NAMES: [&str; 0x20] = [
        "COM_SLEEP",
        "COM_QUIT",
        "COM_INIT_DB",
        "COM_QUERY",
        "COM_FIELD_LIST",
        "COM_CREATE_DB",
        "COM_DROP_DB",
        "COM_REFRESH",
        "COM_SHUTDOWN",
        "COM_STATISTICS",
        "COM_PROCESS_INFO",
        "COM_CONNECT",
        "COM_PROCESS_KILL",
        "COM_DEBUG",
        "COM_PING",
        "COM_TIME",
        "COM_DELAYED_INSERT",
        "COM_CHANGE_USER",
        "COM_BINLOG_DUMP",
        "COM_TABLE_DUMP",
        "COM_CONNECT_OUT",
        "COM_REGISTER_SLAVE",
        "COM_STMT_PREPARE",
        "COM_STMT_EXECUTE",
        "COM_STMT_SEND_LONG_DATA",
        "COM_STMT_CLOSE",
        "COM_STMT_RESET",
        "COM_SET_OPTION",
        "COM_STMT_FETCH",
        "COM_DAEMON",
        "COM_BINLOG_DUMP_GTID",
        "COM_RESET_CONNECTION",
    ];

    /// The name of a command byte.
    pub fn name(cmd: u8) -> Option<&'static str> {
        match cmd {
            STMT_BULK_EXECUTE => Some("COM_STMT_BULK_EXECUTE"),
            _ => NAMES.get(usize::from(cmd)).copied(),
        }
    }
}

/// Bytes of a packet header: 3-byte little-endian payload length, then the sequence number.
pub const HEADER: usize = 4;

/// One whole packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// Cuts a byte stream into packets as the bytes arrive.
#[derive(Debug, Default)]
pub struct Packets {
    buf: Vec<u8>,
}

impl Packets {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet, if all of it has arrived.
    pub fn next_packet(&mut self) -> Option<Packet> {
        if self.buf.len() < HEADER {
            return None;
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], 0]) as usize;
        if self.buf.len() < HEADER + len {
            return None;
        }
        let seq = self.buf[3];
        let payload = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        Some(Packet { seq, payload })
    }

    /// Bytes of a packet not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// What a client's handshake response says about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub user: Vec<u8>,
    /// The initial default database (CLIENT_CONNECT_WITH_DB), if any.
    pub database: Option<Vec<u8>>,
}

impl HandshakeResponse {
    /// Parses the payload of a protocol-41 handshake response (with mysql_common). None for
    /// anything else, including the short TLS request, after which the rest of the session
    /// is encrypted.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let capabilities = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?);
        if capabilities & CapabilityFlags::CLIENT_PROTOCOL_41.bits() == 0 || payload.len() <= 32 {
            return None;
        }
        let h: packets::HandshakeResponse<'_> = ParseBuf(payload).parse(()).ok()?;
        Some(Self {
            capabilities,
            user: h.user().to_vec(),
            database: h.db_name().map(<[u8]>::to_vec),
        })
    }
}

/// The default database a COM_CHANGE_USER body (after the command byte) names: user,
/// authentication data (length-prefixed, as every client since 4.1 sends it), database.
pub fn change_user_database(body: &[u8]) -> Option<Vec<u8>> {
    use mysql_common::misc::raw::{
        RawBytes,
        bytes::{NullBytes, U8Bytes},
    };
    let mut buf = ParseBuf(body);
    buf.parse::<RawBytes<'_, NullBytes>>(()).ok()?;
    buf.parse::<RawBytes<'_, U8Bytes>>(()).ok()?;
    let db = buf.parse::<RawBytes<'_, NullBytes>>(()).ok()?;
    Some(db.as_bytes().to_vec()).filter(|db| !db.is_empty())
}

/// Whether a segment starts with a command packet: sequence 0 and a command byte.
pub fn starts_command(data: &[u8]) -> bool {
    data.len() > HEADER && data[3] == 0 && data[4] <= 0x1f && {
        let len = u32::from_le_bytes([data[0], data[1], data[2], 0]);
        len >= 1
    }
}

/// A command (`cmd` and `body`) as the packets a client sends: payloads of 0xffffff bytes
/// continue in the next packet (sequence numbers counting up), ended by a shorter one.
pub fn command_packets(cmd: u8, body: &[u8]) -> Vec<u8> {
    const MAX: usize = 0xff_ffff;
    let total = 1 + body.len();
    let mut out = Vec::with_capacity(total + HEADER * (total / MAX + 1));
    // The payload is the command byte, then the body; `at` counts the payload bytes written.
    let mut at = 0;
    let mut seq = 0u8;
    loop {
        let n = (total - at).min(MAX);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        out.push(seq);
        let from = if at == 0 {
            out.push(cmd);
            1
        } else {
            at
        };
        out.extend_from_slice(&body[from - 1..at + n - 1]);
        at += n;
        seq = seq.wrapping_add(1);
        if n < MAX {
            return out;
        }
    }
}

/// [`command_packets`] for a body the caller owns: one packet, the usual case, is framed in
/// place instead of copied into a second buffer.
pub fn into_command_packets(cmd: u8, mut body: Vec<u8>) -> Vec<u8> {
    let len = 1 + body.len();
    if len >= 0xff_ffff {
        return command_packets(cmd, &body);
    }
    // Under 2^24 the little-endian u32 is the 3-byte length and sequence number 0. The body
    // moves up by the header's 5 bytes (Vec::splice's general machinery cost more, profiled).
    let n = body.len();
    body.extend_from_slice(&[0; HEADER + 1]);
    body.copy_within(..n, HEADER + 1);
    body[..HEADER].copy_from_slice(&(len as u32).to_le_bytes());
    body[HEADER] = cmd;
    body
}

/// Whether a segment starts with a client's handshake response (or its TLS request): sequence
/// number 1, at least 32 bytes, the CLIENT_PROTOCOL_41 capability set.
pub fn is_handshake_response(data: &[u8]) -> bool {
    if data.len() < HEADER + 32 || data[3] != 1 {
        return false;
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], 0]);
    let caps = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    len >= 32 && caps & CapabilityFlags::CLIENT_PROTOCOL_41.bits() != 0
}

/// Whether a segment starts with a command that changes the default database: COM_INIT_DB,
/// COM_CHANGE_USER, or a COM_QUERY `USE ...`.
pub fn changes_database(data: &[u8]) -> bool {
    // A command packet: 3-byte length, sequence 0, command byte.
    if data.len() < HEADER + 1 || data[3] != 0 {
        return false;
    }
    match data[4] {
        command::INIT_DB | command::CHANGE_USER => true,
        command::QUERY => {
            let text = &data[5..];
            let start = text
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(text.len());
            let word = &text[start..];
            word.len() > 3
                && word[..3].eq_ignore_ascii_case(b"use")
                && (word[3].is_ascii_whitespace() || word[3] == b'`')
        }
        _ => false,
    }
}

/// One packet: `payload` after its header (for tests and synthetic units).
pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24, "longer than one MySQL packet");
    let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
pub(crate) mod test_support {
    /// A protocol-41 handshake response payload: user `mrte`, `auth`, `db`.
    pub(crate) fn handshake(caps: u32, auth: &[u8], db: Option<&[u8]>) -> Vec<u8> {
        let mut p = caps.to_le_bytes().to_vec();
        p.extend_from_slice(&(1u32 << 24).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(b"mrte\0");
        // Under 251 bytes a length-encoded length and a one-byte length are spelled alike.
        p.push(auth.len() as u8);
        p.extend_from_slice(auth);
        if let Some(db) = db {
            p.extend_from_slice(db);
            p.push(0);
        }
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::handshake, *};

    #[test]
    fn every_command_has_its_name() {
        assert_eq!(command::name(command::QUERY), Some("COM_QUERY"));
        assert_eq!(command::name(0x08), Some("COM_SHUTDOWN"));
        assert_eq!(command::name(0x1f), Some("COM_RESET_CONNECTION"));
        assert_eq!(
            command::name(command::STMT_BULK_EXECUTE),
            Some("COM_STMT_BULK_EXECUTE")
        );
        assert_eq!(command::name(0x20), None);
        assert!(command::is_statement(command::STMT_FETCH));
        assert!(!command::is_statement(command::QUERY));
    }

    #[test]
    fn command_packets_split_at_16_mib() {
        const MAX: usize = 0xff_ffff;
        for len in [0, 10, MAX - 2, MAX - 1, MAX, 2 * MAX - 1, 2 * MAX + 5] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let out = command_packets(0x03, &body);
            assert!(into_command_packets(0x03, body.clone()) == out, "len {len}");
            let (mut at, mut seq, mut payload) = (0, 0u8, Vec::new());
            loop {
                let n = u32::from_le_bytes([out[at], out[at + 1], out[at + 2], 0]) as usize;
                assert_eq!(out[at + 3], seq, "len {len}");
                payload.extend_from_slice(&out[at + 4..at + 4 + n]);
                at += 4 + n;
                seq += 1;
                if n < MAX {
                    break;
                }
            }
            assert_eq!(at, out.len(), "len {len}: bytes after the last packet");
            // A payload of exactly 16 MiB - 1 bytes is followed by an empty packet.
            assert_eq!(usize::from(seq), (len + 1) / MAX + 1, "len {len}");
            assert_eq!(payload[0], 0x03);
            assert!(payload[1..] == body[..], "len {len}");
        }
    }

    #[test]
    fn packets_come_out_whole_however_the_bytes_arrive() {
        let stream: Vec<u8> = [packet(0, b"\x03SELECT 1"), packet(0, b"\x01")].concat();
        for cut in 0..stream.len() {
            let mut p = Packets::default();
            p.push(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(x) = p.next_packet() {
                got.push(x);
            }
            p.push(&stream[cut..]);
            while let Some(x) = p.next_packet() {
                got.push(x);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].payload, b"\x03SELECT 1");
            assert_eq!(got[1].payload, b"\x01");
            assert_eq!(p.pending(), 0);
        }
    }

    #[test]
    fn change_user_names_the_database() {
        let body = [
            &b"bob\0"[..],
            &[3, 1, 2, 3],
            b"shop\0",
            &[33, 0],
            b"mysql_native_password\0",
        ]
        .concat();
        assert_eq!(change_user_database(&body), Some(b"shop".to_vec()));
        assert_eq!(change_user_database(b"bob\0\0\0"), None);
        assert_eq!(change_user_database(b"bob\0\x05ab"), None);
    }

    #[test]
    fn handshake_response_names_the_database() {
        let base = CapabilityFlags::CLIENT_PROTOCOL_41.bits()
            | CapabilityFlags::CLIENT_SECURE_CONNECTION.bits();
        let with_db = handshake(
            base | CapabilityFlags::CLIENT_CONNECT_WITH_DB.bits(),
            &[7; 20],
            Some(b"shop"),
        );
        let h = HandshakeResponse::parse(&with_db).unwrap();
        assert_eq!(h.user, b"mrte");
        assert_eq!(h.database.as_deref(), Some(&b"shop"[..]));
        assert!(is_handshake_response(&packet(1, &with_db)));

        let lenenc = handshake(
            base | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA.bits()
                | CapabilityFlags::CLIENT_CONNECT_WITH_DB.bits(),
            &[0; 20],
            Some(b"x"),
        );
        assert_eq!(
            HandshakeResponse::parse(&lenenc)
                .unwrap()
                .database
                .as_deref(),
            Some(&b"x"[..])
        );
        let no_db = handshake(base, &[1; 20], None);
        assert_eq!(HandshakeResponse::parse(&no_db).unwrap().database, None);
        // The TLS request: capabilities, max packet, charset, filler, nothing more.
        assert_eq!(HandshakeResponse::parse(&with_db[..32]), None);
        // Cut inside the auth data.
        assert_eq!(HandshakeResponse::parse(&with_db[..40]), None);
    }

    #[test]
    fn database_changes_are_recognised() {
        assert!(changes_database(&packet(0, b"\x02db")));
        assert!(changes_database(&packet(0, b"\x03  use db")));
        assert!(changes_database(&packet(0, b"\x03USE`db`")));
        assert!(!changes_database(&packet(0, b"\x03used")));
        assert!(!changes_database(&packet(0, b"\x03SELECT 1")));
        assert!(!changes_database(&packet(1, b"\x02db")));
    }
}
