//! The thaw guard: a separate process that thaws a guest's filesystems unless the daemon says it
//! has done so itself, so that no path leaves a guest frozen, even a vmsnapd that crashes, is
//! killed, or hangs in a libvirt call while the guest is frozen.
//!
//! # Protocol
//!
//! The daemon arms a guard just *before* it freezes a guest ([`ThawGuard::arm`]). The guard is
//! the daemon's own binary run as
//! `vmsnapd --thaw-guard UUID --guard-uri URI --guard-deadline-ms MS`, with stdin and stdout
//! piped to the daemon and stderr inherited:
//!
//! 1. The guard opens its own libvirt connection to URI and looks the domain up by UUID. Then it
//!    prints `ready` on stdout. If it cannot, it exits 1 without printing `ready`, and `arm`
//!    fails: the daemon must not freeze then.
//! 2. The daemon freezes, snapshots, thaws, then writes `disarm` on the guard's stdin
//!    ([`ThawGuard::disarm`]): the guard exits 0 and does nothing.
//! 3. If instead the guard's stdin reaches end of file or fails (the daemon dropped the guard
//!    without disarming, panicked, crashed or was killed: the kernel closes its end of the pipe),
//!    or if MS milliseconds pass since the guard started, the guard thaws the guest at once
//!    (virDomainFSThaw) and exits 10 if the thaw succeeded, 11 if it kept failing.
//!
//! A thaw that fails is retried until the agent answers one (up to 30 minutes, then a loud log),
//! reconnecting if the connection died (libvirtd restarted: seen to thaw about 1 s after libvirtd
//! came back). A hung agent fails each attempt after libvirt's agent timeout, and may run a
//! freeze it had queued once it resumes, minutes later: the thaw that it finally answers comes
//! after that freeze, so the guest ends thawed.
//!
//! The guard ignores SIGTERM, SIGINT and SIGHUP (see `ignore_stop_signals`): stopping vmsnapd
//! from a terminal or from systemd signals the guard too, and it must still thaw. The daemon's
//! deadline must therefore stay well below systemd's TimeoutStopSec, after which everything in
//! the unit is killed with SIGKILL.
//!
//! Exit statuses: 0 disarmed, nothing done; 1 could not start (no `ready`); 10 thawed (stdin
//! closed or deadline passed); 11 thaw failed. Lines on stdin other than `disarm` are logged and
//! ignored. Every step is logged to stderr on one line starting `vmsnapd thaw guard:`.
//!
//! Thawing a guest that is not frozen is harmless (libvirt reports 0 filesystems thawed), so a
//! guard that thaws after the daemon already did, or before it froze, does no damage.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;

use crate::virt_ext;

/// What the guard prints once it can thaw.
const READY: &str = "ready";
/// What the daemon writes when it has thawed by itself.
const DISARM: &str = "disarm";

/// How long [`ThawGuard::arm`] waits for `ready` (a libvirt connect and a lookup: milliseconds
/// normally, seconds with a slow libvirtd).
const READY_WAIT: Duration = Duration::from_secs(10);
/// How long [`ThawGuard::disarm`] waits for the guard to exit after `disarm`.
const DISARM_WAIT: Duration = Duration::from_secs(5);
/// How long the guard keeps retrying a failing thaw. A hung agent (stopped, or starved of CPU)
/// may answer minutes later, and may then run a freeze it had queued before our thaws: the guard
/// keeps thawing until the agent itself answers a thaw (thawed, or "not frozen"), which it does
/// only after everything queued before it. Past this bound it gives up with a loud log; a
/// stopped service (systemd's TimeoutStopSec) ends it sooner.
const THAW_GIVE_UP_AFTER: Duration = Duration::from_secs(30 * 60);
/// Longest pause between two thaw attempts.
const THAW_MAX_PAUSE: Duration = Duration::from_secs(5);

const EXIT_DISARMED: u8 = 0;
const EXIT_NOT_STARTED: u8 = 1;
const EXIT_THAWED: u8 = 10;
const EXIT_THAW_FAILED: u8 = 11;

/// A running thaw guard for one domain. Disarm it after thawing; dropping it without
/// [`disarm`](ThawGuard::disarm) makes the guard thaw the guest at once.
///
/// `arm` and `disarm` block (up to [`READY_WAIT`] and [`DISARM_WAIT`]): call them from the
/// libvirt thread or `spawn_blocking`, never on a tokio worker.
#[allow(dead_code)] // used by the snapshot engine
pub struct ThawGuard {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    domain_uuid: String,
}

#[allow(dead_code)] // used by the snapshot engine
impl ThawGuard {
    /// Starts a guard for the domain `domain_uuid` on `uri` that thaws it `deadline` after its
    /// start at the latest, and returns once the guard is ready to thaw. Call it before freezing;
    /// if it fails, do not freeze.
    pub fn arm(uri: &str, domain_uuid: &str, deadline: Duration) -> io::Result<ThawGuard> {
        let mut command = Command::new(own_exe()?);
        command
            .arg("--thaw-guard")
            .arg(domain_uuid)
            .arg("--guard-uri")
            .arg(uri)
            .arg("--guard-deadline-ms")
            .arg(deadline.as_millis().to_string());
        ThawGuard::spawn(command, domain_uuid, READY_WAIT)
    }

    /// Starts `command` as a guard and waits up to `ready_wait` for its `ready` line.
    fn spawn(mut command: Command, domain_uuid: &str, ready_wait: Duration) -> io::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            kill_and_reap(&mut child);
            return Err(io::Error::other("the thaw guard has no stdout"));
        };
        // A thread reads the first line so the wait can be bounded; it ends when the line comes
        // or the child's stdout closes (the child exits or is killed below).
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("thaw-guard-ready".to_string())
            .spawn(move || {
                let mut line = String::new();
                let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
                let _ = line_tx.send(read);
            })
            .inspect_err(|_| kill_and_reap(&mut child))?;
        let failure = match line_rx.recv_timeout(ready_wait) {
            Ok(Ok(line)) if line.trim_end() == READY => {
                return Ok(ThawGuard {
                    child: Some(child),
                    stdin,
                    domain_uuid: domain_uuid.to_string(),
                })
            }
            Ok(Ok(line)) if line.is_empty() => {
                // End of file: the guard gave up; its reason is on the shared stderr.
                let status = wait_bounded(&mut child, Duration::from_secs(1));
                io::Error::other(format!(
                    "the thaw guard exited before it was ready ({})",
                    status.map_or_else(|| "still running".to_string(), |s| s.to_string())
                ))
            }
            Ok(Ok(line)) => io::Error::other(format!(
                "the thaw guard said {:?} instead of {READY:?}",
                line.trim_end()
            )),
            Ok(Err(e)) => io::Error::new(e.kind(), format!("cannot read the thaw guard: {e}")),
            Err(RecvTimeoutError::Disconnected) => {
                io::Error::other("the thread reading the thaw guard stopped")
            }
            Err(RecvTimeoutError::Timeout) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the thaw guard was not ready within {} s",
                    ready_wait.as_secs_f32()
                ),
            ),
        };
        drop(stdin);
        kill_and_reap(&mut child);
        Err(failure)
    }

    /// Tells the guard the daemon has thawed the guest itself, and waits for it to exit.
    ///
    /// Fails if the guard did not confirm in time (it is killed then), or if it had already
    /// thawed the guest on its own because its deadline passed: the freeze then did not last
    /// until the daemon's thaw, which the caller should treat as a failed quiesce.
    pub fn disarm(mut self) -> io::Result<()> {
        let (Some(mut child), Some(mut stdin)) = (self.child.take(), self.stdin.take()) else {
            return Err(io::Error::other("the thaw guard is already gone"));
        };
        // A write error means the guard has exited already; its status says why.
        let _ = stdin
            .write_all(format!("{DISARM}\n").as_bytes())
            .and_then(|()| stdin.flush());
        drop(stdin);
        let Some(status) = wait_bounded(&mut child, DISARM_WAIT) else {
            kill_and_reap(&mut child);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the thaw guard of {} did not exit within {} s of disarm; killed it",
                    self.domain_uuid,
                    DISARM_WAIT.as_secs()
                ),
            ));
        };
        match status.code().and_then(|c| u8::try_from(c).ok()) {
            Some(EXIT_DISARMED) => Ok(()),
            Some(EXIT_THAWED) => Err(io::Error::other(format!(
                "the thaw guard of {} had already thawed the guest (its deadline passed)",
                self.domain_uuid
            ))),
            Some(EXIT_THAW_FAILED) => Err(io::Error::other(format!(
                "the thaw guard of {} tried to thaw the guest before disarm and failed",
                self.domain_uuid
            ))),
            _ => Err(io::Error::other(format!(
                "the thaw guard of {} ended unexpectedly ({status})",
                self.domain_uuid
            ))),
        }
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        // Closing stdin is the signal: the guard thaws on its own from here, whatever we do.
        if self.stdin.take().is_none() {
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        tracing::warn!(
            domain = %self.domain_uuid,
            "thaw guard dropped without disarm: it thaws the guest now"
        );
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // Reap it later without blocking here; if no thread can be started, it stays a zombie
        // until vmsnapd exits, which harms nothing.
        let _ = std::thread::Builder::new()
            .name("thaw-guard-reaper".to_string())
            .spawn(move || {
                let _ = child.wait();
            });
    }
}

/// The daemon's own executable. /proc/self/exe still works after a package upgrade replaced the
/// file on disk (current_exe() then names a deleted path), and runs the very same version, so the
/// protocol matches.
fn own_exe() -> io::Result<std::path::PathBuf> {
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe);
    }
    std::env::current_exe()
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < end => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            _ => return None,
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One line on stderr. A failed write (stderr gone with the daemon) is ignored: eprintln! would
/// panic, and the thaw matters more than the log.
fn log(domain_uuid: &str, message: &str) {
    let _ = writeln!(io::stderr(), "vmsnapd thaw guard: {domain_uuid}: {message}");
}

/// What the stdin reader thread reports.
enum Input {
    Line(String),
    Closed(String),
}

/// The guard process (`vmsnapd --thaw-guard`): see the module documentation for the protocol.
pub fn run_guard(uri: &str, domain_uuid: &str, deadline: Duration) -> ExitCode {
    let started = Instant::now();
    let deadline_at = started + deadline;
    // libvirt would print its errors itself; we log them on one line.
    virt::error::clear_error_callback();
    let signals = ignore_stop_signals(domain_uuid);

    let conn = match Connect::open(Some(uri)) {
        Ok(conn) => conn,
        Err(e) => {
            log(
                domain_uuid,
                &format!("cannot connect to {uri}: {}", e.message()),
            );
            return ExitCode::from(EXIT_NOT_STARTED);
        }
    };
    let dom = match conn.lookup_domain_by_uuid_string(domain_uuid) {
        Ok(dom) => dom,
        Err(e) => {
            log(
                domain_uuid,
                &format!("cannot find the domain: {}", e.message()),
            );
            return ExitCode::from(EXIT_NOT_STARTED);
        }
    };

    let (input_tx, input_rx) = mpsc::channel();
    let reader = std::thread::Builder::new()
        .name("stdin".to_string())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            loop {
                let mut line = String::new();
                let input = match stdin.read_line(&mut line) {
                    Ok(0) => Input::Closed("stdin closed".to_string()),
                    Ok(_) => Input::Line(line.trim().to_string()),
                    Err(e) => Input::Closed(format!("cannot read stdin: {e}")),
                };
                let closed = matches!(input, Input::Closed(_));
                if input_tx.send(input).is_err() || closed {
                    return;
                }
            }
        });
    if let Err(e) = reader {
        log(domain_uuid, &format!("cannot start the stdin reader: {e}"));
        return ExitCode::from(EXIT_NOT_STARTED);
    }

    let mut stdout = io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{READY}").and_then(|()| stdout.flush()) {
        // The daemon is gone before the freeze; thawing is harmless and stdin is closed too.
        log(domain_uuid, &format!("cannot say ready: {e}"));
    } else {
        log(
            domain_uuid,
            &format!("ready, deadline in {} ms", deadline.as_millis()),
        );
    }

    let reason = loop {
        for (name, flag) in &signals {
            if flag.swap(false, Ordering::SeqCst) {
                log(domain_uuid, &format!("ignoring {name}, still guarding"));
            }
        }
        let left = deadline_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break format!("deadline of {} ms passed", deadline.as_millis());
        }
        // Wake now and then to log ignored signals.
        match input_rx.recv_timeout(left.min(Duration::from_millis(250))) {
            Ok(Input::Line(line)) if line == DISARM => {
                log(domain_uuid, "disarmed, not thawing");
                return ExitCode::from(EXIT_DISARMED);
            }
            Ok(Input::Line(line)) => log(domain_uuid, &format!("ignoring {line:?}")),
            Ok(Input::Closed(why)) => break why,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break "stdin closed".to_string(),
        }
    };
    log(domain_uuid, &format!("{reason}: thawing"));
    if thaw(uri, domain_uuid, conn, dom) {
        ExitCode::from(EXIT_THAWED)
    } else {
        ExitCode::from(EXIT_THAW_FAILED)
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP harmless to the guard.
///
/// The guard must outlive a stopping daemon: a terminal's Ctrl-C (SIGINT) and hangup (SIGHUP)
/// go to the whole foreground process group, and systemd's default KillMode=control-group sends
/// SIGTERM to every process of the unit's cgroup. setsid() would only help with the terminal (a
/// new session is still in the cgroup) and needs libc; a handler helps in all three cases. The
/// daemon dies or exits, its end of our stdin closes, and the guard thaws and exits within
/// milliseconds, long before systemd escalates to SIGKILL. Returns the flags the handlers set,
/// for logging.
fn ignore_stop_signals(domain_uuid: &str) -> Vec<(&'static str, Arc<AtomicBool>)> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut flags = Vec::new();
    for (name, signal) in [("SIGTERM", SIGTERM), ("SIGINT", SIGINT), ("SIGHUP", SIGHUP)] {
        let flag = Arc::new(AtomicBool::new(false));
        match signal_hook::flag::register(signal, Arc::clone(&flag)) {
            Ok(_) => flags.push((name, flag)),
            Err(e) => log(domain_uuid, &format!("cannot ignore {name}: {e}")),
        }
    }
    flags
}

/// Thaws, retrying until the agent answers (up to [`THAW_GIVE_UP_AFTER`]), with a fresh
/// connection when the old one is dead (libvirtd restarted meanwhile). Returns whether the guest
/// is thawed.
fn thaw(uri: &str, domain_uuid: &str, conn: Connect, dom: Domain) -> bool {
    let first = Instant::now();
    let mut current = Some((conn, dom));
    let mut pause = Duration::from_millis(250);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match &current {
            Some((_, dom)) => match virt_ext::fs_thaw(dom) {
                Ok(n) => {
                    log(
                        domain_uuid,
                        &format!("thawed {n} filesystem(s) (attempt {attempt})"),
                    );
                    return true;
                }
                // An agent that refuses a thaw because nothing is frozen says so only in
                // words (qemu-ga on Linux answers 0 filesystems instead); libvirt passes its
                // text on with a generic error code.
                Err(e) if e.message().contains("not frozen") => {
                    log(domain_uuid, &format!("not frozen: {}", e.message()));
                    return true;
                }
                // A guest that is not running has no frozen filesystems; nor has one whose
                // domain is gone (destroyed and undefined: its QEMU went with it).
                Err(_) if !dom.is_active().unwrap_or(true) => {
                    log(domain_uuid, "the domain is not running: nothing to thaw");
                    return true;
                }
                Err(e) if is_no_domain(&e) => {
                    log(domain_uuid, "the domain is gone: nothing to thaw");
                    return true;
                }
                Err(e) => e.message().to_string(),
            },
            None => "no connection".to_string(),
        };
        if first.elapsed() >= THAW_GIVE_UP_AFTER {
            log(
                domain_uuid,
                &format!(
                    "thaw attempt {attempt} failed: {error}; GIVING UP after {} minutes: the \
                     guest may still be frozen; thaw it with: virsh domfsthaw {domain_uuid}",
                    THAW_GIVE_UP_AFTER.as_secs() / 60
                ),
            );
            return false;
        }
        // Every failure at first, then one in ten: a long wait stays readable.
        if attempt <= 5 || attempt % 10 == 0 {
            log(
                domain_uuid,
                &format!(
                    "thaw attempt {attempt} failed: {error}; retrying in {} ms",
                    pause.as_millis()
                ),
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(THAW_MAX_PAUSE);
        let alive = current
            .as_ref()
            .is_some_and(|(conn, _)| conn.is_alive().unwrap_or(false));
        if !alive {
            current = reconnect(uri, domain_uuid);
        }
    }
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

fn reconnect(uri: &str, domain_uuid: &str) -> Option<(Connect, Domain)> {
    let conn = Connect::open(Some(uri))
        .map_err(|e| {
            log(
                domain_uuid,
                &format!("cannot reconnect to {uri}: {}", e.message()),
            )
        })
        .ok()?;
    let dom = conn
        .lookup_domain_by_uuid_string(domain_uuid)
        .map_err(|e| {
            log(
                domain_uuid,
                &format!("cannot find the domain again: {}", e.message()),
            )
        })
        .ok()?;
    Some((conn, dom))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in guard speaking the protocol, so the daemon side is tested without libvirt:
    /// `script` runs under sh.
    fn fake(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    const GUARD: &str = r#"echo ready; read cmd; if [ "$cmd" = disarm ]; then exit 0; fi; echo eof > "$1"; exit 10"#;

    fn fake_guard(marker: &std::path::Path) -> Command {
        let mut command = fake(GUARD);
        command.arg("guard").arg(marker);
        command
    }

    #[test]
    fn thaw_guard_disarm_waits_for_a_clean_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("thawed");
        let guard =
            ThawGuard::spawn(fake_guard(&marker), "u", Duration::from_secs(5)).expect("ready");
        guard.disarm().expect("disarmed");
        assert!(!marker.exists());
    }

    #[test]
    fn thaw_guard_drop_closes_stdin_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first_marker = dir.path().join("first");
        let second_marker = dir.path().join("second");
        let first = ThawGuard::spawn(fake_guard(&first_marker), "a", Duration::from_secs(5))
            .expect("first ready");
        // A second guard must not inherit the first one's stdin, or dropping the first would not
        // reach its guard.
        let second = ThawGuard::spawn(fake_guard(&second_marker), "b", Duration::from_secs(5))
            .expect("second ready");
        let start = Instant::now();
        drop(first);
        assert!(start.elapsed() < Duration::from_millis(500));
        let end = Instant::now() + Duration::from_secs(5);
        while !first_marker.exists() {
            assert!(
                Instant::now() < end,
                "the first guard never saw end of file"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!second_marker.exists());
        second.disarm().expect("second disarmed");
    }

    #[test]
    fn thaw_guard_disarm_reports_a_guard_that_thawed_already() {
        let guard = ThawGuard::spawn(fake("echo ready; exit 10"), "u", Duration::from_secs(5))
            .expect("ready");
        std::thread::sleep(Duration::from_millis(100));
        let err = guard.disarm().expect_err("already thawed");
        assert!(err.to_string().contains("already thawed"), "{err}");
    }

    #[test]
    fn thaw_guard_disarm_is_bounded() {
        let guard = ThawGuard::spawn(
            fake("echo ready; exec sleep 30"),
            "u",
            Duration::from_secs(5),
        )
        .expect("ready");
        let start = Instant::now();
        let err = guard.disarm().expect_err("no exit");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() < DISARM_WAIT + Duration::from_secs(2));
    }

    #[test]
    fn thaw_guard_arm_fails_without_ready() {
        let start = Instant::now();
        let err = ThawGuard::spawn(fake("exec sleep 30"), "u", Duration::from_millis(300))
            .err()
            .expect("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the child was killed"
        );

        let err = ThawGuard::spawn(fake("exit 1"), "u", Duration::from_secs(5))
            .err()
            .expect("exits");
        assert!(
            err.to_string().contains("exited before it was ready"),
            "{err}"
        );

        let err = ThawGuard::spawn(
            fake("echo hello; exec sleep 30"),
            "u",
            Duration::from_secs(5),
        )
        .err()
        .expect("wrong word");
        assert!(err.to_string().contains("\"hello\""), "{err}");
    }
}
