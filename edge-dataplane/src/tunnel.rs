//! Byte tunnels between a client and an origin (WebSockets, on both the
//! HTTP/1.1 fast path and HTTP/2's extended CONNECT): each direction is
//! copied on its own, so one side not reading never holds up the other,
//! until both have ended, a side fails, or nothing has moved either way for
//! the idle time (on HTTP/2, [`HALF_CLOSED_IDLE`] at most once the client's
//! side has ended).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A gauge raised while this lives.
pub(crate) struct Gauge<'a>(&'a AtomicI64);

impl<'a> Gauge<'a> {
    pub(crate) fn up(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a tunnel ended.
#[derive(Debug)]
pub(crate) enum Tunnel {
    /// Both directions ended (each side closed its sending half).
    Done,
    /// Nothing moved either way for the idle time, nothing waiting.
    Idle,
    /// A write made no progress for the idle time.
    Stalled,
    /// The client's side ended, and nothing moved for the half-closed
    /// limit since.
    ClientEnded,
    Failed(io::Error),
}

/// One end of a tunnel: its two halves, the buffer its reads go to, and
/// the bytes to write to it before anything else (already read from the
/// other end).
pub(crate) struct Ends<'a, R, W> {
    pub rx: &'a mut R,
    pub tx: &'a mut W,
    pub buf: &'a mut [u8],
    pub first: &'a [u8],
}

/// How long an HTTP/2 tunnel whose client's side has ended may carry
/// nothing before it is closed. hyper reads a client's cancelled stream
/// (`RST_STREAM CANCEL`, as a browser sends for a WebSocket it drops) as
/// its end, which cannot be told from a half close: the origin has this
/// long to finish, not the whole idle time.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(5);

/// When bytes last moved through a tunnel, how many writes are under way,
/// and whether the client's side has ended.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
    writing: AtomicUsize,
    half_closed: AtomicBool,
    ended_one: Notify,
}

impl Activity {
    fn moved(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn end_one(&self) {
        self.half_closed.store(true, Ordering::Relaxed);
        self.ended_one.notify_one();
    }

    /// How long the tunnel may now carry nothing, and whether that is the
    /// half-closed limit.
    fn limit(&self, idle: Duration, half_closed: Option<Duration>) -> (Duration, bool) {
        match half_closed {
            Some(h) if h < idle && self.half_closed.load(Ordering::Relaxed) => (h, true),
            _ => (idle, false),
        }
    }
}

/// Tunnels `client` and `origin` until both directions have ended, one
/// fails, or nothing has moved either way for `idle` (a write under way
/// that long is a stall), or for `half_closed` once the client's side has
/// ended. The bytes sent to the client are added to
/// `counted` (the edge's total) and `noted` (the exchange's) as they go.
pub(crate) async fn splice<CR, CW, OR, OW>(
    idle: Duration,
    client: Ends<'_, CR, CW>,
    origin: Ends<'_, OR, OW>,
    half_closed: Option<Duration>,
    counted: &AtomicU64,
    noted: Option<&mut u64>,
) -> Tunnel
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    OR: AsyncRead + Unpin,
    OW: AsyncWrite + Unpin,
{
    let activity = Activity {
        start: tokio::time::Instant::now(),
        last_ms: AtomicU64::new(0),
        writing: AtomicUsize::new(0),
        half_closed: AtomicBool::new(false),
        ended_one: Notify::new(),
    };
    let both = async {
        pass(client.tx, client.first, &activity).await?;
        pass(origin.tx, origin.first, &activity).await?;
        tokio::try_join!(
            pump(client.rx, origin.tx, client.buf, &activity, true, None, None),
            pump(
                origin.rx,
                client.tx,
                origin.buf,
                &activity,
                false,
                Some(counted),
                noted
            ),
        )
    };
    tokio::pin!(both);
    loop {
        tokio::select! {
            r = &mut both => break match r {
                Ok(_) => Tunnel::Done,
                Err(e) => Tunnel::Failed(e),
            },
            // The limit shortens when the client's side ends.
            () = activity.ended_one.notified() => {}
            () = tokio::time::sleep_until(activity.last() + activity.limit(idle, half_closed).0) => {
                let (limit, half) = activity.limit(idle, half_closed);
                if activity.last() + limit <= tokio::time::Instant::now() {
                    break if activity.writing.load(Ordering::Relaxed) > 0 {
                        Tunnel::Stalled
                    } else if half {
                        Tunnel::ClientEnded
                    } else {
                        Tunnel::Idle
                    };
                }
            }
        }
    }
}

/// Copies one direction of a tunnel until its reader ends, then passes the
/// end on (a half close), noted in `activity` when it is the client's.
/// The bytes read are added to `counted` and `noted`.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rx: &mut R,
    tx: &mut W,
    buf: &mut [u8],
    activity: &Activity,
    client_side: bool,
    counted: Option<&AtomicU64>,
    mut noted: Option<&mut u64>,
) -> io::Result<()> {
    loop {
        let n = rx.read(buf).await?;
        activity.moved();
        if n == 0 {
            if client_side {
                activity.end_one();
            }
            return tx.shutdown().await;
        }
        if let Some(c) = counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let Some(b) = noted.as_deref_mut() {
            *b += n as u64;
        }
        pass(tx, &buf[..n], activity).await?;
    }
}

/// Writes all of `bytes`, noting each bit of progress.
async fn pass<W: AsyncWrite + Unpin>(
    tx: &mut W,
    mut bytes: &[u8],
    activity: &Activity,
) -> io::Result<()> {
    activity.writing.fetch_add(1, Ordering::Relaxed);
    let r = async {
        while !bytes.is_empty() {
            let n = tx.write(bytes).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
            activity.moved();
        }
        Ok(())
    }
    .await;
    activity.writing.fetch_sub(1, Ordering::Relaxed);
    r
}
