//! [`LossyProxy`]: a TCP proxy in front of a test server that loses
//! answers. It relays both ways untouched, except on the connections a
//! [`Cut`] picks: there the server's answer is never relayed and the
//! connection is closed instead, so the client sees a request the server
//! did handle fail as if the network had dropped it.
//!
//! It works on bytes, so REST and WebSocket alike: a client request is
//! recognised by its request line (HTTP/1.1 sends one request at a time on
//! a connection, so the next bytes from the server are its answer), a
//! server frame by its JSON (the server's frames are not masked, and not
//! compressed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Which answers the proxy loses.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// The answer to a request whose bytes contain this, e.g.
    /// `"POST /v1/messages HTTP/1.1"`: the request reaches the server, and
    /// the connection is closed when the server starts to answer it.
    AnswerTo(&'static str),
    /// Server bytes that contain this, e.g. `"type":"sent"` for a
    /// WebSocket `sent` frame: not relayed, and the connection is closed.
    Answer(&'static str),
}

impl Cut {
    fn needle(self) -> &'static [u8] {
        match self {
            Cut::AnswerTo(s) | Cut::Answer(s) => s.as_bytes(),
        }
    }
}

/// The proxy; it stops when dropped (connections in progress are closed).
pub struct LossyProxy {
    /// `http://` and the proxy's address: give it to clients as the server.
    pub base: String,
    made: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl LossyProxy {
    /// Listens on an ephemeral port and relays to `upstream`, losing the
    /// first `times` answers that `cut` picks.
    pub async fn start(upstream: SocketAddr, cut: Cut, times: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let left = Arc::new(AtomicUsize::new(times));
        let made = Arc::new(AtomicUsize::new(0));
        let (l, m) = (left, made.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                connections.spawn(relay(client, server, cut, l.clone(), m.clone()));
            }
        });
        Self { base, made, task }
    }

    /// How many answers it has lost so far.
    pub fn cuts(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes one of the cuts left, if any.
fn take(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Whether `needle` is in `tail` (the end of the previous read) followed
/// by `chunk`, so that a needle split across two reads is still found;
/// `tail` becomes the end of this one.
fn spots(tail: &mut Vec<u8>, chunk: &[u8], needle: &[u8]) -> bool {
    tail.extend_from_slice(chunk);
    let found = tail.windows(needle.len()).any(|w| w == needle);
    let keep = needle.len().saturating_sub(1).min(tail.len());
    tail.drain(..tail.len() - keep);
    found
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    cut: Cut,
    left: Arc<AtomicUsize>,
    made: Arc<AtomicUsize>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // Set (by the upstream half) before the request that earns it is
    // written, so its answer is the first thing the downstream half sees.
    let doomed = Arc::new(AtomicBool::new(false));
    let (doom, cuts_left) = (doomed.clone(), left.clone());
    let upstream = async move {
        let (mut buf, mut tail) = (vec![0; 16 * 1024], Vec::new());
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Cut::AnswerTo(_) = cut
                && !doom.load(Ordering::SeqCst)
                && spots(&mut tail, &buf[..n], cut.needle())
                && take(&cuts_left)
            {
                doom.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let downstream = async move {
        let (mut buf, mut tail) = (vec![0; 16 * 1024], Vec::new());
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let lose = match cut {
                Cut::AnswerTo(_) => doomed.load(Ordering::SeqCst),
                Cut::Answer(needle) => {
                    spots(&mut tail, &buf[..n], needle.as_bytes()) && take(&left)
                }
            };
            if lose {
                made.fetch_add(1, Ordering::SeqCst);
                // Dropping both halves closes the client's connection.
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_client.shutdown().await;
    };
    // Either side ending ends the connection: the client sees the close.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
