//! The proxy on loopback, between raw-socket clients and scripted origins.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::future::BoxFuture;
use sextant_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::h1::ChunkedEnd;
use crate::proxy::{serve, Proxy, Stats};
use crate::subscriber::{Applied, Build};
use crate::upstream::{test_config, Endpoints, UpstreamBuilder, BASE_EJECTION, EJECT_AFTER};

/// A request as an origin saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which of the origin's connections it came on (0, 1, ...).
    conn: usize,
    head: String,
    body: Vec<u8>,
}

type Respond = Arc<dyn Fn(&Seen) -> Vec<u8> + Send + Sync>;

/// An origin that reads requests (Content-Length or chunked bodies),
/// records them, and answers each with what `respond` gives. An answer
/// that starts with "CLOSE" is sent without those five bytes and the
/// connection is closed after it; "HANG" never answers; "SLOW" answers
/// (the rest) after 300 ms.
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    async fn start(respond: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Respond = Arc::new(respond);
        let record = seen.clone();
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve_origin(s, conn, record.clone(), respond.clone()));
                conn += 1;
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Reads into `buf` until it holds a whole head; returns the head's
/// length, or `None` when the connection ends first.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut b = [0u8; 4096];
        match s.read(&mut b).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => return None,
        }
    }
}

/// A test origin on loopback that runs `serve` on every connection it
/// accepts.
async fn spawn_origin<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

async fn serve_origin(
    mut s: TcpStream,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    respond: Respond,
) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        let body = if lower.contains("transfer-encoding: chunked") {
            let mut d = ChunkedEnd::default();
            let mut body = Vec::new();
            loop {
                let (n, done) = d.feed(&buf).expect("chunked request body");
                body.extend(buf.drain(..n));
                if done {
                    break body;
                }
                let mut b = [0u8; 4096];
                match s.read(&mut b).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
                    _ => return,
                }
            }
        } else {
            let len: usize = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < len {
                let mut b = [0u8; 65536];
                match s.read(&mut b).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
                    _ => return,
                }
            }
            buf.drain(..len).collect()
        };
        let req = Seen { conn, head, body };
        seen.lock().expect("lock").push(req.clone());
        let answer = respond(&req);
        if answer.starts_with(b"HANG") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let answer = match answer.strip_prefix(b"SLOW") {
            Some(rest) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                rest.to_vec()
            }
            None => answer,
        };
        let (answer, close) = match answer.strip_prefix(b"CLOSE") {
            Some(rest) => (rest.to_vec(), true),
            None => (answer, false),
        };
        if s.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Edge {
    addr: SocketAddr,
    stats: Arc<Stats>,
    /// Tells the proxy worker to stop.
    stop: watch::Sender<bool>,
    /// Endpoint health and origin stats.
    endpoints: Arc<Endpoints>,
}

async fn edge_with(origins: &[(&str, SocketAddr, f64)], tune: impl FnOnce(&mut Proxy)) -> Edge {
    let spec: Vec<(&str, &[SocketAddr], f64)> = origins
        .iter()
        .map(|(id, addr, w)| (*id, std::slice::from_ref(addr), *w))
        .collect();
    let config = (!origins.is_empty()).then(|| test_config(&spec));
    serve_config(config, Endpoints::default(), tune).await
}

/// An edge serving `config` (none: no config yet) with `endpoints`' health.
async fn serve_config(
    config: Option<pb::NodeConfig>,
    endpoints: Endpoints,
    tune: impl FnOnce(&mut Proxy),
) -> Edge {
    let endpoints = Arc::new(endpoints);
    let builder = UpstreamBuilder {
        endpoints: endpoints.clone(),
        allowed: Vec::new(),
    };
    let current = Arc::new(ArcSwapOption::empty());
    if let Some(config) = config {
        let value = builder.build(1, &config).expect("valid config");
        current.store(Some(Arc::new(Applied {
            version: 1,
            value,
            accepted_at_ms: 0,
            from_disk: false,
        })));
    }
    let stats = Arc::new(Stats::default());
    let mut proxy = Proxy::new("e1".into(), current, endpoints.clone(), stats.clone());
    tune(&mut proxy);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (stop, rx) = watch::channel(false);
    tokio::spawn(serve(l, Arc::new(proxy), rx));
    Edge {
        addr,
        stats,
        stop,
        endpoints,
    }
}

async fn edge(origins: &[(&str, SocketAddr, f64)]) -> Edge {
    edge_with(origins, |_| {}).await
}

/// Reads one response (Content-Length, chunked or to the end) from `s`,
/// with `pending` bytes read before; returns (status, head, body) and
/// leaves what follows in `pending`.
async fn read_response(
    s: &mut TcpStream,
    pending: &mut Vec<u8>,
    head_method: bool,
) -> (u16, String, Vec<u8>) {
    async fn more(s: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
        let mut b = [0u8; 65536];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => {
                pending.extend_from_slice(&b[..n]);
                true
            }
            _ => false,
        }
    }
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(
            more(s, pending).await,
            "connection ended before a response head: {pending:?}"
        );
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    pending.drain(..head_end);
    let status = head[9..12].parse().expect("status");
    let lower = head.to_ascii_lowercase();
    let body = if head_method || status == 204 || status == 304 {
        Vec::new()
    } else if lower.contains("transfer-encoding: chunked") {
        let mut d = ChunkedEnd::default();
        let mut body = Vec::new();
        loop {
            let (n, done) = d.feed(pending).expect("chunked body");
            body.extend(pending.drain(..n));
            if done {
                break body;
            }
            assert!(more(s, pending).await, "chunked body cut");
        }
    } else if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while pending.len() < len {
            assert!(more(s, pending).await, "body cut");
        }
        pending.drain(..len).collect()
    } else {
        while more(s, pending).await {}
        std::mem::take(pending)
    };
    (status, head, body)
}

/// Sends `raw` on a new connection and reads one response.
async fn once(edge: SocketAddr, raw: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(edge).await.expect("connect");
    s.write_all(raw).await.expect("write");
    read_response(&mut s, &mut Vec::new(), raw.starts_with(b"HEAD")).await
}

/// True when the peer closed `s` (nothing more arrives).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn requests_on_a_kept_alive_connection_reuse_one_origin_connection() {
    let origin =
        Origin::start(|r| ok(&format!("hi {}", r.head.lines().next().unwrap_or("")))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    for i in 0..3 {
        let req = format!(
            "GET /{i} HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive, X-Private\r\n\
             X-Private: 1\r\nX-Kept: yes\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let (status, head, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("hi GET /{i} HTTP/1.1").as_bytes());
        assert!(head.contains("x-sextant-origin: a\r\n"), "{head}");
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|r| r.conn == 0),
        "one origin connection: {seen:?}"
    );
    let head = seen[0].head.to_ascii_lowercase();
    assert!(head.contains("host: www.example.com\r\n"), "{head}");
    assert!(head.contains("x-kept: yes\r\n"), "{head}");
    assert!(
        head.contains("x-forwarded-for: 192.0.2.7, 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(
        !head.contains("connection") && !head.contains("x-private"),
        "{head}"
    );
    assert_eq!(e.stats.requests.load(Ordering::Relaxed), 3);
    assert_eq!(e.stats.responses[2].load(Ordering::Relaxed), 3);
    assert_eq!(e.stats.handoffs.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let origin = Origin::start(|r| ok(r.head.split(' ').nth(1).unwrap_or("?"))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\nGET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut pending = Vec::new();
    for path in ["/one", "/two", "/three"] {
        let (status, _, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!((status, body.as_slice()), (200, path.as_bytes()));
    }
    assert!(closed(&mut s).await, "closed after Connection: close");
}

#[tokio::test]
async fn bodies_pass_through_in_every_framing() {
    let origin = Origin::start(|r| {
        let path = r.head.split(' ').nth(1).unwrap_or("");
        match path {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
            "/close" => b"CLOSEHTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
            "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater".to_vec(),
            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/hop" => b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            _ => ok(&format!("got {} bytes", r.body.len())),
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    let get = |path: &'static str, method: &'static str| {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    };
    s.write_all(&get("/chunked", "GET")).await.expect("write");
    let (status, head, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 200);
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert_eq!(
        body,
        b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    );
    s.write_all(&get("/head", "HEAD")).await.expect("write");
    let (status, head, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: 100\r\n"), "{head}");
    s.write_all(&get("/early", "GET")).await.expect("write");
    // The interim answer comes first (read as bodiless), then the final.
    let (status, head, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 103);
    assert!(head.contains("Link: </s.css>\r\n"), "{head}");
    assert!(!head.contains("x-sextant-origin"), "{head}");
    let (status, head, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"later"[..]));
    assert!(!head.contains("Link"), "{head}");
    s.write_all(&get("/empty", "GET")).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 204);
    s.write_all(&get("/hop", "GET")).await.expect("write");
    let (_, head, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(body, b"ok");
    assert!(
        !head.contains("X-Hop") && !head.contains("Keep-Alive"),
        "{head}"
    );
    // A request body of 60 kB, sent in pieces.
    let big = vec![b'x'; 60_000];
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    for piece in big.chunks(20_000) {
        s.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"got 60000 bytes"[..]));
    // One origin connection throughout, but for a new one after the HEAD
    // (never reused: its origin might still send a body).
    let conns: Vec<(String, usize)> = origin
        .seen()
        .iter()
        .map(|r| (r.head.split(' ').nth(1).unwrap_or("").to_owned(), r.conn))
        .collect();
    let at = |p: &str| conns.iter().find(|(path, _)| path == p).map(|(_, c)| *c);
    assert_eq!(
        (at("/chunked"), at("/head")),
        (Some(0), Some(0)),
        "{conns:?}"
    );
    assert!(conns.iter().skip(2).all(|(_, c)| *c == 1), "{conns:?}");
    // A body delimited by the origin's close ends the client connection too.
    s.write_all(&get("/close", "GET")).await.expect("write");
    let (status, head, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"until the end"[..]));
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(e.stats.handoffs.load(Ordering::Relaxed), 0);
    assert!(e.stats.response_bytes.load(Ordering::Relaxed) >= 16 + 13 + 5);
}

#[tokio::test]
async fn what_the_fast_path_does_not_handle_goes_on_in_hyper() {
    let origin = Origin::start(|r| ok(&format!("got {} body bytes", r.body.len()))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    // HTTP/1.0.
    let (status, head, body) = once(e.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!((status, body.as_slice()), (200, &b"got 0 body bytes"[..]));
    assert!(head.contains("x-sextant-origin: a"), "{head}");
    // A chunked request body, after a fast-path request on the same
    // connection.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut s, &mut pending, false).await.0, 200);
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let (status, _, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("got ") && body != "got 0 body bytes",
        "{body}"
    );
    assert!(origin
        .seen()
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body).contains("hello")));
    // A body larger than the fast path buffers: streamed by hyper.
    let big = vec![b'y'; 300_000];
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.write_all(&big).await.expect("write");
    let (status, _, body) = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"got 300000 body bytes"[..])
    );
    // HTTP/2 with prior knowledge.
    let stream = TcpStream::connect(e.addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("http://www.example.com/h2")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("x-sextant-origin").map(|v| v.as_bytes()),
        Some(&b"a"[..])
    );
    assert_eq!(e.stats.handoffs.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn bad_requests_get_a_clear_answer_and_harm_no_other_client() {
    let origin = Origin::start(|_| ok("fine")).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    // Another client, mid-connection while the bad ones come and go.
    let mut good = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
    for (raw, status, says) in [
        ("GARBAGE\r\n\r\n".to_owned(), 400, "malformed head"),
        (
            "POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_owned(),
            400,
            "invalid content-length \"abc\"",
        ),
        (big, 431, "head larger than 65536 bytes"),
    ] {
        let mut s = TcpStream::connect(e.addr).await.expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        let (got, head, body) = read_response(&mut s, &mut Vec::new(), false).await;
        let body = String::from_utf8_lossy(&body);
        assert_eq!(got, status, "{body}");
        assert!(body.contains(says), "{body}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(closed(&mut s).await);
        good.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_response(&mut good, &mut pending, false).await.2,
            b"fine"
        );
    }
    assert_eq!(e.stats.bad_requests.load(Ordering::Relaxed), 3);
    assert_eq!(
        origin.seen().len(),
        3,
        "only the good requests reached the origin"
    );
    // Refused requests are requests too: every answer has its request.
    let answers: u64 = e
        .stats
        .responses
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    assert_eq!(e.stats.requests.load(Ordering::Relaxed), 6);
    assert_eq!(answers, 6);
}

#[tokio::test]
async fn an_origin_that_closes_idle_connections_costs_no_request() {
    // Answers without saying it will close, then closes: every reused
    // connection the proxy picks is dead.
    let origin = Origin::start(|_| {
        let mut r = b"CLOSE".to_vec();
        r.extend(ok("fresh"));
        r
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    for _ in 0..5 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, _, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!((status, body.as_slice()), (200, &b"fresh"[..]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.stats.upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(origin.seen().len(), 5);
}

#[tokio::test]
async fn failed_origins_are_skipped_ejected_and_answered_for() {
    let (_held, dead) = refused_port();
    let origin = Origin::start(|_| ok("alive")).await;
    let e = edge(&[("dead", dead, 0.5), ("alive", origin.addr, 0.5)]).await;
    // Every request gets an answer: a GET that failed on the dead origin
    // is retried on the other one.
    for _ in 0..40 {
        let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!((status, body.as_slice()), (200, &b"alive"[..]));
    }
    assert_eq!(e.stats.ejections.load(Ordering::Relaxed), 1);
    // Every request was answered: no upstream error, but the dead
    // origin's failures are counted.
    assert_eq!(e.stats.upstream_errors.load(Ordering::Relaxed), 0);
    assert!(
        e.endpoints
            .origin_stats("dead")
            .failures
            .load(Ordering::Relaxed)
            >= u64::from(EJECT_AFTER)
    );
    // With only the dead origin: 502 naming it; ejected, it is still
    // tried (nothing else is left: panic routing), so still a 502.
    let e = edge(&[("dead", dead, 1.0)]).await;
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 502);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("origin dead failed: connect"), "{body}");
    // Clients are not shown internal addresses.
    assert!(!body.contains(&dead.ip().to_string()), "{body}");
    for _ in 1..EJECT_AFTER {
        once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    assert_eq!(e.endpoints.ejected().len(), 1);
    assert_eq!(e.stats.panic_picks.load(Ordering::Relaxed), 0);
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("origin dead failed: connect"), "{body}");
    assert_eq!(e.stats.panic_picks.load(Ordering::Relaxed), 1);
    assert_eq!(
        e.stats.upstream_errors.load(Ordering::Relaxed),
        u64::from(EJECT_AFTER) + 1
    );
    // No config yet: 503.
    let e = edge(&[]).await;
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        (status, body.as_slice()),
        (503, &b"sextant-edge: no config yet\n"[..])
    );
}

#[tokio::test]
async fn a_run_of_5xx_ejects_and_a_silent_origin_times_out() {
    let failing =
        Origin::start(|_| b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
    let e = edge(&[("a", failing.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    for _ in 0..EJECT_AFTER {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(
            read_response(&mut s, &mut pending, false).await.0,
            500,
            "5xx are forwarded"
        );
    }
    assert_eq!(e.stats.ejections.load(Ordering::Relaxed), 1);
    assert_eq!(
        e.stats.responses[5].load(Ordering::Relaxed),
        u64::from(EJECT_AFTER)
    );
    let silent = Origin::start(|_| b"HANG".to_vec()).await;
    let e = edge_with(&[("a", silent.addr, 1.0)], |p| {
        p.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
}

/// A client connection whose first request (answered `first`) left an
/// origin connection in the edge's pool; and what was read past it.
async fn primed(edge: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(edge).await.expect("connect");
    let mut pending = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut s, &mut pending, false).await.2, b"first");
    (s, pending)
}

#[tokio::test]
async fn only_idempotent_requests_are_sent_again_when_a_pooled_connection_dies() {
    // Each origin connection answers its first request, and closes without
    // a word on its second: the request was taken, and no answer came.
    let origin = Origin::start(|r| {
        if r.head.contains("X-Second") {
            b"CLOSE".to_vec()
        } else {
            ok("first")
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let (mut s, mut pending) = primed(e.addr).await;
    // A DELETE dying on the pooled connection is sent again on a new one.
    s.write_all(b"DELETE /d HTTP/1.1\r\nHost: x\r\nX-Second: 1\r\n\r\n")
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 502, "the new connection dies the same way");
    let deletes = origin
        .seen()
        .iter()
        .filter(|r| r.head.starts_with("DELETE"))
        .count();
    assert_eq!(deletes, 2, "sent once more on a new connection");
    // A POST is not: the origin may have acted on it.
    let (mut s, mut pending) = primed(e.addr).await;
    s.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nX-Second: 1\r\n\r\n")
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 502);
    assert!(String::from_utf8_lossy(&body).contains("closed before a response"));
    let posts = origin
        .seen()
        .iter()
        .filter(|r| r.head.starts_with("POST"))
        .count();
    assert_eq!(posts, 1, "never sent twice");
}

#[tokio::test]
async fn a_length_named_by_connection_cannot_smuggle_a_request() {
    let origin = Origin::start(|r| ok(&format!("{} body bytes", r.body.len()))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let smuggled = "GET /admin HTTP/1.1\r\nX-Pad: ";
    let raw = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let (status, _, body) = once(e.addr, raw.as_bytes()).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, format!("{} body bytes", smuggled.len()).as_bytes())
    );
    // Another client on the same origin connection gets its own answer.
    let (status, _, body) = once(e.addr, b"GET /mine HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!((status, body.as_slice()), (200, &b"0 body bytes"[..]));
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|r| !r.head.contains("/admin")), "{seen:?}");
    assert_eq!(seen[0].body, smuggled.as_bytes());
}

#[tokio::test]
async fn an_origin_answering_before_it_read_the_body_is_heard() {
    // Refuses every upload at once and closes without reading it.
    let addr = spawn_origin(|mut s| async move {
        if read_head(&mut s, &mut Vec::new()).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")
                .await;
        }
    })
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let body = vec![b'z'; 60_000];
    let mut raw = format!(
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let (status, _, got) = once(e.addr, &raw).await;
    assert_eq!((status, got.as_slice()), (413, &b"too big\n"[..]));
    assert_eq!(e.stats.upstream_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn the_pool_forgets_connections_their_origins_closed() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let pool = crate::h1proxy::Pool::default();
    let kept = TcpStream::connect(addr).await.expect("connect");
    let (_open, _) = l.accept().await.expect("accept");
    let dropped = TcpStream::connect(addr).await.expect("connect");
    let (closing, _) = l.accept().await.expect("accept");
    pool.put(addr, kept);
    pool.put(addr, dropped);
    drop(closing);
    // The event loop learns of the close while the task waits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    pool.sweep();
    assert_eq!(pool.len(), 1);
    assert!(pool.take(addr).is_some(), "the open one is still good");
    assert!(pool.take(addr).is_none());
}

#[tokio::test]
async fn the_pool_never_hands_out_a_connection_with_bytes_nobody_asked_for() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let pool = crate::h1proxy::Pool::default();
    let mut origin_sides = Vec::new();
    for _ in 0..2 {
        let up = TcpStream::connect(addr).await.expect("connect");
        let (o, _) = l.accept().await.expect("accept");
        pool.put(addr, up);
        origin_sides.push(o);
    }
    for o in &mut origin_sides {
        o.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .expect("write");
    }
    // The bytes are in the kernel, but the event loop has not turned since
    // (a blocking sleep): only the socket itself knows.
    std::thread::sleep(Duration::from_millis(20));
    assert!(pool.take(addr).is_none());
    assert_eq!(pool.len(), 0, "both were dropped");
}

#[tokio::test]
async fn requests_and_answers_are_framed_and_addressed_strictly_on_both_paths() {
    let o = Origin::start(|r| {
        let line = r.head.lines().next().unwrap_or("").to_owned();
        if line.contains("/tece") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n".to_vec()
        } else if line.contains("/gzresp") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec()
        } else if line.contains("/switch") {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n".to_vec()
        } else {
            ok(&format!("body={}", String::from_utf8_lossy(&r.body)))
        }
    })
    .await;
    let e = edge(&[("a", o.addr, 1.0)]).await;
    let seen_host = |path: &str| -> Vec<String> {
        let seen = o.seen();
        let r = seen
            .iter()
            .rev()
            .find(|s| s.head.lines().next().is_some_and(|l| l.contains(path)))
            .unwrap_or_else(|| panic!("{path} never reached the origin"));
        r.head
            .lines()
            .filter_map(|l| l.strip_prefix("host:").or_else(|| l.strip_prefix("Host:")))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    // Refused by the proxy itself, on either path: nothing reaches the origin.
    for (raw, status) in [
        (&b"GET /nohost HTTP/1.1\r\n\r\n"[..], 400),
        (b"GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /badhost HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"POST /nohost-chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET http://u:pw@good.example/userinfo HTTP/1.1\r\nHost: good.example\r\n\r\n", 400),
        (b"CONNECT good.example:443 HTTP/1.1\r\nHost: good.example:443\r\n\r\n", 501),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://a,b/list HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (
            b"POST /gzip HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
            501,
        ),
    ] {
        let (got, head, _) = once(e.addr, raw).await;
        assert_eq!(got, status, "{}: {head}", String::from_utf8_lossy(raw));
    }
    assert!(o.seen().is_empty(), "{:?}", o.seen());
    // An absolute-form target's authority is the Host, whatever the client
    // sent with it.
    let (status, _, _) = once(
        e.addr,
        b"GET http://good.example/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen_host("/abs"), ["good.example"]);
    // HTTP/1.0 without Host goes out as HTTP/1.1 with one (empty).
    let (status, _, _) = once(e.addr, b"GET /h10 HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(seen_host("/h10"), [""]);
    // Connection cannot take Host away.
    let (status, _, _) = once(
        e.addr,
        b"POST /connhost HTTP/1.1\r\nHost: a.example\r\nConnection: host\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen_host("/connhost"), ["a.example"]);
    // A GET's chunked body is forwarded, not dropped.
    let (status, _, body) = once(
        e.addr,
        b"GET /getbody HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    // (The test origin records a chunked body as it came, framing and all.)
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"body=5\r\nhello\r\n0\r\n\r\n"[..])
    );
    // An origin's length sent with chunked is dropped on both paths: the
    // whole body arrives.
    for raw in [
        &b"GET /tece HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET http://x/tece HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let (status, head, body) = once(e.addr, raw).await;
        // (The body as read is still chunked: hyper may write the size as "B".)
        assert_eq!(status, 200, "{head}");
        let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
        assert_eq!(text, "b\r\nhello world\r\n0\r\n\r\n", "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
    }
    // A switch of protocols nobody asked for, or a transfer coding the
    // proxy cannot pass on, is a bad gateway on both paths.
    for raw in [
        &b"GET /switch HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET http://x/switch HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /gzresp HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://x/gzresp HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let (status, head, _) = once(e.addr, raw).await;
        assert_eq!(status, 502, "{head}");
    }
}

#[tokio::test]
async fn a_connection_the_client_closes_after_its_answer_is_closed_gently() {
    let big = "z".repeat(4 << 20);
    let answer = ok(&big);
    let o = Origin::start(move |_| answer.clone()).await;
    let e = edge(&[("a", o.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    // The request says close and more bytes follow it that nobody reads:
    // an abrupt close would reset the connection and cut the answer.
    let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    raw.extend_from_slice(&[b'x'; 200_000]);
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(&raw).await;
    };
    let read = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got)).await;
        got
    };
    let ((), got) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body_start = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| i + 4);
    assert_eq!(got.len() - body_start, big.len(), "answer cut");
}

#[tokio::test]
async fn a_request_trickled_byte_by_byte_is_forwarded_whole() {
    let o = Origin::start(|r| ok(&format!("got {} bytes", r.body.len()))).await;
    let e = edge(&[("a", o.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let raw = b"POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n0123456789abcdefghij";
    for b in raw {
        s.write_all(&[*b]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (status, _, body) = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!((status, body.as_slice()), (200, &b"got 20 bytes"[..]));
    assert_eq!(o.seen().len(), 1);
}

#[tokio::test]
async fn heads_are_parsed_when_they_can_be_judged_not_only_at_a_line_feed() {
    let o = Origin::start(|_| ok("fine")).await;
    let e = edge(&[("a", o.addr, 1.0)]).await;
    // Bytes that cannot start a request (a TLS hello) are refused at once.
    let (status, _, _) = once(e.addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await;
    assert_eq!(status, 400);
    // A head with no line feed is refused once it is too large.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut raw = b"GET /".to_vec();
    raw.extend(std::iter::repeat_n(b'a', crate::h1::MAX_HEAD + 10));
    s.write_all(&raw).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!(status, 431);
    // Empty lines before a request are skipped.
    let (status, _, body) = once(e.addr, b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, body.as_slice()), (200, &b"fine"[..]));
}

#[tokio::test]
async fn a_body_an_origin_sends_late_after_a_head_answer_answers_nobody() {
    // The origin wrongly sends a "body" 5 ms after its answer to HEAD, and
    // that body looks like a response.
    let addr = spawn_origin(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(end) = read_head(&mut s, &mut buf).await {
            let head: Vec<u8> = buf.drain(..end).collect();
            let fake = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPWNED!";
            if head.starts_with(b"HEAD") {
                let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", fake.len());
                let _ = s.write_all(h.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = s.write_all(fake).await;
            } else if s.write_all(&ok("real")).await.is_err() {
                return;
            }
        }
    })
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut c = TcpStream::connect(e.addr).await.expect("connect");
    c.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut pending = Vec::new();
    let (status, _, _) = read_response(&mut c, &mut pending, true).await;
    assert_eq!(status, 200);
    let (status, _, body) = read_response(&mut c, &mut pending, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"real"[..]));
}

#[tokio::test]
async fn an_answer_the_origin_cuts_reaches_the_client_as_a_reset() {
    // No length: the body ends when the origin closes; a reset instead
    // must not look like the end of the body.
    let addr = spawn_origin(|mut s| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\npartial").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut c = TcpStream::connect(e.addr).await.expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("the connection ends");
    assert!(String::from_utf8_lossy(&got).contains("partial"), "{got:?}");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a cut answer must not end cleanly"
    );
}

type After = Box<dyn Fn(TcpStream, Vec<u8>) -> BoxFuture<'static, ()> + Send + Sync>;

/// An origin that switches every connection to WebSocket: it answers the
/// handshake with a 101 and `greeting` in the same write, then hands the
/// connection and the bytes read past the head to `after`. The heads it got
/// are kept.
async fn switching_origin(
    greeting: &'static [u8],
    after: After,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let after = Arc::new(after);
    let addr = spawn_origin(move |mut s| {
        let (seen, after) = (seen.clone(), after.clone());
        async move {
            let mut buf = Vec::new();
            let Some(end) = read_head(&mut s, &mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let switch = switch_for(&head);
            seen.lock().expect("lock").push(head);
            if s.write_all(&[switch.as_bytes(), greeting].concat())
                .await
                .is_ok()
            {
                after(s, buf.split_off(end)).await;
            }
        }
    })
    .await;
    (addr, heads)
}

/// The answer to [`HANDSHAKE`].
const SWITCH: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// A 101 to the WebSocket handshake whose head is `head`, with the accept
/// key of its `Sec-WebSocket-Key` ([`SWITCH`] for [`HANDSHAKE`]).
fn switch_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim())
        })
        .unwrap_or("");
    let accept = crate::h1::websocket_accept(key.as_bytes());
    SWITCH.replace(
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        std::str::from_utf8(&accept).expect("base64"),
    )
}

/// A [`switching_origin`] that says `hello`, echoes what it reads in upper
/// case, and once the client has finished sending, says `bye` and closes.
async fn websocket_origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    switching_origin(
        b"hello",
        Box::new(|mut s, rest| {
            Box::pin(async move {
                let mut out = rest.to_ascii_uppercase();
                loop {
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    let mut b = vec![0u8; 65536];
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => out = b[..n].to_ascii_uppercase(),
                        _ => break,
                    }
                }
                let _ = s.write_all(b"bye").await;
            })
        }),
    )
    .await
}

/// Writes `n` bytes of `b` to `s`.
async fn send_n(s: &mut (impl AsyncWriteExt + Unpin), n: usize, b: u8) -> std::io::Result<()> {
    let chunk = vec![b; 65536];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        s.write_all(&chunk[..k]).await?;
        left -= k;
    }
    Ok(())
}

/// Opens a WebSocket through the edge at `addr`; returns the stream, and
/// what was read past the 101.
async fn open_websocket(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(HANDSHAKE.as_bytes()).await.expect("write");
    // A 101 has no body (read as if it answered a HEAD).
    let mut pending = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 101);
    (s, pending)
}

#[tokio::test]
async fn each_direction_of_a_websocket_flows_on_its_own() {
    // The origin writes 16 MiB before it reads anything, while the client
    // writes 16 MiB as it reads: far more than socket buffers hold, so a
    // tunnel that waited for one direction before serving the other would
    // deadlock.
    const N: usize = 16 << 20;
    let (addr, _) = switching_origin(
        b"",
        Box::new(|mut s, rest| {
            Box::pin(async move {
                if send_n(&mut s, N, b'o').await.is_err() {
                    return;
                }
                let mut got = rest.len();
                let mut b = vec![0u8; 65536];
                while got < N {
                    match s.read(&mut b).await {
                        Ok(k) if k > 0 => got += k,
                        _ => return,
                    }
                }
                let _ = s.write_all(b"done").await;
            })
        }),
    )
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let (s, pending) = open_websocket(e.addr).await;
    let (mut rx, mut tx) = s.into_split();
    let writer = tokio::spawn(async move { send_n(&mut tx, N, b'c').await.map(|()| tx) });
    let mut got = pending.len();
    let mut tail = Vec::new();
    let mut b = vec![0u8; 65536];
    while got < N + 4 {
        match tokio::time::timeout(Duration::from_secs(30), rx.read(&mut b)).await {
            Ok(Ok(k)) if k > 0 => {
                got += k;
                tail.extend_from_slice(&b[..k]);
                tail.drain(..tail.len().saturating_sub(4));
            }
            other => panic!("{got} of {} bytes, then {other:?}", N + 4),
        }
    }
    assert_eq!(tail, b"done");
    writer.await.expect("writer").expect("all sent");
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_still_reaches_the_origin_until_stalled() {
    // The origin floods the client, which reads nothing but still sends.
    let (to_test, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let (addr, _) = switching_origin(
        b"",
        Box::new(move |s, _| {
            let to_test = to_test.clone();
            Box::pin(async move {
                let (mut rx, mut tx) = s.into_split();
                let flood = tokio::spawn(async move { send_n(&mut tx, 1 << 30, b'o').await });
                let mut b = [0u8; 64];
                while let Ok(n) = rx.read(&mut b).await {
                    let _ = to_test.send(Ok(b[..n].to_vec()));
                    if n == 0 {
                        break;
                    }
                }
                // What the flood ran into once the edge gave up on the client.
                let _ = to_test.send(flood.await.expect("flood").map(|()| Vec::new()));
            })
        }),
    )
    .await;
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.websocket_idle = Duration::from_millis(500);
    })
    .await;
    let (mut s, _) = open_websocket(e.addr).await;
    s.write_all(b"ping").await.expect("write");
    let got = recv(&mut heard).await;
    assert_eq!(got.expect("read"), b"ping");
    // The edge's writes to the client stall for the idle time: both
    // connections are reset, not closed as if the stream had ended.
    let flood = loop {
        match recv(&mut heard).await {
            Ok(b) if !b.is_empty() => continue,
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            flood.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{flood:?}"
    );
    let mut b = vec![0u8; 1 << 20];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => continue,
            other => break other,
        }
    };
    assert!(
        matches!(&end, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    eventually_zero(&e.stats.websockets_open).await;
}

/// The next thing the origin reports, within 10 s.
async fn recv<T>(heard: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("in time")
        .expect("origin alive")
}

/// A [`switching_origin`] that reads all it gets, then reports how its
/// connection ended (an end or an error's kind) and keeps it `hold` long.
async fn reporting_origin(
    hold: Duration,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), std::io::ErrorKind>>,
) {
    let (to_test, heard) = tokio::sync::mpsc::unbounded_channel();
    let (addr, _) = switching_origin(
        b"",
        Box::new(move |mut s, _| {
            let to_test = to_test.clone();
            Box::pin(async move {
                let mut b = [0u8; 64];
                let end = loop {
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => continue,
                        end => break end,
                    }
                };
                let _ = to_test.send(end.map(|_| ()).map_err(|e| e.kind()));
                tokio::time::sleep(hold).await;
            })
        }),
    )
    .await;
    (addr, heard)
}

#[tokio::test]
async fn a_websocket_client_that_resets_resets_the_origin() {
    let (addr, mut heard) = reporting_origin(Duration::ZERO).await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let (s, _) = open_websocket(e.addr).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
    assert_eq!(
        recv(&mut heard).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

const HANDSHAKE: &str = "GET /chat HTTP/1.1\r\nHost: www.example.com\r\nConnection: Upgrade\r\n\
                         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                         Sec-WebSocket-Version: 13\r\n\r\n";

/// Reads from `s` until `want` bytes have come (or 10 s pass).
async fn read_exactly(s: &mut TcpStream, pending: &mut Vec<u8>, want: usize) -> Vec<u8> {
    while pending.len() < want {
        let mut b = vec![0u8; 65536];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&b[..n]),
            other => panic!("{} of {want} bytes, then {other:?}", pending.len()),
        }
    }
    pending.drain(..want).collect()
}

#[tokio::test]
async fn a_websocket_is_tunnelled_both_ways_and_each_side_closes_on_its_own() {
    let (addr, heads) = websocket_origin().await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    // Bytes sent right behind the handshake reach the origin too.
    s.write_all(format!("{HANDSHAKE}early").as_bytes())
        .await
        .expect("write");
    // A 101 has no body (read as if it answered a HEAD): what follows is
    // the tunnel's.
    let mut pending = Vec::new();
    let (status, head, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 101);
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    for f in [
        "connection: upgrade\r\n",
        "upgrade: websocket\r\n",
        "sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n",
        "x-sextant-origin: a\r\n",
    ] {
        assert!(head.contains(f), "{f} in {head}");
    }
    assert_eq!(read_exactly(&mut s, &mut pending, 10).await, b"helloEARLY");
    let origin_head = heads.lock().expect("lock")[0].to_ascii_lowercase();
    assert!(
        origin_head.contains("connection: upgrade\r\nupgrade: websocket\r\n")
            && origin_head.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
        "{origin_head}"
    );
    // Both ways, more than one buffer's worth.
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (mut rx, mut tx) = s.into_split();
    let send = tokio::spawn(async move {
        tx.write_all(&big).await.expect("write");
        tx.write_all(b"ping").await.expect("write");
        // The client is done sending; the origin still answers.
        tx.shutdown().await.expect("shutdown");
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut echoed))
        .await
        .expect("in time")
        .expect("read");
    send.await.expect("sender");
    let want: Vec<u8> = (0..300_000u32).map(|i| b'A' + (i % 26) as u8).collect();
    assert_eq!(echoed.len(), want.len() + 7);
    assert!(echoed.starts_with(&want));
    assert!(echoed.ends_with(b"PINGbye"));
    assert_eq!(e.stats.websockets.load(Ordering::Relaxed), 1);
    eventually_zero(&e.stats.websockets_open).await;
    assert_eq!(e.stats.responses[1].load(Ordering::Relaxed), 1);
}

async fn eventually_zero(n: &std::sync::atomic::AtomicI64) {
    eventually_at(n, 0).await;
}

/// Waits (2 s at most) for `n` to be `want`.
async fn eventually_at(n: &std::sync::atomic::AtomicI64, want: i64) {
    for _ in 0..100 {
        if n.load(Ordering::Relaxed) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still {}, not {want}", n.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_silent_websocket_is_closed_after_its_idle_time() {
    let (addr, _) = websocket_origin().await;
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.websocket_idle = Duration::from_millis(300);
    })
    .await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let started = std::time::Instant::now();
    s.write_all(HANDSHAKE.as_bytes()).await.expect("write");
    let mut pending = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(read_exactly(&mut s, &mut pending, 5).await, b"hello");
    assert_eq!(status, 101);
    assert_eq!(e.stats.websockets_open.load(Ordering::Relaxed), 1);
    // A clean close, not a reset.
    let mut b = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");
    // Not before its idle time, which starts after the handshake.
    assert!(started.elapsed() >= Duration::from_millis(300));
    eventually_zero(&e.stats.websockets_open).await;
}

#[tokio::test]
async fn an_origin_that_declines_a_websocket_answers_as_usual() {
    let origin = Origin::start(|_| ok("no websocket here")).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    for _ in 0..2 {
        s.write_all(HANDSHAKE.as_bytes()).await.expect("write");
        let (status, head, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!((status, body.as_slice()), (200, &b"no websocket here"[..]));
        assert!(!head.to_ascii_lowercase().contains("upgrade"), "{head}");
    }
    let seen = origin.seen();
    assert!(seen.iter().all(|r| r.conn == 0), "one origin connection");
    assert!(
        seen[0].head.contains("upgrade: websocket\r\n"),
        "{:?}",
        seen[0]
    );
    assert_eq!(e.stats.websockets.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_stopping_worker_finishes_the_exchange_under_way_and_closes_idle_connections() {
    let origin = Origin::start(|r| {
        if r.head.starts_with("GET /slow") {
            [&b"SLOW"[..], &ok("slow")].concat()
        } else {
            ok("fast")
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    // An idle kept-alive connection, and one with a request under way.
    let mut idle = TcpStream::connect(e.addr).await.expect("connect");
    idle.write_all(&get("/")).await.expect("write");
    let (status, _, _) = read_response(&mut idle, &mut Vec::new(), false).await;
    assert_eq!(status, 200);
    let mut busy = TcpStream::connect(e.addr).await.expect("connect");
    busy.write_all(&get("/slow")).await.expect("write");
    for _ in 0..500 {
        if origin
            .seen()
            .iter()
            .any(|r| r.head.starts_with("GET /slow"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    e.stop.send(true).expect("worker listening");
    assert!(closed(&mut idle).await, "the idle connection is closed");
    let mut pending = Vec::new();
    let (status, head, body) = read_response(&mut busy, &mut pending, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"slow"[..]));
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert!(closed(&mut busy).await, "closed after its answer");
    assert!(
        TcpStream::connect(e.addr).await.is_err(),
        "no new connection is accepted"
    );
}

#[tokio::test]
async fn past_its_connection_limit_a_worker_leaves_new_connections_waiting() {
    let origin = Origin::start(|_| ok("hi")).await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| p.connection_limit = 2).await;
    let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(e.addr).await.expect("connect");
        s.write_all(get).await.expect("write");
        let (status, _, _) = read_response(&mut s, &mut Vec::new(), false).await;
        assert_eq!(status, 200);
        open.push(s);
    }
    // The third is left in the backlog: its request is not answered...
    let mut third = TcpStream::connect(e.addr).await.expect("connect");
    third.write_all(get).await.expect("write");
    let mut b = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.read(&mut b))
            .await
            .is_err(),
        "answered past the limit"
    );
    assert_eq!(e.stats.connection_limit_hits.load(Ordering::Relaxed), 1);
    // ...until one of the others ends.
    drop(open.pop());
    let (status, _, body) = read_response(&mut third, &mut Vec::new(), false).await;
    assert_eq!((status, body.as_slice()), (200, &b"hi"[..]));
}

#[tokio::test]
async fn what_the_shutdown_grace_cuts_is_reset_not_closed() {
    // A body only the origin's close would end, and an origin that never
    // closes.
    let origin = Origin::start(|_| b"HTTP/1.1 200 OK\r\n\r\npart".to_vec()).await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| {
        p.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    while !got.ends_with(b"part") {
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&b[..n]),
            other => panic!("{other:?} after {got:?}"),
        }
    }
    e.stop.send(true).expect("worker listening");
    let mut b = [0u8; 256];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
    assert!(
        matches!(&end, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a cut body must not look complete: {end:?}"
    );
    assert_eq!(e.stats.active_connections.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_request_that_reached_a_stopping_worker_is_still_answered() {
    let origin = Origin::start(|r| ok(&format!("{} bytes", r.body.len()))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz";
    let mut kept = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(e.addr).await.expect("connect");
        s.write_all(post).await.expect("write");
        let mut pending = Vec::new();
        let (status, _, _) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 200);
        kept.push((s, pending));
    }
    // The next requests are in the edge's socket buffers, not read yet
    // (this test's runtime has not let the edge run), when it is stopped.
    for (s, _) in &mut kept {
        s.write_all(post).await.expect("write");
    }
    e.stop.send(true).expect("worker listening");
    for (s, pending) in &mut kept {
        let (status, head, body) = read_response(s, pending, false).await;
        assert_eq!((status, body.as_slice()), (200, &b"1 bytes"[..]));
        assert!(head.contains("connection: close\r\n"), "{head}");
    }
}

#[tokio::test]
async fn a_request_handed_to_hyper_on_a_stopping_worker_is_still_answered() {
    let origin = Origin::start(|r| ok(&format!("{} bytes", r.body.len()))).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    // Half a head each (a chunked upload, which hyper serves), read by the
    // edge before it is stopped; the rest after.
    let mut conns = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(e.addr).await.expect("connect");
        s.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
            .await
            .expect("write");
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    e.stop.send(true).expect("worker listening");
    for s in &mut conns {
        s.write_all(b"\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .expect("write");
    }
    for s in &mut conns {
        let (status, _, body) = read_response(s, &mut Vec::new(), false).await;
        // The origin counts the chunked body as it came.
        assert_eq!((status, body.as_slice()), (200, &b"13 bytes"[..]));
    }
}

#[tokio::test]
async fn a_request_whose_1xx_went_out_is_not_sent_again() {
    // The second request on the pooled origin connection gets a 103, then
    // the origin closes.
    let origin = Origin::start(|r| {
        if r.head.starts_with("GET /second") {
            b"CLOSEHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".to_vec()
        } else {
            ok("first")
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let (mut s, mut pending) = primed(e.addr).await;
    s.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 103);
    // The client has heard from this origin: no second try elsewhere.
    let (status, _, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 502);
    assert_eq!(origin.seen().len(), 2, "{:?}", origin.seen());
}

#[tokio::test]
async fn a_stopping_worker_opens_no_new_websocket() {
    let origin = Origin::start(|_| ok("plain")).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    let mut pending = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 200);
    // The handshake reaches the edge as it stops.
    s.write_all(HANDSHAKE.as_bytes()).await.expect("write");
    e.stop.send(true).expect("worker listening");
    let (status, head, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 503);
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(origin.seen().len(), 1, "the handshake went nowhere");
}

/// The access log's lines, once `want` are there (they are written on a
/// flush, and a hyper-served exchange is logged when its body is done).
async fn logged(
    log: &crate::access::AccessLog,
    path: &std::path::Path,
    want: usize,
) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        log.flush();
        let text = std::fs::read_to_string(path).expect("read the access log");
        if text.lines().count() >= want {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {want} lines logged");
}

#[tokio::test]
async fn every_exchange_is_logged_on_both_paths_with_its_outcome() {
    use crate::access::{AccessLog, Sink};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = Arc::new(AccessLog::open(Sink::File(path.clone())).expect("open"));
    let origin = Origin::start(|r| {
        if r.head.starts_with("GET /slow") {
            b"SLOW".iter().copied().chain(ok("late")).collect()
        } else {
            ok("hello")
        }
    })
    .await;
    let (_held, dead) = refused_port();
    let (ws, _) = websocket_origin().await;
    let config = |p: &mut Proxy| {
        p.access_log = Some(log.clone());
        p.websocket_idle = Duration::from_millis(200);
    };
    let e = edge_with(&[("a", origin.addr, 1.0)], config).await;
    let down = edge_with(&[("gone", dead, 1.0)], config).await;
    let tunnels = edge_with(&[("w", ws, 1.0)], config).await;

    // The fast path, answered by the origin.
    let (status, _, _) = once(e.addr, b"GET /a?b=\"1\" HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200);
    // Answered by the edge itself.
    assert_eq!(
        once(down.addr, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .0,
        502
    );
    assert_eq!(once(e.addr, b"GARBAGE\r\n\r\n").await.0, 400);
    // Handed to hyper.
    assert_eq!(once(e.addr, b"GET /c HTTP/1.0\r\n\r\n").await.0, 200);
    // A client that leaves (a reset) before its answer.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
    // A WebSocket, closed when idle.
    let (mut s, _) = open_websocket(tunnels.addr).await;
    assert!(closed(&mut s).await);

    let mut lines = logged(&log, &path, 6).await;
    assert_eq!(lines.len(), 6, "{lines:#?}");
    lines.sort_by_key(|l| l["target"].as_str().unwrap_or_default().to_owned());
    let by = |t: &str| {
        lines
            .iter()
            .find(|l| l["target"] == t)
            .unwrap_or_else(|| panic!("no line for {t}: {lines:#?}"))
    };
    let a = by("/a?b=\"1\"");
    assert_eq!(
        (
            &a["method"],
            &a["version"],
            &a["status"],
            &a["bytes"],
            &a["origin"],
            &a["error"]
        ),
        (
            &"GET".into(),
            &"HTTP/1.1".into(),
            &200.into(),
            &5.into(),
            &"a".into(),
            &serde_json::Value::Null
        )
    );
    assert!(a["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(
        a["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
        "{a}"
    );
    assert!(
        a["duration_ms"]
            .as_f64()
            .is_some_and(|d| d > 0.0 && d < 5_000.0),
        "{a}"
    );
    let b = by("/b");
    assert_eq!(
        (&b["status"], &b["origin"]),
        (&502.into(), &serde_json::Value::Null)
    );
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("origin gone failed: connect")),
        "{b}"
    );
    assert_eq!(
        b["bytes"].as_u64(),
        Some(crate::h1::local_body(b["error"].as_str().unwrap_or_default()).len() as u64)
    );
    let bad = by("-");
    assert_eq!((&bad["method"], &bad["status"]), (&"-".into(), &400.into()));
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.contains("malformed")),
        "{bad}"
    );
    let c = by("/c");
    assert_eq!(
        (&c["version"], &c["status"], &c["bytes"], &c["origin"]),
        (&"HTTP/1.0".into(), &200.into(), &5.into(), &"a".into())
    );
    let gone = by("/slow");
    assert_eq!(
        (&gone["status"], &gone["origin"], &gone["error"]),
        (&499.into(), &"a".into(), &"the client went away".into())
    );
    let w = by("/chat");
    assert_eq!((&w["status"], &w["origin"]), (&101.into(), &"w".into()));
    assert_eq!(w["error"], "websocket idle: closed");
    // The origin's greeting, "hello", went through the tunnel.
    assert_eq!(w["bytes"], 5);
    assert!(w["duration_ms"].as_f64().is_some_and(|d| d >= 200.0), "{w}");
    assert_eq!(log.lines(), 6);
}

#[tokio::test]
async fn each_origin_s_answers_failures_and_response_times_are_in_the_metrics() {
    let fast = Origin::start(|_| ok("fast")).await;
    let slow = Origin::start(|_| [&b"SLOW"[..], &ok("slow")].concat()).await;
    let (_held, dead) = refused_port();
    let e = edge(&[("fast", fast.addr, 1.0)]).await;
    for _ in 0..3 {
        assert_eq!(
            once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
            200
        );
    }
    // Handed to hyper: counted the same way.
    assert_eq!(once(e.addr, b"GET / HTTP/1.0\r\n\r\n").await.0, 200);
    let s = edge(&[("slow", slow.addr, 1.0)]).await;
    assert_eq!(
        once(s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
        200
    );
    let d = edge(&[("dead", dead, 1.0)]).await;
    assert_eq!(
        once(d.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
        502
    );
    let text = |e: &Edge| {
        crate::admin::Admin {
            stats: e.stats.clone(),
            current: Arc::new(ArcSwapOption::empty()),
            endpoints: e.endpoints.clone(),
            access_log: None,
        }
        .metrics()
    };
    let value = |text: &str, line: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
    };
    let m = text(&e);
    assert!(
        m.contains("# TYPE sextant_edge_origin_response_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_responses_total{origin=\"fast\",class=\"2xx\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_responses_total{origin=\"fast\",class=\"5xx\"}"
        ),
        0.0
    );
    assert_eq!(
        value(&m, "sextant_edge_origin_failures_total{origin=\"fast\"}"),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_count{origin=\"fast\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_bucket{le=\"+Inf\",origin=\"fast\"}"
        ),
        4.0
    );
    // The slow origin answers after 300 ms: above the 0.25 s bucket,
    // within the 0.5 s one.
    let m = text(&s);
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_bucket{le=\"0.25\",origin=\"slow\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_bucket{le=\"0.5\",origin=\"slow\"}"
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_sum{origin=\"slow\"}"
        ) >= 0.3
    );
    let m = text(&d);
    assert_eq!(
        value(&m, "sextant_edge_origin_failures_total{origin=\"dead\"}"),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "sextant_edge_origin_response_seconds_count{origin=\"dead\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn exchanges_cut_short_or_ended_by_trailers_are_logged_as_they_ended() {
    use crate::access::{AccessLog, Sink};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = Arc::new(AccessLog::open(Sink::File(path.clone())).expect("open"));
    let origin = Origin::start(|r| {
        if r.head.starts_with("POST /t") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n\
              5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"
                .to_vec()
        } else {
            ok("hello")
        }
    })
    .await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| {
        p.access_log = Some(log.clone());
    })
    .await;
    // On hyper's path (a chunked upload), an answer ending with trailers:
    // hyper drops the body after them without reading on.
    let (status, _, body) = once(
        e.addr,
        b"POST /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        status == 200 && body.windows(5).any(|w| w == b"hello"),
        "{status} {body:?}"
    );
    // A head whose body never comes: the client leaves.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"POST /never HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let lines = logged(&log, &path, 2).await;
    let by = |t: &str| {
        lines
            .iter()
            .find(|l| l["target"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} in {lines:#?}"))
    };
    let t = by("/t");
    assert_eq!(
        (&t["status"], &t["error"]),
        (&200.into(), &serde_json::Value::Null),
        "{t}"
    );
    let never = by("/never");
    assert_eq!(never["status"], 499, "{never}");
    assert_eq!(never["error"], "the client went away before its body came");

    // A WebSocket the shutdown grace cuts.
    let (ws, _) = websocket_origin().await;
    let w = edge_with(&[("w", ws, 1.0)], |p| {
        p.access_log = Some(log.clone());
        p.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    let (mut s, mut got) = open_websocket(w.addr).await;
    // What the tunnel carried before the cut is logged with it.
    s.write_all(b"abc").await.expect("write");
    while !got.ends_with(b"ABC") {
        let mut b = [0u8; 64];
        match s.read(&mut b).await {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            r => panic!("tunnel ended early: {r:?} after {got:?}"),
        }
    }
    w.stop.send(true).expect("stop");
    let lines = logged(&log, &path, 3).await;
    let chat = lines
        .iter()
        .find(|l| l["target"] == "/chat")
        .unwrap_or_else(|| panic!("no /chat in {lines:#?}"));
    assert_eq!(
        (&chat["status"], &chat["origin"], &chat["bytes"]),
        (&101.into(), &"w".into(), &got.len().into()),
        "{chat}"
    );
    assert_eq!(
        chat["error"],
        "the connection ended before the exchange did"
    );
}

#[tokio::test]
async fn a_body_that_does_not_come_in_time_gets_a_408_and_is_logged() {
    use crate::access::{AccessLog, Sink};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = Arc::new(AccessLog::open(Sink::File(path.clone())).expect("open"));
    let origin = Origin::start(|_| ok("hello")).await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| {
        p.access_log = Some(log.clone());
        p.request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .expect("write");
    let mut pending = Vec::new();
    let (status, head, _) = read_response(&mut s, &mut pending, false).await;
    assert_eq!(status, 408, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // The connection is closed after it.
    let mut b = [0u8; 16];
    assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
    let lines = logged(&log, &path, 1).await;
    assert_eq!(
        (&lines[0]["target"], &lines[0]["status"], &lines[0]["error"]),
        (
            &"/slow".into(),
            &408.into(),
            &"the request body did not arrive within 300ms".into()
        ),
        "{lines:#?}"
    );
    // The origin saw nothing of it.
    assert!(origin.seen().is_empty());
}

/// An edge serving `config` (origins may have several endpoints), whose
/// first ejections last `base_ejection`.
async fn edge_cfg(config: pb::NodeConfig, base_ejection: Duration) -> Edge {
    serve_config(
        Some(config),
        Endpoints::with_base_ejection(base_ejection),
        |_| {},
    )
    .await
}

/// A port bound but not listening, held while the socket lives: connects
/// to it are refused, and no other test running alongside can take it (a
/// port merely freed could be).
fn refused_port() -> (socket2::Socket, SocketAddr) {
    let held =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let a = held.local_addr().expect("addr").as_socket().expect("ip");
    (held, a)
}

/// A GET refused by one endpoint is retried on another origin when there
/// is one, else on another endpoint of the same origin. Both paths.
#[tokio::test]
async fn a_get_refused_by_one_endpoint_is_retried_on_the_origins_other_endpoint() {
    let (_held, dead) = refused_port();
    let alive = Origin::start(|_| ok("alive")).await;
    let e = edge_cfg(
        test_config(&[("only", &[dead, alive.addr], 1.0)]),
        BASE_EJECTION,
    )
    .await;
    let mut statuses = Vec::new();
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..], // hyper's path
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..],
    ] {
        statuses.push(once(e.addr, req).await.0);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200],
        "every GET should be answered by the healthy endpoint"
    );
}

/// An endpoint ejected for a run of 5xx (it accepts connections fine) is
/// probed only once its ejection has run out, and comes back on probation:
/// its next 500 ejects it again at once.
#[tokio::test]
async fn an_endpoint_ejected_for_5xx_stays_out_for_its_ejection_then_is_on_probation() {
    let failing =
        Origin::start(|_| b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
    let e = edge_cfg(
        test_config(&[("a", &[failing.addr], 1.0)]),
        Duration::from_millis(1500),
    )
    .await;
    let (_tx, rx) = watch::channel(false);
    tokio::spawn(crate::proxy::readmit(e.endpoints.clone(), rx));
    for _ in 0..EJECT_AFTER {
        once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    let ejected_at = std::time::Instant::now();
    assert_eq!(e.endpoints.ejected().len(), 1, "ejected after 5 x 500");
    // The probe (once a second) passes, but the ejection has not run out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        e.endpoints.ejected().len(),
        1,
        "re-admitted before its time"
    );
    while !e.endpoints.ejected().is_empty() {
        assert!(
            ejected_at.elapsed() < Duration::from_secs(5),
            "never re-admitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ejected_at.elapsed() >= Duration::from_millis(1500));
    // On probation: one more 500 ejects it again.
    assert_eq!(
        once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
        500
    );
    assert_eq!(e.endpoints.ejected().len(), 1);
    assert_eq!(e.stats.ejections.load(Ordering::Relaxed), 2);
}

/// With every endpoint ejected, requests still go to them (panic routing):
/// five 5xx in a row from the only origin (here it recovers at once) do
/// not turn into a 503 for every client.
#[tokio::test]
async fn with_every_endpoint_ejected_requests_still_reach_an_origin() {
    let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let m = n.clone();
    let origin = Origin::start(move |_| {
        if m.fetch_add(1, Ordering::Relaxed) < EJECT_AFTER {
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            ok("recovered")
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    for _ in 0..EJECT_AFTER {
        assert_eq!(
            once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
            500
        );
    }
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        status,
        200,
        "the only origin (now healthy) is not tried: {}",
        String::from_utf8_lossy(&body)
    );
    // It was sent there ejected; its answer brought it back at once.
    assert_eq!(e.stats.panic_picks.load(Ordering::Relaxed), 1);
    assert!(e.endpoints.ejected().is_empty());
    assert_eq!(
        once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
        200
    );
    assert_eq!(e.stats.panic_picks.load(Ordering::Relaxed), 1);
}

/// Response bytes (reported to the control plane as bytes/s, and
/// sextant_edge_response_bytes_total) on hyper's path are the body bytes
/// sent: none for a HEAD, whatever its Content-Length, and those of a
/// chunked answer.
#[tokio::test]
async fn response_bytes_count_the_body_bytes_sent_on_hypers_path() {
    let origin = Origin::start(|s| {
        if s.head.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
        }
    })
    .await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let (status, _, body) = once(e.addr, b"HEAD / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, body.len()), (200, 0));
    let (status, _, body) = once(e.addr, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(
        e.stats.response_bytes.load(Ordering::Relaxed),
        5,
        "body bytes sent: 0 for the HEAD, 5 for the chunked GET"
    );
}

/// An endpoint whose answers are all cut (the head comes, the body does
/// not) is ejected like one that fails to answer, on both paths: the
/// head's arrival is no success until the body has come whole.
#[tokio::test]
async fn an_endpoint_that_cuts_every_answer_is_ejected() {
    let addr = partial_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        false,
    )
    .await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..], // hyper's path
    ] {
        let e = edge(&[("a", addr, 1.0)]).await;
        for _ in 0..EJECT_AFTER {
            leave_after(e.addr, request, Duration::from_secs(10)).await;
        }
        assert_eq!(
            e.endpoints.ejected().len(),
            1,
            "{} answers cut in a row, endpoint still in service; ejections = {}",
            EJECT_AFTER,
            e.stats.ejections.load(Ordering::Relaxed)
        );
        assert_eq!(
            e.endpoints
                .origin_stats("a")
                .failures
                .load(Ordering::Relaxed),
            u64::from(EJECT_AFTER)
        );
    }
}

/// A cut answer is an upstream error on both paths.
#[tokio::test]
async fn a_cut_answer_is_an_upstream_error_on_both_paths() {
    let addr = partial_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        false,
    )
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    leave_after(
        e.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        e.stats.upstream_errors.load(Ordering::Relaxed),
        1,
        "fast path"
    );
    leave_after(
        e.addr,
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await; // hyper's path
    assert_eq!(
        e.stats.upstream_errors.load(Ordering::Relaxed),
        2,
        "hyper's path does not count the cut answer"
    );
}

/// The edge's own answers count the same body bytes on both paths.
#[tokio::test]
async fn local_answers_count_the_same_bytes_on_both_paths() {
    let (_held, dead) = refused_port();
    let e = edge(&[("a", dead, 1.0)]).await;
    assert_eq!(
        once(e.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
        502
    );
    let fast = e.stats.response_bytes.load(Ordering::Relaxed);
    assert_eq!(
        once(e.addr, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await.0,
        502
    );
    let hyper = e.stats.response_bytes.load(Ordering::Relaxed) - fast;
    assert!(fast > 0);
    assert_eq!(
        fast, hyper,
        "fast path counted {fast}, hyper's path {hyper}"
    );
}

/// An origin that answers every request with `head_and_part` and then
/// either closes (`hold` false) or keeps the connection open without
/// sending more (`hold` true).
async fn partial_origin(head_and_part: &'static [u8], hold: bool) -> SocketAddr {
    spawn_origin(move |mut s| async move {
        if read_head(&mut s, &mut Vec::new()).await.is_some() {
            let _ = s.write_all(head_and_part).await;
            if hold {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    })
    .await
}

/// A plain GET as the fast path serves it (HTTP/1.1) and as hyper does
/// (HTTP/1.0).
const GET_ON_BOTH_PATHS: [(&str, &[u8]); 2] = [
    ("fast", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("hyper", b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"),
];

/// Sends `raw` and reads until the edge closes, or gives up after `wait`
/// and leaves.
async fn leave_after(edge: SocketAddr, raw: &[u8], wait: Duration) {
    let mut c = TcpStream::connect(edge).await.expect("connect");
    c.write_all(raw).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, c.read_to_end(&mut got)).await;
}

/// An endpoint that sends a head and then stalls every body is ejected on
/// both paths: its body pauses past the upstream timeout (a failure), and
/// a client leaving is not the endpoint's success.
#[tokio::test]
async fn an_endpoint_stalling_every_body_is_ejected_on_both_paths() {
    let addr = partial_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        true,
    )
    .await;
    for (path, request) in GET_ON_BOTH_PATHS {
        let e = edge_with(&[("a", addr, 1.0)], |p| {
            p.upstream_timeout = Duration::from_millis(300);
        })
        .await;
        for _ in 0..EJECT_AFTER {
            leave_after(e.addr, request, Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            e.endpoints.ejected().len(),
            1,
            "{path} path: {EJECT_AFTER} bodies stalled in a row, endpoint still in service"
        );
    }
}

/// A 5xx whose body is then cut is one bad answer: one failure toward
/// EJECT_AFTER, not two.
#[tokio::test]
async fn a_cut_5xx_counts_once() {
    let addr = partial_origin(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\npartial",
        false,
    )
    .await;
    for (path, request) in GET_ON_BOTH_PATHS {
        let e = edge(&[("a", addr, 1.0)]).await;
        for _ in 0..EJECT_AFTER / 2 + 1 {
            leave_after(e.addr, request, Duration::from_secs(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            e.endpoints.ejected().len(),
            0,
            "{path} path: {} bad answers ejected an endpoint that needs {EJECT_AFTER}",
            EJECT_AFTER / 2 + 1
        );
    }
}

/// The edge's own answer to a HEAD has no body (a keep-alive client would
/// read it as the next response).
#[tokio::test]
async fn a_local_answer_to_a_head_has_no_body() {
    let (_held, dead) = refused_port();
    let e = edge(&[("a", dead, 1.0)]).await;
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut pending = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut pending, true).await;
    assert_eq!(status, 502);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = [0u8; 256];
    let extra = match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    pending.extend_from_slice(&b[..extra]);
    assert!(
        pending.is_empty(),
        "bytes after a HEAD's answer: {:?}",
        String::from_utf8_lossy(&pending)
    );
}

/// An origin that answers every request with `len` bytes of body at once
/// (what the socket buffers do not take waits for the reader).
async fn big_origin(len: usize) -> SocketAddr {
    spawn_origin(move |mut s| async move {
        let mut buf = Vec::new();
        while let Some(n) = read_head(&mut s, &mut buf).await {
            buf.drain(..n);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(&vec![b'x'; len]).await.is_err()
            {
                return;
            }
        }
    })
    .await
}

/// A client slow to read is not the origin's fault: the body waits only
/// because the client has not taken what came before. It neither times
/// out (the upstream timeout is for an origin that pauses) nor counts
/// against the endpoint, on both paths.
#[tokio::test]
async fn a_client_slow_to_read_is_not_blamed_on_the_origin() {
    // Far more than the loopback socket buffers hold, so that the body is
    // still coming from the origin when the client reads on.
    const LEN: usize = 32 << 20;
    let addr = big_origin(LEN).await;
    for (path, request) in [
        (
            "fast",
            &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        ),
        ("hyper", &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..]),
    ] {
        let e = edge_with(&[("a", addr, 1.0)], |p| {
            p.upstream_timeout = Duration::from_millis(200);
        })
        .await;
        // One failure short of an ejection: a failure ejects it, a success
        // clears the run.
        let st = e.endpoints.get(addr);
        for _ in 1..EJECT_AFTER {
            st.failure(crate::upstream::mono_ms());
        }
        let mut c = TcpStream::connect(e.addr).await.expect("connect");
        c.write_all(request).await.expect("write");
        let mut got = vec![0u8; 64 * 1024];
        let n = c.read(&mut got).await.expect("read");
        got.truncate(n);
        // The client stops reading for several upstream timeouts.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
            .await
            .expect("the rest in time")
            .expect("read");
        let head = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        assert!(got.starts_with(b"HTTP/1.1 200") || got.starts_with(b"HTTP/1.0 200"));
        assert_eq!(got.len() - head, LEN, "{path} path: the body was cut");
        assert!(
            !st.is_ejected(),
            "{path} path: the slow client counted against the origin"
        );
        // And a success was recorded (the run is cleared): one more
        // failure does not eject it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !st.failure(crate::upstream::mono_ms()),
            "{path} path: the whole answer was not counted a success"
        );
    }
}

/// An HTTP/2 connection (prior knowledge) to the edge at `addr`.
async fn h2(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// An extended CONNECT (RFC 8441) for `protocol` at `/chat`.
fn extended_connect(
    protocol: &'static str,
) -> hyper::Request<http_body_util::Empty<hyper::body::Bytes>> {
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("http://www.example.com/chat")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(http_body_util::Empty::new())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

#[tokio::test]
async fn a_websocket_over_http2_is_tunnelled_to_an_http1_origin() {
    let (addr, heads) = websocket_origin().await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut send = h2(e.addr).await;
    let resp = open_ws(&mut send).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h.get("x-sextant-origin").map(|v| v.as_bytes()),
        Some(&b"a"[..])
    );
    assert!(
        h.get("sec-websocket-accept").is_none() && h.get("upgrade").is_none(),
        "{h:?}"
    );
    let up = hyper::upgrade::on(resp).await.expect("upgraded");
    let mut ws = hyper_util::rt::TokioIo::new(up);
    assert_eq!(read_n(&mut ws, 5).await, b"hello");
    ws.write_all(b"abc").await.expect("write");
    assert_eq!(read_n(&mut ws, 3).await, b"ABC");
    assert_eq!(e.stats.websockets_open.load(Ordering::Relaxed), 1);
    // The client ends its side (END_STREAM): the origin sees the end, says
    // bye and closes, and the stream ends.
    ws.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut rest))
        .await
        .expect("the stream ends")
        .expect("cleanly");
    assert_eq!(rest, b"bye");
    eventually_zero(&e.stats.websockets_open).await;
    assert_eq!(e.stats.websockets.load(Ordering::Relaxed), 1);
    // The origin got an HTTP/1.1 handshake with a key of the edge's and
    // the client's end-to-end fields.
    let head = heads.lock().expect("lock")[0].to_ascii_lowercase();
    for want in [
        "get /chat http/1.1\r\n",
        "host: www.example.com\r\n",
        "connection: upgrade\r\n",
        "upgrade: websocket\r\n",
        "sec-websocket-version: 13\r\n",
        "sec-websocket-protocol: chat\r\n",
        "sec-websocket-key: ",
    ] {
        assert!(head.contains(want), "{want:?} in {head}");
    }
}

/// Reads exactly `n` bytes from `s` (within 10 s).
async fn read_n(s: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("in time")
        .expect("read");
    b
}

#[tokio::test]
async fn an_http2_websocket_the_origin_does_not_switch_for_gets_its_answer_or_a_502() {
    // A 101 with another handshake's accept key, a 200 (which would open
    // the tunnel were it passed on), and a 403 (passed on).
    let wrong = wrong_accept_origin().await;
    let ok_origin = Origin::start(|_| ok("no websocket here")).await;
    let forbidden =
        Origin::start(|_| b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno".to_vec()).await;
    for (addr, status, body) in [
        (
            wrong,
            502,
            "switched protocols without this handshake's websocket accept key",
        ),
        (
            ok_origin.addr,
            502,
            "answered a websocket handshake with 200 OK",
        ),
        (forbidden.addr, 403, "no"),
    ] {
        let e = edge(&[("a", addr, 1.0)]).await;
        let resp = h2_websocket(e.addr).await;
        assert_eq!(resp.status(), status, "{addr}");
        let got = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        let got = String::from_utf8_lossy(&got);
        assert!(got.contains(body), "{got:?} for {body:?}");
        assert_eq!(e.stats.websockets.load(Ordering::Relaxed), 0);
    }
}

#[tokio::test]
async fn a_connect_for_another_protocol_is_not_served() {
    let origin = Origin::start(|_| ok("x")).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let mut send = h2(e.addr).await;
    let resp = send
        .send_request(extended_connect("webtransport"))
        .await
        .expect("response");
    assert_eq!(resp.status(), 501);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"webtransport\""),
        "{body:?}"
    );
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn an_http2_websocket_whose_client_connection_breaks_resets_the_origin() {
    let (addr, mut heard) = reporting_origin(Duration::ZERO).await;
    let e = edge(&[("a", addr, 1.0)]).await;
    // The client reaches the edge through a relay whose connection to the
    // edge can be reset.
    let (relay, cut) = cuttable_relay(e.addr).await;
    let mut send = h2(relay).await;
    let resp = open_ws(&mut send).await;
    assert_eq!(resp.status(), 200);
    let mut ws = tunnel_of(resp).await;
    ws.write_all(b"some").await.expect("write");
    ws.flush().await.expect("flush");
    eventually_at(&e.stats.websockets_open, 1).await;
    let _ = cut.send(());
    assert_eq!(
        recv(&mut heard).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
    eventually_zero(&e.stats.websockets_open).await;
    drop(ws);
}

#[tokio::test]
async fn a_silent_http2_websocket_is_closed_after_its_idle_time() {
    let (addr, _) = websocket_origin().await;
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.websocket_idle = Duration::from_millis(300);
    })
    .await;
    let mut send = h2(e.addr).await;
    let started = std::time::Instant::now();
    let resp = open_ws(&mut send).await;
    let mut ws = tunnel_of(resp).await;
    assert_eq!(read_n(&mut ws, 5).await, b"hello");
    // Nothing more moves: the stream ends cleanly after the idle time.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut rest))
        .await
        .expect("the stream ends")
        .expect("cleanly");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    eventually_zero(&e.stats.websockets_open).await;
}

/// A relay on loopback to `to`, for one connection; when `cut` is sent,
/// its connection to `to` is reset.
async fn cuttable_relay(to: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut client, _)) = l.accept().await else {
            return;
        };
        let Ok(mut up) = TcpStream::connect(to).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut up) => {}
            _ = cut_rx => {
                let _ = socket2::SockRef::from(&up).set_linger(Some(Duration::ZERO));
            }
        }
    });
    (addr, cut)
}

#[tokio::test]
async fn an_http2_websocket_is_logged_when_its_tunnel_ends() {
    use crate::access::{AccessLog, Sink};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = Arc::new(AccessLog::open(Sink::File(path.clone())).expect("open"));
    let (ws, _) = websocket_origin().await;
    let e = edge_with(&[("w", ws, 1.0)], |p| {
        p.access_log = Some(log.clone());
        p.websocket_idle = Duration::from_millis(200);
    })
    .await;
    let mut send = h2(e.addr).await;
    let resp = open_ws(&mut send).await;
    assert_eq!(resp.status(), 200);
    let mut t = tunnel_of(resp).await;
    assert_eq!(read_n(&mut t, 5).await, b"hello");
    t.write_all(b"abc").await.expect("write");
    assert_eq!(read_n(&mut t, 3).await, b"ABC");
    // Not logged while the tunnel is open.
    log.flush();
    assert_eq!(log.lines(), 0);
    let got = logged(&log, &path, 1).await;
    let w = &got[0];
    assert_eq!(
        (&w["method"], &w["target"], &w["version"]),
        (&"CONNECT".into(), &"/chat".into(), &"HTTP/2".into())
    );
    assert_eq!((&w["status"], &w["origin"]), (&200.into(), &"w".into()));
    assert_eq!(w["error"], "websocket idle: closed");
    // "hello" and "ABC" went through the tunnel to the client.
    assert_eq!(w["bytes"], 8);
    assert!(w["duration_ms"].as_f64().is_some_and(|d| d >= 200.0), "{w}");
    assert_eq!(log.lines(), 1);
}

/// An extended CONNECT for a websocket at `uri`.
fn connect_at(uri: &str) -> hyper::Request<http_body_util::Empty<hyper::body::Bytes>> {
    let mut req = extended_connect("websocket");
    *req.uri_mut() = uri.parse().expect("uri");
    req
}

#[tokio::test]
async fn an_extended_connect_gets_the_authority_checks_a_get_gets() {
    let (addr, heads) = websocket_origin().await;
    let e = edge(&[("a", addr, 1.0)]).await;
    for uri in [
        "http://www.example.com,evil.example/chat",
        "http://user@www.example.com/chat",
    ] {
        let mut send = h2(e.addr).await;
        let get = hyper::Request::builder()
            .uri(uri)
            .body(http_body_util::Empty::new())
            .expect("request");
        let get = send.send_request(get).await.expect("response").status();
        let connect = send
            .send_request(connect_at(uri))
            .await
            .expect("response")
            .status();
        let seen = heads.lock().expect("lock").clone();
        assert_eq!(
            (get.as_u16(), connect.as_u16()),
            (400, 400),
            "{uri}: GET {get}, extended CONNECT {connect}; the origin got {seen:?}"
        );
    }
}

#[tokio::test]
async fn an_http2_websocket_client_that_cancels_its_stream_ends_its_tunnel_soon() {
    // The origin keeps its connection open once told of its end (as a
    // quiet origin that waits for the client would).
    let (addr, mut heard) = reporting_origin(Duration::from_secs(10)).await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let (_client, mut stream, _) = raw_h2_websocket(e.addr).await;
    stream
        .send_data(hyper::body::Bytes::from_static(b"some"), false)
        .expect("data");
    eventually_at(&e.stats.websockets_open, 1).await;
    // What a browser does to a WebSocket it drops: RST_STREAM(CANCEL),
    // which hyper reads as the stream's end. The origin sees its end, and
    // the tunnel, the origin silent, ends once HALF_CLOSED_IDLE has passed
    // (not the 300 s idle time).
    let cancelled = std::time::Instant::now();
    stream.send_reset(h2::Reason::CANCEL);
    assert_eq!(recv(&mut heard).await, Ok(()));
    while e.stats.websockets_open.load(Ordering::Relaxed) > 0 {
        assert!(
            cancelled.elapsed() < crate::tunnel::HALF_CLOSED_IDLE + Duration::from_secs(3),
            "still open {:?} after the cancel",
            cancelled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cancelled.elapsed() >= crate::tunnel::HALF_CLOSED_IDLE);
}

#[tokio::test]
async fn a_stopping_worker_opens_no_new_http2_websocket() {
    let (addr, heads) = websocket_origin().await;
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.shutdown_grace = Duration::from_secs(2);
    })
    .await;
    let mut send = h2(e.addr).await;
    // The connection is up (a CONNECT answered by the edge itself).
    let warm = send
        .send_request(extended_connect("webtransport"))
        .await
        .expect("response");
    assert_eq!(warm.status(), 501);
    // The handshake reaches the edge as it stops (as in
    // a_stopping_worker_opens_no_new_websocket).
    let resp = send.send_request(extended_connect("websocket"));
    e.stop.send(true).expect("worker listening");
    let resp = resp.await.expect("response");
    let status = resp.status();
    let opened = e.stats.websockets.load(Ordering::Relaxed);
    assert_eq!(
        (status.as_u16(), opened),
        (503, 0),
        "the origin got {} handshake(s)",
        heads.lock().expect("lock").len()
    );
}

#[tokio::test]
async fn http2_websocket_answers_the_edge_refuses_count_as_on_the_other_paths() {
    // An origin answering a 101 with another handshake's accept key.
    let wrong = wrong_accept_origin().await;
    let e = edge(&[("a", wrong, 1.0)]).await;
    let o = e.endpoints.origin_stats("a");
    let counts = || {
        (
            o.responses[1].load(Ordering::Relaxed),
            o.failures.load(Ordering::Relaxed),
        )
    };
    // On HTTP/1.1 a 101 without this handshake's key is a failure only.
    // (A key the origin's SWITCH does not answer.)
    let h1_handshake = HANDSHAKE.replace("dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==");
    let (status, _, _) = once(e.addr, h1_handshake.as_bytes()).await;
    assert_eq!(status, 502);
    let h1 = counts();
    let resp = h2_websocket(e.addr).await;
    assert_eq!(resp.status(), 502);
    let after = counts();
    let h2_delta = (after.0 - h1.0, after.1 - h1.1);
    // An origin answering a handshake with a 200 (any page does): a 502 to
    // the client, counted as an upstream error and as the origin's 2xx
    // answer, but not as the endpoint's failure, which any client could
    // otherwise cause.
    let ok_origin = Origin::start(|_| ok("no websocket here")).await;
    let e2 = edge(&[("b", ok_origin.addr, 1.0)]).await;
    for _ in 0..EJECT_AFTER {
        let resp = h2_websocket(e2.addr).await;
        assert_eq!(resp.status(), 502);
    }
    let ob = e2.endpoints.origin_stats("b");
    let b = (
        ob.responses[2].load(Ordering::Relaxed),
        ob.failures.load(Ordering::Relaxed),
        e2.stats.upstream_errors.load(Ordering::Relaxed),
        e2.stats.ejections.load(Ordering::Relaxed),
    );
    let n = u64::from(EJECT_AFTER);
    assert!(
        h1 == (0, 1) && h2_delta == (0, 1) && b == (n, 0, n, 0),
        "bad 101: HTTP/1.1 (1xx answers, failures) = {h1:?}, HTTP/2 adds {h2_delta:?}; \
         200 to a handshake x{EJECT_AFTER}: (2xx answers, failures, upstream_errors, ejections) = {b:?}"
    );
}

#[tokio::test]
async fn one_http2_websocket_whose_origin_stops_reading_holds_up_no_other_stream() {
    // "/stall": the origin switches, then never reads; else it echoes in
    // upper case.
    let addr = spawn_origin(|mut s| async move {
        let mut buf = Vec::new();
        let Some(end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if s.write_all(switch_for(&head).as_bytes()).await.is_err() {
            return;
        }
        if head.starts_with("GET /stall") {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        let mut b = vec![0u8; 65536];
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 || s.write_all(&b[..n].to_ascii_uppercase()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut send = h2(e.addr).await;
    let mut open = |path: &'static str| {
        let req = connect_at(&format!("http://www.example.com{path}"));
        let resp = send.send_request(req);
        async move {
            let resp = resp.await.expect("response");
            assert_eq!(resp.status(), 200);
            tunnel_of(resp).await
        }
    };
    let mut stalled = open("/stall").await;
    let mut other = open("/echo").await;
    // The other tunnel works.
    other.write_all(b"abc").await.expect("write");
    assert_eq!(read_n(&mut other, 3).await, b"ABC");
    // The client sends a lot on the stalled one (in the background; its
    // writes block once the windows are full).
    tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..1024 {
            if stalled.write_all(&chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    other.write_all(b"def").await.expect("write");
    let mut b = vec![0u8; 3];
    let got = tokio::time::timeout(Duration::from_secs(5), other.read_exact(&mut b)).await;
    assert!(
        matches!(got, Ok(Ok(3))) && b == b"DEF",
        "the other tunnel on the connection is held up: {got:?}"
    );
}

#[tokio::test]
async fn the_grace_cuts_an_open_http2_websocket_and_resets_its_origin() {
    let (addr, mut heard) = reporting_origin(Duration::ZERO).await;
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let mut send = h2(e.addr).await;
    let resp = open_ws(&mut send).await;
    let _ws = tunnel_of(resp).await;
    eventually_at(&e.stats.websockets_open, 1).await;
    e.stop.send(true).expect("worker listening");
    assert_eq!(
        recv(&mut heard).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
    eventually_zero(&e.stats.websockets_open).await;
    eventually_zero(&e.stats.active_connections).await;
}

#[tokio::test]
async fn http2_websockets_retry_a_refused_connect_and_time_out_once() {
    let (_held, dead) = refused_port();
    let (alive, _) = websocket_origin().await;
    let e = edge(&[("dead", dead, 0.5), ("alive", alive, 0.5)]).await;
    for _ in 0..20 {
        let resp = h2_websocket(e.addr).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("x-sextant-origin").map(|v| v.as_bytes()),
            Some(&b"alive"[..])
        );
    }
    assert_eq!(e.stats.upstream_errors.load(Ordering::Relaxed), 0);
    assert_eq!(e.stats.ejections.load(Ordering::Relaxed), 1);
    let silent = spawn_origin(|mut s| async move {
        let _ = read_head(&mut s, &mut Vec::new()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let e = edge_with(&[("a", silent, 1.0)], |p| {
        p.upstream_timeout = Duration::from_millis(200);
    })
    .await;
    let resp = h2_websocket(e.addr).await;
    assert_eq!(resp.status(), 504);
    let o = e.endpoints.origin_stats("a");
    assert_eq!(o.failures.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats.upstream_errors.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_http2_websocket_broken_by_its_origin_is_logged_as_broken() {
    use crate::access::{AccessLog, Sink};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = Arc::new(AccessLog::open(Sink::File(path.clone())).expect("open"));
    // The origin says hello, then resets the connection.
    let (addr, _) = switching_origin(
        b"hello",
        Box::new(|s, _| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            })
        }),
    )
    .await;
    let e = edge_with(&[("a", addr, 1.0)], |p| p.access_log = Some(log.clone())).await;
    let mut send = h2(e.addr).await;
    let resp = open_ws(&mut send).await;
    let mut ws = tunnel_of(resp).await;
    assert_eq!(read_n(&mut ws, 5).await, b"hello");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut rest)).await;
    eventually_zero(&e.stats.websockets_open).await;
    let lines = logged(&log, &path, 1).await;
    assert!(matches!(end, Ok(Ok(_))), "{end:?}");
    let w = &lines[0];
    assert_eq!((&w["status"], &w["bytes"]), (&200.into(), &5.into()), "{w}");
    assert!(
        w["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("websocket broken")),
        "{w}"
    );
}

#[tokio::test]
async fn an_http2_connection_carries_a_bounded_number_of_websockets() {
    use crate::proxy::MAX_TUNNELS_PER_CONNECTION;
    let (addr, heads) = websocket_origin().await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let mut send = h2(e.addr).await;
    let mut open = Vec::new();
    for _ in 0..MAX_TUNNELS_PER_CONNECTION {
        let resp = open_ws(&mut send).await;
        assert_eq!(resp.status(), 200);
        open.push(hyper::upgrade::on(resp).await.expect("upgraded"));
    }
    // One more on this connection is refused, before any origin is asked.
    let resp = open_ws(&mut send).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        heads.lock().expect("lock").len(),
        MAX_TUNNELS_PER_CONNECTION
    );
    // Another connection has room of its own, and so has this one once a
    // tunnel has ended.
    let resp = h2_websocket(e.addr).await;
    assert_eq!(resp.status(), 200);
    let mut one = hyper_util::rt::TokioIo::new(open.pop().expect("a tunnel"));
    one.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), one.read_to_end(&mut rest))
        .await
        .expect("the tunnel ends")
        .expect("cleanly");
    let mut status = 0;
    for _ in 0..100 {
        let resp = open_ws(&mut send).await;
        status = resp.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}
#[tokio::test]
async fn http2_websocket_handshakes_to_a_page_do_not_eject_its_origin() {
    // An ordinary origin: every request (a WebSocket handshake included)
    // gets a 200 page, as a site's "/" does.
    let page = Origin::start(|_| ok("a page")).await;
    let e = edge(&[("a", page.addr, 1.0)]).await;
    // On HTTP/1.1 the same handshakes get the page: no failure.
    for _ in 0..EJECT_AFTER {
        let (status, _, _) = once(e.addr, HANDSHAKE.as_bytes()).await;
        assert_eq!(status, 200);
    }
    let o = e.endpoints.origin_stats("a");
    let h1 = (
        o.failures.load(Ordering::Relaxed),
        e.stats.ejections.load(Ordering::Relaxed),
    );
    // Any client, over HTTP/2, a burst of EJECT_AFTER extended CONNECTs.
    let mut send = h2(e.addr).await;
    let mut statuses = Vec::new();
    for _ in 0..EJECT_AFTER {
        let resp = open_ws(&mut send).await;
        statuses.push(resp.status().as_u16());
    }
    let h2 = (
        o.failures.load(Ordering::Relaxed),
        e.stats.ejections.load(Ordering::Relaxed),
    );
    assert!(
        h1 == (0, 0) && h2 == (0, 0),
        "HTTP/2 statuses {statuses:?}; (origin failures, ejections): after HTTP/1.1 \
         handshakes {h1:?}, after HTTP/2 ones {h2:?}: a client ejected a healthy endpoint"
    );
}

#[tokio::test]
async fn uploads_whose_origin_is_slow_hold_up_no_websocket_on_the_same_connection() {
    use hyper::body::Bytes;
    // One origin address. Its first connection (the tunnel) is served:
    // switched, then echoed in upper case. After it, the origin accepts no
    // more (an overloaded origin, its listen backlog full): connections
    // hang in the SYN, and requests' bodies are not read meanwhile.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let listener = sock.listen(0).expect("listen");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let Some(end) = read_head(&mut s, &mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if s.write_all(switch_for(&head).as_bytes()).await.is_err() {
                return;
            }
            let mut b = vec![0u8; 65536];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 || s.write_all(&b[..n].to_ascii_uppercase()).await.is_err() {
                    return;
                }
            }
        });
        // Never accept again, keep the listener.
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(listener);
    });
    let e = edge_with(&[("a", addr, 1.0)], |p| {
        p.connect_timeout = Duration::from_secs(60);
        p.upstream_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut client, mut ws_tx, mut ws_rx) = raw_h2_websocket(e.addr).await;
    async fn echo(
        tx: &mut h2::SendStream<Bytes>,
        rx: &mut h2::RecvStream,
        what: &'static [u8],
    ) -> Result<Vec<u8>, String> {
        tx.send_data(Bytes::from_static(what), false)
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        while got.len() < what.len() {
            match tokio::time::timeout(Duration::from_secs(5), rx.data()).await {
                Ok(Some(Ok(d))) => {
                    let _ = rx.flow_control().release_capacity(d.len());
                    got.extend_from_slice(&d);
                }
                other => return Err(format!("{other:?} after {got:?}")),
            }
        }
        Ok(got)
    }
    assert_eq!(
        echo(&mut ws_tx, &mut ws_rx, b"abc").await,
        Ok(b"ABC".to_vec())
    );
    // As many uploads of 512 KiB as the connection has streams left, to the
    // same origin, which cannot take them yet.
    let chunk = Bytes::from(vec![b'x'; 512 * 1024]);
    let mut uploads = Vec::new();
    for _ in 1..crate::proxy::MAX_STREAMS {
        client = client.ready().await.expect("ready");
        let req = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri("http://www.example.com/upload")
            .body(())
            .expect("request");
        let (resp, mut body) = client.send_request(req, false).expect("send");
        body.send_data(chunk.clone(), false).expect("data");
        uploads.push((resp, body));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = e.stats.websockets_open.load(Ordering::Relaxed);
    let got = echo(&mut ws_tx, &mut ws_rx, b"def").await;
    assert_eq!(
        got,
        Ok(b"DEF".to_vec()),
        "the websocket ({open} open) is held up by uploads on its connection"
    );
}

#[tokio::test]
async fn one_http2_connection_holds_at_most_its_streams_in_origin_connections() {
    let origin = Origin::start(|_| b"HANG".to_vec()).await;
    let e = edge(&[("a", origin.addr, 1.0)]).await;
    let send = h2(e.addr).await;
    for _ in 0..100 {
        let req = hyper::Request::builder()
            .uri("http://www.example.com/slow")
            .body(http_body_util::Empty::new())
            .expect("request");
        let mut send = send.clone();
        tokio::spawn(async move {
            let _ = send.send_request(req).await;
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let conns: std::collections::HashSet<usize> = origin.seen().iter().map(|s| s.conn).collect();
    // At most one per stream in flight.
    assert_eq!(conns.len(), crate::proxy::MAX_STREAMS as usize);
}

#[tokio::test]
async fn a_receive_only_http1_websocket_client_that_half_closes_gets_its_feed() {
    // A feed: the origin sends a tick after 6 s (more than the HTTP/2
    // half-closed limit, well under the 300 s idle time), whatever the
    // client does.
    let (addr, _) = switching_origin(
        b"",
        Box::new(|mut s, _| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(6)).await;
                if s.write_all(b"tick").await.is_ok() {
                    let _ = s.shutdown().await;
                }
            })
        }),
    )
    .await;
    let e = edge(&[("a", addr, 1.0)]).await;
    let (mut s, pending) = open_websocket(e.addr).await;
    assert!(pending.is_empty());
    // The client has nothing to say: it half-closes.
    s.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "tick",
        "{r:?}: the feed was cut"
    );
}

/// A WebSocket (an extended CONNECT) on a new HTTP/2 connection to `addr`
/// made with h2 itself, which can reset a stream (hyper's client cannot):
/// the connection, and the stream's two halves.
async fn raw_h2_websocket(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<hyper::body::Bytes>,
    h2::SendStream<hyper::body::Bytes>,
    h2::RecvStream,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    for _ in 0..100 {
        if client.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        client = client.ready().await.expect("ready");
    }
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("http://www.example.com/chat")
        .header("sec-websocket-version", "13")
        .body(())
        .expect("request");
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, tx) = client.send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    (client, tx, resp.into_body())
}

/// An origin that answers every handshake with [`SWITCH`], whose accept
/// key answers only [`HANDSHAKE`]'s key, never the edge's own.
async fn wrong_accept_origin() -> SocketAddr {
    spawn_origin(|mut s| async move {
        let _ = read_head(&mut s, &mut Vec::new()).await;
        let _ = s.write_all(SWITCH.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await
}

/// The edge's answer to a WebSocket's extended CONNECT, on a new HTTP/2
/// connection to `addr`.
async fn h2_websocket(addr: SocketAddr) -> hyper::Response<hyper::body::Incoming> {
    open_ws(&mut h2(addr).await).await
}

/// The tunnel a 200 to an extended CONNECT opened.
async fn tunnel_of(
    resp: hyper::Response<hyper::body::Incoming>,
) -> hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"))
}

/// Waits (5 s at most) for `s` to be closed by the edge; how long it took.
async fn closed_within(s: &mut TcpStream) -> Duration {
    let started = std::time::Instant::now();
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => return started.elapsed(),
            Err(_) => panic!("still open after 5 s"),
        }
    }
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_client_idle_time() {
    let origin = Origin::start(|_| ok("x")).await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| {
        p.client_idle = Duration::from_millis(300);
    })
    .await;
    let mut send = h2(e.addr).await;
    let get = || {
        hyper::Request::get("http://www.example.com/")
            .body(http_body_util::Empty::new())
            .expect("request")
    };
    // Requests at shorter intervals keep it open.
    for _ in 0..4 {
        let resp = send.send_request(get()).await.expect("response");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Then, idle, it is closed (a GOAWAY, then the end).
    let started = std::time::Instant::now();
    for _ in 0..100 {
        if send.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        send.is_closed(),
        "open {:?} after its last answer",
        started.elapsed()
    );
    eventually_zero(&e.stats.active_connections).await;
}

#[tokio::test]
async fn an_http2_connection_with_an_answer_or_a_tunnel_under_way_is_not_idle() {
    let slow = Origin::start(|_| [&b"SLOW"[..], &ok("slow")].concat()).await;
    let e = edge_with(&[("a", slow.addr, 1.0)], |p| {
        p.client_idle = Duration::from_millis(100);
    })
    .await;
    // An answer that takes 300 ms, three times the idle time.
    let mut send = h2(e.addr).await;
    let resp = send
        .send_request(
            hyper::Request::get("http://www.example.com/")
                .body(http_body_util::Empty::new())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    // A tunnel with nothing to say for 500 ms.
    let (ws, _) = websocket_origin().await;
    let e = edge_with(&[("w", ws, 1.0)], |p| {
        p.client_idle = Duration::from_millis(100);
    })
    .await;
    let mut send = h2(e.addr).await;
    let resp = open_ws(&mut send).await;
    let mut t = tunnel_of(resp).await;
    assert_eq!(read_n(&mut t, 5).await, b"hello");
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.write_all(b"abc").await.expect("write");
    assert_eq!(read_n(&mut t, 3).await, b"ABC");
    assert!(!send.is_closed());
    // Once it has ended, the connection is idle.
    t.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest)).await;
    eventually_zero(&e.stats.active_connections).await;
}

#[tokio::test]
async fn a_connection_served_by_hyper_over_http1_gets_a_head_in_time_or_is_closed() {
    let origin = Origin::start(|r| ok(&format!("{} bytes", r.body.len()))).await;
    let e = edge_with(&[("a", origin.addr, 1.0)], |p| {
        p.request_timeout = Duration::from_millis(300);
    })
    .await;
    // A chunked upload: the connection goes on in hyper.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let (status, _, body) = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!((status, body.as_slice()), (200, &b"13 bytes"[..]));
    assert_eq!(e.stats.handoffs.load(Ordering::Relaxed), 1);
    // Half of the next head, and no more: closed after the request timeout.
    s.write_all(b"GET /y HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let took = closed_within(&mut s).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_on_a_connection_hyper_serves_is_cut_after_the_write_timeout() {
    const LEN: usize = 32 << 20;
    let origin = big_origin(LEN).await;
    let e = edge_with(&[("a", origin, 1.0)], |p| {
        p.client_write_timeout = Duration::from_millis(300);
    })
    .await;
    // HTTP/1.0: hyper serves it. The client then reads nothing.
    let mut s = TcpStream::connect(e.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    eventually_at(&e.stats.active_connections, 1).await;
    while e.stats.active_connections.load(Ordering::Relaxed) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a client that reads nothing still holds its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(e.stats.handoffs.load(Ordering::Relaxed), 1);
    // What it reads now is short of the answer, and ends.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(got.len() < LEN, "{}", got.len());
}

/// The edge's answer to a WebSocket's extended CONNECT on the HTTP/2
/// connection `send`.
async fn open_ws(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
) -> hyper::Response<hyper::body::Incoming> {
    send.send_request(extended_connect("websocket"))
        .await
        .expect("response")
}
