//! The binary layout of what [`EmbeddedStore`](super::EmbeddedStore) writes
//! to disk: a key's record in the `kv` table and one revision's events in the
//! `history` table.
//!
//! Hand-written rather than serde so that values stay compact (no JSON
//! arrays of bytes) and so that a damaged record is reported as
//! [`DecodeError`] instead of being misread. Every record starts with a
//! format tag; integers are little-endian, byte strings are length-prefixed
//! with a `u32`.

use crate::{EventKind, KeyValue, LeaseId, Revision, WatchBatch, WatchEvent};

/// Format tag of a `kv` record.
const RECORD_V1: u8 = 1;
/// Format tag of a `history` batch.
const BATCH_V1: u8 = 1;

const KIND_PUT: u8 = 0;
const KIND_DELETE: u8 = 1;

/// A stored record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("corrupt stored record: {0}")]
pub(super) struct DecodeError(&'static str);

/// Encodes a key's record (everything but the key, which is the table key).
pub(super) fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 * 8 + kv.value.len());
    out.push(RECORD_V1);
    put_i64(&mut out, kv.create_revision);
    put_i64(&mut out, kv.mod_revision);
    put_i64(&mut out, kv.version);
    put_i64(&mut out, kv.lease.unwrap_or(0));
    out.extend_from_slice(&kv.value);
    out
}

/// Decodes a record written by [`encode_record`] for `key`.
pub(super) fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != RECORD_V1 {
        return Err(DecodeError("unknown key record format"));
    }
    let create_revision = r.i64()?;
    let mod_revision = r.i64()?;
    let version = r.i64()?;
    let lease = lease_from(r.i64()?);
    Ok(KeyValue {
        key: key.to_owned(),
        value: r.rest().to_vec(),
        create_revision,
        mod_revision,
        version,
        lease,
    })
}

/// Encodes the events of one revision.
pub(super) fn encode_batch(batch: &WatchBatch) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(BATCH_V1);
    put_len(&mut out, batch.events.len());
    for event in &batch.events {
        out.push(match event.kind {
            EventKind::Put => KIND_PUT,
            EventKind::Delete => KIND_DELETE,
        });
        put_kv(&mut out, &event.kv);
        match &event.prev_kv {
            Some(prev) => {
                out.push(1);
                put_kv(&mut out, prev);
            }
            None => out.push(0),
        }
    }
    out
}

/// Decodes the events of `revision` written by [`encode_batch`].
pub(super) fn decode_batch(revision: Revision, bytes: &[u8]) -> Result<WatchBatch, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != BATCH_V1 {
        return Err(DecodeError("unknown history record format"));
    }
    let count = r.len()?;
    // Each event takes well over one byte, so this bounds the allocation by
    // the record's size whatever the stored count says.
    let mut events = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let kind = match r.u8()? {
            KIND_PUT => EventKind::Put,
            KIND_DELETE => EventKind::Delete,
            _ => return Err(DecodeError("unknown event kind")),
        };
        let kv = r.kv()?;
        let prev_kv = match r.u8()? {
            0 => None,
            1 => Some(r.kv()?),
            _ => return Err(DecodeError("bad previous-value flag")),
        };
        events.push(WatchEvent { kind, kv, prev_kv });
    }
    if !r.0.is_empty() {
        return Err(DecodeError("trailing bytes after history record"));
    }
    Ok(WatchBatch { revision, events })
}

fn lease_from(raw: i64) -> Option<LeaseId> {
    (raw != 0).then_some(raw)
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Keys and values are far below 4 GiB; saturate rather than wrap so that a
    // record that could not be written faithfully fails to decode.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(out, kv.key.as_bytes());
    put_bytes(out, &kv.value);
    put_i64(out, kv.create_revision);
    put_i64(out, kv.mod_revision);
    put_i64(out, kv.version);
    put_i64(out, kv.lease.unwrap_or(0));
}

/// A bounds-checked cursor over a record.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record is truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(buf))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        usize::try_from(u32::from_le_bytes(buf)).map_err(|_| DecodeError("length overflows"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.len()?;
        self.take(len)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn kv(&mut self) -> Result<KeyValue, DecodeError> {
        let key = std::str::from_utf8(self.bytes()?)
            .map_err(|_| DecodeError("key is not UTF-8"))?
            .to_owned();
        let value = self.bytes()?.to_vec();
        Ok(KeyValue {
            key,
            value,
            create_revision: self.i64()?,
            mod_revision: self.i64()?,
            version: self.i64()?,
            lease: lease_from(self.i64()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], lease: Option<LeaseId>) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease,
        }
    }

    #[test]
    fn record_round_trips() {
        for original in [kv("/a", b"hello", Some(42)), kv("/b", b"", None)] {
            let decoded = decode_record(&original.key, &encode_record(&original));
            assert_eq!(decoded.ok(), Some(original));
        }
    }

    #[test]
    fn batch_round_trips() {
        let batch = WatchBatch {
            revision: 7,
            events: vec![
                WatchEvent {
                    kind: EventKind::Put,
                    kv: kv("/a", b"v", Some(9)),
                    prev_kv: None,
                },
                WatchEvent {
                    kind: EventKind::Delete,
                    kv: kv("/é", b"", None),
                    prev_kv: Some(kv("/é", b"old", None)),
                },
            ],
        };
        let decoded = decode_batch(7, &encode_batch(&batch));
        assert_eq!(decoded.ok(), Some(batch));
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let record = encode_record(&kv("/a", b"value", None));
        for cut in 0..33 {
            assert!(decode_record("/a", &record[..cut]).is_err(), "cut at {cut}");
        }
        let batch = encode_batch(&WatchBatch {
            revision: 2,
            events: vec![WatchEvent {
                kind: EventKind::Put,
                kv: kv("/a", b"v", None),
                prev_kv: None,
            }],
        });
        for cut in 0..batch.len() {
            assert!(decode_batch(2, &batch[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = batch.clone();
        bad_kind[5] = 9;
        assert!(decode_batch(2, &bad_kind).is_err());
        let mut huge_count = batch;
        huge_count[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_batch(2, &huge_count).is_err());
    }
}
