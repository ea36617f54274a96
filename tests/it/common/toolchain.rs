//! What the JavaScript tests need beyond Rust, set up by the tests
//! themselves so that `cargo test --workspace` passes on a fresh clone with
//! nothing installed by hand: each npm directory's dependencies, installed
//! from its lockfile (`npm ci`) when missing or older than the lockfile, and
//! a Chromium for the demo's browser test, found or (as root, on Debian)
//! installed, and a Python virtual environment for the Web Push
//! cross-check, installed from its pinned requirements.
//!
//! Many tests ask at once, from threads of one process or from processes of
//! their own (nextest), so each install runs under an exclusive file lock:
//! the first to take it installs, the others wait and, holding the lock in
//! turn, find the work done. Anything that cannot be set up fails the test
//! with what to do; nothing is skipped.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Where a Chromium is looked for when `CHROMIUM` is not set: Debian's
/// `chromium` package, and the name other distributions give it.
const CHROMIUM_PATHS: [&str; 2] = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];

/// Makes sure `dir` (holding `package.json` and `package-lock.json`) has its
/// npm dependencies installed as the lockfile pins them, running `npm ci`
/// once if not; returns `dir`. Blocking: call it from `spawn_blocking`.
pub fn npm_ready(dir: &Path) -> PathBuf {
    let lockfile = dir.join("package-lock.json");
    // npm ci reads the lockfile and never writes it, so it is a lock file
    // that always exists and that no install replaces (node_modules, which
    // npm ci deletes first, could not hold one). flock is advisory on
    // Linux: npm reads it as ever.
    with_lock(
        &lockfile,
        || npm_fresh(dir),
        || {
            let started = Instant::now();
            let output = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run npm (Node.js 20+ with npm is required): {e}")
                });
            assert!(
                output.status.success(),
                "npm ci in {} failed ({}):\n{}\n{}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
            eprintln!(
                "installed the npm dependencies of {} in {:.1?}",
                dir.display(),
                started.elapsed()
            );
        },
    );
    assert!(
        npm_fresh(dir),
        "npm ci in {} left no node_modules/.package-lock.json newer than package-lock.json",
        dir.display()
    );
    dir.to_owned()
}

/// A Python virtual environment under the target directory with the
/// pinned `requirements` installed (`python3 -m venv`, then `pip install
/// -r`), made once and again whenever `requirements` is newer than the
/// install; returns its `python`. Blocking: call it from `spawn_blocking`.
pub fn python_venv(name: &str, requirements: &Path) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    // Written last, so it exists only after a complete install.
    let marker = venv.join("installed-requirements.txt");
    let fresh = || {
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        match (modified(&marker), modified(requirements)) {
            (Some(installed), Some(wanted)) => installed >= wanted && python.is_file(),
            _ => false,
        }
    };
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).expect("the target's tmp directory");
    let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.lock"));
    with_lock(&lock, fresh, || {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&venv);
        let run = |program: &Path, args: &[&std::ffi::OsStr]| {
            let output = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {} (Python 3 with venv and pip is required: on Debian, \
                         apt-get install python3-venv): {e}",
                        program.display()
                    )
                });
            assert!(
                output.status.success(),
                "{} {:?} failed ({}); the Web Push cross-check needs Python 3 with venv and \
                 pip, and PyPI reachable:\n{}\n{}",
                program.display(),
                args,
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        };
        run(
            Path::new("python3"),
            &["-m".as_ref(), "venv".as_ref(), venv.as_os_str()],
        );
        run(
            &python,
            &[
                "-m".as_ref(),
                "pip".as_ref(),
                "install".as_ref(),
                "--quiet".as_ref(),
                "--disable-pip-version-check".as_ref(),
                "--require-virtualenv".as_ref(),
                "-r".as_ref(),
                requirements.as_os_str(),
            ],
        );
        std::fs::copy(requirements, &marker).expect("marking the install done");
        eprintln!(
            "installed {} into {} in {:.1?}",
            requirements.display(),
            venv.display(),
            started.elapsed()
        );
    });
    assert!(fresh(), "the venv at {} is not installed", venv.display());
    python
}

/// Whether `dir`'s install matches its lockfile: `npm ci` writes
/// `node_modules/.package-lock.json` last, so it exists and is no older than
/// `package-lock.json` unless the install is missing, was cut short, or
/// predates a change of the lockfile (a pull, a checkout).
fn npm_fresh(dir: &Path) -> bool {
    let modified = |path: PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    match (
        modified(dir.join("node_modules/.package-lock.json")),
        modified(dir.join("package-lock.json")),
    ) {
        (Some(installed), Some(locked)) => installed >= locked,
        _ => false,
    }
}

/// The Chromium for the browser test: `CHROMIUM` if set, else the first of
/// [`CHROMIUM_PATHS`] present; when there is none and the tests run as root
/// with `apt-get`, Debian's `chromium` package is installed first. Panics
/// saying what to do otherwise. Blocking: call it from `spawn_blocking`.
pub fn chromium() -> PathBuf {
    let look = || {
        find_chromium(
            std::env::var_os("CHROMIUM"),
            |path| path.is_file(),
            is_root() && Path::new("/usr/bin/apt-get").is_file(),
        )
    };
    match look() {
        Browser::Found(path) => return path,
        Browser::Missing(why) => panic!("{why}"),
        Browser::Install => {}
    }
    // apt is machine-wide, so the lock is too (and apt waits on dpkg's own
    // lock, for an install another program started).
    let lock = std::env::temp_dir().join("sealpost-test-chromium-install.lock");
    with_lock(
        &lock,
        || matches!(look(), Browser::Found(_)),
        || {
            eprintln!("no Chromium found: installing Debian's chromium package");
            let started = Instant::now();
            apt(&["update", "-qq"]);
            apt(&[
                "install",
                "-y",
                "-qq",
                "-o",
                "DPkg::Lock::Timeout=600",
                "chromium",
            ]);
            eprintln!("installed chromium in {:.1?}", started.elapsed());
        },
    );
    match look() {
        Browser::Found(path) => path,
        _ => panic!(
            "installed Debian's chromium package, but found no browser at {CHROMIUM_PATHS:?}: \
             set CHROMIUM to its path"
        ),
    }
}

fn apt(args: &[&str]) {
    let output = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run apt-get: {e}"));
    assert!(
        output.status.success(),
        "apt-get {} failed ({}); install Chromium by hand (apt-get install chromium) or set \
         CHROMIUM:\n{}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// Whether this process runs as root: `/proc/self` belongs to the
/// effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What [`find_chromium`] decided.
#[derive(Debug, PartialEq, Eq)]
enum Browser {
    Found(PathBuf),
    /// None is installed, and this process may install Debian's.
    Install,
    /// None is installed, and none can be: why, and what to do.
    Missing(String),
}

/// The decision of [`chromium`], apart from the machine: `env` is
/// `CHROMIUM`, `exists` says whether a file is there, `can_install` whether
/// this process may run apt-get as root. A `CHROMIUM` that names nothing is
/// an error, never a reason to install another browser.
fn find_chromium(
    env: Option<OsString>,
    exists: impl Fn(&Path) -> bool,
    can_install: bool,
) -> Browser {
    if let Some(chosen) = env.filter(|v| !v.is_empty()) {
        let chosen = PathBuf::from(chosen);
        return if exists(&chosen) {
            Browser::Found(chosen)
        } else {
            Browser::Missing(format!(
                "CHROMIUM is set to {}, which does not exist",
                chosen.display()
            ))
        };
    }
    if let Some(found) = CHROMIUM_PATHS.iter().map(Path::new).find(|p| exists(p)) {
        return Browser::Found(found.to_owned());
    }
    if can_install {
        return Browser::Install;
    }
    Browser::Missing(format!(
        "the demo's browser test needs Chromium: none at {CHROMIUM_PATHS:?}, and only root can \
         install it here. Run `apt-get install chromium` as root, or set CHROMIUM to a Chromium \
         or Chrome binary"
    ))
}

/// Runs `install` unless `ready` holds, with an exclusive lock on `path`
/// (created if missing) held around the second look and the install: one
/// caller installs, the others block until it is done and then see `ready`.
fn with_lock(path: &Path, ready: impl Fn() -> bool, install: impl FnOnce()) {
    if ready() {
        return;
    }
    let file = File::options()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {} to lock it: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    // Someone else may have finished while this one waited.
    if !ready() {
        install();
    }
    // Unlocked when `file` is closed.
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn found(path: &str) -> Browser {
        Browser::Found(PathBuf::from(path))
    }

    #[test]
    fn chromium_comes_from_the_variable_then_the_usual_paths_then_an_install() {
        let only = |present: &'static [&'static str]| {
            move |p: &Path| present.iter().any(|x| p == Path::new(x))
        };
        let none = |_: &Path| false;

        // CHROMIUM wins, even over an installed one.
        assert_eq!(
            find_chromium(
                Some("/opt/chrome".into()),
                only(&["/opt/chrome", "/usr/bin/chromium"]),
                true
            ),
            found("/opt/chrome")
        );
        // A CHROMIUM that names nothing fails; it is not replaced by an
        // install.
        match find_chromium(Some("/opt/nothing".into()), none, true) {
            Browser::Missing(why) => assert!(why.contains("/opt/nothing"), "{why}"),
            other => panic!("{other:?}"),
        }
        // An empty CHROMIUM counts as unset.
        assert_eq!(
            find_chromium(Some("".into()), only(&["/usr/bin/chromium"]), false),
            found("/usr/bin/chromium")
        );
        // Debian's name first, then the other.
        assert_eq!(
            find_chromium(
                None,
                only(&["/usr/bin/chromium-browser", "/usr/bin/chromium"]),
                false
            ),
            found("/usr/bin/chromium")
        );
        assert_eq!(
            find_chromium(None, only(&["/usr/bin/chromium-browser"]), false),
            found("/usr/bin/chromium-browser")
        );
        // None installed: installed by root, else a failure saying how.
        assert_eq!(find_chromium(None, none, true), Browser::Install);
        match find_chromium(None, none, false) {
            Browser::Missing(why) => assert!(why.contains("apt-get install chromium"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_install_runs_once_however_many_ask_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let done = dir.path().join("done");
        let installs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lock, done, installs) = (lock.clone(), done.clone(), installs.clone());
                std::thread::spawn(move || {
                    with_lock(
                        &lock,
                        || done.exists(),
                        || {
                            installs.fetch_add(1, Ordering::SeqCst);
                            // Long enough for the others to queue on the lock.
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            std::fs::write(&done, "").unwrap();
                        },
                    );
                    assert!(done.exists(), "returned before the install was done");
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(installs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_install_older_than_its_lockfile_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |path: &str, at: std::time::SystemTime| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            File::create(&path).unwrap().set_modified(at).unwrap();
        };
        let now = std::time::SystemTime::now();
        let earlier = now - std::time::Duration::from_secs(60);
        touch("package-lock.json", now);
        assert!(!npm_fresh(dir.path()), "no node_modules");
        touch("node_modules/.package-lock.json", earlier);
        assert!(
            !npm_fresh(dir.path()),
            "installed before the lockfile changed"
        );
        touch("node_modules/.package-lock.json", now);
        assert!(npm_fresh(dir.path()));
    }
}
