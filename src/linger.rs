//! Lingering close: how an HTTP connection ends, so that an answer given
//! before the request body was read still reaches its client.
//!
//! A server may answer early (415 for a body of the wrong type, 401 without
//! a token, 413 once the body passes its limit, 431 for an oversized head)
//! and then close with the rest of the body unread. The kernel answers a
//! close with unread data, and any data that arrives after it, with a reset;
//! a client still writing its body then fails with EPIPE or ECONNRESET and
//! never reads the answer (a client that sends its whole request before it
//! reads, such as Python's `http.client`, lost every such 415 and 401 with
//! a 1 MiB body here).
//!
//! [`Linger`] wraps a connection's stream. Its `poll_shutdown`, which hyper
//! calls when it ends a connection after an answer, shuts the write half
//! (the client sees the answer end with a FIN) and then reads and drops
//! what the client still sends, until it closes its side, or [`Bounds`] are
//! reached, as nginx's `lingering_close` does. Only then is the stream
//! dropped and the socket closed. The discarded bytes go through a buffer on
//! the stack: a lingering connection holds no memory of its own beyond the
//! socket and a timer.
//!
//! WebSockets never reach it: an upgraded socket is dropped, not shut down.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long, and how much, a closing connection is read for.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Bytes read and dropped at most.
    pub bytes: usize,
    /// Time spent at most, from the shutdown of the write half.
    pub time: Duration,
}

/// The stack buffer each read of the drain goes through.
const DRAIN_CHUNK: usize = 8 * 1024;

/// A stream that lingers when shut down; reads and writes pass through.
pub struct Linger<T> {
    io: T,
    bounds: Bounds,
    state: State,
}

enum State {
    Open,
    /// The write half is shut; reading until the client closes, `left`
    /// bytes or `deadline`.
    Draining {
        left: usize,
        deadline: Pin<Box<Sleep>>,
    },
    Closed,
}

impl<T> Linger<T> {
    pub fn new(io: T, bounds: Bounds) -> Self {
        Self {
            io,
            bounds,
            state: State::Open,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Linger<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    // hyper chooses how it buffers writes by this: pass it through.
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    // The FIN (over TLS, close_notify first): the answer is
                    // complete whatever happens next.
                    ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    this.state = State::Draining {
                        left: this.bounds.bytes,
                        deadline: Box::pin(tokio::time::sleep(this.bounds.time)),
                    };
                }
                State::Draining { left, deadline } => {
                    let mut chunk = [0u8; DRAIN_CHUNK];
                    let mut buf = ReadBuf::new(&mut chunk[..(*left).min(DRAIN_CHUNK)]);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        // The client closed too (or went away): done.
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            this.state = State::Closed;
                        }
                        Poll::Ready(Err(_)) => this.state = State::Closed,
                        Poll::Ready(Ok(())) => {
                            *left -= buf.filled().len();
                            if *left == 0 {
                                this.state = State::Closed;
                            }
                        }
                        Poll::Pending => {
                            ready!(deadline.as_mut().poll(cx));
                            this.state = State::Closed;
                        }
                    }
                }
                // Whatever ended the drain, the shutdown itself succeeded.
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const BOUNDS: Bounds = Bounds {
        bytes: 100 * 1024,
        time: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn shutdown_ends_the_answer_then_drains_until_the_client_closes() {
        let (server, mut client) = duplex(4096);
        let mut server = Linger::new(server, BOUNDS);
        server.write_all(b"answer").await.unwrap();
        let shutdown = tokio::spawn(async move { server.shutdown().await });
        // The client still sends its body, more than the pipe holds, and
        // is never refused; then it reads the answer to its end.
        client.write_all(&[7u8; 64 * 1024]).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        assert!(
            !shutdown.is_finished(),
            "stopped draining before the client closed"
        );
        drop(client);
        shutdown.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_drain_stops_at_its_byte_bound() {
        let (server, mut client) = duplex(1024);
        let bounds = Bounds {
            bytes: 10 * 1024,
            ..BOUNDS
        };
        let shutdown = tokio::spawn(async move { Linger::new(server, bounds).shutdown().await });
        // Past the bound the server stops reading and closes: the writer
        // learns of it instead of being read forever.
        let mut sent = 0;
        while client.write_all(&[0u8; 512]).await.is_ok() {
            sent += 512;
            assert!(sent <= 64 * 1024, "read on past its bound");
        }
        shutdown.await.unwrap().unwrap();
        assert!(sent >= 10 * 1024, "stopped early, at {sent} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_stops_at_its_time_bound() {
        let (server, client) = duplex(1024);
        let started = tokio::time::Instant::now();
        // A client that neither sends nor closes.
        Linger::new(server, BOUNDS).shutdown().await.unwrap();
        assert_eq!(started.elapsed(), BOUNDS.time);
        drop(client);
    }
}
