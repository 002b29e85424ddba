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
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use crate::h1::{self, ChunkedEnd, Framing, Parsed, RequestHead};
use crate::proxy::Proxy;
use crate::upstream::{EndpointState, Origin};

/// How long a kept-alive client connection may sit between requests.
pub const CLIENT_IDLE: Duration = Duration::from_secs(75);
/// How long the rest of a request head, a body read or a write to the
/// client may take.
pub const CLIENT_IO: Duration = Duration::from_secs(30);
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
    /// The most recently used idle connection to `addr` that still looks
    /// open: one the origin closed (or sent stray bytes on) is readable and
    /// is dropped.
    fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && stream.readable().now_or_never().is_none() {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(addr).or_default();
        if list.len() < POOL_PER_ENDPOINT {
            list.push((stream, Instant::now()));
        }
    }

    /// Idle connections held, all endpoints.
    pub fn len(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
        let n = s.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// What becomes of the client connection after an exchange.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Why an attempt at one endpoint got no response.
#[derive(Debug)]
enum Failure {
    /// Nothing was sent that the origin could have acted on: the request
    /// may go to another origin.
    Retriable(String),
    /// The request reached the origin, or its body is gone.
    Final(String),
    TimedOut,
    /// The client went away or stalled: nothing to answer.
    Client,
}

/// The reusable buffers of one client connection.
struct Conn {
    client: TcpStream,
    peer_ip: Vec<u8>,
    cbuf: Buf,
    ubuf: Buf,
    request: Vec<u8>,
    response: Vec<u8>,
}

/// Sends a response the proxy made and closes the connection gently: its
/// side is shut first, and what the client still sends (a body nobody will
/// read) is read and dropped for a moment, so that the close does not
/// reset the connection before the client has read the answer.
async fn answer_and_close(client: &mut TcpStream, response: &[u8]) {
    if write_client(client, response).await.is_err() || client.shutdown().await.is_err() {
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
    match timeout(CLIENT_IO, client.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Failure::Client),
    }
}

/// Serves one client connection until it closes, on the fast path while
/// its requests allow, then in hyper.
pub async fn serve_connection(
    proxy: Arc<Proxy>,
    pool: Arc<Pool>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let mut c = Conn {
        client,
        peer_ip: peer.ip().to_string().into_bytes(),
        cbuf: Buf::new(4096, h1::MAX_HEAD + 4096),
        ubuf: Buf::new(0, h1::MAX_HEAD + 4096),
        request: Vec::new(),
        response: Vec::new(),
    };
    loop {
        let head = loop {
            if !c.cbuf.is_empty() {
                match h1::forward_request(c.cbuf.bytes(), &c.peer_ip, &mut c.request) {
                    Ok(Parsed::Done(h)) => break h,
                    Ok(Parsed::Partial) => {}
                    Ok(Parsed::HandOff) => {
                        proxy.stats.handoffs.fetch_add(1, Ordering::Relaxed);
                        let pre = c.cbuf.take();
                        crate::proxy::serve_hyper(proxy, Rewind::new(pre, c.client), peer).await;
                        return;
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "bad request head");
                        proxy.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        let reason = if e.status() == 431 {
                            "Request Header Fields Too Large"
                        } else {
                            "Bad Request"
                        };
                        let body = format!("sextant-edge: {e}\n");
                        let r = h1::local_response(e.status(), reason, &body, true);
                        answer_and_close(&mut c.client, &r).await;
                        return;
                    }
                }
            }
            let wait = if c.cbuf.is_empty() {
                CLIENT_IDLE
            } else {
                CLIENT_IO
            };
            match timeout(wait, c.cbuf.fill(&mut c.client)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        c.cbuf.consume(head.len);
        proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
        if exchange(&proxy, &pool, &mut c, &head).await == Next::Close {
            return;
        }
    }
}

/// Forwards one request and its response.
async fn exchange(proxy: &Proxy, pool: &Pool, c: &mut Conn, head: &RequestHead) -> Next {
    let mut body_left = match head.body {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut tried: Option<&str> = None;
    // The failure of the first attempt, said when no other origin is left.
    let mut first_failure: Option<String> = None;
    let cfg = proxy.current.load_full();
    let failure = 'attempts: {
        let Some(cfg) = cfg.as_ref() else {
            break 'attempts (503, "Service Unavailable", "no config yet".to_owned());
        };
        for attempt in 0..2 {
            let Some(origin) = cfg.value.pick(tried) else {
                break 'attempts match first_failure {
                    Some(e) => (502, "Bad Gateway", e),
                    None => (503, "Service Unavailable", "no origin available".to_owned()),
                };
            };
            let Some(ep) = origin.pick() else {
                tried = Some(origin.id.as_str());
                continue;
            };
            match attempt_endpoint(proxy, pool, c, head, origin, ep, &mut body_left).await {
                Ok(next) => return next,
                Err(Failure::Client) => return Next::Close,
                Err(Failure::TimedOut) => {
                    proxy.upstream_failed(origin, ep, "timed out");
                    break 'attempts (
                        504,
                        "Gateway Timeout",
                        format!("origin {} ({}) timed out", origin.id, ep.addr),
                    );
                }
                Err(Failure::Retriable(e)) if attempt == 0 => {
                    proxy.upstream_failed(origin, ep, &e);
                    first_failure = Some(format!("origin {} ({}) failed: {e}", origin.id, ep.addr));
                    tried = Some(origin.id.as_str());
                }
                Err(Failure::Retriable(e) | Failure::Final(e)) => {
                    proxy.upstream_failed(origin, ep, &e);
                    break 'attempts (
                        502,
                        "Bad Gateway",
                        format!("origin {} ({}) failed: {e}", origin.id, ep.addr),
                    );
                }
            }
        }
        match first_failure {
            Some(e) => (502, "Bad Gateway", e),
            None => (
                503,
                "Service Unavailable",
                "no healthy origin endpoint".to_owned(),
            ),
        }
    };
    let (status, reason, text) = failure;
    proxy.count_status(status);
    // A body the origin did not take is still on the client connection.
    let close = !head.keep_alive || body_left > 0;
    let r = h1::local_response(status, reason, &format!("sextant-edge: {text}\n"), close);
    if close {
        answer_and_close(&mut c.client, &r).await;
        return Next::Close;
    }
    match write_client(&mut c.client, &r).await {
        Ok(()) => Next::KeepAlive,
        Err(_) => Next::Close,
    }
}

/// Connects to an endpoint within the proxy's connect timeout.
async fn connect(proxy: &Proxy, addr: SocketAddr) -> Result<TcpStream, Failure> {
    match timeout(proxy.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(Failure::Retriable(format!("connect: {e}"))),
        Err(_) => Err(Failure::Retriable("connect timed out".into())),
    }
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
    body_left: &mut u64,
) -> Result<Next, Failure> {
    let (mut up, mut reused) = match pool.take(ep.addr) {
        Some(s) => (s, true),
        None => (connect(proxy, ep.addr).await?, false),
    };
    let bodyless = head.body == Framing::None;
    let response = loop {
        match send_request(proxy, c, &mut up, body_left).await {
            Ok(()) => {}
            // A pooled connection the origin closed meanwhile: nothing was
            // taken, so try once more on a new connection.
            Err(Failure::Retriable(_)) if reused => {
                up = connect(proxy, ep.addr).await?;
                reused = false;
                continue;
            }
            Err(e) => return Err(e),
        }
        match read_response_head(proxy, c, &mut up, head, origin).await {
            Ok(r) => break r,
            // The request went out but the connection died before a byte
            // of answer: only an idempotent request may be sent again.
            Err(Failure::Final(_))
                if reused && bodyless && head.idempotent && c.ubuf.is_empty() =>
            {
                up = connect(proxy, ep.addr).await?;
                reused = false;
            }
            Err(e) => return Err(e),
        }
    };
    if (500..600).contains(&response.status) {
        proxy.endpoint_5xx(origin, ep);
    } else {
        ep.success();
    }
    proxy.count_status(response.status);
    let mut body_bytes = 0u64;
    let reusable = relay_body(proxy, c, &mut up, response.body, &mut body_bytes).await;
    proxy
        .stats
        .response_bytes
        .fetch_add(body_bytes, Ordering::Relaxed);
    let reusable = reusable?;
    if reusable && response.reusable && c.ubuf.is_empty() {
        pool.put(ep.addr, up);
    }
    c.ubuf.consume(c.ubuf.len());
    if head.keep_alive && response.body != Framing::Close {
        Ok(Next::KeepAlive)
    } else {
        Ok(Next::Close)
    }
}

/// Writes the request head and its `Content-Length` body (from what was
/// read with the head, then from the client) to the origin.
async fn send_request(
    proxy: &Proxy,
    c: &mut Conn,
    up: &mut TcpStream,
    body_left: &mut u64,
) -> Result<(), Failure> {
    // Nothing of the body is taken from the client before the head is out,
    // so a head that cannot be sent leaves the request free to go elsewhere.
    match timeout(proxy.upstream_timeout, up.write_all(&c.request)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failure::Retriable(format!("sending the request: {e}"))),
        Err(_) => return Err(Failure::TimedOut),
    }
    loop {
        let have = c
            .cbuf
            .len()
            .min(usize::try_from(*body_left).unwrap_or(usize::MAX));
        if have > 0 {
            let r = timeout(
                proxy.upstream_timeout,
                up.write_all(&c.cbuf.bytes()[..have]),
            )
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Failure::Final(format!("sending the body: {e}"))),
                Err(_) => return Err(Failure::TimedOut),
            }
            c.cbuf.consume(have);
            *body_left -= have as u64;
        }
        if *body_left == 0 {
            return Ok(());
        }
        match timeout(CLIENT_IO, c.cbuf.fill(&mut c.client)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Failure::Client),
        }
    }
}

/// Reads the origin's final response head into `c.response` (interim 1xx
/// responses are skipped); the bytes after it stay in `c.ubuf`.
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
            let r = h1::forward_response(
                c.ubuf.bytes(),
                head.head_method,
                origin.header.as_bytes(),
                head.keep_alive,
                &mut c.response,
            )
            .map_err(|e| Failure::Final(format!("bad response: {e}")))?;
            match r {
                Some(r) if r.interim => {
                    c.ubuf.consume(r.len);
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

/// Sends the response head in `c.response` and its body to the client.
/// Returns whether the origin connection can carry another request; an
/// error means the client connection is done (the response may be cut).
async fn relay_body(
    proxy: &Proxy,
    c: &mut Conn,
    up: &mut TcpStream,
    body: Framing,
    bytes: &mut u64,
) -> Result<bool, Failure> {
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
            Framing::Chunked => chunked.feed(c.ubuf.bytes()).map_err(|e| {
                debug!(error = %e, "origin sent a bad chunked body");
                Failure::Client
            })?,
            Framing::Close => (c.ubuf.len(), false),
        };
        *bytes += take as u64;
        if first {
            c.response.extend_from_slice(&c.ubuf.bytes()[..take]);
            write_client(&mut c.client, &c.response).await?;
            first = false;
        } else if take > 0 {
            write_client(&mut c.client, &c.ubuf.bytes()[..take]).await?;
        }
        c.ubuf.consume(take);
        if done {
            return Ok(true);
        }
        match timeout(proxy.upstream_timeout, c.ubuf.fill(up)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) if body == Framing::Close => return Ok(false),
            _ => return Err(Failure::Client),
        }
    }
}

/// A connection whose first bytes were already read: they are read again
/// first, then the stream.
#[derive(Debug)]
pub struct Rewind {
    pre: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(pre: Vec<u8>, inner: TcpStream) -> Self {
        Self { pre, pos: 0, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.pre.len() {
            let n = (this.pre.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.pre[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pre.len() {
                this.pre = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "h1proxy_tests.rs"]
mod tests;
