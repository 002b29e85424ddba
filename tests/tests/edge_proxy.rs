//! End to end: config distribution to real edge proxies forwarding real
//! HTTP to real origins; static stability; NACKs; hostile subscribers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sextant_proto::v1 as pb;
use sextant_tests::origin::Origin;
use sextant_tests::subscriber::{ack, hello, hello_holding, subscribe, whole};
use sextant_tests::{eventually, split, ControlPlane, Ctl, EdgeProxy};

use sextant_tests::fleets::{two_edges_three_origins as fleet, SITE1, SITE2};

fn shares(counts: &BTreeMap<String, usize>) -> BTreeMap<String, f64> {
    let n: usize = counts.values().sum();
    counts
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / n as f64))
        .collect()
}

fn check_split(counts: &BTreeMap<String, usize>, expected: &[(&str, f64)]) -> Result<()> {
    let s = shares(counts);
    for (name, want) in expected {
        let got = s.get(*name).copied().unwrap_or(0.0);
        ensure!(
            (got - want).abs() <= 0.05,
            "{name}: {got:.3} of requests, expected {want:.3} ± 0.05 (split {counts:?})"
        );
    }
    ensure!(
        s.len() == expected.len(),
        "unexpected origins in {counts:?}"
    );
    Ok(())
}

fn applied(ctl: &Ctl, node: &str) -> Result<u64> {
    let status = ctl.json(["status"])?;
    let subs = status["subscribers"].as_array().context("subscribers")?;
    Ok(subs
        .iter()
        .find(|s| s["node_id"] == node)
        .and_then(|s| s["version_applied"].as_u64())
        .unwrap_or(0))
}

fn version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("routing_version")
}

/// Drains half of origin o2's capacity: o1, o2 and o3 then get a third
/// each.
fn drain_half_of_o2(ctl: &Ctl) -> Result<()> {
    ctl.run([
        "drain",
        "region/r2/origin/o2",
        "--fraction",
        "0.5",
        "--reason",
        "o2 maintenance",
    ])?
    .ok()?;
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

#[test]
fn weights_reach_the_edges_and_survive_the_control_plane() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let origins = [
        Origin::start("o1")?,
        Origin::start("o2")?,
        Origin::start("o3")?,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let fleet_file = write(dir.path(), "fleet.toml", &fleet(&refs, None))?;
    let cp = ControlPlane::start(&dir.path().join("cp"), Some(&fleet_file))?;
    let ctl = cp.ctl();
    let e1 = EdgeProxy::start(&cp.url(), "e1", SITE1, &dir.path().join("e1"))?;
    let e2 = EdgeProxy::start(&cp.url(), "e2", SITE2, &dir.path().join("e2"))?;
    let v1 = version(&ctl)?;
    for e in [&e1, &e2] {
        eventually(
            Duration::from_secs(10),
            "edges to apply the first version",
            || (e.config_version().ok()? == v1).then_some(()),
        )?;
    }
    check_split(
        &split(e1.process.addr, 2000)?,
        &[("o1", 0.25), ("o2", 0.5), ("o3", 0.25)],
    )?;

    // A weight change: half of o2's capacity drained → a third each.
    drain_half_of_o2(&ctl)?;
    let v2 = version(&ctl)?;
    ensure!(v2 == v1 + 1, "version {v2}");
    for (e, node) in [(&e1, "e1"), (&e2, "e2")] {
        eventually(
            Duration::from_secs(10),
            "edges to ACK the new version",
            || (applied(&ctl, node).ok()? == v2 && e.config_version().ok()? == v2).then_some(()),
        )?;
    }
    let third = 1.0 / 3.0;
    check_split(
        &split(e2.process.addr, 2000)?,
        &[("o1", third), ("o2", third), ("o3", third)],
    )?;

    // The edges reported their load.
    let edges = eventually(Duration::from_secs(5), "a load report from e2", || {
        let edges = ctl.json(["get", "edges"]).ok()?;
        let e2 = edges.as_array()?.iter().find(|e| e["id"] == "e2")?.clone();
        (e2["reported_config_version"].as_u64()? == v2).then_some(e2)
    })?;
    ensure!(edges["last_report"].is_string(), "{edges}");

    // The control plane dies: the edges keep the same split.
    cp.process.kill()?;
    check_split(
        &split(e1.process.addr, 2000)?,
        &[("o1", third), ("o2", third), ("o3", third)],
    )?;

    // An edge restarted while the control plane is down serves its
    // persisted config.
    e2.process.kill()?;
    let e2 = EdgeProxy::start("http://127.0.0.1:1", "e2", SITE2, &dir.path().join("e2"))?;
    ensure!(
        e2.config_version()? == v2,
        "restarted edge holds {}",
        e2.config_version()?
    );
    check_split(
        &split(e2.process.addr, 2000)?,
        &[("o1", third), ("o2", third), ("o3", third)],
    )?;
    let (_, metrics) = sextant_tests::http_get(e2.admin, "/metrics")?;
    ensure!(
        metrics.contains("sextant_edge_config_from_disk 1"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_config_the_edge_cannot_apply_is_nacked_and_the_old_one_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let origins = [
        Origin::start("o1")?,
        Origin::start("o2")?,
        Origin::start("o3")?,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let good = write(dir.path(), "good.toml", &fleet(&refs, None))?;
    let cp = ControlPlane::start(&dir.path().join("cp"), Some(&good))?;
    let ctl = cp.ctl();
    let e1 = EdgeProxy::start(&cp.url(), "e1", SITE1, &dir.path().join("e1"))?;
    let v1 = version(&ctl)?;
    eventually(Duration::from_secs(10), "first version applied", || {
        (applied(&ctl, "e1").ok()? == v1).then_some(())
    })?;
    // o3 moves outside the edge's allowed upstream ranges.
    let bad = write(dir.path(), "bad.toml", &fleet(&refs, Some("192.0.2.10:80")))?;
    ctl.run(["apply".as_ref(), "-f".as_ref(), bad.as_os_str()])?
        .ok()?;
    let v2 = version(&ctl)?;
    let nack = eventually(Duration::from_secs(10), "the NACK in status", || {
        let status = ctl.json(["status"]).ok()?;
        let s = status["subscribers"]
            .as_array()?
            .iter()
            .find(|s| s["node_id"] == "e1")?
            .clone();
        (s["last_nack_version"].as_u64()? == v2).then_some(s)
    })?;
    let reason = nack["last_nack_reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("192.0.2.10:80 is outside the allowed upstream ranges"),
        "{nack}"
    );
    ensure!(nack["version_applied"] == v1, "{nack}");
    ensure!(
        e1.config_version()? == v1,
        "edge switched to the refused version"
    );
    check_split(
        &split(e1.process.addr, 2000)?,
        &[("o1", 0.25), ("o2", 0.5), ("o3", 0.25)],
    )?;
    let human = ctl.run(["status"])?.ok()?.stdout;
    ensure!(
        human.contains("outside the allowed upstream ranges"),
        "{human}"
    );
    // The stored routing is not harmed: re-applying the good fleet heals it.
    ctl.run(["apply".as_ref(), "-f".as_ref(), good.as_os_str()])?
        .ok()?;
    let v3 = version(&ctl)?;
    eventually(Duration::from_secs(10), "the good version applied", || {
        (applied(&ctl, "e1").ok()? == v3).then_some(())
    })?;
    Ok(())
}

#[tokio::test]
async fn hostile_subscribers_are_cut_off_and_harm_no_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start_with(
        dir.path(),
        Some(&sextant_tests::example_fleet()),
        &["--stale-after-seconds", "1"],
    )?;
    let url = cp.url();
    // A well-behaved DNS subscriber.
    let (good_tx, mut good) = subscribe(&url, hello("dns-1", pb::NodeKind::Dns, 0)).await?;
    let update = whole(&mut good).await?;
    ensure!(update.full && update.chunk_index == 0, "{update:?}");
    good_tx.send(ack(&update)).await?;

    // An ACK before any hello.
    let ack = pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Ack(pb::Ack {
            version: 99,
            nonce: "x".into(),
        })),
    };
    let (_tx, mut s) = subscribe(&url, ack.clone()).await?;
    let err = s
        .message()
        .await
        .err()
        .context("no error for an ack before hello")?;
    ensure!(
        err.code() == tonic::Code::InvalidArgument && err.message().contains("hello"),
        "{err:?}"
    );
    // An ACK for a version never sent.
    let (tx, mut s) = subscribe(&url, hello("dns-evil", pb::NodeKind::Dns, 0)).await?;
    while !s.message().await?.context("chunk")?.last {}
    tx.send(ack).await?;
    let err = s
        .message()
        .await
        .err()
        .context("no error for a bogus ack")?;
    ensure!(err.message().contains("never sent"), "{err:?}");
    // A proxy naming an edge that does not exist, and an empty message.
    let (_tx, mut s) = subscribe(&url, hello("no-such-edge", pb::NodeKind::Proxy, 0)).await?;
    let err = s.message().await.err().context("unknown edge accepted")?;
    ensure!(
        err.message().contains("is not an edge of the fleet"),
        "{err:?}"
    );
    let (_tx, mut s) = subscribe(&url, pb::SubscribeRequest { message: None }).await?;
    ensure!(s.message().await.is_err(), "empty first message accepted");
    // A digest far longer than any this server makes (it would be logged).
    let long = "f".repeat(100_000);
    let (_tx, mut s) = subscribe(&url, hello_holding("dns-2", pb::NodeKind::Dns, 1, &long)).await?;
    let err = s.message().await.err().context("a huge digest accepted")?;
    ensure!(
        err.code() == tonic::Code::InvalidArgument
            && err
                .message()
                .contains("digest_held is 100000 bytes (at most 64)"),
        "{err:?}"
    );

    // The good subscriber still gets the next version.
    let ctl = cp.ctl();
    ctl.run(["drain", "provider/cdn-b", "--reason", "test"])?
        .ok()?;
    let next = good.message().await?.context("stream ended")?;
    ensure!(!next.full && next.version == update.version + 1, "{next:?}");
    ensure!(next.base_version == update.version, "{next:?}");
    // dns-evil's and the good one's status are visible; a subscriber that
    // never ACKs the new version turns stale.
    let stale = eventually(Duration::from_secs(10), "dns-1 flagged stale", || {
        let status = ctl.json(["status"]).ok()?;
        let s = status["subscribers"]
            .as_array()?
            .iter()
            .find(|s| s["node_id"] == "dns-1")?
            .clone();
        (s["stale"] == true).then_some(status)
    })?;
    ensure!(
        stale["alarms"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains("old config")))),
        "{stale}"
    );
    Ok(())
}

/// Origins o1–o3, a control plane with their fleet, and edge e1 (started
/// with `extra`) serving the first version. Keep the origins and the
/// control plane as long as the edge is used.
fn one_edge(dir: &Path, extra: &[&str]) -> Result<(Vec<Origin>, ControlPlane, EdgeProxy)> {
    let (origins, fleet_file) = sextant_tests::fleets::origins_and_fleet(dir)?;
    let cp = ControlPlane::start(&dir.join("cp"), Some(&fleet_file))?;
    let e1 = EdgeProxy::start_with(&cp.url(), "e1", SITE1, &dir.join("e1"), extra)?;
    let v1 = version(&cp.ctl())?;
    eventually(Duration::from_secs(10), "the edge to apply", || {
        (e1.config_version().ok()? == v1).then_some(())
    })?;
    Ok((origins, cp, e1))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket to `www.example.com` through the edge at `edge`.
async fn open_websocket(edge: std::net::SocketAddr) -> Result<Ws> {
    let tcp = tokio::net::TcpStream::connect(edge).await?;
    let (ws, resp) = tokio_tungstenite::client_async("ws://www.example.com/chat", tcp).await?;
    ensure!(resp.status() == 101, "status {}", resp.status());
    Ok(ws)
}

/// A WebSocket over HTTP/2 (RFC 8441): a stream of an HTTP/2 connection.
type H2Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// An HTTP/2 connection (prior knowledge) to the edge at `edge`.
async fn h2_connection(
    edge: std::net::SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(edge).await?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A WebSocket to `www.example.com` on a new stream of `h2` (an extended
/// CONNECT); returns it and the origin the edge named.
async fn open_h2_websocket(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
) -> Result<(H2Ws, String)> {
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("http://www.example.com/chat")
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = h2.send_request(req).await?;
    ensure!(resp.status() == 200, "status {}", resp.status());
    let origin = resp
        .headers()
        .get("x-sextant-origin")
        .context("x-sextant-origin")?
        .to_str()?
        .to_owned();
    let up = hyper::upgrade::on(resp).await?;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(up),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    Ok((ws, origin))
}

/// Sends `text` and returns the answer, split into (origin, echoed text).
async fn ask<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    text: &str,
) -> Result<(String, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await?;
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no answer within 10 s")?
        .context("closed")??;
    let reply = m.into_text()?;
    let (origin, echoed) = reply.split_once(": ").context("an answer NAME: TEXT")?;
    Ok((origin.to_owned(), echoed.to_owned()))
}

/// Closes `ws` with the close handshake, to the end of the stream.
async fn close<S>(mut ws: tokio_tungstenite::WebSocketStream<S>) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    ws.close(None).await?;
    while tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("close not answered within 10 s")?
        .is_some()
    {}
    Ok(())
}

#[test]
fn websockets_reach_the_origins_and_outlive_a_config_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, cp, e1) = one_edge(dir.path(), &[])?;
    let ctl = cp.ctl();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let edge = e1.process.addr;

    // Handshakes go by the weights (1/4, 1/2, 1/4): of 60, every origin
    // gets some (all but certain), and each tunnel carries its echo.
    let by_origin = rt.block_on(async {
        let mut by_origin = BTreeMap::<String, usize>::new();
        for i in 0..60 {
            let mut ws = open_websocket(edge).await?;
            let (origin, echoed) = ask(&mut ws, &format!("hi {i}")).await?;
            ensure!(echoed == format!("hi {i}"), "echoed {echoed:?}");
            *by_origin.entry(origin).or_default() += 1;
            close(ws).await?;
        }
        Ok::<_, anyhow::Error>(by_origin)
    })?;
    ensure!(
        by_origin.keys().eq(["o1", "o2", "o3"].iter()),
        "{by_origin:?}"
    );

    let open_now = |n: f64| {
        eventually(Duration::from_secs(5), &format!("{n} tunnels open"), || {
            (e1.metric("sextant_edge_websockets_open ").ok()? == Some(n)).then_some(())
        })
    };
    open_now(0.0)?;

    // One stays open while the weights change, with the same origin.
    let mut ws = rt.block_on(open_websocket(edge))?;
    let (origin, _) = rt.block_on(ask(&mut ws, "before"))?;
    open_now(1.0)?;
    drain_half_of_o2(&ctl)?;
    let v2 = version(&ctl)?;
    eventually(Duration::from_secs(10), "the edge to apply v2", || {
        (e1.config_version().ok()? == v2).then_some(())
    })?;
    let (after, echoed) = rt.block_on(ask(&mut ws, "after"))?;
    ensure!(
        (after.as_str(), echoed.as_str()) == (origin.as_str(), "after"),
        "{after}: {echoed} (was {origin})"
    );
    rt.block_on(close(ws))?;
    open_now(0.0)?;
    ensure!(e1.metric("sextant_edge_websockets_total ")? == Some(61.0));
    Ok(())
}

#[test]
fn websockets_over_http2_share_connections_up_to_a_limit_and_reach_the_origins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, _cp, e1) = one_edge(dir.path(), &[])?;
    let edge = e1.process.addr;
    // The connection's task runs between the blocks below too (the end of
    // each stream goes out after its WebSocket is dropped).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // 64 WebSockets, 32 (the most one connection may carry) on each of two
    // HTTP/2 connections, open at once; by the weights (1/4, 1/2, 1/4)
    // every origin gets some (all but certain), and each tunnel carries its
    // own echo from the origin the edge named. A 33rd on a connection is
    // refused.
    let (open, by_origin) = rt.block_on(async {
        let mut open = Vec::new();
        let mut by_origin = BTreeMap::<String, usize>::new();
        for _ in 0..2 {
            let mut h2 = h2_connection(edge).await?;
            for _ in 0..32 {
                let (ws, origin) = open_h2_websocket(&mut h2).await?;
                *by_origin.entry(origin.clone()).or_default() += 1;
                open.push((ws, origin));
            }
            let refused = open_h2_websocket(&mut h2).await;
            ensure!(
                refused
                    .as_ref()
                    .is_err_and(|e| e.to_string() == "status 503 Service Unavailable"),
                "a 33rd: {:?}",
                refused.map(|(_, o)| o)
            );
        }
        for (i, (ws, origin)) in open.iter_mut().enumerate() {
            let (from, echoed) = ask(ws, &format!("hi {i}")).await?;
            ensure!(
                (from.as_str(), echoed) == (origin.as_str(), format!("hi {i}")),
                "{from}: stream {i} to {origin}"
            );
        }
        Ok::<_, anyhow::Error>((open, by_origin))
    })?;
    ensure!(
        by_origin.keys().eq(["o1", "o2", "o3"].iter()),
        "{by_origin:?}"
    );
    ensure!(e1.metric("sextant_edge_websockets_open ")? == Some(64.0));
    rt.block_on(async {
        for (ws, _) in open {
            close(ws).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    eventually(Duration::from_secs(5), "every tunnel closed", || {
        (e1.metric("sextant_edge_websockets_open ").ok()? == Some(0.0)).then_some(())
    })?;
    ensure!(e1.metric("sextant_edge_websockets_total ")? == Some(64.0));
    Ok(())
}

#[test]
fn a_stopped_edge_finishes_the_requests_under_way() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (origins, _cp, e1) = one_edge(dir.path(), &[])?;
    let edge = e1.process.addr;
    let requests = || -> u64 {
        origins
            .iter()
            .map(|o| o.requests.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    let before = requests();
    let slow = std::thread::spawn(move || sextant_tests::http_get(edge, "/slow"));
    eventually(
        Duration::from_secs(5),
        "the slow request to reach an origin",
        || (requests() > before).then_some(()),
    )?;
    // SIGTERM while the origin takes its time: the answer still comes (with
    // --shutdown-grace 0 it does not), and the edge exits once it has.
    let started = std::time::Instant::now();
    let status = e1.process.stop()?;
    ensure!(status.success(), "edge exited with {status}");
    let (code, body) = slow
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    ensure!(code == 200 && body.starts_with('o'), "{code} {body}");
    ensure!(
        started.elapsed() < Duration::from_secs(9),
        "the edge took {:?} to stop",
        started.elapsed()
    );
    ensure!(
        std::net::TcpStream::connect(edge).is_err(),
        "a stopped edge accepts nothing"
    );
    Ok(())
}

#[test]
fn an_edge_at_its_connection_limit_serves_the_next_client_when_one_leaves() -> Result<()> {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir()?;
    let limit = ["--threads", "1", "--max-connections", "1"];
    let (_origins, _cp, e1) = one_edge(dir.path(), &limit)?;
    let get = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
    let answered = |s: &mut std::net::TcpStream| -> Result<bool> {
        let mut b = [0u8; 12];
        match s.read(&mut b) {
            Ok(n) => Ok(b[..n].starts_with(b"HTTP/1.1 200")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let mut first = std::net::TcpStream::connect(e1.process.addr)?;
    first.set_read_timeout(Some(Duration::from_secs(10)))?;
    first.write_all(get)?;
    ensure!(answered(&mut first)?, "the first client is served");
    let mut second = std::net::TcpStream::connect(e1.process.addr)?;
    second.set_read_timeout(Some(Duration::from_millis(500)))?;
    second.write_all(get)?;
    ensure!(!answered(&mut second)?, "served past the limit");
    drop(first);
    second.set_read_timeout(Some(Duration::from_secs(10)))?;
    ensure!(answered(&mut second)?, "the second client is served");
    ensure!(e1.metric("sextant_edge_connection_limit_hits_total ")? >= Some(1.0));
    Ok(())
}

#[test]
fn a_second_stop_signal_does_not_wait_for_the_grace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, _cp, e1) = one_edge(dir.path(), &["--shutdown-grace", "60"])?;
    // An open WebSocket would hold a stopping edge for the whole grace.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut ws = rt.block_on(open_websocket(e1.process.addr))?;
    rt.block_on(ask(&mut ws, "hello"))?;
    e1.process.signal("TERM")?;
    std::thread::sleep(Duration::from_millis(300));
    // Process::stop sends the second SIGTERM and waits at most 10 s.
    let status = e1.process.stop()?;
    ensure!(!status.success(), "a forced exit says so: {status}");
    Ok(())
}

/// The JSON lines of an access log, once there are at least `want`.
fn access_lines(path: &Path, want: usize) -> Result<Vec<serde_json::Value>> {
    eventually(
        Duration::from_secs(10),
        &format!("{want} lines in {}", path.display()),
        || {
            let text = std::fs::read_to_string(path).ok()?;
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .ok()?;
            (lines.len() >= want).then_some(lines)
        },
    )
}

#[test]
fn the_access_log_has_a_line_per_exchange_and_follows_a_rotation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("access.log");
    let arg = path.to_str().context("a UTF-8 path")?;
    let (_origins, _cp, e1) = one_edge(dir.path(), &["--access-log", arg])?;
    let edge = e1.process.addr;
    // Each answer is logged with the origin that gave it.
    let counts = split(edge, 30)?;
    let lines = access_lines(&path, 30)?;
    ensure!(lines.len() == 30, "{} lines for 30 requests", lines.len());
    let mut by_origin = BTreeMap::new();
    for l in &lines {
        ensure!(
            l["method"] == "GET" && l["target"] == "/" && l["status"] == 200,
            "{l}"
        );
        let origin = l["origin"].as_str().context("an origin")?;
        *by_origin.entry(origin.to_owned()).or_insert(0) += 1;
    }
    ensure!(
        by_origin == counts,
        "logged {by_origin:?}, answered {counts:?}"
    );
    // A rotation: the file is moved away, SIGUSR1 opens the name again.
    let moved = dir.path().join("access.log.1");
    std::fs::rename(&path, &moved)?;
    e1.process.signal("USR1")?;
    eventually(Duration::from_secs(10), "the log to be reopened", || {
        e1.process
            .log()
            .contains("access log reopened")
            .then_some(())
    })?;
    ensure!(sextant_tests::http_get(edge, "/after")?.0 == 200);
    let after = access_lines(&path, 1)?;
    ensure!(
        after.len() == 1 && after[0]["target"] == "/after",
        "{after:?}"
    );
    ensure!(std::fs::read_to_string(&moved)?.lines().count() == 30);
    ensure!(e1.metric("sextant_edge_access_log_lines_total ")? == Some(31.0));
    // What is logged just before a stop is written before the edge exits.
    ensure!(sextant_tests::http_get(edge, "/last")?.0 == 200);
    ensure!(e1.process.stop()?.success());
    let text = std::fs::read_to_string(&path)?;
    ensure!(
        text.lines().last().is_some_and(|l| l.contains("\"/last\"")),
        "{text}"
    );
    Ok(())
}

#[test]
fn an_access_log_that_cannot_be_opened_stops_the_edge_with_its_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("missing/access.log");
    let out = std::process::Command::new(sextant_tests::bin("sextant-edge")?)
        .args(["--control-plane", "http://127.0.0.1:9", "--node-id", "e1"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--access-log")
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started anyway: {stderr}");
    ensure!(
        stderr.contains(&format!("cannot open the access log {}", bad.display())),
        "{stderr}"
    );
    ensure!(!stderr.contains("listening for http"), "{stderr}");
    Ok(())
}

#[test]
fn a_capacity_or_report_interval_the_control_plane_would_refuse_stops_the_edge() -> Result<()> {
    // A negative capacity would have every report refused: the edge would
    // count as silent, a failing health vote. An interval that rounds to
    // nothing would stop the reporter.
    for (flag, value, said) in [
        ("--capacity-rps", "-1", "--capacity-rps must be"),
        ("--capacity-rps", "NaN", "--capacity-rps must be"),
        ("--report-interval", "1e-10", "--report-interval must be"),
    ] {
        let dir = tempfile::tempdir()?;
        let mut child = std::process::Command::new(sextant_tests::bin("sextant-edge")?)
            .args(["--control-plane", "http://127.0.0.1:9", "--node-id", "e1"])
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg(format!("{flag}={value}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        // An edge that takes the value runs on: it is stopped, and fails.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if std::time::Instant::now() > until {
                child.kill()?;
                anyhow::bail!("{flag} {value}: still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr)?;
        }
        ensure!(
            !status.success(),
            "{flag} {value}: started anyway: {stderr}"
        );
        ensure!(stderr.contains(said), "{flag} {value}: {stderr}");
        ensure!(!stderr.contains("listening for http"), "{stderr}");
    }
    Ok(())
}

#[test]
fn sigusr1_leaves_an_edge_without_an_access_log_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, _cp, e1) = one_edge(dir.path(), &[])?;
    // What `systemctl reload` sends.
    e1.process.signal("USR1")?;
    eventually(Duration::from_secs(10), "the signal to be seen", || {
        e1.process
            .log()
            .contains("SIGUSR1: no access log to reopen")
            .then_some(())
    })?;
    ensure!(sextant_tests::http_get(e1.process.addr, "/")?.0 == 200);
    Ok(())
}
