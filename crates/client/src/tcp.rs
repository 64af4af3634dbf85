//! A TCP tunnel: the DATA frames of a classic CONNECT stream as a byte stream (RFC 9114 §4.4).
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use crate::client::H3Stream;
use crate::front::FrontStream;
use tokio_util::either::Either;

type SendHalf = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvHalf = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Largest chunk one `poll_write` queues; the queue holds [`WRITE_QUEUE`] chunks, so a tunnel
/// buffers at most 512 KiB beyond QUIC's own send buffer.
const MAX_CHUNK: usize = 64 * 1024;
const WRITE_QUEUE: usize = 8;

/// A byte stream through the relay to a TCP destination, over HTTP/3 or over the relay's
/// TLS/TCP front-end ([`crate::front`]).
///
/// - `poll_shutdown` sends FIN (the relay half-closes the TCP connection); reading still works.
/// - A stream reset by the relay (H3_CONNECT_ERROR, or RST_STREAM CONNECT_ERROR on HTTP/2: the
///   destination reset the TCP connection) surfaces as [`io::ErrorKind::ConnectionReset`].
/// - Dropping the tunnel without `shutdown` resets the stream (H3_CONNECT_ERROR; RST_STREAM on
///   HTTP/2), so the relay aborts the TCP connection (RFC 9114 §4.4, RFC 9113 §8.5).
pub struct TcpTunnel {
    response: http::Response<()>,
    io: Either<H3TcpStream, FrontStream>,
}

/// The DATA frames of an HTTP/3 CONNECT stream as a byte stream.
struct H3TcpStream {
    recv: RecvHalf,
    leftover: Bytes,
    read_done: bool,
    writer: Writer,
    shut: bool,
    /// Keeps the QUIC connection (and its HTTP/3 driver) alive while the tunnel is open, even after
    /// the client replaced it: dropping the last h3 `SendRequest` closes the whole connection.
    _conn: Arc<crate::client::Conn>,
}

/// The send side of a tunnel. The write pump task is started by the first write or shutdown,
/// not at setup: a tunnel costs no task, channel or wakeup before it sends anything, and one
/// dropped unused is reset right here.
// Not boxed: every tunnel starts `Idle`, so a box would be one more allocation per setup.
#[allow(clippy::large_enum_variant)]
enum Writer {
    /// Nothing written yet. `None` only while the pump is being started.
    Idle(Option<SendHalf>),
    Pumping(WritePump),
}

/// The handle of a running [`write_pump`].
struct WritePump {
    tx: PollSender<Bytes>,
    /// Why the write pump stopped (kind and message), for every later write.
    error: Arc<Mutex<Option<(io::ErrorKind, String)>>>,
    /// Resolves when the writer has sent FIN (after `tx` was closed by `poll_shutdown`).
    finished: Option<oneshot::Receiver<io::Result<()>>>,
    /// Dropped → the writer resets the stream unless it already finished.
    _abort: oneshot::Sender<()>,
}

impl WritePump {
    fn start(send: SendHalf) -> Self {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (abort_tx, abort_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let error = Arc::new(Mutex::new(None));
        tokio::spawn(write_pump(send, rx, abort_rx, done_tx, error.clone()));
        WritePump {
            tx: PollSender::new(tx),
            error,
            finished: Some(done_rx),
            _abort: abort_tx,
        }
    }

    fn error(&self) -> io::Error {
        match self.error.lock().unwrap().as_ref() {
            Some((kind, why)) => io::Error::new(*kind, format!("tunnel send side closed: {why}")),
            None => io::Error::new(io::ErrorKind::BrokenPipe, "tunnel send side closed"),
        }
    }
}

impl Writer {
    /// The running pump, started now if nothing was written before.
    fn pump(&mut self) -> &mut WritePump {
        if let Writer::Idle(send) = self {
            let send = send.take().expect("an idle writer holds the send half");
            *self = Writer::Pumping(WritePump::start(send));
        }
        match self {
            Writer::Pumping(p) => p,
            Writer::Idle(_) => unreachable!("started above"),
        }
    }
}

impl TcpTunnel {
    pub(crate) fn new(
        stream: H3Stream,
        response: http::Response<()>,
        conn: Arc<crate::client::Conn>,
    ) -> Self {
        TcpTunnel {
            response,
            io: Either::Left(H3TcpStream::new(stream, conn)),
        }
    }

    pub(crate) fn over_front(stream: FrontStream, response: http::Response<()>) -> Self {
        TcpTunnel {
            response,
            io: Either::Right(stream),
        }
    }

    /// The relay's 2xx response.
    pub fn response(&self) -> &http::Response<()> {
        &self.response
    }

    /// The HTTP version the tunnel travels on: `h3`, `h2` or `http/1.1`.
    pub fn protocol(&self) -> &'static str {
        match &self.io {
            Either::Left(_) => "h3",
            Either::Right(s) => s.version().alpn(),
        }
    }
}

impl H3TcpStream {
    fn new(stream: H3Stream, conn: Arc<crate::client::Conn>) -> Self {
        let (send, recv) = stream.split();
        H3TcpStream {
            recv,
            leftover: Bytes::new(),
            read_done: false,
            writer: Writer::Idle(Some(send)),
            shut: false,
            _conn: conn,
        }
    }
}

pub(crate) fn io_error(e: StreamError) -> io::Error {
    match e {
        // RFC 9114 §4.4: the proxy resets the stream with H3_CONNECT_ERROR when the TCP
        // connection to the destination was reset or failed.
        StreamError::RemoteTerminate { code } => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("relay reset the stream ({code})"),
        ),
        StreamError::ConnectionError(c) => {
            io::Error::new(io::ErrorKind::ConnectionAborted, c.to_string())
        }
        other => io::Error::other(other.to_string()),
    }
}

async fn write_pump(
    mut send: SendHalf,
    mut rx: mpsc::Receiver<Bytes>,
    mut abort: oneshot::Receiver<()>,
    done: oneshot::Sender<io::Result<()>>,
    error: Arc<Mutex<Option<(io::ErrorKind, String)>>>,
) {
    let fail = |e: StreamError| {
        let e = io_error(e);
        *error.lock().unwrap() = Some((e.kind(), e.to_string()));
        e
    };
    loop {
        tokio::select! {
            // Drop of the tunnel wins over queued data: the application abandoned the stream.
            biased;
            _ = &mut abort => {
                send.stop_stream(Code::H3_CONNECT_ERROR);
                return;
            }
            msg = rx.recv() => match msg {
                Some(data) => {
                    tokio::select! {
                        biased;
                        _ = &mut abort => {
                            send.stop_stream(Code::H3_CONNECT_ERROR);
                            return;
                        }
                        r = send.send_data(data) => if let Err(e) = r {
                            let _ = done.send(Err(fail(e)));
                            return;
                        }
                    }
                }
                None => {
                    // poll_shutdown closed the queue after everything was written: FIN.
                    let r = send.finish().await.map_err(fail);
                    let _ = done.send(r);
                    return;
                }
            },
        }
    }
}

impl AsyncRead for H3TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_chunks(&mut this.leftover, &mut this.read_done, buf, || {
            Poll::Ready(match ready!(this.recv.poll_recv_data(cx)) {
                Ok(Some(mut data)) => Ok(Some(data.copy_to_bytes(data.remaining()))),
                Ok(None) => Ok(None),
                Err(e) => Err(io_error(e)),
            })
        })
    }
}

/// The read side both tunnel streams (HTTP/3 and HTTP/2) share: hand out what is left of the
/// last chunk, then pull the next one from `next`; `None` is a clean end, and an error ends
/// reading as well.
pub(crate) fn poll_read_chunks(
    leftover: &mut Bytes,
    done: &mut bool,
    buf: &mut ReadBuf<'_>,
    mut next: impl FnMut() -> Poll<io::Result<Option<Bytes>>>,
) -> Poll<io::Result<()>> {
    loop {
        if !leftover.is_empty() {
            let n = leftover.len().min(buf.remaining());
            buf.put_slice(&leftover.split_to(n));
            return Poll::Ready(Ok(()));
        }
        if *done {
            return Poll::Ready(Ok(()));
        }
        match ready!(next()) {
            Ok(Some(chunk)) => *leftover = chunk,
            Ok(None) => *done = true,
            Err(e) => {
                *done = true;
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl AsyncWrite for H3TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let pump = this.writer.pump();
        if ready!(pump.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(pump.error()));
        }
        let n = buf.len().min(MAX_CHUNK);
        if pump
            .tx
            .send_item(Bytes::copy_from_slice(&buf[..n]))
            .is_err()
        {
            return Poll::Ready(Err(pump.error()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued chunks are written by the pump as fast as QUIC flow control allows; the queue is
        // bounded, so there is nothing more a flush could force.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let pump = this.writer.pump();
        if !this.shut {
            this.shut = true;
            // Closing the queue tells the pump to send FIN once the queued data is out.
            pump.tx.close();
        }
        match pump.finished.as_mut() {
            None => Poll::Ready(Ok(())),
            Some(rx) => {
                let r = ready!(Pin::new(rx).poll(cx));
                pump.finished = None;
                Poll::Ready(r.unwrap_or_else(|_| Err(pump.error())))
            }
        }
    }
}

impl Drop for H3TcpStream {
    fn drop(&mut self) {
        // A running write pump resets the send side (H3_CONNECT_ERROR) when its `_abort` drops;
        // an idle writer is reset here. The receive half is not stopped explicitly: h3 0.0.8
        // reads ahead, so h3-quinn 0.0.10 may hold the QUIC stream inside a pending read, where
        // its stop_sending panics. Dropping the half drops the quinn RecvStream, which sends
        // STOP_SENDING itself for an unfinished stream.
        if let Writer::Idle(Some(send)) = &mut self.writer {
            send.stop_stream(Code::H3_CONNECT_ERROR);
        }
    }
}

forward_async_io!(TcpTunnel => io);
