//! UDP serving: one socket per thread (SO_REUSEPORT, the kernel spreads
//! flows over them), each thread a plain blocking loop: receive, answer,
//! send. The hot shape goes through [`wire`]; anything else through the
//! general path ([`general`]), synchronously, in the same thread.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::Cache;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use nix::errno::Errno as NixErrno;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use rustix::net::{sendmmsg, sendto, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use tracing::{debug, warn};

use super::general;
use super::metrics::Tally;
use super::table::{Client, Rcode, Tables, TYPE_A, TYPE_AAAA};
use super::wire::{self, ScanError};
use super::{Current, Shared};

/// Per-thread scratch space.
#[derive(Debug)]
pub struct Scratch {
    pub rng: fastrand::Rng,
    pub out: Vec<u8>,
    pub name: [u8; 256],
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            rng: fastrand::Rng::new(),
            out: Vec::with_capacity(4096),
            name: [0; 256],
        }
    }
}

/// Answers one UDP datagram into `cx.out`; false when nothing is to be
/// sent.
pub fn answer(
    raw: &[u8],
    src: SocketAddr,
    tables: Option<&Tables>,
    cx: &mut Scratch,
    tally: &mut Tally,
) -> bool {
    let scan = match wire::scan(raw, &mut cx.name) {
        Ok(s) => s,
        Err(ScanError::Drop) => {
            tally.dropped();
            return false;
        }
        Err(ScanError::FormErr) => {
            wire::write_error(&mut cx.out, raw, Rcode::FormErr);
            tally.record(tables, 0, Rcode::FormErr, None, false, true, false);
            return true;
        }
    };
    let ecs = scan.edns.and_then(|e| e.ecs);
    if let Some(t) = tables {
        if scan.simple
            && scan.qclass == 1
            && (scan.qtype == TYPE_A || scan.qtype == TYPE_AAAA)
            && scan.edns.is_none_or(|e| e.version == 0)
        {
            let client = match ecs {
                Some(e) if e.source > 0 => e.addr,
                _ => src.ip(),
            };
            let res = t.resolve(
                &cx.name[..scan.qname_len],
                scan.qtype,
                Client { addr: client },
                &mut cx.rng,
            );
            if wire::write(&mut cx.out, raw, &scan, &res, t) {
                let tc = cx.out.get(2).is_some_and(|b| b & 0x02 != 0);
                tally.record(
                    tables,
                    scan.qtype,
                    res.rcode,
                    Some(&res),
                    ecs.is_some(),
                    true,
                    tc,
                );
                return true;
            }
        }
    }
    // The general path.
    let request = match Request::from_bytes(raw.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(e) => {
            debug!(%src, error = %e, "undecodable query");
            wire::write_error(&mut cx.out, raw, Rcode::FormErr);
            tally.record(
                tables,
                scan.qtype,
                Rcode::FormErr,
                None,
                ecs.is_some(),
                false,
                false,
            );
            return true;
        }
    };
    let plan = general::plan(tables, &request, raw, src.ip(), &mut cx.rng);
    let tc = general::encode_udp(&request, &plan, &mut cx.out);
    tally.record(
        tables,
        plan.qtype,
        plan.rcode,
        plan.res.as_ref(),
        plan.ecs,
        false,
        tc,
    );
    true
}

/// Binds `threads` UDP sockets and one TCP listener on the same address;
/// with port 0, picks a port free for both (retrying if TCP finds it
/// taken).
pub fn bind(
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<(Vec<UdpSocket>, std::net::TcpListener)> {
    use socket2::{Domain, Protocol as P, Socket, Type};
    let domain = Domain::for_address(addr);
    let udp = |at: SocketAddr| -> std::io::Result<UdpSocket> {
        let s = Socket::new(domain, Type::DGRAM, Some(P::UDP))?;
        s.set_reuse_port(true)?;
        // Room for bursts; capped by net.core.rmem_max.
        let _ = s.set_recv_buffer_size(4 << 20);
        s.bind(&at.into())?;
        Ok(s.into())
    };
    let mut last = None;
    for _ in 0..50 {
        let first = udp(addr)?;
        let bound = first.local_addr()?;
        let mut sockets = vec![first];
        let rest: std::io::Result<Vec<UdpSocket>> = (1..threads).map(|_| udp(bound)).collect();
        let tcp = rest.and_then(|rest| {
            sockets.extend(rest);
            let t = Socket::new(domain, Type::STREAM, Some(P::TCP))?;
            t.set_reuse_address(true)?;
            t.bind(&bound.into())?;
            t.listen(1024)?;
            t.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(t))
        });
        match tcp {
            Ok(t) => return Ok((sockets, t)),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

fn sane_source(src: &SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
        }
}

/// How stale the shared metrics may get under steady traffic.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Most datagrams read (and answers sent with one `sendmmsg`) per batch.
const BATCH: usize = 32;

/// Responses waiting to be sent, packed in one buffer.
struct Outbox {
    bytes: Vec<u8>,
    /// (end offset in `bytes`, destination) per response.
    msgs: Vec<(usize, SocketAddrAny)>,
}

impl Outbox {
    fn push(&mut self, response: &[u8], to: SocketAddrAny) {
        self.bytes.extend_from_slice(response);
        self.msgs.push((self.bytes.len(), to));
    }

    /// Sends everything: one `sendto` for one response, else `sendmmsg`.
    fn flush(&mut self, socket: &UdpSocket) {
        let mut start = 0;
        let mut at = 0;
        while at < self.msgs.len() {
            let n = (self.msgs.len() - at).min(BATCH);
            if n == 1 {
                let (end, to) = &self.msgs[at];
                if let Err(e) = sendto(socket, &self.bytes[start..*end], SendFlags::empty(), to) {
                    debug!(error = %e, "udp send failed");
                }
                break;
            }
            let mut iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|_| [IoSlice::new(&[])]);
            let mut from = start;
            for (k, (end, _)) in self.msgs[at..at + n].iter().enumerate() {
                iovs[k] = [IoSlice::new(&self.bytes[from..*end])];
                from = *end;
            }
            let mut controls: [SendAncillaryBuffer<'_, '_, '_>; BATCH] =
                std::array::from_fn(|_| SendAncillaryBuffer::default());
            let mut hdrs: Vec<MMsgHdr<'_>> = Vec::with_capacity(n);
            for ((iov, control), (_, to)) in iovs
                .iter()
                .zip(controls.iter_mut())
                .zip(&self.msgs[at..at + n])
            {
                hdrs.push(MMsgHdr::new_with_addr(to, iov, control));
            }
            match sendmmsg(socket, &mut hdrs, SendFlags::empty()) {
                Ok(0) | Err(_) => {
                    // Drop the rest of this batch rather than spin: UDP.
                    debug!("udp sendmmsg sent nothing");
                    at += n;
                    start = self.msgs[at - 1].0;
                }
                Ok(sent) => {
                    at += sent;
                    start = self.msgs[at - 1].0;
                }
            }
        }
        self.bytes.clear();
        self.msgs.clear();
    }
}

/// Largest query read; longer datagrams are dropped.
const MAX_QUERY: usize = 4096;

fn std_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// One serving thread: `recvmmsg` waits for a datagram and takes whatever
/// else is queued (up to [`BATCH`]); the answers leave with one
/// `sendmmsg`. Two system calls per batch, however large.
pub fn serve(socket: UdpSocket, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    if let Err(e) = socket.set_read_timeout(Some(Duration::from_millis(200))) {
        warn!(error = %e, "cannot set a read timeout; shutdown may hang");
    }
    let fd = socket.as_raw_fd();
    let mut cache: Cache<Arc<Current>, _> = Cache::new(shared.current.clone());
    let mut held = cache.load().clone();
    let mut tally = Tally::new("udp");
    tally.reset_for(held.as_deref().map(|a| &a.value));
    let mut cx = Scratch::default();
    let mut bufs = vec![0u8; BATCH * MAX_QUERY];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    // (length, source, truncated) of each datagram of a batch.
    let mut got: [(usize, Option<SocketAddr>, bool); BATCH] = [(0, None, false); BATCH];
    let mut outbox = Outbox {
        bytes: Vec::with_capacity(BATCH * 512),
        msgs: Vec::with_capacity(BATCH),
    };
    let mut last_flush = Instant::now();
    loop {
        let received = {
            let mut chunks = bufs.chunks_exact_mut(MAX_QUERY);
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
            match recvmmsg(
                fd,
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    let mut n = 0;
                    for (slot, r) in got.iter_mut().zip(results) {
                        *slot = (
                            r.bytes,
                            r.address.as_ref().and_then(std_addr),
                            r.flags.contains(MsgFlags::MSG_TRUNC),
                        );
                        n += 1;
                    }
                    Ok(n)
                }
                Err(e) => Err(e),
            }
        };
        let n = match received {
            Ok(n) => n,
            Err(NixErrno::EAGAIN | NixErrno::EINTR) => {
                tally.flush(&shared.metrics, held.as_deref().map(|a| &a.value));
                last_flush = Instant::now();
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let current = cache.load();
        let changed = match (current, &held) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        if changed {
            tally.flush(&shared.metrics, held.as_deref().map(|a| &a.value));
            held = current.clone();
            tally.reset_for(held.as_deref().map(|a| &a.value));
        }
        let tables = held.as_deref().map(|a| &a.value);
        for (i, &(len, src, truncated)) in got[..n].iter().enumerate() {
            match src {
                Some(src) if sane_source(&src) && !truncated && len <= MAX_QUERY => {
                    let raw = &bufs[i * MAX_QUERY..i * MAX_QUERY + len];
                    if answer(raw, src, tables, &mut cx, &mut tally) {
                        outbox.push(&cx.out, SocketAddrAny::from(src));
                    }
                }
                _ => tally.dropped(),
            }
        }
        outbox.flush(&socket);
        tally.batch();
        let pending = tally.pending();
        if pending >= 4096 || (pending & 63 == 0 && last_flush.elapsed() >= FLUSH_EVERY) {
            tally.flush(&shared.metrics, tables);
            last_flush = Instant::now();
        }
    }
}
