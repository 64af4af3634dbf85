//! The QUIC transport under the relay's HTTP/3 server: h3's `quic` traits over quinn streams.
//!
//! h3-quinn 0.0.10 moves a stream's `quinn::RecvStream` into the read that is pending on it, so a
//! request stream stalled on a partial HEADERS frame can only be dropped (quinn then stops it
//! with code 0) and its `stop_sending` panics while a read is pending. quinn's chunk read is
//! cancel-safe, so here every poll makes a fresh read on the stream this adapter keeps: the
//! receive side can be stopped with a chosen code at any time.
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;

type Pending<T> = Pin<Box<dyn Future<Output = Result<T, quinn::ConnectionError>> + Send + Sync>>;
type StreamPair = (quinn::SendStream, quinn::RecvStream);

/// A QUIC connection as h3's server sees it.
pub struct Connection {
    quic: quinn::Connection,
    accepting_bidi: Pending<StreamPair>,
    accepting_uni: Pending<quinn::RecvStream>,
    opener: OpenStreams,
}

impl Connection {
    pub fn new(quic: quinn::Connection) -> Self {
        Self {
            accepting_bidi: accept_bidi(quic.clone()),
            accepting_uni: accept_uni(quic.clone()),
            opener: OpenStreams::new(quic.clone()),
            quic,
        }
    }
}

fn accept_bidi(quic: quinn::Connection) -> Pending<StreamPair> {
    Box::pin(async move { quic.accept_bi().await })
}

fn accept_uni(quic: quinn::Connection) -> Pending<quinn::RecvStream> {
    Box::pin(async move { quic.accept_uni().await })
}

impl<B: Buf> quic::Connection<B> for Connection {
    type RecvStream = RecvStream;
    type OpenStreams = OpenStreams;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<RecvStream, ConnectionErrorIncoming>> {
        let accepted = ready!(self.accepting_uni.as_mut().poll(cx));
        // A finished future must not be polled again: the next accept starts now.
        self.accepting_uni = accept_uni(self.quic.clone());
        Poll::Ready(accepted.map(RecvStream::new).map_err(connection_error))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BidiStream<B>, ConnectionErrorIncoming>> {
        let accepted = ready!(self.accepting_bidi.as_mut().poll(cx));
        self.accepting_bidi = accept_bidi(self.quic.clone());
        Poll::Ready(accepted.map(BidiStream::new).map_err(connection_error))
    }

    fn opener(&self) -> OpenStreams {
        OpenStreams::new(self.quic.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for Connection {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BidiStream<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<SendStream<B>, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.opener, code, reason)
    }
}

/// Opens streams on a connection (h3 opens its control and QPACK streams with it).
pub struct OpenStreams {
    quic: quinn::Connection,
    opening_bidi: Option<Pending<StreamPair>>,
    opening_uni: Option<Pending<quinn::SendStream>>,
}

impl OpenStreams {
    fn new(quic: quinn::Connection) -> Self {
        Self {
            quic,
            opening_bidi: None,
            opening_uni: None,
        }
    }
}

impl<B: Buf> quic::OpenStreams<B> for OpenStreams {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BidiStream<B>, StreamErrorIncoming>> {
        let quic = &self.quic;
        let opened = ready!(poll_once(&mut self.opening_bidi, cx, || {
            let quic = quic.clone();
            Box::pin(async move { quic.open_bi().await })
        }));
        Poll::Ready(opened.map(BidiStream::new).map_err(stream_connection_error))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<SendStream<B>, StreamErrorIncoming>> {
        let quic = &self.quic;
        let opened = ready!(poll_once(&mut self.opening_uni, cx, || {
            let quic = quic.clone();
            Box::pin(async move { quic.open_uni().await })
        }));
        Poll::Ready(opened.map(SendStream::new).map_err(stream_connection_error))
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.quic.close(
            VarInt::from_u64(code.value()).unwrap_or(VarInt::MAX),
            reason,
        );
    }
}

/// Polls the operation in `slot`, starting it first if none is under way; a finished operation
/// leaves the slot empty, so the next call starts a new one.
fn poll_once<T>(
    slot: &mut Option<Pending<T>>,
    cx: &mut Context<'_>,
    start: impl FnOnce() -> Pending<T>,
) -> Poll<Result<T, quinn::ConnectionError>> {
    let done = ready!(slot.get_or_insert_with(start).as_mut().poll(cx));
    *slot = None;
    Poll::Ready(done)
}

impl Clone for OpenStreams {
    fn clone(&self) -> Self {
        Self::new(self.quic.clone())
    }
}

/// A request stream: both halves until h3 splits them.
pub struct BidiStream<B: Buf> {
    send: SendStream<B>,
    recv: RecvStream,
}

impl<B: Buf> BidiStream<B> {
    fn new((send, recv): StreamPair) -> Self {
        Self {
            send: SendStream::new(send),
            recv: RecvStream::new(recv),
        }
    }
}

impl<B: Buf> quic::BidiStream<B> for BidiStream<B> {
    type SendStream = SendStream<B>;
    type RecvStream = RecvStream;

    fn split(self) -> (SendStream<B>, RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for BidiStream<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for BidiStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<D: Into<WriteBuf<B>>>(&mut self, data: D) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// The receive side of a stream. The quinn stream stays here between reads.
pub struct RecvStream {
    stream: quinn::RecvStream,
}

impl RecvStream {
    fn new(stream: quinn::RecvStream) -> Self {
        Self { stream }
    }
}

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        // quinn documents `read_chunk` as cancel-safe: a read that is not ready takes nothing
        // and only registers the waker, so dropping it at the end of this poll loses no data.
        let read = pin!(self.stream.read_chunk(usize::MAX, true));
        let chunk = ready!(read.poll(cx)).map_err(read_error)?;
        Poll::Ready(Ok(chunk.map(|c| c.bytes)))
    }

    fn stop_sending(&mut self, error_code: u64) {
        // Already stopped or finished: nothing left to tell the peer.
        let _ = self
            .stream
            .stop(VarInt::from_u64(error_code).unwrap_or(VarInt::MAX));
    }

    fn recv_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

/// The send side of a stream: one h3 frame (`WriteBuf`) in flight at a time.
pub struct SendStream<B: Buf> {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<B>>,
}

impl<B: Buf> SendStream<B> {
    fn new(stream: quinn::SendStream) -> Self {
        Self {
            stream,
            writing: None,
        }
    }
}

impl<B: Buf> quic::SendStream<B> for SendStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(frame) = self.writing.as_mut() {
            while frame.has_remaining() {
                let written = ready!(Pin::new(&mut self.stream).poll_write(cx, frame.chunk()))
                    .map_err(write_error)?;
                frame.advance(written);
            }
            self.writing = None;
        }
        Poll::Ready(Ok(()))
    }

    fn send_data<D: Into<WriteBuf<B>>>(&mut self, data: D) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 calls poll_ready until the previous frame is out before it sends another.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data while the previous frame is still being written".into(),
                ),
            });
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self
            .stream
            .reset(VarInt::from_u64(reset_code).unwrap_or(VarInt::MAX));
    }

    fn send_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

fn stream_id(id: quinn::StreamId) -> StreamId {
    StreamId::try_from(u64::from(id)).expect("a QUIC stream ID is a 62-bit varint")
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_connection_error(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: connection_error(e),
    }
}

fn read_error(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(e) => stream_connection_error(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => stream_connection_error(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}
