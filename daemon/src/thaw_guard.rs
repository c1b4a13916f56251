//! The thaw guard: a separate process that thaws a guest's filesystems unless the daemon says it
//! has done so itself, so that no path leaves a guest frozen, even a vmsnapd that crashes, is
//! killed, or hangs in a libvirt call while the guest is frozen.
//!
//! # Protocol
//!
//! The daemon starts a guard early, while it still reads the VM and prepares the snapshot
//! ([`ThawGuard::start`]: the guard's start, about 12 ms, costs the create nothing then), and
//! arms it just *before* it freezes ([`PendingThawGuard::armed`]). The guard is the daemon's own
//! binary run as `vmsnapd --thaw-guard UUID --guard-uri URI --guard-deadline-ms MS`, with stdin
//! and stdout piped to the daemon and stderr inherited:
//!
//! 1. The guard opens its own libvirt connection to URI and looks the domain up by UUID. Then it
//!    prints `ready` on stdout. If it cannot, it exits 1 without printing `ready`, and arming
//!    fails: the daemon must not freeze then.
//!
//!    A *standby* guard (`vmsnapd --thaw-guard-standby --guard-uri URI`, see [`keep_standby`])
//!    is started ahead of need: it opens its libvirt connection, then waits for the line
//!    `guard UUID MS` on stdin and, from that line on, is the guard of that domain with that
//!    deadline exactly as above (it looks the domain up, connecting again once if the
//!    connection died while it stood by, and prints `ready`). Its stdin closing before that
//!    line ends it with exit 0 and nothing done; a line that is not `guard UUID MS` ends it
//!    with exit 1.
//! 2. The daemon writes `arm` just before it freezes; the guard counts its deadline (MS) from
//!    then on and answers `armed`. Only then does the daemon freeze. (Until `arm`, the deadline
//!    counts from the guard's start, so an unused guard does not live on.)
//! 3. The daemon freezes, snapshots, thaws, then writes `disarm` on the guard's stdin
//!    ([`ThawGuard::disarm`]): the guard answers `disarmed`, exits 0 and does nothing. The daemon
//!    waits for that line, not for the exit (the guard closing its libvirt connection takes
//!    another 1-2 ms); the guard is reaped in the background.
//! 4. If instead the guard's stdin reaches end of file or fails (the daemon dropped the guard
//!    without disarming, panicked, crashed or was killed: the kernel closes its end of the pipe),
//!    or if MS milliseconds pass since `arm` (or since the guard started, without `arm`), the
//!    guard thaws the guest at once (virDomainFSThaw) and exits 10 if the thaw succeeded, 11 if
//!    it kept failing; it prints no `disarmed` then.
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
//! closed or deadline passed); 11 thaw failed. Lines on stdin other than `arm` and `disarm` are
//! logged and ignored; a failed write of an answer (the daemon no longer reads) is ignored. Every step is logged to stderr on one line starting `vmsnapd thaw guard:`.
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
/// What the daemon writes just before it freezes; the guard's deadline counts from then.
const ARM: &str = "arm";
/// The guard's answer to [`ARM`].
const ARMED: &str = "armed";
/// What the daemon writes when it has thawed by itself.
const DISARM: &str = "disarm";
/// The guard's answer to [`DISARM`], just before it exits 0.
const DISARMED: &str = "disarmed";
/// What the daemon writes to a standby guard to give it its domain: `guard UUID MS`.
const GUARD: &str = "guard";

/// How long [`ThawGuard::arm`] waits for `ready` (a libvirt connect and a lookup: milliseconds
/// normally, seconds with a slow libvirtd).
const READY_WAIT: Duration = Duration::from_secs(10);
/// How long [`PendingThawGuard::armed`] waits for `armed` after `arm`.
const ARM_WAIT: Duration = Duration::from_secs(5);
/// How long [`ThawGuard::disarm`] waits for `disarmed` (or the guard's exit) after `disarm`.
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
pub struct ThawGuard {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<io::Result<String>>,
    domain_uuid: String,
}

/// A guard started ([`ThawGuard::start`]) but not armed yet: it may still be connecting.
/// Arm it with [`armed`](PendingThawGuard::armed) right before the freeze; dropped, it is
/// killed (nothing is frozen yet).
pub struct PendingThawGuard {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<io::Result<String>>,
    domain_uuid: String,
    ready_by: Instant,
}

impl ThawGuard {
    /// Starts a guard for the domain `domain_uuid` on `uri` that thaws it `deadline` after
    /// `arm` at the latest, and returns at once: the guard connects while the caller prepares.
    pub fn start(uri: &str, domain_uuid: &str, deadline: Duration) -> io::Result<PendingThawGuard> {
        STANDBY.start(uri, domain_uuid, deadline, guard_command)
    }

    /// Starts a guard and arms it: returns once the guard is ready to thaw. Call it before
    /// freezing; if it fails, do not freeze.
    pub fn arm(uri: &str, domain_uuid: &str, deadline: Duration) -> io::Result<ThawGuard> {
        ThawGuard::start(uri, domain_uuid, deadline)?.armed()
    }

    /// Starts `command` as a guard that must say `ready` within `ready_wait`.
    fn spawn(
        command: Command,
        domain_uuid: &str,
        ready_wait: Duration,
    ) -> io::Result<PendingThawGuard> {
        let ready_by = Instant::now() + ready_wait;
        let (child, stdin, lines) = spawn_piped(command)?;
        Ok(PendingThawGuard {
            child: Some(child),
            stdin: Some(stdin),
            lines,
            domain_uuid: domain_uuid.to_string(),
            ready_by,
        })
    }
}

/// Starts a guard process with its stdin and stdout piped to us and its stderr inherited.
fn spawn_piped(
    mut command: Command,
) -> io::Result<(Child, ChildStdin, mpsc::Receiver<io::Result<String>>)> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        kill_and_reap(&mut child);
        return Err(io::Error::other("the thaw guard has no stdin or stdout"));
    };
    // A thread passes the guard's lines on, so that every wait for one is bounded and none
    // polls; it ends at the guard's end of file (the guard exits or is killed) and sends ""
    // then.
    let (line_tx, lines) = mpsc::channel();
    std::thread::Builder::new()
        .name("thaw-guard-out".to_string())
        .spawn(move || {
            let mut out = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                let read = out.read_line(&mut line).map(|_| line);
                let last = !matches!(&read, Ok(l) if !l.is_empty());
                if line_tx.send(read).is_err() || last {
                    return;
                }
            }
        })
        .inspect_err(|_| kill_and_reap(&mut child))?;
    Ok((child, stdin, lines))
}

/// A guard started ahead of need (`vmsnapd --thaw-guard-standby`): connected to libvirt and
/// waiting to be told its domain. Taking it costs a line and a domain lookup where a fresh guard
/// costs a process start and a libvirt connection (about 12 ms, most of a create's wait for
/// `armed`), and its start does not compete for the CPU with the create that needs it.
struct Standby {
    uri: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<io::Result<String>>,
}

#[derive(Default)]
struct Standbys {
    /// The URI a standby is kept for ([`keep_standby`]); none is started without it.
    wanted: Option<String>,
    ready: Option<Standby>,
}

/// The daemon's standby guard: at most one, for its one libvirt URI.
struct StandbySlot(std::sync::Mutex<Option<Standbys>>);

static STANDBY: StandbySlot = StandbySlot(std::sync::Mutex::new(None));

/// Keeps a standby guard for `uri` from now on: one is started now, and a new one each time a
/// guard ends (see [`replenish_standby`]).
pub fn keep_standby(uri: &str) {
    STANDBY.with(|standbys| standbys.wanted = Some(uri.to_string()));
    STANDBY.replenish(standby_command);
}

fn standby_command(uri: &str) -> io::Result<Command> {
    let mut command = guard_command()?;
    command
        .arg("--thaw-guard-standby")
        .arg("--guard-uri")
        .arg(uri);
    Ok(command)
}

/// How long after a guard ends the next standby is started: its start (a process, dynamic
/// linking, a libvirt connection: about 12 ms of CPU) would otherwise compete with the end of the
/// create that just used a guard (its records, its answer). A create within this time starts a
/// guard of its own, as without a standby.
const STANDBY_AFTER: Duration = Duration::from_millis(100);

/// Starts the next standby guard, if one is wanted and none is waiting, on a thread of its own
/// and [`STANDBY_AFTER`] from now: called when a guard ends, after the thaw.
fn replenish_standby() {
    if STANDBY.with(|standbys| standbys.wanted.is_none()) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("thaw-guard-standby".to_string())
        .spawn(|| {
            std::thread::sleep(STANDBY_AFTER);
            STANDBY.replenish(standby_command);
        });
}

impl StandbySlot {
    fn with<T>(&self, f: impl FnOnce(&mut Standbys) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.get_or_insert_with(Standbys::default))
    }

    /// Starts a standby with `command` unless one for the wanted URI is alive.
    fn replenish(&self, command: impl FnOnce(&str) -> io::Result<Command>) {
        self.with(|standbys| {
            let Some(uri) = standbys.wanted.clone() else {
                return;
            };
            if let Some(standby) = standbys.ready.as_mut() {
                if standby.uri == uri && matches!(standby.child.try_wait(), Ok(None)) {
                    return;
                }
            }
            if let Some(old) = standbys.ready.take() {
                reap_in_background(old.child, true);
            }
            match command(&uri).and_then(spawn_piped) {
                Ok((child, stdin, lines)) => {
                    standbys.ready = Some(Standby {
                        uri,
                        child,
                        stdin,
                        lines,
                    })
                }
                // A fresh guard is started for the next freeze instead.
                Err(e) => tracing::debug!(error = %e, "cannot start a standby thaw guard"),
            }
        })
    }

    /// [`ThawGuard::start`] with this slot's standby, or else a fresh guard run by `command`
    /// (the daemon's own executable; tests give a fake).
    fn start(
        &self,
        uri: &str,
        domain_uuid: &str,
        deadline: Duration,
        command: impl FnOnce() -> io::Result<Command>,
    ) -> io::Result<PendingThawGuard> {
        if let Some(pending) = self.take(uri, domain_uuid, deadline) {
            return Ok(pending);
        }
        let mut command = command()?;
        command
            .arg("--thaw-guard")
            .arg(domain_uuid)
            .arg("--guard-uri")
            .arg(uri)
            .arg("--guard-deadline-ms")
            .arg(deadline.as_millis().to_string());
        ThawGuard::spawn(command, domain_uuid, READY_WAIT)
    }

    /// The standby for `uri`, made the guard of `domain_uuid` with `deadline` (see
    /// [`ThawGuard::start`]); `None` if there is none, it is for another URI, or it has exited.
    fn take(&self, uri: &str, domain_uuid: &str, deadline: Duration) -> Option<PendingThawGuard> {
        let mut standby = self.with(|standbys| match &standbys.ready {
            Some(standby) if standby.uri == uri => standbys.ready.take(),
            _ => None,
        })?;
        if !matches!(standby.child.try_wait(), Ok(None)) {
            // It could not connect, or was killed: a fresh guard instead.
            reap_in_background(standby.child, true);
            return None;
        }
        let told = standby
            .stdin
            .write_all(format!("{GUARD} {domain_uuid} {}\n", deadline.as_millis()).as_bytes())
            .and_then(|()| standby.stdin.flush());
        if let Err(e) = told {
            tracing::debug!(error = %e, "the standby thaw guard is gone");
            reap_in_background(standby.child, true);
            return None;
        }
        tracing::debug!(domain = %domain_uuid, "thaw guard taken from standby");
        Some(PendingThawGuard {
            child: Some(standby.child),
            stdin: Some(standby.stdin),
            lines: standby.lines,
            domain_uuid: domain_uuid.to_string(),
            ready_by: Instant::now() + READY_WAIT,
        })
    }
}

/// The guard one hypervisor session started early (`Host::prepare_thaw_guard`) for one VM,
/// until that session arms it or ends. At most one: a second hint for the same VM keeps the
/// guard the first one started (it neither takes the next standby nor starts a process); a hint
/// for another VM stops the first guard.
#[derive(Default)]
pub struct EarlyGuard(std::cell::RefCell<Option<(String, PendingThawGuard)>>);

impl EarlyGuard {
    /// Starts a guard for `vm` unless this session has one for it already. A failed start is
    /// only logged: the arm tries again and reports it.
    pub fn prepare(&self, uri: &str, vm: &str, deadline: Duration) {
        self.prepare_with(vm, || ThawGuard::start(uri, vm, deadline));
    }

    /// [`EarlyGuard::prepare`] with the start given (tests start fakes).
    fn prepare_with(&self, vm: &str, start: impl FnOnce() -> io::Result<PendingThawGuard>) {
        if matches!(&*self.0.borrow(), Some((for_vm, _)) if for_vm == vm) {
            return;
        }
        match start() {
            Ok(pending) => *self.0.borrow_mut() = Some((vm.to_string(), pending)),
            Err(e) => tracing::debug!(vm, error = %e, "cannot start the thaw guard early"),
        }
    }

    /// The guard started for `vm`, if any; one started for another VM is stopped.
    pub fn take(&self, vm: &str) -> Option<PendingThawGuard> {
        match self.0.borrow_mut().take() {
            Some((for_vm, pending)) if for_vm == vm => Some(pending),
            _ => None,
        }
    }

    /// Stops the guard, if any (nothing is frozen under a guard never armed).
    pub fn stop(&self) {
        self.0.borrow_mut().take();
    }
}

/// Waits until `by` for the guard's next line ("" at its end of file).
fn next_line(
    lines: &mpsc::Receiver<io::Result<String>>,
    by: Instant,
) -> Result<io::Result<String>, RecvTimeoutError> {
    lines.recv_timeout(by.saturating_duration_since(Instant::now()))
}

impl PendingThawGuard {
    /// Waits for the guard's `ready`, then arms it (its deadline counts from now) and waits for
    /// its `armed`. Call it right before freezing; if it fails, do not freeze.
    pub fn armed(mut self) -> io::Result<ThawGuard> {
        let (Some(mut child), Some(mut stdin)) = (self.child.take(), self.stdin.take()) else {
            return Err(io::Error::other("the thaw guard is already gone"));
        };
        let failure = match self.expect(READY, self.ready_by, &mut child) {
            Err(e) => e,
            Ok(()) => {
                // A write error means the guard has exited; the next line (end of file) says so.
                let _ = stdin
                    .write_all(format!("{ARM}\n").as_bytes())
                    .and_then(|()| stdin.flush());
                match self.expect(ARMED, Instant::now() + ARM_WAIT, &mut child) {
                    Ok(()) => {
                        return Ok(ThawGuard {
                            child: Some(child),
                            stdin: Some(stdin),
                            lines: std::mem::replace(&mut self.lines, mpsc::channel().1),
                            domain_uuid: std::mem::take(&mut self.domain_uuid),
                        })
                    }
                    Err(e) => e,
                }
            }
        };
        // Nothing is frozen yet: the guard is simply stopped.
        drop(stdin);
        kill_and_reap(&mut child);
        Err(failure)
    }

    /// Waits until `by` for the line `word`.
    fn expect(&self, word: &str, by: Instant, child: &mut Child) -> io::Result<()> {
        Err(match next_line(&self.lines, by) {
            Ok(Ok(line)) if line.trim_end() == word => return Ok(()),
            Ok(Ok(line)) if line.is_empty() => {
                // End of file: the guard gave up; its reason is on the shared stderr.
                let status = wait_bounded(child, Duration::from_secs(1));
                io::Error::other(format!(
                    "the thaw guard exited before it said {word:?} ({})",
                    status.map_or_else(|| "still running".to_string(), |s| s.to_string())
                ))
            }
            Ok(Ok(line)) => io::Error::other(format!(
                "the thaw guard said {:?} instead of {word:?}",
                line.trim_end()
            )),
            Ok(Err(e)) => io::Error::new(e.kind(), format!("cannot read the thaw guard: {e}")),
            Err(RecvTimeoutError::Disconnected) => {
                io::Error::other("the thread reading the thaw guard stopped")
            }
            Err(RecvTimeoutError::Timeout) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the thaw guard did not say {word:?} in time"),
            ),
        })
    }
}

impl Drop for PendingThawGuard {
    fn drop(&mut self) {
        // Never armed, so nothing is frozen under it: stop it without waiting. (If it were to
        // see its stdin close first, it would thaw an unfrozen guest: harmless.)
        self.stdin.take();
        if let Some(child) = self.child.take() {
            reap_in_background(child, true);
            replenish_standby();
        }
    }
}

impl ThawGuard {
    /// Tells the guard the daemon has thawed the guest itself, and waits for its `disarmed`.
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
        let by = Instant::now() + DISARM_WAIT;
        loop {
            match next_line(&self.lines, by) {
                Ok(Ok(line)) if line.trim_end() == DISARMED => {
                    // It exits 0 next; no need to wait for that.
                    reap_in_background(child, false);
                    return Ok(());
                }
                // Anything else before its end of file is not an answer to disarm.
                Ok(Ok(line)) if !line.is_empty() => continue,
                Ok(_) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    kill_and_reap(&mut child);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the thaw guard of {} did not answer disarm within {} s; killed it",
                            self.domain_uuid,
                            DISARM_WAIT.as_secs()
                        ),
                    ));
                }
            }
        }
        // End of file without `disarmed`: the guard ended on its own; its status says why.
        let Some(status) = wait_bounded(&mut child, by.saturating_duration_since(Instant::now()))
        else {
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

/// Waits for `child` on a thread of its own (killing it first with `kill`), so that nothing
/// blocks here; if no thread can be started, it stays a zombie until vmsnapd exits, which harms
/// nothing.
fn reap_in_background(mut child: Child, kill: bool) {
    if kill {
        let _ = child.kill();
    }
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("thaw-guard-reaper".to_string())
        .spawn(move || {
            let _ = child.wait();
        });
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        // Disarmed or not, this guard's work with the daemon is over.
        replenish_standby();
        // Closing stdin is the signal: the guard thaws on its own from here, whatever we do.
        if self.stdin.take().is_none() {
            return;
        }
        let Some(child) = self.child.take() else {
            return;
        };
        tracing::warn!(
            domain = %self.domain_uuid,
            "thaw guard dropped without disarm: it thaws the guest now"
        );
        reap_in_background(child, false);
    }
}

/// The daemon's own executable as a command named `vmsnapd` (argv[0]), so that `ps` shows the
/// guards as vmsnapd's, not as `/proc/self/exe`.
fn guard_command() -> io::Result<Command> {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(own_exe()?);
    command.arg0("vmsnapd");
    Ok(command)
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
    guard_domain(uri, domain_uuid, deadline, started, signals, conn, dom)
}

/// The standby guard process (`vmsnapd --thaw-guard-standby`): connects to libvirt, then waits
/// for `guard UUID MS` on stdin and from there is the guard of that domain with that deadline
/// (counted from that line), exactly as `run_guard`. Its stdin closing before that line (the
/// daemon exited) ends it with nothing done: it guards nothing yet.
pub fn run_standby(uri: &str) -> ExitCode {
    const WHO: &str = "standby";
    virt::error::clear_error_callback();
    // From the start: once it has a domain, a stop signal must not end it either.
    let signals = ignore_stop_signals(WHO);
    let conn = match Connect::open(Some(uri)) {
        Ok(conn) => conn,
        Err(e) => {
            log(WHO, &format!("cannot connect to {uri}: {}", e.message()));
            return ExitCode::from(EXIT_NOT_STARTED);
        }
    };
    let mut line = String::new();
    match io::stdin().lock().read_line(&mut line) {
        Ok(0) => return ExitCode::from(EXIT_DISARMED),
        Ok(_) => {}
        Err(e) => {
            log(WHO, &format!("cannot read stdin: {e}"));
            return ExitCode::from(EXIT_DISARMED);
        }
    }
    let started = Instant::now();
    let Some((domain_uuid, deadline)) = parse_guard_line(&line) else {
        log(
            WHO,
            &format!("expected \"{GUARD} UUID MS\", got {:?}", line.trim_end()),
        );
        return ExitCode::from(EXIT_NOT_STARTED);
    };
    // The connection may have died while standing by (libvirtd restarted): one more try.
    let found = conn
        .lookup_domain_by_uuid_string(&domain_uuid)
        .map(|dom| (conn, dom))
        .or_else(|e| {
            log(
                &domain_uuid,
                &format!("cannot find the domain ({}); connecting again", e.message()),
            );
            reconnect(uri, &domain_uuid).ok_or(())
        });
    let Ok((conn, dom)) = found else {
        return ExitCode::from(EXIT_NOT_STARTED);
    };
    guard_domain(uri, &domain_uuid, deadline, started, signals, conn, dom)
}

/// `guard UUID MS` (a UUID, then a deadline in milliseconds), as the daemon writes it.
fn parse_guard_line(line: &str) -> Option<(String, Duration)> {
    let mut words = line.split_ascii_whitespace();
    let (Some(GUARD), Some(uuid), Some(ms), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let uuid = uuid::Uuid::try_parse(uuid).ok()?;
    let ms = ms.parse::<u64>().ok().filter(|ms| *ms > 0)?;
    Some((uuid.hyphenated().to_string(), Duration::from_millis(ms)))
}

/// Guards `dom` from `started` on (see the module documentation): says `ready`, follows `arm`
/// and `disarm`, and thaws at its deadline or when its stdin closes.
fn guard_domain(
    uri: &str,
    domain_uuid: &str,
    deadline: Duration,
    started: Instant,
    signals: Vec<(&'static str, Arc<AtomicBool>)>,
    conn: Connect,
    dom: Domain,
) -> ExitCode {
    // Until `arm`, from the start; from `arm` on, from then.
    let mut deadline_at = started + deadline;
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
            Ok(Input::Line(line)) if line == ARM => {
                deadline_at = Instant::now() + deadline;
                // A failed answer leaves the daemon without `armed`: it does not freeze then.
                let _ = writeln!(stdout, "{ARMED}").and_then(|()| stdout.flush());
                log(
                    domain_uuid,
                    &format!("armed, deadline in {} ms", deadline.as_millis()),
                );
            }
            Ok(Input::Line(line)) if line == DISARM => {
                // The answer goes first: the daemon waits for it, not for the exit.
                let _ = writeln!(stdout, "{DISARMED}").and_then(|()| stdout.flush());
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

    const GUARD: &str = r#"echo ready; read cmd; [ "$cmd" = arm ] && echo armed; read cmd; if [ "$cmd" = disarm ]; then echo disarmed; exit 0; fi; echo eof > "$1"; exit 10"#;

    fn fake_guard(marker: &std::path::Path) -> Command {
        let mut command = fake(GUARD);
        command.arg("guard").arg(marker);
        command
    }

    fn armed(command: Command, uuid: &str, ready_wait: Duration) -> io::Result<ThawGuard> {
        ThawGuard::spawn(command, uuid, ready_wait)?.armed()
    }

    #[test]
    fn thaw_guard_disarm_waits_for_its_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("thawed");
        let guard = armed(fake_guard(&marker), "u", Duration::from_secs(5)).expect("armed");
        guard.disarm().expect("disarmed");
        assert!(!marker.exists());
    }

    #[test]
    fn thaw_guard_disarm_takes_a_clean_exit_without_answer() {
        // A guard that exits 0 on disarm without saying so is disarmed too.
        let guard = armed(
            fake("echo ready; read a; echo armed; read b; exit 0"),
            "u",
            Duration::from_secs(5),
        )
        .expect("armed");
        guard.disarm().expect("disarmed");
    }

    #[test]
    fn thaw_guard_started_early_is_armed_later() {
        // The guard connects while the caller works; arming waits for its ready, then arms.
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("thawed");
        let mut command = fake(&format!("sleep 0.2; {GUARD}"));
        command.arg("guard").arg(&marker);
        let start = Instant::now();
        let pending = ThawGuard::spawn(command, "u", Duration::from_secs(5)).expect("started");
        assert!(start.elapsed() < Duration::from_millis(150), "start waited");
        let guard = pending.armed().expect("armed");
        assert!(start.elapsed() >= Duration::from_millis(200));
        guard.disarm().expect("disarmed");
        assert!(!marker.exists());
    }

    #[test]
    fn thaw_guard_pending_drop_stops_it_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("thawed");
        let mut command = fake("echo ready; exec sleep 30");
        command.arg("guard").arg(&marker);
        let pending = ThawGuard::spawn(command, "u", Duration::from_secs(5)).expect("started");
        let pid = pending.child.as_ref().map(Child::id).expect("child");
        let start = Instant::now();
        drop(pending);
        assert!(start.elapsed() < Duration::from_millis(500));
        // Killed and reaped in the background: the process goes away.
        let end = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
        {
            assert!(Instant::now() < end, "the pending guard was not killed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn thaw_guard_drop_closes_stdin_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first_marker = dir.path().join("first");
        let second_marker = dir.path().join("second");
        let first =
            armed(fake_guard(&first_marker), "a", Duration::from_secs(5)).expect("first armed");
        // A second guard must not inherit the first one's stdin, or dropping the first would not
        // reach its guard.
        let second =
            armed(fake_guard(&second_marker), "b", Duration::from_secs(5)).expect("second armed");
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
        let guard = armed(
            fake("echo ready; read a; echo armed; exit 10"),
            "u",
            Duration::from_secs(5),
        )
        .expect("armed");
        std::thread::sleep(Duration::from_millis(100));
        let err = guard.disarm().expect_err("already thawed");
        assert!(err.to_string().contains("already thawed"), "{err}");
    }

    #[test]
    fn thaw_guard_disarm_is_bounded() {
        let guard = armed(
            fake("echo ready; read a; echo armed; exec sleep 30"),
            "u",
            Duration::from_secs(5),
        )
        .expect("armed");
        let start = Instant::now();
        let err = guard.disarm().expect_err("no answer");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() < DISARM_WAIT + Duration::from_secs(2));
    }

    #[test]
    fn thaw_guard_arm_fails_without_ready_or_armed() {
        let start = Instant::now();
        let err = armed(fake("exec sleep 30"), "u", Duration::from_millis(300))
            .err()
            .expect("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the child was killed"
        );

        let err = armed(fake("exit 1"), "u", Duration::from_secs(5))
            .err()
            .expect("exits");
        assert!(
            err.to_string().contains("exited before it said \"ready\""),
            "{err}"
        );

        let err = armed(
            fake("echo hello; exec sleep 30"),
            "u",
            Duration::from_secs(5),
        )
        .err()
        .expect("wrong word");
        assert!(err.to_string().contains("\"hello\""), "{err}");

        // Ready, but the arm is never confirmed (an old guard, or one that died): no freeze.
        let err = armed(
            fake("echo ready; read a; exit 10"),
            "u",
            Duration::from_secs(5),
        )
        .err()
        .expect("not armed");
        assert!(
            err.to_string().contains("exited before it said \"armed\""),
            "{err}"
        );
    }

    /// A slot of its own (not the daemon's `STANDBY`: tests run at once) wanting `uri`, filled
    /// with `script` run under sh as its standby.
    fn slot_with(uri: &str, script: &str, args: &[&std::path::Path]) -> StandbySlot {
        let slot = StandbySlot(std::sync::Mutex::new(None));
        slot.with(|standbys| standbys.wanted = Some(uri.to_string()));
        let mut command = fake(script);
        command.arg("standby").args(args);
        let mut command = Some(command);
        slot.replenish(|_| command.take().ok_or_else(|| io::Error::other("used")));
        slot
    }

    /// Waits (5 s at most) until the standby in `slot` has exited; it stays in the slot.
    fn wait_standby_exited(slot: &StandbySlot) {
        let end = Instant::now() + Duration::from_secs(5);
        while slot.with(|s| matches!(s.ready.as_mut().map(|r| r.child.try_wait()), Some(Ok(None))))
        {
            assert!(Instant::now() < end, "the standby did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Speaks the standby protocol: notes the line it was given, then is a guard.
    const STANDBY_GUARD: &str = r#"read given; echo "$given" > "$1"; echo ready; read cmd; [ "$cmd" = arm ] && echo armed; read cmd; if [ "$cmd" = disarm ]; then echo disarmed; exit 0; fi; exit 10"#;

    #[test]
    fn a_standby_guard_is_told_its_domain_and_deadline_and_then_guards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let given = dir.path().join("given");
        let slot = slot_with("qemu:///x", STANDBY_GUARD, &[&given]);
        let uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
        let pending = slot
            .take("qemu:///x", uuid, Duration::from_millis(1500))
            .expect("taken");
        let guard = pending.armed().expect("armed");
        guard.disarm().expect("disarmed");
        assert_eq!(
            std::fs::read_to_string(&given).expect("given"),
            format!("guard {uuid} 1500\n")
        );
        // Taken: the next freeze starts a fresh guard (or the next standby).
        assert!(slot
            .take("qemu:///x", uuid, Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn a_standby_for_another_uri_or_one_that_exited_is_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let given = dir.path().join("given");
        let slot = slot_with("qemu:///x", STANDBY_GUARD, &[&given]);
        assert!(slot
            .take("qemu:///y", "u", Duration::from_secs(1))
            .is_none());
        // Still there for its own URI.
        assert!(slot
            .take("qemu:///x", "u", Duration::from_secs(1))
            .is_some());

        // One that could not connect (exits 1 at once) is not handed a domain.
        let slot = slot_with("qemu:///x", "exit 1", &[]);
        wait_standby_exited(&slot);
        assert!(slot
            .take("qemu:///x", "u", Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn replenishing_keeps_a_live_standby_and_replaces_a_dead_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let given = dir.path().join("given");
        let slot = slot_with("qemu:///x", STANDBY_GUARD, &[&given]);
        let first = slot.with(|s| s.ready.as_ref().map(|r| r.child.id()));
        slot.replenish(|_| Err(io::Error::other("a live standby is kept")));
        assert_eq!(slot.with(|s| s.ready.as_ref().map(|r| r.child.id())), first);

        let slot = slot_with("qemu:///x", "exit 1", &[]);
        let dead = slot.with(|s| s.ready.as_ref().map(|r| r.child.id()));
        wait_standby_exited(&slot);
        let mut next = Some(fake(STANDBY_GUARD));
        slot.replenish(|_| next.take().ok_or_else(|| io::Error::other("used")));
        let now = slot.with(|s| s.ready.as_ref().map(|r| r.child.id()));
        assert!(now.is_some() && now != dead, "{dead:?} -> {now:?}");
    }

    #[test]
    fn a_second_early_start_for_the_same_vm_keeps_the_first_guard_and_the_next_standby() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (given, next_given, fresh) = (
            dir.path().join("given"),
            dir.path().join("next-given"),
            dir.path().join("fresh"),
        );
        let (uri, uuid) = ("qemu:///x", "6695eb01-f6a4-8304-79aa-97f2502e193f");
        let slot = slot_with(uri, STANDBY_GUARD, &[&given]);
        let standby_pid = || slot.with(|s| s.ready.as_ref().map(|r| r.child.id()));
        let first = standby_pid();
        let early = EarlyGuard::default();
        // As `Host::prepare_thaw_guard` does, over this slot; a fresh guard would leave a mark.
        let prepare = || {
            early.prepare_with(uuid, || {
                slot.start(uri, uuid, Duration::from_secs(5), || {
                    let mut command = fake(r#"touch "$1"; exec sleep 30"#);
                    command.arg("fresh").arg(&fresh);
                    Ok(command)
                })
            })
        };
        prepare();
        assert!(slot.with(|s| s.ready.is_none()), "the standby was taken");
        // Another operation's guard ended meanwhile: the next standby waits in the slot.
        let mut next = Some(fake(STANDBY_GUARD));
        if let Some(command) = next.as_mut() {
            command.arg("standby").arg(&next_given);
        }
        slot.replenish(|_| next.take().ok_or_else(|| io::Error::other("used")));
        let next_standby = standby_pid();
        assert!(next_standby.is_some() && next_standby != first);

        prepare();
        assert_eq!(
            standby_pid(),
            next_standby,
            "the next standby is left for the next create"
        );
        let pending = early.take(uuid).expect("the first guard is kept");
        assert_eq!(pending.child.as_ref().map(Child::id), first);
        pending.armed().expect("armed").disarm().expect("disarmed");
        assert_eq!(
            std::fs::read_to_string(&given).expect("given"),
            format!("guard {uuid} 5000\n"),
            "the first standby was told its domain once"
        );
        assert!(
            !next_given.exists(),
            "the next standby was never told a domain"
        );
        assert!(!fresh.exists(), "no fresh guard was started");
    }

    #[test]
    fn the_guard_line_is_a_uuid_and_a_positive_deadline() {
        let uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
        assert_eq!(
            parse_guard_line(&format!("guard {} 10000\n", uuid.to_uppercase())),
            Some((uuid.to_string(), Duration::from_secs(10)))
        );
        for bad in [
            "".to_string(),
            format!("guard {uuid}"),
            format!("guard {uuid} 0"),
            format!("guard {uuid} -5"),
            format!("guard {uuid} 10 more"),
            format!("arm {uuid} 10"),
            "guard ../../etc 10".to_string(),
            "guard 6695eb01 10".to_string(),
        ] {
            assert_eq!(parse_guard_line(&bad), None, "{bad:?}");
        }
    }
}
