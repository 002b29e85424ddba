//! The HTTP/1.1 fast path of the edge proxy.
//!
//! One task per client connection reads a request head, writes the
//! rewritten head (and any `Content-Length` body) to an origin connection
//! taken from the worker's pool, and streams the response back, all in
//! that task: no per-request allocation of header maps, no hand-over
//! between tasks, two reads and two writes for a small request. Bodies pass
//! through unchanged; where a chunked response ends is found by
//! [`ChunkedEnd`] without copying. A request this path does not handle
//! (HTTP/2, HTTP/1.0, chunked request bodies, `Expect`, `CONNECT`) hands
//! the connection, with the bytes already read, to hyper at that request.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::access::Exchange;
use crate::h1::{self, ChunkedEnd, Framing, Parsed, RequestHead};
use crate::proxy::{about, gave_up, Proxy};
use crate::tunnel::{splice, Ends, Gauge, Tunnel};
use crate::upstream::{mono_ms_at, EndpointState, Failed, Origin};

/// How long a kept-alive client connection may sit between requests.
pub const CLIENT_IDLE: Duration = Duration::from_secs(75);
/// How long the rest of a request head, a body read or a write to the
/// client may take.
pub const CLIENT_IO: Duration = Duration::from_secs(30);
/// Request bodies up to this size (with `Content-Length`) are read whole
/// before the request goes upstream, so that it can be retried and an
/// early answer is never lost; larger ones go to hyper, which streams both
/// ways at once.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;
/// Idle origin connections kept per endpoint and worker.
pub const POOL_PER_ENDPOINT: usize = 64;
/// How long an origin connection may sit in the pool.
pub const POOL_IDLE: Duration = Duration::from_secs(30);

/// Idle origin connections of one proxy worker, by endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
}

impl Pool {
    /// The most recently used idle connection to `addr` that is still
    /// open and silent. One the origin closed, or sent bytes on that no
    /// request asked for, is dropped: those bytes must never be read as the
    /// next request's response (RFC 9112 §6.3), which may be another
    /// client's. The socket itself is asked (a peek, one system call), so
    /// bytes the event loop has not seen yet count too.
    pub(crate) fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if usable(&stream, since) && quiet(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Drops the idle connections that expired or were closed, for every
    /// endpoint (also those no config names any more).
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|(stream, since)| usable(stream, *since));
            !list.is_empty()
        });
    }

    pub(crate) fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(addr).or_default();
        if list.len() < POOL_PER_ENDPOINT {
            list.push((stream, Instant::now()));
        }
    }

    /// Idle connections held, all endpoints.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.values().map(Vec::len).sum()
    }
}

/// An idle connection young enough, with nothing to read (no close, no
/// stray bytes) as far as the event loop knows.
fn usable(stream: &TcpStream, since: Instant) -> bool {
    since.elapsed() < POOL_IDLE && stream.readable().now_or_never().is_none()
}

/// Nothing to read on the socket right now: no close, no stray bytes.
fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(stream).peek(&mut probe),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// A read buffer: bytes `start..end` of `data` are unread.
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl Buf {
    fn new(initial: usize, max: usize) -> Self {
        Self {
            data: vec![0; initial],
            start: 0,
            end: 0,
            max,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn take(&mut self) -> Vec<u8> {
        let rest = self.bytes().to_vec();
        self.consume(rest.len());
        rest
    }

    /// Reads once into the free space (made by moving the unread bytes to
    /// the front, or by growing up to the maximum); 0 means end of stream.
    async fn fill(&mut self, s: &mut TcpStream) -> io::Result<usize> {
        self.make_room()?;
        let n = s.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Like [`Buf::fill`], without waiting: what the socket holds now,
    /// asked of the socket itself, since the event loop may not have seen
    /// it yet (0 or an error: nothing).
    fn fill_now(&mut self, s: &TcpStream) -> io::Result<usize> {
        use std::io::Read as _;
        self.make_room()?;
        let n = (&*socket2::SockRef::from(s)).read(&mut self.data[self.end..])?;
        self.end += n;
        Ok(n)
    }

    fn make_room(&mut self) -> io::Result<()> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < self.max {
                let grown = (self.data.len() * 2).max(4096).min(self.max);
                self.data.resize(grown, 0);
            } else {
                return Err(io::Error::other("buffer full"));
            }
        }
        Ok(())
    }
}

/// What becomes of the client connection after an exchange.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    /// Close gently: the client has its whole answer.
    Close,
    /// Reset the connection: the answer was cut (a clean close would pass
    /// for the end of a body delimited by close), or the client is gone.
    Abort,
}

/// Why an attempt at one endpoint got no response.
#[derive(Debug)]
enum Failure {
    /// Nothing reached the origin that it could have acted on: the request
    /// may go to another origin.
    Retriable(String),
    /// The request reached the origin and no answer came.
    Final(String),
    /// A pooled connection died unanswered under a request that may not be
    /// sent twice: not the endpoint's fault (no health penalty).
    Stale(String),
    TimedOut,
    /// The client went away or stalled: nothing to answer.
    Client,
}

/// The reusable buffers of one client connection.
struct Conn {
    client: TcpStream,
    peer: SocketAddr,
    peer_ip: Vec<u8>,
    /// The worker is stopping.
    stop: CancellationToken,
    /// A 1xx of the origin's went to the client in this exchange: it
    /// cannot be sent elsewhere any more.
    interim_sent: bool,
    /// The access log's record of the exchange under way (only when
    /// there is an access log).
    logged: Option<Box<Exchange>>,
    cbuf: Buf,
    ubuf: Buf,
    /// The request as it goes upstream: head, then its whole body.
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Conn {
    /// The bytes read and not yet used, and the client socket; the
    /// buffers go (they are not kept while hyper serves the connection).
    fn into_unread(mut self) -> (Vec<u8>, TcpStream, CancellationToken) {
        (self.cbuf.take(), self.client, self.stop)
    }

    /// Whether the connection stays open after the answer to `head`: as
    /// the client asked, unless the worker is stopping by now (then this
    /// answer is the last, and says so).
    fn keeps_alive(&self, head: &RequestHead) -> bool {
        head.keep_alive && !self.stop.is_cancelled()
    }

    /// A request's head has arrived (in `self.request` as it will be
    /// forwarded; empty for a head refused as malformed): a new exchange,
    /// and, when there is an access log, its record (kept when already
    /// begun: the body was still arriving).
    fn begin(&mut self, proxy: &Proxy) {
        self.interim_sent = false;
        let Some(log) = &proxy.access_log else {
            return;
        };
        if self.logged.is_some() {
            return;
        }
        let mut words = self
            .request
            .split(|&b| b == b'\r' || b == b'\n')
            .next()
            .unwrap_or_default()
            .splitn(3, |&b| b == b' ');
        let (method, target) = (
            words.next().filter(|w| !w.is_empty()).unwrap_or(b"-"),
            words.next().unwrap_or(b"-"),
        );
        self.logged = Some(Box::new(Exchange::begin(
            log, self.peer, method, target, "HTTP/1.1",
        )));
    }

    /// Notes, for the access log, the answer's status, the body bytes
    /// sent, the origin tried, or what cut the exchange.
    fn note(&mut self, f: impl FnOnce(&mut Exchange)) {
        if let Some(x) = &mut self.logged {
            f(x);
        }
    }

    /// Logs the exchange under way (once).
    fn log(&mut self, error: Option<&str>) {
        if let Some(x) = self.logged.take() {
            x.finish(error);
        }
    }

    /// Writes an answer the proxy makes itself, and logs it.
    async fn answer(
        &mut self,
        proxy: &Proxy,
        status: StatusCode,
        what: &str,
        close: bool,
        head_method: bool,
    ) -> Result<(), Failure> {
        proxy.count_status(status.as_u16());
        let mut r = h1::local_response(status, what, close);
        // The answer to a HEAD has no body (its length is still said): a
        // body would be read as the start of the next answer.
        let body = if head_method {
            r.truncate(r.len() - h1::local_body_len(what) as usize);
            0
        } else {
            h1::local_body_len(what)
        };
        let written = write_client(&mut self.client, &r).await;
        let ok = written.is_ok();
        if ok {
            proxy
                .stats
                .response_bytes
                .fetch_add(body, Ordering::Relaxed);
        }
        self.note(|x| {
            x.origin = None;
            (x.status, x.bytes) = if ok {
                (status.as_u16(), body)
            } else {
                (499, 0)
            };
        });
        self.log(Some(what));
        written
    }
}

/// Sends a response the proxy made (logged) and closes the connection
/// gently.
async fn answer_and_close(proxy: &Proxy, c: &mut Conn, status: StatusCode, what: &str) {
    if c.answer(proxy, status, what, true, false).await.is_ok() {
        close_gently(&mut c.client).await;
    }
}

/// Closes a client connection in stages (RFC 9112 §9.6): its side is shut
/// first, and what the client still sends (a body or pipelined requests
/// nobody will read) is read and dropped for a moment, so that the close
/// does not reset the connection before the client has read the answer.
async fn close_gently(client: &mut TcpStream) {
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut left: usize = 1 << 20;
    while left > 0 {
        match tokio::time::timeout_at(until, client.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

async fn write_client(client: &mut TcpStream, bytes: &[u8]) -> Result<(), Failure> {
    match write_within(client, bytes, CLIENT_IO).await {
        Ok(()) => Ok(()),
        Err(_) => Err(Failure::Client),
    }
}

/// Writes all of `bytes` within `limit`. What the socket buffer takes at
/// once (nearly every head and small answer) is written without arming a
/// timer.
async fn write_within(s: &mut TcpStream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    let rest = match s.try_write(bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => &bytes[n..],
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => bytes,
        Err(e) => return Err(e),
    };
    match timeout(limit, s.write_all(rest)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Serves one client connection until it closes, on the fast path while
/// its requests allow, then in hyper.
///
/// When `stop` is cancelled, the connection ends after the exchange under
/// way (answered with `connection: close`), or at once when idle.
pub async fn serve_connection(
    proxy: Arc<Proxy>,
    pool: Arc<Pool>,
    client: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let mut c = Conn {
        client,
        peer,
        peer_ip: peer.ip().to_string().into_bytes(),
        stop,
        interim_sent: false,
        logged: None,
        cbuf: Buf::new(4096, h1::MAX_HEAD + MAX_BUFFERED_BODY + 4096),
        ubuf: Buf::new(0, h1::MAX_HEAD + 4096),
        request: Vec::new(),
        response: Vec::new(),
    };
    loop {
        // A request, head and body, must arrive within request_timeout of its
        // first byte: a client trickling bytes cannot hold the connection.
        let mut deadline = None;
        // A head parsed whose body is still arriving: it is not parsed
        // again on every read.
        let mut waiting: Option<RequestHead> = None;
        // Whether to parse what is buffered: at first, and then only when
        // the bytes read since could complete the head (a head ends with a
        // line feed) or make it too large. A head trickled byte by byte is
        // parsed once per line, not once per byte.
        let mut parse = true;
        skip_empty_lines(&mut c.cbuf);
        let head = loop {
            if let Some(h) = waiting.take_if(|h| c.cbuf.len() >= h.len + body_len(h)) {
                break h;
            } else if waiting.is_none() && parse && !c.cbuf.is_empty() {
                match h1::forward_request(c.cbuf.bytes(), &c.peer_ip, &mut c.request) {
                    Ok(Parsed::Done(h)) => match h.body {
                        Framing::Length(n) if n > MAX_BUFFERED_BODY as u64 => {
                            hand_off(proxy, c, peer).await;
                            return;
                        }
                        Framing::Length(n) if c.cbuf.len() < h.len + n as usize => {
                            // Logged (as cut) should the body not come.
                            c.begin(&proxy);
                            waiting = Some(h);
                        }
                        _ => break h,
                    },
                    Ok(Parsed::Partial) => {}
                    Ok(Parsed::HandOff) => {
                        hand_off(proxy, c, peer).await;
                        return;
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "bad request head");
                        proxy.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        let status =
                            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
                        // Counted as a request (its answer is counted);
                        // nothing of it is logged as a request line.
                        proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
                        c.request.clear();
                        c.begin(&proxy);
                        answer_and_close(&proxy, &mut c, status, &e.to_string()).await;
                        return;
                    }
                }
            }
            let read = if c.cbuf.is_empty() {
                // Idle between requests: a stopping worker closes it, but
                // serves a request that has already arrived (its last).
                tokio::select! {
                    biased;
                    r = timeout(proxy.client_idle, c.cbuf.fill(&mut c.client)) => r,
                    // Asked of the socket itself: the event loop may not
                    // have seen those bytes yet.
                    () = c.stop.cancelled() => match c.cbuf.fill_now(&c.client) {
                        Ok(n) if n > 0 => Ok(Ok(n)),
                        _ => {
                            close_gently(&mut c.client).await;
                            return;
                        }
                    },
                }
            } else {
                let at = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + proxy.request_timeout);
                tokio::time::timeout_at(at, c.cbuf.fill(&mut c.client)).await
            };
            match read {
                Ok(Ok(n)) if n > 0 => {
                    let all = c.cbuf.bytes();
                    parse = all.len() == n
                        || all.len() > h1::MAX_HEAD
                        || all[all.len() - n..].contains(&b'\n');
                    skip_empty_lines(&mut c.cbuf);
                }
                // A body that does not come in time gets a 408 (RFC 9110
                // §15.5.9); a head that does not, only the close (no
                // request to answer yet).
                Err(_) if waiting.is_some() => {
                    let what = format!(
                        "the request body did not arrive within {:?}",
                        proxy.request_timeout
                    );
                    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
                    answer_and_close(&proxy, &mut c, StatusCode::REQUEST_TIMEOUT, &what).await;
                    return;
                }
                _ => {
                    c.note(|x| x.error = Some("the client went away before its body came".into()));
                    return;
                }
            }
        };
        // The body (at most MAX_BUFFERED_BODY) is all here: it goes out
        // with the head, and can go again to another origin.
        let body = body_len(&head);
        // No new WebSocket on a stopping worker: the grace would only cut
        // it.
        c.begin(&proxy);
        proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
        if head.upgrade.is_some() && c.stop.is_cancelled() {
            let what = "stopping: no new websockets here";
            answer_and_close(&proxy, &mut c, StatusCode::SERVICE_UNAVAILABLE, what).await;
            return;
        }
        c.request
            .extend_from_slice(&c.cbuf.bytes()[head.len..head.len + body]);
        c.cbuf.consume(head.len + body);
        match exchange(&proxy, &pool, &mut c, &head).await {
            Next::KeepAlive => {}
            Next::Close => {
                close_gently(&mut c.client).await;
                return;
            }
            Next::Abort => {
                let _ = socket2::SockRef::from(&c.client).set_linger(Some(Duration::ZERO));
                return;
            }
        }
    }
}

/// Drops the empty lines before a request line (RFC 9112 §2.2), so that
/// a client sending only line feeds does not have a head parsed for each.
fn skip_empty_lines(buf: &mut Buf) {
    let b = buf.bytes();
    let mut n = 0;
    loop {
        if b[n..].starts_with(b"\r\n") {
            n += 2;
        } else if b[n..].starts_with(b"\n") {
            n += 1;
        } else {
            break;
        }
    }
    buf.consume(n);
}

/// Bytes of a request body the fast path buffers (its length, at most
/// [`MAX_BUFFERED_BODY`]).
fn body_len(head: &RequestHead) -> usize {
    match head.body {
        Framing::Length(n) => usize::try_from(n).unwrap_or(usize::MAX),
        _ => 0,
    }
}

/// Goes on with the connection in hyper, from the request at the start of
/// `c.cbuf`.
async fn hand_off(proxy: Arc<Proxy>, c: Conn, peer: SocketAddr) {
    proxy.stats.handoffs.fetch_add(1, Ordering::Relaxed);
    let (unread, client, stop) = c.into_unread();
    // The bytes already read are read again first, then the socket.
    let (read, write) = client.into_split();
    let io = tokio::io::join(io::Cursor::new(unread).chain(read), write);
    crate::proxy::serve_hyper(proxy, io, peer, stop).await;
}

/// Forwards one request and its response.
async fn exchange(proxy: &Proxy, pool: &Pool, c: &mut Conn, head: &RequestHead) -> Next {
    let mut tried: Option<Failed<'_>> = None;
    // The failure of the first attempt, said when nothing is left to retry.
    let mut first_failure: Option<String> = None;
    let cfg = proxy.current.load_full();
    let (status, text) = 'attempts: {
        let Some(cfg) = cfg.as_ref() else {
            break 'attempts (StatusCode::SERVICE_UNAVAILABLE, "no config yet".to_owned());
        };
        for attempt in 0..2 {
            let Some(pick) = cfg.value.choose(tried) else {
                break 'attempts gave_up(first_failure, "no origin available");
            };
            let (origin, ep) = (pick.origin, pick.endpoint);
            proxy.note_pick(&pick);
            let failed = |e: &str| about(origin, format_args!("failed: {e}"));
            c.note(|x| x.origin = Some(origin.id.clone()));
            match attempt_endpoint(proxy, pool, c, head, origin, ep).await {
                Ok(next) => {
                    c.log(None);
                    return next;
                }
                Err(Failure::Client) => {
                    c.note(|x| x.status = 499);
                    c.log(Some("the client went away"));
                    return Next::Abort;
                }
                Err(Failure::TimedOut) => {
                    proxy.upstream_failed(origin, ep, "timed out");
                    break 'attempts (StatusCode::GATEWAY_TIMEOUT, about(origin, "timed out"));
                }
                Err(Failure::Stale(e)) => {
                    break 'attempts (StatusCode::BAD_GATEWAY, failed(&e));
                }
                Err(Failure::Retriable(e)) if attempt == 0 => {
                    proxy.upstream_failed(origin, ep, &e);
                    first_failure = Some(failed(&e));
                    tried = Some(Failed {
                        origin: &origin.id,
                        endpoint: ep.addr,
                    });
                }
                Err(Failure::Retriable(e) | Failure::Final(e)) => {
                    proxy.upstream_failed(origin, ep, &e);
                    break 'attempts (StatusCode::BAD_GATEWAY, failed(&e));
                }
            }
        }
        gave_up(first_failure, "no healthy origin endpoint")
    };
    if matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
    ) {
        // The request got no answer from any origin.
        proxy.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }
    let keep_alive = c.keeps_alive(head);
    match c
        .answer(proxy, status, &text, !keep_alive, head.head_method)
        .await
    {
        Ok(()) if keep_alive => Next::KeepAlive,
        Ok(()) => Next::Close,
        Err(_) => Next::Abort,
    }
}

/// Connects to an endpoint within the proxy's connect timeout.
async fn connect(proxy: &Proxy, addr: SocketAddr) -> Result<TcpStream, Failure> {
    crate::proxy::dial(addr, proxy.connect_timeout)
        .await
        .map_err(|e| Failure::Retriable(e.to_string()))
}

/// Sends the request to one endpoint (on a pooled connection, or a new one
/// when the pooled one turns out closed) and relays the response.
async fn attempt_endpoint(
    proxy: &Proxy,
    pool: &Pool,
    c: &mut Conn,
    head: &RequestHead,
    origin: &Origin,
    ep: &Arc<EndpointState>,
) -> Result<Next, Failure> {
    // From the (last) try at this endpoint, connecting included, to the
    // response head.
    let mut sent = Instant::now();
    let (mut up, mut reused) = match pool.take(ep.addr) {
        Some(s) => (s, true),
        None => (connect(proxy, ep.addr).await?, false),
    };
    let response = loop {
        match write_within(&mut up, &c.request, proxy.upstream_timeout).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(Failure::TimedOut),
            Err(e) => {
                // The origin may have answered and closed before taking it
                // all (a 413 to an upload): that answer is the response.
                if let Ok(r) = read_response_head(proxy, c, &mut up, head, origin).await {
                    break r;
                }
                // Nothing of it can have been acted on: the head or the
                // body is incomplete at the origin.
                if reused && !c.interim_sent {
                    sent = Instant::now();
                    up = connect(proxy, ep.addr).await?;
                    reused = false;
                    continue;
                }
                let e = format!("sending the request: {e}");
                return Err(if c.interim_sent {
                    Failure::Final(e)
                } else {
                    Failure::Retriable(e)
                });
            }
        }
        match read_response_head(proxy, c, &mut up, head, origin).await {
            Ok(r) => break r,
            // The request went out but a pooled connection died before a
            // byte of answer: only an idempotent request is sent again.
            Err(Failure::Final(e)) if reused && c.ubuf.is_empty() && !c.interim_sent => {
                if !head.idempotent {
                    return Err(Failure::Stale(e));
                }
                sent = Instant::now();
                up = connect(proxy, ep.addr).await?;
                reused = false;
            }
            Err(e) => return Err(e),
        }
    };
    origin.stats.answered(response.status, sent.elapsed());
    // A 5xx is the endpoint's failure at once; any other answer is its
    // success once the body has come whole (a cut body is a failure).
    let server_error = (500..600).contains(&response.status);
    if server_error {
        proxy.endpoint_5xx(origin, ep);
    }
    proxy.count_status(response.status);
    c.note(|x| x.status = response.status);
    if response.upgraded {
        ep.success(mono_ms_at(sent));
        return Ok(websocket(proxy, c, up).await);
    }
    let relayed = relay_body(proxy, c, &mut up, response.body).await;
    if !server_error && !matches!(relayed, Err(Relay::Origin(_))) {
        ep.success(mono_ms_at(sent));
    }
    match relayed {
        Ok(complete) => {
            if complete && response.reusable && c.ubuf.is_empty() {
                pool.put(ep.addr, up);
            }
        }
        Err(Relay::Client) => return Err(Failure::Client),
        // The answer is cut: the client sees its connection reset.
        Err(Relay::Origin(e)) => {
            // A 5xx was already the endpoint's failure: one bad answer
            // counts once.
            if !server_error {
                proxy.upstream_failed(origin, ep, &e);
            }
            proxy.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            c.note(|x| x.error = Some(format!("the answer was cut: {e}")));
            return Ok(Next::Abort);
        }
    }
    if response.close {
        Ok(Next::Close)
    } else {
        Ok(Next::KeepAlive)
    }
}

/// Reads the origin's final response head into `c.response` (interim 1xx
/// responses are passed on to the client as they come); the bytes after it
/// stay in `c.ubuf`.
async fn read_response_head(
    proxy: &Proxy,
    c: &mut Conn,
    up: &mut TcpStream,
    head: &RequestHead,
    origin: &Origin,
) -> Result<h1::ResponseHead, Failure> {
    if c.ubuf.data.is_empty() {
        c.ubuf.data.resize(16 * 1024, 0);
    }
    c.ubuf.consume(c.ubuf.len());
    loop {
        if !c.ubuf.is_empty() {
            let asked = h1::Asked {
                keep_alive: c.keeps_alive(head),
                ..head.asked()
            };
            let r = h1::forward_response(
                c.ubuf.bytes(),
                asked,
                origin.header.as_bytes(),
                &mut c.response,
            )
            .map_err(|e| Failure::Final(format!("bad response: {e}")))?;
            match r {
                // Such as 103 Early Hints: the client gets it now.
                Some(r) if r.interim => {
                    c.ubuf.consume(r.len);
                    c.interim_sent = true;
                    write_client(&mut c.client, &c.response).await?;
                    continue;
                }
                Some(r) => {
                    c.ubuf.consume(r.len);
                    return Ok(r);
                }
                None => {}
            }
        }
        match timeout(proxy.upstream_timeout, c.ubuf.fill(up)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err(Failure::Final("closed before a response".into())),
            Ok(Err(e)) => return Err(Failure::Final(format!("reading the response: {e}"))),
            Err(_) => return Err(Failure::TimedOut),
        }
    }
}

/// Carries a WebSocket once the origin has switched protocols: the 101 and
/// what came after it go to the client, what the client sent after its
/// handshake goes to the origin, and then each direction is copied on its
/// own (one side not reading never holds up the other) until both have
/// ended, a side fails, or nothing has moved either way for
/// `websocket_idle`. A failure, or a write stalled that long, resets both
/// connections; an idle tunnel is closed cleanly.
async fn websocket(proxy: &Proxy, c: &mut Conn, mut up: TcpStream) -> Next {
    proxy.stats.websockets.fetch_add(1, Ordering::Relaxed);
    let _open = Gauge::up(&proxy.stats.websockets_open);
    let ended = tunnel(proxy, c, &mut up).await;
    let why = match &ended {
        Tunnel::Done => return Next::Close,
        Tunnel::Idle | Tunnel::ClientEnded => {
            debug!("websocket idle: closed");
            c.note(|x| x.error = Some("websocket idle: closed".to_owned()));
            return Next::Close;
        }
        Tunnel::Stalled => "websocket write stalled".to_owned(),
        Tunnel::Failed(e) => format!("websocket broken: {e}"),
    };
    let next = reset(&up, &why);
    c.note(|x| x.error = Some(why));
    next
}

/// Ends a tunnel with a reset both ways: the origin's here, the client's
/// by the caller.
fn reset(up: &TcpStream, why: &str) -> Next {
    debug!("{why}: reset");
    let _ = socket2::SockRef::from(up).set_linger(Some(Duration::ZERO));
    Next::Abort
}

/// How the tunnel ended. The bytes it sends the client are noted in the
/// exchange as they go, so that one cut (say, by the stop's grace) is
/// logged with them.
async fn tunnel(proxy: &Proxy, c: &mut Conn, up: &mut TcpStream) -> Tunnel {
    proxy
        .stats
        .response_bytes
        .fetch_add(c.ubuf.len() as u64, Ordering::Relaxed);
    let early = c.ubuf.len() as u64;
    c.note(|x| x.bytes = early);
    c.response.extend_from_slice(c.ubuf.bytes());
    // What the client sent past its handshake (usually nothing).
    let to_origin = c.cbuf.bytes().to_vec();
    let Conn {
        client,
        cbuf,
        ubuf,
        response,
        logged,
        ..
    } = c;
    let to_client = logged.as_deref_mut().map(|x| &mut x.bytes);
    let (mut client_rx, mut client_tx) = client.split();
    let (mut origin_rx, mut origin_tx) = up.split();
    splice(
        proxy.websocket_idle,
        Ends {
            rx: &mut client_rx,
            tx: &mut client_tx,
            buf: &mut cbuf.data,
            first: response.as_slice(),
        },
        Ends {
            rx: &mut origin_rx,
            tx: &mut origin_tx,
            buf: &mut ubuf.data,
            first: &to_origin,
        },
        // A FIN is a FIN here: a half close has the whole idle time.
        None,
        &proxy.stats.response_bytes,
        to_client,
    )
    .await
}

/// Why a response body could not be relayed whole.
enum Relay {
    /// The client went away or stalled.
    Client,
    /// The origin broke the body off, sent a bad one, or stalled.
    Origin(String),
}

/// Sends the response head in `c.response` and its body to the client.
/// Returns whether the body ended where its framing said (so that the
/// origin connection can carry another request).
async fn relay_body(
    proxy: &Proxy,
    c: &mut Conn,
    up: &mut TcpStream,
    body: Framing,
) -> Result<bool, Relay> {
    let mut chunked = ChunkedEnd::default();
    let mut left = match body {
        Framing::Length(n) => n,
        _ => 0,
    };
    // The head goes out with the body bytes already read, in one write.
    let mut first = true;
    loop {
        let (take, done) = match body {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let t = c
                    .ubuf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                left -= t as u64;
                (t, left == 0)
            }
            Framing::Chunked => chunked
                .feed(c.ubuf.bytes())
                .map_err(|e| Relay::Origin(format!("bad chunked body: {e}")))?,
            Framing::Close => (c.ubuf.len(), false),
        };
        // Counted as it goes: an exchange cut (say, by the stop's grace)
        // is counted and logged with what it had sent.
        proxy
            .stats
            .response_bytes
            .fetch_add(take as u64, Ordering::Relaxed);
        c.note(|x| x.bytes += take as u64);
        let sent = if first {
            first = false;
            c.response.extend_from_slice(&c.ubuf.bytes()[..take]);
            write_client(&mut c.client, &c.response).await
        } else if take > 0 {
            write_client(&mut c.client, &c.ubuf.bytes()[..take]).await
        } else {
            Ok(())
        };
        sent.map_err(|_| Relay::Client)?;
        c.ubuf.consume(take);
        if done {
            return Ok(true);
        }
        match timeout(proxy.upstream_timeout, c.ubuf.fill(up)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) if body == Framing::Close => return Ok(false),
            Ok(Ok(_)) => return Err(Relay::Origin("body cut short".into())),
            Ok(Err(e)) => return Err(Relay::Origin(format!("reading the body: {e}"))),
            Err(_) => return Err(Relay::Origin("body timed out".into())),
        }
    }
}

#[cfg(test)]
#[path = "h1proxy_tests.rs"]
mod tests;
