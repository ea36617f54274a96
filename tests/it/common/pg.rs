//! A private PostgreSQL cluster for the fault tests, which pause, crash and
//! restart their database: never the shared one of
//! `SEALPOST_TEST_DATABASE_URL`, which other tests use at the same time.
//!
//! [`PrivatePg::start`] runs `initdb` into a temporary directory and starts
//! `postgres` on it as a child process of the test, as the `postgres` OS
//! account (PostgreSQL refuses to run as root), listening on 127.0.0.1 on a
//! free port and with its Unix socket inside that directory. It needs root
//! (to become `postgres`) and the server binaries
//! (`SEALPOST_TEST_PG_BIN`, default `/usr/lib/postgresql/15/bin`); without
//! either it panics naming what is missing: these tests belong with the
//! PostgreSQL half of the suite, which CI runs as root.
//!
//! Only the processes this cluster started are ever signalled, by pid: its
//! postmaster (the child) and that postmaster's own children.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

/// How long a fresh or restarted cluster may take to accept queries (a
/// restart after a crash replays its WAL first).
const START: Duration = Duration::from_secs(30);

pub struct PrivatePg {
    /// initdb, pg_ctl and postgres.
    bin: PathBuf,
    /// The `postgres` account's uid and gid.
    uid: u32,
    gid: u32,
    port: u16,
    /// `None` while stopped.
    postmaster: Option<Child>,
    /// Holds `data/` (the cluster), `socket/` and `log`; removed last.
    dir: tempfile::TempDir,
}

impl PrivatePg {
    /// A fresh cluster, running and accepting queries.
    pub async fn start() -> Self {
        assert!(
            is_root(),
            "the fault tests start a PostgreSQL of their own as the `postgres` account and \
             must run as root (as CI does)"
        );
        let bin = std::env::var_os("SEALPOST_TEST_PG_BIN")
            .filter(|b| !b.is_empty())
            .map_or_else(
                || PathBuf::from("/usr/lib/postgresql/15/bin"),
                PathBuf::from,
            );
        assert!(
            bin.join("initdb").is_file() && bin.join("postgres").is_file(),
            "no initdb and postgres in {} (set SEALPOST_TEST_PG_BIN to the PostgreSQL server \
             binaries)",
            bin.display()
        );
        let (uid, gid) = account("postgres").unwrap_or_else(|| {
            panic!("no `postgres` account in /etc/passwd to run a private PostgreSQL as")
        });
        let dir = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the temp dir");
        std::fs::create_dir(dir.path().join("socket")).expect("socket dir");
        std::os::unix::fs::chown(dir.path().join("socket"), Some(uid), Some(gid))
            .expect("chown the socket dir");
        let mut pg = Self {
            bin,
            uid,
            gid,
            port: free_port(),
            postmaster: None,
            dir,
        };
        let data = pg.data();
        let status = pg
            .as_postgres("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            // The cluster lives for one test: fsync at initdb buys nothing.
            .arg("--no-sync")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        pg.run().await;
        pg
    }

    /// The URL of database `postgres` on this cluster.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of this cluster's binaries, run as `postgres` (std drops
    /// root's supplementary groups with the uid).
    fn as_postgres(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        command
    }

    /// Starts the postmaster on the cluster's port; returns once it
    /// answers a query.
    async fn run(&mut self) {
        assert!(self.postmaster.is_none(), "PostgreSQL is already running");
        let log = std::fs::File::create(self.dir.path().join("log")).expect("log file");
        std::os::unix::fs::chown(self.dir.path().join("log"), Some(self.uid), Some(self.gid))
            .expect("chown the log");
        let child = self
            .as_postgres("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path().join("socket"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.postmaster = Some(child);
        let deadline = tokio::time::Instant::now() + START;
        loop {
            use sqlx::Connection;
            if sqlx::PgConnection::connect(&self.url()).await.is_ok() {
                return;
            }
            if let Some(status) = self.postmaster.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited at start ({status}): {}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private PostgreSQL did not accept queries within {START:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn postmaster_pid(&self) -> u32 {
        self.postmaster
            .as_ref()
            .expect("PostgreSQL is running")
            .id()
    }

    /// SIGSTOP to the postmaster, then to each of its children (backends,
    /// checkpointer, WAL writer): the whole server stops answering, as a
    /// paused VM's would, while its sockets stay open. The postmaster goes
    /// first so that it forks no child after the list is read.
    pub fn pause(&self) {
        let postmaster = self.postmaster_pid();
        signal("STOP", &[postmaster]);
        signal("STOP", &children(postmaster));
    }

    /// SIGCONT to the children, then the postmaster.
    pub fn resume(&self) {
        let postmaster = self.postmaster_pid();
        signal("CONT", &children(postmaster));
        signal("CONT", &[postmaster]);
    }

    /// Crashes the server: `pg_ctl stop -m immediate`, which has every
    /// process quit at once without a checkpoint (the next start replays
    /// the WAL, as after a power cut). Then reaps the postmaster.
    pub fn crash(&mut self) {
        let status = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop -m immediate: {status}");
        let mut postmaster = self.postmaster.take().expect("PostgreSQL is running");
        postmaster.wait().expect("reap postgres");
    }

    /// Starts the server again after [`PrivatePg::crash`], on the same port.
    pub async fn restart(&mut self) {
        self.run().await;
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        // A paused server ignores everything until continued.
        signal("CONT", &children(postmaster.id()));
        signal("CONT", &[postmaster.id()]);
        let _ = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if postmaster.try_wait().ok().flatten().is_none() {
            let _ = postmaster.kill();
        }
        let _ = postmaster.wait();
    }
}

/// Whether this process runs as root: the owner of `/proc/self` is the
/// process's effective uid.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of the account `name`, from /etc/passwd.
fn account(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// The pids whose parent is `parent`, from /proc.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .collect()
}

/// The parent pid in `/proc/<pid>/stat`: the field after the command,
/// which is in parentheses and may itself hold spaces or parentheses.
fn parent_of(pid: u32) -> Option<u32> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `kill -<name>` to exactly `pids`.
fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    // A child may have exited since it was listed; the others were
    // signalled all the same.
    let _ = status;
}
