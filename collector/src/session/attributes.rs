//! Query attributes (CLIENT_QUERY_ATTRIBUTES, MySQL 8.0.23+): a session that negotiated them
//! starts every COM_QUERY with a parameter count and a parameter-set count (`00 01` when there
//! are none), then, with attributes, a NULL bitmap, a bind flag, each one's type and name, and
//! their values, before the SQL. A player runs the SQL, so the block is taken out.

use mysql_common::{
    io::ParseBuf,
    misc::raw::{RawBytes, RawInt, int::LenEnc},
};

use crate::prepared::{Param, RenderError, literal};

/// A COM_QUERY body (after the command byte) split into its attributes and its SQL.
#[derive(Debug, PartialEq)]
pub struct Split<'a> {
    /// Name and value (as an SQL literal) of each attribute.
    pub attributes: Vec<(Vec<u8>, Vec<u8>)>,
    pub sql: &'a [u8],
}

/// Whether a COM_QUERY body of a session whose handshake was not seen starts with an attribute
/// block: SQL never starts with a byte followed by 0x01, the set count, which is always 1.
pub fn looks_like_attributes(body: &[u8]) -> bool {
    matches!(body, [n, 1, ..] if *n < 0xfb)
}

fn lenenc(buf: &mut ParseBuf<'_>) -> Option<u64> {
    buf.parse::<RawInt<LenEnc>>(()).ok().map(|n| n.0)
}

/// Splits a COM_QUERY body into attributes and SQL; `describe`: render the attributes (for
/// `inspect`), otherwise only their place is found.
pub fn split(body: &[u8], describe: bool) -> Result<Split<'_>, RenderError> {
    let truncated = |what| RenderError::Truncated { what };
    let mut buf = ParseBuf(body);
    let count = lenenc(&mut buf).ok_or(truncated("the attribute count"))? as usize;
    if lenenc(&mut buf) != Some(1) {
        return Err(truncated("the attribute set count"));
    }
    let mut attributes = Vec::new();
    if count > 0 {
        // At most one attribute per byte of the body: a bad count fails here, not in an
        // allocation.
        if count > body.len() {
            return Err(truncated("the attributes"));
        }
        let nulls = buf
            .checked_eat(count.div_ceil(8))
            .ok_or(truncated("the NULL bitmap"))?
            .to_vec();
        if buf.checked_eat_u8() != Some(1) {
            // Attributes are always sent with their types and names.
            return Err(truncated("the attribute types"));
        }
        let mut typed = Vec::with_capacity(count);
        for _ in 0..count {
            let t = buf.checked_eat(2).ok_or(truncated("the attribute types"))?;
            let (ty, flags) = (t[0], t[1]);
            let name: RawBytes<'_, LenEnc> = buf
                .parse(())
                .map_err(|_| truncated("the attribute names"))?;
            typed.push((ty, flags, name.as_bytes().to_vec()));
        }
        for (i, (ty, flags, name)) in typed.into_iter().enumerate() {
            let value = if nulls[i / 8] & (1 << (i % 8)) != 0 {
                Param::Null
            } else {
                Param::decode(&mut buf, i, ty, flags)?
            };
            if describe {
                let mut v = Vec::new();
                if literal(i, &value, &mut v).is_err() {
                    v = b"(no literal)".to_vec();
                }
                attributes.push((name, v));
            }
        }
    }
    Ok(Split {
        attributes,
        sql: &body[body.len() - buf.len()..],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A body with the named attributes (type, flags, value bytes), then `sql`.
    pub(crate) fn body(attrs: &[(&str, u8, &[u8])], sql: &[u8]) -> Vec<u8> {
        let mut b = vec![attrs.len() as u8, 1];
        if !attrs.is_empty() {
            b.extend(std::iter::repeat_n(0, attrs.len().div_ceil(8)));
            b.push(1);
            for (name, ty, _) in attrs {
                b.extend_from_slice(&[*ty, 0, name.len() as u8]);
                b.extend_from_slice(name.as_bytes());
            }
            for (_, _, v) in attrs {
                b.extend_from_slice(v);
            }
        }
        b.extend_from_slice(sql);
        b
    }

    #[test]
    fn the_attribute_block_is_taken_off_the_sql() {
        let none = body(&[], b"select 1");
        assert!(looks_like_attributes(&none));
        assert_eq!(split(&none, true).unwrap().sql, b"select 1");
        let some = body(
            &[
                ("number1", 0x08, &7u64.to_le_bytes()),
                ("string1", 0xfe, b"\x03abc"),
            ],
            b"SELECT @a",
        );
        let s = split(&some, true).unwrap();
        assert_eq!(s.sql, b"SELECT @a");
        assert_eq!(
            s.attributes,
            vec![
                (b"number1".to_vec(), b"7".to_vec()),
                (b"string1".to_vec(), b"'abc'".to_vec()),
            ]
        );
        // Cut anywhere inside the block: an error, never SQL that starts inside it.
        let block = some.len() - b"SELECT @a".len();
        for cut in 0..block {
            assert!(split(&some[..cut], false).is_err(), "cut at {cut}");
        }
        assert!(!looks_like_attributes(b"SELECT 1"));
        assert!(!looks_like_attributes(b" \nSELECT 1"));
    }
}
