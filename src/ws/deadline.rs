//! The deadline on a WebSocket message begun and not finished
//! (`SEALPOST_WS_MESSAGE_TIMEOUT`): a message sent in fragments whose last
//! never comes, or one frame whose payload trickles in.
//!
//! tungstenite keeps what arrived of such a message (up to a maximal one,
//! ~850 KiB, reserved in full once a frame's header is read) for as long as
//! the peer likes, and pings do not help: control frames may come between
//! fragments, so a peer that answers them looks alive. tungstenite does not
//! say whether a message is pending, so [`MessageDeadline`] sits under it,
//! between it and the connection, and follows the framing of the bytes it
//! reads: a frame header is at most 14 bytes, a payload is skipped by its
//! length. Once what arrived ends inside a frame or a fragmented message,
//! a timer runs; the next read after it fires fails with [`TimedOut`], and
//! the connection closes with 1008, which frees the message.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The error a read fails with once a message was left unfinished too
/// long: an [`io::Error`] of kind `TimedOut` wrapping this.
#[derive(Debug)]
pub struct TimedOut;

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebSocket message not finished in time")
    }
}

impl std::error::Error for TimedOut {}

impl TimedOut {
    /// Whether `err` is this deadline's.
    pub fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|inner| inner.is::<TimedOut>())
    }
}

/// A socket's byte stream, with the deadline on unfinished messages.
pub struct MessageDeadline<S> {
    inner: S,
    limit: Duration,
    frames: Frames,
    /// Runs while what arrived ends inside a message; boxed so that the
    /// many sockets at a message boundary carry only a pointer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> MessageDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            frames: Frames::default(),
            timer: None,
        }
    }

    /// Follows the bytes just read; starts the timer when they leave a
    /// message unfinished, stops it when they finish it. Fails once the
    /// timer has fired, though bytes keep coming (a trickle).
    fn arrived(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.frames.feed(bytes);
        if !self.frames.unfinished() {
            self.timer = None;
            return Ok(());
        }
        match &self.timer {
            None => {
                self.timer = Some(Box::pin(tokio::time::sleep(self.limit)));
                Ok(())
            }
            Some(timer) if timer.is_elapsed() => Err(timed_out()),
            Some(_) => Ok(()),
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, TimedOut)
}

impl<S: AsyncRead + Unpin> AsyncRead for MessageDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.arrived(&buf.filled()[before..])),
            // Nothing to read: wake the reader when the timer fires.
            Poll::Pending => {
                let fired = this
                    .timer
                    .as_mut()
                    .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                if fired {
                    Poll::Ready(Err(timed_out()))
                } else {
                    Poll::Pending
                }
            }
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MessageDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The framing of a client's byte stream (RFC 6455 §5.2), as far as it
/// tells where messages end. Whether the frames are valid is tungstenite's
/// business; a stream it refuses is closed anyway.
#[derive(Default)]
struct Frames {
    /// The header being read: its bytes so far (a header is 2 to 14).
    header: [u8; 14],
    header_len: u8,
    /// Payload bytes of the current frame still to come; its header has
    /// been read while this is `Some`.
    payload: Option<(u64, Kind)>,
    /// A data message has begun in a frame without FIN and has not ended.
    fragmented: bool,
}

/// What a frame does to the message around it.
#[derive(Clone, Copy)]
enum Kind {
    /// A control frame: it may come between fragments and changes nothing.
    Control,
    /// A data frame: with FIN it ends its message, without it begins or
    /// continues one.
    Data { fin: bool },
}

impl Frames {
    fn unfinished(&self) -> bool {
        self.fragmented || self.header_len > 0 || self.payload.is_some()
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if let Some((left, kind)) = &mut self.payload {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                bytes = &bytes[take as usize..];
                if *left == 0 {
                    let kind = *kind;
                    self.end_frame(kind);
                }
                continue;
            }
            self.header[self.header_len as usize] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some((payload, kind)) = self.parse_header() {
                self.header_len = 0;
                if payload == 0 {
                    self.end_frame(kind);
                } else {
                    self.payload = Some((payload, kind));
                }
            }
        }
    }

    /// The payload length and kind of the header read so far, once it is
    /// complete.
    fn parse_header(&self) -> Option<(u64, Kind)> {
        let header = &self.header[..self.header_len as usize];
        let [first, second, ..] = *header else {
            return None;
        };
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        if header.len() < 2 + extended + mask {
            return None;
        }
        let payload = match extended {
            0 => u64::from(second & 0x7f),
            _ => header[2..2 + extended]
                .iter()
                .fold(0, |n, byte| n << 8 | u64::from(*byte)),
        };
        let kind = if first & 0x08 != 0 {
            Kind::Control
        } else {
            Kind::Data {
                fin: first & 0x80 != 0,
            }
        };
        Some((payload, kind))
    }

    fn end_frame(&mut self, kind: Kind) {
        self.payload = None;
        if let Kind::Data { fin } = kind {
            self.fragmented = !fin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame (zero mask) with `first` and `payload`.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![first];
        match payload.len() {
            n @ 0..126 => bytes.push(0x80 | n as u8),
            n @ 126..65536 => {
                bytes.push(0x80 | 126);
                bytes.extend((n as u16).to_be_bytes());
            }
            n => {
                bytes.push(0x80 | 127);
                bytes.extend((n as u64).to_be_bytes());
            }
        }
        bytes.extend([0; 4]);
        bytes.extend(payload);
        bytes
    }

    fn fed(chunks: &[&[u8]]) -> Frames {
        let mut frames = Frames::default();
        for chunk in chunks {
            frames.feed(chunk);
        }
        frames
    }

    #[test]
    fn whole_messages_leave_nothing_unfinished() {
        let big = vec![b'x'; 70_000];
        let mut stream = frame(0x81, b"{}");
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x81, &vec![b'y'; 300]));
        stream.extend(frame(0x82, &big));
        // Whole, and a byte at a time.
        assert!(!fed(&[&stream]).unfinished());
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert!(!fed(&bytes).unfinished());
    }

    #[test]
    fn a_partial_frame_is_unfinished_until_its_last_byte() {
        let whole = frame(0x81, &vec![b'x'; 1000]);
        for cut in 1..whole.len() {
            let frames = fed(&[&whole[..cut]]);
            assert!(frames.unfinished(), "cut at {cut}");
            assert!(!fed(&[&whole[..cut], &whole[cut..]]).unfinished());
        }
    }

    #[test]
    fn a_fragmented_message_is_unfinished_until_its_final_fragment() {
        let first = frame(0x01, b"{\"a\":");
        let pong = frame(0x8A, b"");
        let last = frame(0x80, b"1}");
        assert!(fed(&[&first]).unfinished());
        // Control frames between fragments do not finish it.
        assert!(fed(&[&first, &pong, &pong]).unfinished());
        assert!(fed(&[&first, &frame(0x00, b"2")]).unfinished());
        assert!(!fed(&[&first, &pong, &last]).unfinished());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_fail_once_the_deadline_passes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = MessageDeadline::new(server, Duration::from_secs(1));
        let mut buf = [0; 1024];
        // A whole message, and a ping long after: no deadline.
        for bytes in [frame(0x81, b"{}"), frame(0x89, b"")] {
            client.write_all(&bytes).await.unwrap();
            server.read_exact(&mut buf[..bytes.len()]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        // Begun and left: the read waiting for more fails at the deadline.
        let begun = frame(0x01, b"{");
        client.write_all(&begun).await.unwrap();
        server.read_exact(&mut buf[..begun.len()]).await.unwrap();
        let err = server.read(&mut buf).await.unwrap_err();
        assert!(TimedOut::is(&err));
    }
}
