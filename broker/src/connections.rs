//! Accepted connections that the broker can cut at once when its shutdown grace is over.
//!
//! Graceful shutdown waits for every call to finish, and a client that never reads its stream (or keeps a health
//! Watch open) never lets it. After the grace, [`Connections::cut`] makes every read and write of every accepted
//! connection fail: hyper drops the connection and whatever it carried, so the tasks serving those streams end and
//! the broker exits. Before that, a connection behaves exactly like its socket.

use std::{
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// The switch shared by every connection accepted through [`Connections::accept`].
#[derive(Clone, Default)]
pub struct Connections {
    cut: CancellationToken,
}

impl Connections {
    /// Wraps every connection `incoming` accepts.
    pub fn accept<IO, E, S: Stream<Item = Result<IO, E>>>(
        &self,
        incoming: S,
    ) -> impl Stream<Item = Result<Cuttable<IO>, E>> + use<IO, E, S> {
        let cut = self.cut.clone();
        incoming.map(move |accepted| {
            accepted.map(|io| Cuttable { io, cut: cut.clone(), cutting: Box::pin(cut.clone().cancelled_owned()) })
        })
    }

    /// Fails every read and write of every connection accepted so far and from now on.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

/// A connection that fails with `ConnectionAborted` once cut.
pub struct Cuttable<IO> {
    io: IO,
    cut: CancellationToken,
    /// Registers the connection's task to be woken when the cut comes.
    cutting: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<IO> Cuttable<IO> {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.is_cancelled() || self.cutting.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the broker's shutdown grace is over"));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Cuttable<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Cuttable<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Cuttable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
