//! The access log: one JSON line per exchange, collected in memory and
//! written in batches by a thread of its own, so that the request path
//! makes no system call for it and never waits for the sink.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

/// The writer writes once this many bytes are waiting, or every second.
const WRITE_AT: usize = 64 * 1024;

/// Past this many bytes waiting (a sink that does not take them), new
/// lines are dropped and counted as lost.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

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

/// An exchange under way, as the access log will have it. Logged once: by
/// [`Exchange::finish`], or when dropped unfinished (the connection ended
/// first: the client left mid-request, a timeout, the shutdown grace),
/// then as cut, `499` when no status was sent.
#[derive(Debug)]
pub struct Exchange {
    log: Arc<AccessLog>,
    /// When its head had arrived.
    time: SystemTime,
    at: Instant,
    client: SocketAddr,
    method: Vec<u8>,
    target: Vec<u8>,
    version: &'static str,
    /// The answer's status (0: none yet), the body bytes sent to the
    /// client, the origin tried or that answered, and why the edge
    /// answered itself or what cut the exchange.
    pub status: u16,
    pub bytes: u64,
    pub origin: Option<String>,
    pub error: Option<String>,
    finished: bool,
}

impl Exchange {
    /// Starts the record of a request whose head has just arrived.
    pub fn begin(
        log: &Arc<AccessLog>,
        client: SocketAddr,
        method: &[u8],
        target: &[u8],
        version: &'static str,
    ) -> Self {
        Self {
            log: log.clone(),
            time: SystemTime::now(),
            at: Instant::now(),
            client,
            method: method.to_vec(),
            target: target.to_vec(),
            version,
            status: 0,
            bytes: 0,
            origin: None,
            error: None,
            finished: false,
        }
    }

    /// Logs it, with `error` (or the one noted).
    pub fn finish(mut self, error: Option<&str>) {
        self.record(error);
        self.finished = true;
    }

    fn record(&self, error: Option<&str>) {
        self.log.record(&Entry {
            time: self.time,
            client: self.client,
            method: &self.method,
            target: &self.target,
            version: self.version,
            status: self.status,
            bytes: self.bytes,
            duration: self.at.elapsed(),
            origin: self.origin.as_deref(),
            error: error.or(self.error.as_deref()),
        });
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.status == 0 {
            self.status = 499;
        }
        let error = self.error.take();
        self.record(Some(
            error
                .as_deref()
                .unwrap_or("the connection ended before the exchange did"),
        ));
    }
}

/// The access log of one edge, shared by its workers. Recording a line
/// only appends it to memory; a thread of its own writes the lines, so a
/// slow or stuck sink loses lines (counted), never stalls a request.
#[derive(Debug)]
pub struct AccessLog {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    sink: Sink,
    queue: Mutex<Queue>,
    /// To the writer: lines are waiting, a flush, a reopen or the end.
    wake: Condvar,
    /// From the writer: a pass is done.
    done: Condvar,
    lines: AtomicU64,
    lost: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<u8>,
    /// Lines logged before a reopen was asked for: the old file's.
    before_reopen: Option<Vec<u8>>,
    /// Flushes asked for, and the last one the writer has served.
    asked: u64,
    served: u64,
    stop: bool,
    stopped: bool,
}

impl AccessLog {
    /// Opens `sink` for appending and starts its writer.
    pub fn open(sink: Sink) -> Result<Self, AccessLogError> {
        let file = open_file(&sink)?;
        let inner = Arc::new(Inner {
            sink,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            lines: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&inner, file))
                .map_err(|source| AccessLogError {
                    path: PathBuf::from("(the access log's writer thread)"),
                    source,
                })?
        };
        Ok(Self {
            inner,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Lines logged (written, waiting, or lost).
    pub fn lines(&self) -> u64 {
        self.inner.lines.load(Ordering::Relaxed)
    }

    /// Lines lost: a write failed, or more than [`MAX_PENDING`] bytes were
    /// waiting for a sink that did not take them.
    pub fn lost(&self) -> u64 {
        self.inner.lost.load(Ordering::Relaxed)
    }

    /// Adds a line (never waits for the sink).
    pub fn record(&self, e: &Entry<'_>) {
        self.inner.lines.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.inner.queue);
        let waiting = q.pending.len() + q.before_reopen.as_ref().map_or(0, Vec::len);
        // Past the bound, or with the writer gone, a line is lost.
        if waiting >= MAX_PENDING || q.stopped {
            drop(q);
            self.inner.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        format(e, &mut q.pending);
        let enough = q.pending.len() >= WRITE_AT;
        drop(q);
        if enough {
            self.inner.wake.notify_one();
        }
    }

    /// Waits (at most 5 s) until the lines logged so far are written.
    pub fn flush(&self) {
        let mut q = lock(&self.inner.queue);
        q.asked += 1;
        let want = q.asked;
        self.inner.wake.notify_one();
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.served < want && !q.stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self
                .inner
                .done
                .wait_timeout(q, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Has the file opened again by its name (after a rotation moved it
    /// away): lines logged until now go to the old file, later ones to the
    /// new. The writer logs whether it worked (on failure it keeps the old
    /// file).
    pub fn reopen(&self) {
        let mut q = lock(&self.inner.queue);
        let lines = std::mem::take(&mut q.pending);
        match &mut q.before_reopen {
            Some(b) => b.extend_from_slice(&lines),
            None => q.before_reopen = Some(lines),
        }
        drop(q);
        self.inner.wake.notify_one();
    }

    /// Writes what is waiting and stops the writer (at most 5 s).
    pub fn close(&self) {
        lock(&self.inner.queue).stop = true;
        self.inner.wake.notify_one();
        self.flush();
        if lock(&self.inner.queue).stopped {
            if let Some(w) = lock(&self.writer).take() {
                let _ = w.join();
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // Closed already (the edge does at its stop): nothing to wait for.
        if !lock(&self.inner.queue).stop {
            self.close();
        }
    }
}

/// The writer: waits for lines (or a second), writes them, and serves
/// flushes, reopens and the end.
fn write_lines(inner: &Inner, mut file: Option<File>) {
    let mut failing = false;
    let mut out = Vec::with_capacity(WRITE_AT * 2);
    let mut q = lock(&inner.queue);
    loop {
        let idle = q.pending.len() < WRITE_AT
            && q.before_reopen.is_none()
            && q.asked == q.served
            && !q.stop;
        if idle {
            q = inner
                .wake
                .wait_timeout(q, Duration::from_secs(1))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        let old = q.before_reopen.take();
        std::mem::swap(&mut q.pending, &mut out);
        let (asked, stop) = (q.asked, q.stop);
        drop(q);
        if let Some(old) = old {
            write(inner, &mut file, &old, &mut failing);
            match open_file(&inner.sink) {
                Ok(f) => {
                    file = f;
                    info!("access log reopened");
                }
                Err(e) => {
                    warn!(error = %e, "cannot reopen the access log: still writing to the old file")
                }
            }
        }
        write(inner, &mut file, &out, &mut failing);
        out.clear();
        q = lock(&inner.queue);
        q.served = asked;
        if stop && q.pending.is_empty() && q.before_reopen.is_none() {
            q.stopped = true;
            inner.done.notify_all();
            return;
        }
        inner.done.notify_all();
    }
}

/// Writes `bytes` (whole lines) to the sink; a failure loses them, counted,
/// and is logged once until a write works again.
fn write(inner: &Inner, file: &mut Option<File>, bytes: &[u8], failing: &mut bool) {
    if bytes.is_empty() {
        return;
    }
    let written = match file {
        Some(f) => f.write_all(bytes),
        None => io::stdout().lock().write_all(bytes),
    };
    match written {
        Ok(()) => *failing = false,
        Err(e) => {
            let n = bytes.iter().filter(|&&b| b == b'\n').count();
            inner.lost.fetch_add(n as u64, Ordering::Relaxed);
            if !std::mem::replace(failing, true) {
                warn!(error = %e, sink = ?inner.sink, "cannot write the access log: lines are lost until it works again");
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
        log.flush();
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            1
        );
        // A batch's worth is written by the writer alone.
        let mut n = 1;
        let mut line = Vec::new();
        format(&entry(b"/many", Some("a"), None), &mut line);
        for _ in 0..=WRITE_AT / line.len() {
            log.record(&entry(b"/many", Some("a"), None));
            n += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(&path).expect("read").len() < WRITE_AT {
            assert!(Instant::now() < deadline, "a batch was never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Rotation: the file moves away, the log opens the name again.
        let moved = dir.path().join("access.log.1");
        std::fs::rename(&path, &moved).expect("rename");
        log.record(&entry(b"/after", Some("a"), None));
        log.reopen();
        log.record(&entry(b"/new", Some("a"), None));
        log.flush();
        let old = std::fs::read_to_string(&moved).expect("read");
        let new = std::fs::read_to_string(&path).expect("read");
        assert!(old.lines().last().is_some_and(|l| l.contains("\"/after\"")));
        assert_eq!(new.lines().count(), 1);
        assert!(new.contains("\"/new\""));
        assert_eq!(log.lines(), n + 2);
        assert_eq!(log.lost(), 0);
    }

    #[test]
    fn a_sink_that_takes_nothing_loses_lines_but_never_holds_up_a_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // A reader that opens the pipe and never reads.
        let f = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::File::open(f).expect("reader"));
        let log = AccessLog::open(Sink::File(fifo.clone())).expect("open");
        let _stuck = reader.join().expect("reader");
        let started = Instant::now();
        let target = vec![b'x'; 1000];
        let n = 3 * MAX_PENDING / 1000;
        for _ in 0..n {
            log.record(&entry(&target, Some("a"), None));
        }
        // Well over the pipe's buffer and MAX_PENDING, yet no call waited.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(log.lines(), n as u64);
        assert!(log.lost() > (n / 2) as u64, "lost {} of {n}", log.lost());
        // Lines waiting for a reopen count against the bound too.
        let lost = log.lost();
        log.reopen();
        for _ in 0..100 {
            log.record(&entry(&target, Some("a"), None));
        }
        assert_eq!(log.lost(), lost + 100);
        // A reader that drains the pipe lets the writer, and the reopen, go
        // on (a pipe opens for writing only once it has a reader).
        std::thread::spawn(move || {
            if let Ok(mut r) = std::fs::File::open(&fifo) {
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            }
        });
        let closing = Instant::now();
        log.close();
        assert!(
            closing.elapsed() < Duration::from_secs(4),
            "{:?}",
            closing.elapsed()
        );
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
        assert_eq!(log.lost(), 2);
    }
}
