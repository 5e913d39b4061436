//! The MRTE wire format (`shared/docs/mrte-wire-format.md`), byte for byte.
//!
//! A message is `LOCAL_IP` (4 bytes, network order) followed by units; a unit is
//! `u32le length | source IPv4 | source port u16le | data | adler32 u32le` where the length
//! counts everything after itself and the checksum covers only the first 22 bytes of
//! `ip ‖ port ‖ data`. The decoder is strict where the consumer is: a consumer stops at the
//! first bad unit, so every deviation is an error here.

use std::net::Ipv4Addr;

use bytes::{BufMut as _, BytesMut};

/// Bytes a unit adds around its data: length, address, port, checksum.
pub const UNIT_OVERHEAD: usize = 4 + 4 + 2 + 4;
/// The checksum covers at most this many bytes of `ip ‖ port ‖ data`.
const CHECKSUM_SPAN: usize = 22;
/// Bytes before the first unit of a message.
pub const MESSAGE_HEADER: usize = 4;

/// DATA of a synthetic COM_QUIT unit: length 1, sequence 0, command 0x01.
pub const COM_QUIT: [u8; 5] = [0x01, 0x00, 0x00, 0x00, 0x01];

/// Starts a message: `LOCAL_IP`.
pub fn put_message_header(buf: &mut BytesMut, local_ip: Ipv4Addr) {
    buf.put_slice(&local_ip.octets());
}

/// Appends one unit carrying `data` from `ip:port`.
pub fn put_unit(buf: &mut BytesMut, ip: Ipv4Addr, port: u16, data: &[u8]) {
    let mut head = [0u8; CHECKSUM_SPAN];
    head[..4].copy_from_slice(&ip.octets());
    head[4..6].copy_from_slice(&port.to_le_bytes());
    let from_data = data.len().min(CHECKSUM_SPAN - 6);
    head[6..6 + from_data].copy_from_slice(&data[..from_data]);
    let checksum = adler2::adler32_slice(&head[..6 + from_data]);

    buf.reserve(UNIT_OVERHEAD + data.len());
    buf.put_u32_le((4 + 2 + data.len() + 4) as u32);
    buf.put_slice(&head[..6]);
    buf.put_slice(data);
    buf.put_u32_le(checksum);
}

/// DATA of a synthetic COM_INIT_DB unit for database `db` (a MySQL packet: u24le length,
/// sequence 0, command 0x02, name).
pub fn com_init_db(db: &[u8]) -> Vec<u8> {
    let len = (1 + db.len()) as u32;
    assert!(len < 1 << 24, "database name longer than a MySQL packet");
    let mut out = Vec::with_capacity(4 + len as usize);
    out.extend_from_slice(&len.to_le_bytes()[..3]);
    out.push(0x00);
    out.push(0x02);
    out.extend_from_slice(db);
    out
}

/// One decoded unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub data: Vec<u8>,
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub local_ip: Ipv4Addr,
    pub units: Vec<Unit>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {len} bytes: a message holds LOCAL_IP and at least one unit")]
    TooShort { len: usize },
    #[error("unit at byte {offset}: length {length} is at most 10, so it holds no data")]
    UnitTooShort { offset: usize, length: u32 },
    #[error("unit at byte {offset}: length {length} runs past the message end ({available} left)")]
    UnitTruncated {
        offset: usize,
        length: u32,
        available: usize,
    },
    #[error("unit at byte {offset}: checksum {found:#010x}, computed {computed:#010x}")]
    Checksum {
        offset: usize,
        found: u32,
        computed: u32,
    },
}

/// Decodes a whole message; any bad unit is an error (a consumer would stop there).
pub fn decode_message(msg: &[u8]) -> Result<Message, DecodeError> {
    if msg.len() < 8 {
        return Err(DecodeError::TooShort { len: msg.len() });
    }
    let local_ip = Ipv4Addr::new(msg[0], msg[1], msg[2], msg[3]);
    let mut units = Vec::new();
    let mut at = MESSAGE_HEADER;
    while at < msg.len() {
        let rest = &msg[at..];
        if rest.len() < 4 {
            return Err(DecodeError::UnitTruncated {
                offset: at,
                length: 0,
                available: rest.len(),
            });
        }
        let length = u32::from_le_bytes(rest[..4].try_into().unwrap());
        if length <= 10 {
            return Err(DecodeError::UnitTooShort { offset: at, length });
        }
        let body = rest[4..]
            .get(..length as usize)
            .ok_or(DecodeError::UnitTruncated {
                offset: at,
                length,
                available: rest.len() - 4,
            })?;
        let (covered, tail) = body.split_at(body.len() - 4);
        let found = u32::from_le_bytes(tail.try_into().unwrap());
        let computed = adler2::adler32_slice(&covered[..covered.len().min(CHECKSUM_SPAN)]);
        if found != computed {
            return Err(DecodeError::Checksum {
                offset: at,
                found,
                computed,
            });
        }
        units.push(Unit {
            ip: Ipv4Addr::new(covered[0], covered[1], covered[2], covered[3]),
            port: u16::from_le_bytes([covered[4], covered[5]]),
            data: covered[6..].to_vec(),
        });
        at += 4 + length as usize;
    }
    Ok(Message { local_ip, units })
}

/// Encodes a whole message (tests and tools; the publishers build theirs incrementally).
pub fn encode_message(local_ip: Ipv4Addr, units: &[Unit]) -> BytesMut {
    let mut buf = BytesMut::new();
    put_message_header(&mut buf, local_ip);
    for u in units {
        put_unit(&mut buf, u.ip, u.port, &u.data);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The known-answer vectors, computed independently (Python's zlib.adler32).
    const VECTORS: &str = include_str!("../testdata/mrte-frames.json");

    fn vectors() -> Vec<(String, Message, Vec<u8>)> {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let units = c["units"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|u| Unit {
                        ip: u["source_ip"].as_str().unwrap().parse().unwrap(),
                        port: u["source_port"].as_u64().unwrap() as u16,
                        data: hex(u["data_hex"].as_str().unwrap()),
                    })
                    .collect();
                (
                    c["name"].as_str().unwrap().to_owned(),
                    Message {
                        local_ip: c["local_ip"].as_str().unwrap().parse().unwrap(),
                        units,
                    },
                    hex(c["message_hex"].as_str().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn every_vector_byte_for_byte() {
        let cases = vectors();
        assert!(cases.len() >= 6, "vectors file lost cases");
        for (name, msg, expected) in cases {
            let got = encode_message(msg.local_ip, &msg.units);
            assert_eq!(&got[..], &expected[..], "{name}: encoding differs");
            assert_eq!(decode_message(&expected).unwrap(), msg, "{name}: decoding");
        }
    }

    #[test]
    fn synthetic_units_match_the_vectors() {
        let (_, msg, _) = vectors()
            .into_iter()
            .find(|(n, ..)| n == "init_db_then_quit")
            .unwrap();
        assert_eq!(msg.units[0].data, com_init_db(b"shop"));
        assert_eq!(msg.units[1].data, COM_QUIT);
    }

    #[test]
    fn consumer_rules_are_errors() {
        assert_eq!(
            decode_message(&[127, 0, 0, 1]),
            Err(DecodeError::TooShort { len: 4 })
        );
        let mut m = encode_message(
            Ipv4Addr::LOCALHOST,
            &[Unit {
                ip: Ipv4Addr::LOCALHOST,
                port: 1,
                data: b"abc".to_vec(),
            }],
        )
        .to_vec();
        let good = m.clone();
        m[12] ^= 1; // a data byte inside the checksum span
        assert!(matches!(
            decode_message(&m),
            Err(DecodeError::Checksum { offset: 4, .. })
        ));
        let mut cut = good.clone();
        cut.pop();
        assert!(matches!(
            decode_message(&cut),
            Err(DecodeError::UnitTruncated { offset: 4, .. })
        ));
        let mut short = good;
        short[4..8].copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(
            decode_message(&short),
            Err(DecodeError::UnitTooShort {
                offset: 4,
                length: 10
            })
        );
    }

    fn unit() -> impl Strategy<Value = Unit> {
        (
            any::<u32>(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 1..300),
        )
            .prop_map(|(ip, port, data)| Unit {
                ip: Ipv4Addr::from(ip),
                port,
                data,
            })
    }

    proptest! {
        #[test]
        fn round_trips_arbitrary_batches(
            local in any::<u32>(),
            units in prop::collection::vec(unit(), 1..40),
        ) {
            let local_ip = Ipv4Addr::from(local);
            let bytes = encode_message(local_ip, &units);
            let expected_len = MESSAGE_HEADER
                + units.iter().map(|u| UNIT_OVERHEAD + u.data.len()).sum::<usize>();
            prop_assert_eq!(bytes.len(), expected_len);
            prop_assert_eq!(decode_message(&bytes).unwrap(), Message { local_ip, units });
        }

        #[test]
        fn any_flipped_bit_in_a_checked_byte_is_caught(
            u in unit(),
            pick in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode_message(Ipv4Addr::LOCALHOST, std::slice::from_ref(&u)).to_vec();
            // Bytes the checksum covers or is: ip, port, data's first 16 bytes, checksum.
            let data_checked = u.data.len().min(16);
            let mut checked: Vec<usize> = (8..14 + data_checked).collect();
            checked.extend(bytes.len() - 4..bytes.len());
            let at = checked[pick.index(checked.len())];
            bytes[at] ^= 1 << bit;
            prop_assert!(
                matches!(decode_message(&bytes), Err(DecodeError::Checksum { .. })),
                "flip at {} not caught", at
            );
        }
    }
}
