//! The access log: one JSON line per exchange, collected in memory and
//! written in batches, so that the request path makes no system call for
//! it.
//!
//! A line (fields always in this order; `origin` and `error` are `null`
//! when there is none):
//!
//! ```text
//! {"time":"2026-12-05T10:15:40.123Z","client":"127.0.0.1:50412","method":"GET","target":"/a?b=1","version":"HTTP/1.1","status":200,"bytes":9,"duration_ms":0.412,"origin":"b","error":null}
//! ```
//!
//! - `time`: when the request's head had arrived (UTC);
//! - `bytes`: body bytes sent to the client (for a WebSocket: those sent
//!   to the client through the tunnel);
//! - `duration_ms`: from the head's arrival to the answer's last byte
//!   written (for a WebSocket: to the tunnel's end);
//! - `status` 499: the client went away before its answer was complete
//!   (as nginx logs it);
//! - `error`: why the edge answered itself, or what cut the exchange.
//!
//! Request bytes outside printable ASCII, `"` and `\` are escaped, so a
//! line is always valid JSON whatever a client sends.

use std::fs::File;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

/// Lines are written once this many bytes are waiting (and by the
/// flusher every second).
const WRITE_AT: usize = 64 * 1024;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to, created if missing.
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(s))
        })
    }
}

/// The access log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}: {source}")]
pub struct AccessLogError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One exchange, as logged.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// When the request's head had arrived.
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub origin: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// The access log of one edge, shared by its workers.
#[derive(Debug)]
pub struct AccessLog {
    sink: Sink,
    /// `None` for standard output.
    file: Mutex<Option<File>>,
    /// Lines not yet written.
    pending: Mutex<Vec<u8>>,
    /// Lines logged, and lines lost to write errors.
    pub lines: AtomicU64,
    pub lost: AtomicU64,
    /// Whether the last write failed (its error is logged once).
    failing: AtomicBool,
}

impl AccessLog {
    /// Opens `sink` for appending.
    pub fn open(sink: Sink) -> Result<Self, AccessLogError> {
        let file = open_file(&sink)?;
        Ok(Self {
            sink,
            file: Mutex::new(file),
            pending: Mutex::new(Vec::with_capacity(WRITE_AT * 2)),
            lines: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// Adds a line; writes the lines waiting once there are enough.
    pub fn record(&self, e: &Entry<'_>) {
        let mut pending = lock(&self.pending);
        format(e, &mut pending);
        self.lines.fetch_add(1, Ordering::Relaxed);
        if pending.len() >= WRITE_AT {
            let out = std::mem::take(&mut *pending);
            drop(pending);
            self.write(&out);
        }
    }

    /// Writes the lines waiting.
    pub fn flush(&self) {
        let out = std::mem::take(&mut *lock(&self.pending));
        if !out.is_empty() {
            self.write(&out);
        }
    }

    /// Writes what is waiting, then opens the file again by its name
    /// (after a rotation moved it away). On failure the old file is kept.
    pub fn reopen(&self) -> Result<(), AccessLogError> {
        self.flush();
        let file = open_file(&self.sink)?;
        *lock(&self.file) = file;
        Ok(())
    }

    fn write(&self, bytes: &[u8]) {
        let written = match &mut *lock(&self.file) {
            Some(f) => f.write_all(bytes),
            None => io::stdout().lock().write_all(bytes),
        };
        match written {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                let n = bytes.iter().filter(|&&b| b == b'\n').count();
                self.lost.fetch_add(n as u64, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, sink = ?self.sink, "cannot write the access log: lines are lost until it works again");
                }
            }
        }
    }
}

fn open_file(sink: &Sink) -> Result<Option<File>, AccessLogError> {
    match sink {
        Sink::Stdout => Ok(None),
        Sink::File(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Some)
            .map_err(|source| AccessLogError {
                path: path.clone(),
                source,
            }),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Appends `e` to `out` as one JSON line.
pub fn format(e: &Entry<'_>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let ms = e
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(sextant_core::timefmt::rfc3339_millis(ms).as_bytes());
    // Writing to a Vec cannot fail.
    let _ = write!(out, "\",\"client\":\"{}\",\"method\":", e.client);
    string(e.method, out);
    out.extend_from_slice(b",\"target\":");
    string(e.target, out);
    out.extend_from_slice(b",\"version\":");
    string(e.version.as_bytes(), out);
    let _ = write!(
        out,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"origin\":",
        e.status,
        e.bytes,
        e.duration.as_secs_f64() * 1000.0
    );
    optional(e.origin, out);
    out.extend_from_slice(b",\"error\":");
    optional(e.error, out);
    out.extend_from_slice(b"}\n");
}

fn optional(s: Option<&str>, out: &mut Vec<u8>) {
    match s {
        Some(s) => string(s.as_bytes(), out),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string of `bytes`: printable ASCII as is, `"` and `\` escaped,
/// every other byte as `\u00XX` (so that any input gives valid JSON).
fn string(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in bytes {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(target: &'a [u8], origin: Option<&'a str>, error: Option<&'a str>) -> Entry<'a> {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(1_795_867_200_123),
            client: "127.0.0.1:50412".parse().expect("addr"),
            method: b"GET",
            target,
            version: "HTTP/1.1",
            status: 200,
            bytes: 9,
            duration: Duration::from_micros(412),
            origin,
            error,
        }
    }

    #[test]
    fn a_line_has_every_field_in_order() {
        let mut out = Vec::new();
        format(&entry(b"/a?b=1", Some("b"), None), &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\"time\":\"2026-11-28T12:00:00.123Z\",\"client\":\"127.0.0.1:50412\",\
             \"method\":\"GET\",\"target\":\"/a?b=1\",\"version\":\"HTTP/1.1\",\
             \"status\":200,\"bytes\":9,\"duration_ms\":0.412,\"origin\":\"b\",\"error\":null}\n"
        );
    }

    #[test]
    fn any_request_bytes_give_valid_json() {
        let target = b"/\"q\\\x01\xff\x7f%20";
        let mut out = Vec::new();
        format(&entry(target, None, Some("origin \"a\" failed")), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["target"], "/\"q\\\u{1}\u{ff}\u{7f}%20");
        assert_eq!(v["error"], "origin \"a\" failed");
        assert!(v["origin"].is_null());
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn lines_are_written_in_batches_and_after_a_reopen_to_the_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(Sink::File(path.clone())).expect("open");
        log.record(&entry(b"/1", Some("a"), None));
        // Not written yet: it waits for a batch or the flusher.
        assert_eq!(std::fs::read(&path).expect("read").len(), 0);
        log.flush();
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            1
        );
        // Enough lines are written without a flush.
        let mut n = 1;
        while std::fs::read(&path).expect("read").len() < WRITE_AT {
            log.record(&entry(b"/many", Some("a"), None));
            n += 1;
            assert!(n < 10_000, "a batch was never written");
        }
        // Rotation: the file moves away, the log opens the name again.
        let moved = dir.path().join("access.log.1");
        std::fs::rename(&path, &moved).expect("rename");
        log.record(&entry(b"/after", Some("a"), None));
        log.reopen().expect("reopen");
        log.record(&entry(b"/new", Some("a"), None));
        log.flush();
        let old = std::fs::read_to_string(&moved).expect("read");
        let new = std::fs::read_to_string(&path).expect("read");
        assert!(old.lines().last().is_some_and(|l| l.contains("\"/after\"")));
        assert_eq!(new.lines().count(), 1);
        assert!(new.contains("\"/new\""));
        assert_eq!(log.lines.load(Ordering::Relaxed), n + 2);
        assert_eq!(log.lost.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_log_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = AccessLog::open(Sink::File(dir.path().join("no/such/dir/access.log")))
            .expect_err("a missing directory");
        assert!(e.to_string().contains("no/such/dir/access.log"), "{e}");
    }

    #[test]
    fn lines_a_write_loses_are_counted() {
        // /dev/full takes the open and refuses every write.
        let log = AccessLog::open(Sink::File("/dev/full".into())).expect("open /dev/full");
        log.record(&entry(b"/1", None, None));
        log.record(&entry(b"/2", None, None));
        log.flush();
        assert_eq!(log.lost.load(Ordering::Relaxed), 2);
    }
}
