//! Faults under a running server (issue 16): the database paused (SIGSTOP)
//! and resumed, crashed and restarted, and a disk that fills up. While 8
//! senders send steadily over REST, every request is answered within its
//! deadline (`SEALPOST_DB_TIMEOUT`, plus a margin), with 201 or a clean
//! 503 `unavailable`; the server process stays up and serves again once the
//! fault is gone; and every message answered 201 is in the recipient's
//! queue afterwards.
//!
//! The PostgreSQL faults run on a private cluster of their own
//! ([`crate::common::pg`]), with the PostgreSQL half of the suite. The full
//! disk is SQLite on a small tmpfs, which only root can mount: without root
//! that test says it is skipped. Node and NATS faults are in `cluster.rs`,
//! the server's own SIGKILL in `durability.rs`.

use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use crate::common::pg::is_root;
use crate::common::traffic::{
    Answer, Plan, Senders, Sent, assert_all_queued, assert_answered_in_time,
    assert_created_or_unavailable, created_ids, slowest,
};
use crate::common::{ServerProcess, eventually_within};

/// How long the senders may take to get going, and the server to serve
/// again once a fault is gone (a pool reconnecting, a restarted database
/// replaying its WAL).
const SETTLE: Duration = Duration::from_secs(60);

/// Sends answered 201 before a fault, and after it, for the test to go on.
const BEFORE: usize = 50;
const AFTER: usize = 50;

/// What every fault test asserts once its senders have stopped.
async fn assert_weathered(server: &mut ServerProcess, who: &crate::common::Account, sent: &[Sent]) {
    assert_created_or_unavailable(sent);
    assert_answered_in_time(sent);
    assert!(
        sent.iter().any(|s| s.answer == Answer::Unavailable),
        "no send was refused: the fault never reached the server"
    );
    server.assert_running();
    assert_all_queued(&server.api, who, &created_ids(sent)).await;
    let refused = sent
        .iter()
        .filter(|s| s.answer == Answer::Unavailable)
        .count();
    eprintln!(
        "faults: {} sends: {} answered 201 (slowest {:?}), {refused} answered 503 (slowest {:?})",
        sent.len(),
        sent.len() - refused,
        slowest(sent, |a| matches!(a, Answer::Created(_))),
        slowest(sent, |a| *a == Answer::Unavailable),
    );
}

#[cfg(sealpost_pg_tests)]
mod postgres {
    use super::*;
    use crate::common::Api;
    use crate::common::pg::PrivatePg;
    use crate::common::traffic::{ANSWER_BOUND, ANSWER_MARGIN};
    use crate::common::ws::WsClient;

    /// The server's bound on `/readyz`'s wait for the database.
    const READY_DEADLINE: Duration = Duration::from_secs(2);

    /// One timed `GET /readyz`: its status, error code and how long it took.
    async fn timed_readyz(api: &Api) -> (u16, String, Duration) {
        let started = Instant::now();
        let reply = api.get("/readyz", None).await;
        (
            reply.status.as_u16(),
            reply.code().to_owned(),
            started.elapsed(),
        )
    }

    /// Asserts that `/readyz` says 503 `unavailable`, within its deadline.
    async fn assert_not_ready(api: &Api, what: &str) {
        let (status, code, took) = timed_readyz(api).await;
        assert_eq!(
            (status, code.as_str()),
            (503, "unavailable"),
            "/readyz {what}"
        );
        assert!(
            took <= READY_DEADLINE + ANSWER_MARGIN,
            "/readyz {what} took {took:?}, past its deadline of {READY_DEADLINE:?}"
        );
        eprintln!("faults: /readyz {what}: 503 in {took:?}");
    }

    /// Waits (at most [`SETTLE`]) until `/readyz` says 200 again.
    async fn until_ready(api: &Api, what: &str) {
        let started = Instant::now();
        eventually_within(&format!("/readyz 200 {what}"), SETTLE, async || {
            (timed_readyz(api).await.0 == 200).then_some(())
        })
        .await;
        eprintln!("faults: ready again {what} in {:?}", started.elapsed());
    }

    /// How long the database stays paused: twice the deadline, so that
    /// requests pass it and the committer fails batches in a row.
    const PAUSE: Duration = Duration::from_secs(10);

    /// How long the database stays down: longer than the deadline, so
    /// that a send made as it went down must pass its deadline. (With 4 s,
    /// under the 5 s deadline, sends waited for the pool to reconnect and
    /// all went through when a quick restart came back in time, and the
    /// test could not tell that the fault had reached the server.)
    const DOWN: Duration = Duration::from_secs(8);

    /// PostgreSQL stops answering (SIGSTOP to all of its processes) for
    /// 10 s: sends are answered 503 at their deadline instead of hanging,
    /// on REST and on a socket, `/readyz` says 503 within its own
    /// deadline, and once it is resumed the server is ready and stores
    /// again, with nothing answered 201 lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_paused_answers_within_the_deadline_and_loses_nothing() {
        let pg = PrivatePg::start().await;
        let mut server = ServerProcess::spawn(&pg.url(), &[]);
        let alice = server.account("alice").await;
        let bob = server.account("bob").await;
        let carol = server.account("carol").await;
        let (mut carol_ws, _) = WsClient::ready(&server.api, &carol).await;
        let senders = Senders::start(&server.api, &alice, bob.id, Plan::STEADY);
        senders.until_created(BEFORE, SETTLE).await;

        pg.pause();
        let paused = Instant::now();
        // A send on a socket: `sent`, or an `error` frame `unavailable`
        // with its ref, within the deadline as on REST.
        carol_ws
            .send_message("paused", bob.id, b"on a socket")
            .await;
        let reply = carol_ws.json().await;
        let took = paused.elapsed();
        assert_eq!(reply["ref"], "paused", "{reply}");
        assert!(
            reply["type"] == "sent" || (reply["type"] == "error" && reply["code"] == "unavailable"),
            "a socket's send during the pause: {reply}"
        );
        assert!(
            took <= ANSWER_BOUND,
            "the socket's send was answered after {took:?}"
        );
        eprintln!(
            "faults: a socket's send during the pause: {} in {took:?}",
            reply["type"]
        );
        assert_not_ready(&server.api, "just after the pause").await;
        tokio::time::sleep_until(paused + PAUSE - READY_DEADLINE - ANSWER_MARGIN).await;
        assert_not_ready(&server.api, "at the end of the pause").await;
        tokio::time::sleep_until(paused + PAUSE).await;
        let during = senders.sent().len();
        pg.resume();

        until_ready(&server.api, "after the resume").await;
        senders
            .until_created(senders.created() + AFTER, SETTLE)
            .await;
        let sent = senders.finish().await;
        eprintln!("faults: {during} sends answered by the end of the pause");
        assert_weathered(&mut server, &bob, &sent).await;
        drop(server);
        drop(pg);
    }

    /// PostgreSQL crashes (`pg_ctl stop -m immediate`: every process quits
    /// at once, no checkpoint) and comes back on the same port 4 s later
    /// after replaying its WAL: sends are refused with 503 while it is
    /// gone, the pools reconnect by themselves, and every message answered
    /// 201 before the crash is there after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_crashed_and_restarted_loses_nothing() {
        let mut pg = PrivatePg::start().await;
        let mut server = ServerProcess::spawn(&pg.url(), &[]);
        let alice = server.account("alice").await;
        let bob = server.account("bob").await;
        let senders = Senders::start(&server.api, &alice, bob.id, Plan::STEADY);
        senders.until_created(BEFORE, SETTLE).await;

        pg.crash();
        let crashed = Instant::now();
        assert_not_ready(&server.api, "while the database is down").await;
        tokio::time::sleep_until(crashed + DOWN).await;
        pg.restart().await;

        until_ready(&server.api, "after the restart").await;
        senders
            .until_created(senders.created() + AFTER, SETTLE)
            .await;
        let sent = senders.finish().await;
        assert_weathered(&mut server, &bob, &sent).await;
        drop(server);
        drop(pg);
    }
}

/// The tmpfs the full-disk test runs its database on.
const DISK: &str = "8m";

/// Room left on the disk once the filler has taken the rest: less than
/// SQLite's write-ahead log grows to between checkpoints (about 4 MiB), so
/// that the sends fill it within seconds.
const LEFT: u64 = 256 * 1024;

/// Sends refused on the full disk before room is made: two per sender.
const REFUSALS: usize = 16;

/// A tmpfs mounted on a temporary directory for one test, unmounted when
/// dropped, on a panic too. Drop whatever has files open in it first.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs: {status}");
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with a file beside the database, then gives back
    /// `left` bytes of it.
    fn fill(&self, left: u64) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        // At most the disk's size in chunks: 8 MiB is 128 of them.
        for _ in 0..1024 {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = file.flush();
        let written = file.metadata().expect("filler size").len();
        file.set_len(written.saturating_sub(left))
            .expect("shrink the filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still has a file open in it: detach it now, it goes
            // once they close.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// SQLite's disk fills up under steady sends: they are refused with 503
/// `unavailable` (a full disk is "not now", never a 500), the server stays
/// up and ready to read, nothing answered 201 is lost, and once room is
/// made (the filler deleted) sends are stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_disk_refuses_cleanly_and_recovers() {
    if !is_root() {
        eprintln!(
            "SKIPPED sqlite_on_a_full_disk_refuses_cleanly_and_recovers: not root, cannot mount \
             a tmpfs"
        );
        return;
    }
    let disk = Tmpfs::mount(DISK);
    let url = format!("sqlite://{}", disk.path().join("sealpost.db").display());
    let mut server = ServerProcess::spawn(&url, &[]);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let senders = Senders::start(&server.api, &alice, bob.id, Plan::STEADY);
    senders.until_created(BEFORE, SETTLE).await;

    let filler = disk.fill(LEFT);
    // Refused again and again: each failure reopens the write connection.
    eventually_within("sends refused on the full disk", SETTLE, async || {
        let refused = senders
            .sent()
            .iter()
            .filter(|s| s.answer == Answer::Unavailable)
            .count();
        (refused >= REFUSALS).then_some(())
    })
    .await;
    // Full, and still serving reads.
    server.get("/readyz", None).await.expect(200);
    server.assert_running();
    let refused_at = senders.sent().len();

    std::fs::remove_file(&filler).expect("delete the filler");
    let freed = Instant::now();
    let created = senders.created();
    senders.until_created(created + 1, SETTLE).await;
    eprintln!(
        "faults: a send stored again {:?} after room was made",
        freed.elapsed()
    );
    senders
        .until_created(senders.created() + AFTER, SETTLE)
        .await;
    let sent = senders.finish().await;
    eprintln!("faults: {refused_at} sends answered when the disk was first full");
    assert_weathered(&mut server, &bob, &sent).await;
    drop(server);
    drop(disk);
}
