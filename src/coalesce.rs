//! Write coalescing for HTTP/2 connections, used by the broker for every accepted connection and by [`client`]
//! for every channel it opens.
//!
//! Many calls share one HTTP/2 connection. When several of them finish at once (a group commit answering 30
//! Enqueues, a worker completing a burst of jobs), each call's task hands its frames to the connection and wakes
//! the connection's task. Tokio runs a task woken by another task next, so the connection's task would wake after
//! every call and write its frames out alone: one `sendto` per call, and on loopback the receiver's whole TCP
//! path runs inside each of them. [`Coalesced`] makes the first write of a burst yield once instead: the
//! connection's task goes to the back of the run queue, the frames of the calls already ready join its buffer
//! meanwhile, and one write carries them all. The price is one more poll of the connection per burst, a few
//! microseconds later.
//!
//! [`client`]: crate::client

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose bursts of writes go out together (see the module's documentation).
#[derive(Debug)]
pub struct Coalesced<IO> {
    io: IO,
    /// The current burst has yielded once already; cleared when the burst is flushed.
    yielded: bool,
}

impl<IO> Coalesced<IO> {
    pub fn new(io: IO) -> Self {
        Coalesced { io, yielded: false }
    }

    /// Pending once per burst, with the task rescheduled behind the tasks already ready: a tokio task that wakes
    /// itself while it is polled is queued at the back of the run queue, not run next.
    fn yield_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.yield_once(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.yield_once(cx));
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
