//! The thaw guard (`vmsnapd --thaw-guard`, daemon/src/thaw_guard.rs) against the lab's real guest
//! agent: it thaws a frozen guest when its deadline passes or its stdin closes (the daemon died),
//! does nothing once disarmed, and survives SIGTERM/SIGINT.
//!
//! A test binary of its own because it freezes the shared lab VM (cargo runs test binaries one
//! after another); inside it the tests take a lock, and every freeze is undone by a drop guard so
//! a failing test never leaves the lab frozen.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmsnap_tests::{bin, guest_exec, require_lab, virsh, wait_for, LAB_AGENT_VM, LAB_URI};
use vmsnap_tests::{stop_libvirtd, RestartLibvirtdOnDrop};

/// The guard's exit statuses (thaw_guard.rs).
const EXIT_DISARMED: i32 = 0;
const EXIT_NOT_STARTED: i32 = 1;
const EXIT_THAWED: i32 = 10;

static LAB: Mutex<()> = Mutex::new(());

/// Serializes the tests of this binary: they all freeze the same guest.
fn lab_lock() -> MutexGuard<'static, ()> {
    let lock = LAB.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    require_lab();
    lock
}

/// "frozen" or "thawed", from the guest agent itself.
fn freeze_status() -> String {
    let reply = virsh(&[
        "qemu-agent-command",
        LAB_AGENT_VM,
        r#"{"execute":"guest-fsfreeze-status"}"#,
    ]);
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    reply["return"].as_str().unwrap().to_string()
}

fn agent_vm_uuid() -> String {
    virsh(&["domuuid", LAB_AGENT_VM]).trim().to_string()
}

/// The lab guest frozen for the lifetime of this value; thawed again on drop, whatever happened.
struct Frozen;

impl Frozen {
    fn freeze() -> Frozen {
        assert_eq!(freeze_status(), "thawed", "the lab guest is frozen already");
        let frozen = Frozen;
        virsh(&["domfsfreeze", LAB_AGENT_VM]);
        assert_eq!(freeze_status(), "frozen");
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Not virsh(): it panics, and a panic in drop during a failing test aborts. Retried
        // because a test may have stopped the agent for a few seconds.
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            let thawed = Command::new("virsh")
                .args(["-c", LAB_URI, "domfsthaw", LAB_AGENT_VM])
                .output()
                .is_ok_and(|o| o.status.success());
            if thawed {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("could not thaw {LAB_AGENT_VM}: run `virsh domfsthaw {LAB_AGENT_VM}`");
    }
}

/// A guard process started the way ThawGuard::arm starts it, killed on drop if still running.
struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
    _dir: TempDir,
}

impl Guard {
    /// Starts a guard and waits for its `ready`.
    fn start(uuid: &str, deadline_ms: u64) -> (Guard, Instant) {
        let (mut guard, first_line) = Guard::spawn(uuid, LAB_URI, deadline_ms);
        let started = Instant::now();
        assert_eq!(
            first_line,
            "ready\n",
            "the guard did not say ready: {}",
            guard.log_text()
        );
        assert!(guard.child.try_wait().unwrap().is_none());
        (guard, started)
    }

    /// Starts a guard; returns it with the first line it printed ("" if none).
    fn spawn(uuid: &str, uri: &str, deadline_ms: u64) -> (Guard, String) {
        let deadline_ms = deadline_ms.to_string();
        let mut guard = Guard::launch(&[
            "--thaw-guard",
            uuid,
            "--guard-uri",
            uri,
            "--guard-deadline-ms",
            &deadline_ms,
        ]);
        let line = guard.next_line();
        (guard, line)
    }

    /// Starts a standby guard, as vmsnapd keeps one (it says nothing until told its domain).
    fn standby(uri: &str) -> Guard {
        Guard::launch(&["--thaw-guard-standby", "--guard-uri", uri])
    }

    fn launch(args: &[&str]) -> Guard {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guard.log");
        let mut child = Command::new(bin("vmsnapd"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        Guard {
            child,
            stdin,
            stdout,
            log,
            _dir: dir,
        }
    }

    /// The guard's next line ("" at its end of file).
    fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Writes `line` on the guard's stdin.
    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the guard to exit; returns its exit code.
    fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = wait_for(timeout, "the guard to exit", || {
            self.child.try_wait().unwrap()
        });
        status
            .code()
            .unwrap_or_else(|| panic!("guard ended by a signal: {status}"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_thawed(within: Duration) -> Duration {
    let start = Instant::now();
    wait_for(within, "the guest to be thawed", || {
        (freeze_status() == "thawed").then_some(())
    });
    start.elapsed()
}

#[test]
fn deadline_thaws() {
    let _lab = lab_lock();
    let (mut guard, started) = Guard::start(&agent_vm_uuid(), 2000);
    let _frozen = Frozen::freeze();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    assert_eq!(freeze_status(), "frozen", "thawed before the deadline");
    wait_thawed(Duration::from_secs(3));
    let thawed_after = started.elapsed();
    assert!(
        thawed_after >= Duration::from_millis(1900),
        "{thawed_after:?}"
    );
    assert_eq!(guard.exit_code(Duration::from_secs(5)), EXIT_THAWED);
    let log = guard.log_text();
    assert!(log.contains("deadline of 2000 ms passed: thawing"), "{log}");
    assert!(log.contains("thawed 1 filesystem(s) (attempt 1)"), "{log}");
    assert!(
        log.lines().all(|l| l.starts_with("vmsnapd thaw guard: ")),
        "{log}"
    );
}

/// Also the daemon killed with SIGKILL, or crashing: the kernel closes its end of the pipe,
/// which is exactly this end of file (see also `killed_parent_thaws` below).
#[test]
fn end_of_stdin_thaws_at_once() {
    let _lab = lab_lock();
    let (mut guard, _) = Guard::start(&agent_vm_uuid(), 60_000);
    let _frozen = Frozen::freeze();
    drop(guard.stdin.take());
    let took = wait_thawed(Duration::from_secs(2));
    assert_eq!(guard.exit_code(Duration::from_secs(5)), EXIT_THAWED);
    let log = guard.log_text();
    assert!(log.contains("stdin closed: thawing"), "{log}");
    eprintln!("thawed {took:?} after stdin closed");
}

#[test]
fn disarm_exits_without_thawing() {
    let _lab = lab_lock();
    let (mut guard, _) = Guard::start(&agent_vm_uuid(), 60_000);
    let frozen = Frozen::freeze();
    let mut stdin = guard.stdin.take().unwrap();
    stdin.write_all(b"disarm\n").unwrap();
    stdin.flush().unwrap();
    assert_eq!(guard.exit_code(Duration::from_secs(2)), EXIT_DISARMED);
    drop(stdin);
    // The guard is gone and did not thaw: the guest stays frozen until the test thaws it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(freeze_status(), "frozen");
    assert!(guard.log_text().contains("disarmed, not thawing"));
    drop(frozen);
    assert_eq!(freeze_status(), "thawed");
}

#[test]
fn stop_signals_do_not_stop_the_guard() {
    let _lab = lab_lock();
    let (mut guard, _) = Guard::start(&agent_vm_uuid(), 60_000);
    let _frozen = Frozen::freeze();
    let pid = guard.child.id().to_string();
    for signal in ["-TERM", "-INT", "-HUP"] {
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        guard.child.try_wait().unwrap().is_none(),
        "{}",
        guard.log_text()
    );
    assert_eq!(freeze_status(), "frozen");
    // It still does its job when the daemon goes away.
    drop(guard.stdin.take());
    wait_thawed(Duration::from_secs(2));
    assert_eq!(guard.exit_code(Duration::from_secs(5)), EXIT_THAWED);
    let log = guard.log_text();
    for name in ["SIGTERM", "SIGINT", "SIGHUP"] {
        assert!(
            log.contains(&format!("ignoring {name}, still guarding")),
            "{log}"
        );
    }
}

/// A stand-in daemon holds the only write end of the guard's stdin and is killed with SIGKILL.
#[test]
fn killed_parent_thaws() {
    let _lab = lab_lock();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("guard.log");
    // bash keeps the pipe to the guard on fd 3 and execs sleep, which inherits it: sleep is the
    // "daemon". $! is the guard's pid.
    let mut parent = Command::new("bash")
        .arg("-c")
        .arg(
            r#"exec 3> >(exec "$0" --thaw-guard "$1" --guard-uri "$2" --guard-deadline-ms 60000)
               echo "$!"; exec sleep 600"#,
        )
        .arg(bin("vmsnapd"))
        .arg(agent_vm_uuid())
        .arg(LAB_URI)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(parent.stdout.take().unwrap());
    let mut guard_pid = String::new();
    out.read_line(&mut guard_pid).unwrap();
    let guard_pid = guard_pid.trim().to_string();
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    if ready != "ready\n" {
        let _ = parent.kill();
        let _ = parent.wait();
        panic!(
            "no ready: {ready:?} {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let frozen = Frozen::freeze();
    parent.kill().unwrap();
    parent.wait().unwrap();
    let took = wait_thawed(Duration::from_secs(2));
    eprintln!("thawed {took:?} after the parent was killed");
    // The orphaned guard exits (PID 1 here may not reap it: a zombie counts as exited).
    wait_for(Duration::from_secs(5), "the guard to exit", || {
        let status = std::fs::read_to_string(format!("/proc/{guard_pid}/status"));
        let alive = status.is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("State:") && !l.contains("Z ") && !l.contains("X "))
        });
        (!alive).then_some(())
    });
    drop(frozen);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("stdin closed: thawing"), "{log}");
}

#[test]
fn a_guard_that_cannot_start_never_says_ready() {
    let _lab = lab_lock();
    let (mut guard, line) = Guard::spawn("00000000-0000-0000-0000-000000000000", LAB_URI, 60_000);
    assert_eq!(line, "");
    assert_eq!(guard.exit_code(Duration::from_secs(10)), EXIT_NOT_STARTED);
    assert!(
        guard.log_text().contains("cannot find the domain"),
        "{}",
        guard.log_text()
    );

    let (mut guard, line) = Guard::spawn(
        &agent_vm_uuid(),
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        60_000,
    );
    assert_eq!(line, "");
    assert_eq!(guard.exit_code(Duration::from_secs(10)), EXIT_NOT_STARTED);
    assert!(
        guard.log_text().contains("cannot connect"),
        "{}",
        guard.log_text()
    );
}

/// The agent hangs (qemu-ga stopped with SIGSTOP inside the guest for a few seconds) when the
/// guard must thaw. libvirt 9.0 does not time the thaw out (the agent is "in sync", and commands
/// wait without limit): the call blocks until the agent runs again, then succeeds. So a hung
/// agent delays the guard; it does not make it give up.
#[test]
fn a_hung_agent_delays_the_thaw_until_it_answers() {
    let _lab = lab_lock();
    let (mut guard, _) = Guard::start(&agent_vm_uuid(), 60_000);
    // guest-exec is refused while frozen, so the stop is scheduled before the freeze.
    let (code, _) = guest_exec(
        LAB_AGENT_VM,
        "setsid sh -c 'sleep 1; killall -STOP qemu-ga; sleep 4; killall -CONT qemu-ga' \
         </dev/null >/dev/null 2>&1 &",
        Duration::from_secs(20),
    );
    assert_eq!(code, 0);
    let frozen = Frozen::freeze();
    std::thread::sleep(Duration::from_millis(1500));
    let closed = Instant::now();
    drop(guard.stdin.take());
    assert_eq!(guard.exit_code(Duration::from_secs(20)), EXIT_THAWED);
    let took = closed.elapsed();
    assert_eq!(freeze_status(), "thawed");
    drop(frozen);
    let log = guard.log_text();
    eprintln!("thawed {took:?} after stdin closed");
    assert!(
        took > Duration::from_secs(2),
        "{took:?}: was the agent stopped?"
    );
    assert!(log.contains("thawed 1 filesystem(s) (attempt 1)"), "{log}");
}

/// libvirtd restarts while the guest is frozen: the guard's connection is dead when it must
/// thaw, so its first attempts fail; it reconnects and thaws once libvirtd is back.
#[test]
fn thaw_reconnects_after_a_libvirtd_restart() {
    let _lab = lab_lock();
    let (mut guard, _) = Guard::start(&agent_vm_uuid(), 60_000);
    let _frozen = Frozen::freeze();
    // Declared after Frozen so that it is dropped first: the thaw needs libvirtd.
    let _restart = RestartLibvirtdOnDrop;
    stop_libvirtd();
    drop(guard.stdin.take());
    std::thread::sleep(Duration::from_millis(800));
    let restarted = Instant::now();
    assert!(Command::new("libvirtd")
        .arg("-d")
        .status()
        .unwrap()
        .success());
    assert_eq!(
        guard.exit_code(Duration::from_secs(20)),
        EXIT_THAWED,
        "{}",
        guard.log_text()
    );
    let took = restarted.elapsed();
    assert_eq!(freeze_status(), "thawed");
    let log = guard.log_text();
    eprintln!("thawed {took:?} after libvirtd was started again:\n{log}");
    assert!(log.contains("thaw attempt 1 failed: "), "{log}");
    assert!(!log.contains("(attempt 1)"), "{log}");
}

/// The VM is destroyed and undefined while a guard watches it (an admin's `virsh undefine` of a
/// VM in trouble, mid-snapshot): at its deadline the guard finds no domain, so nothing frozen,
/// and exits at once instead of retrying for half an hour.
#[test]
fn a_guard_whose_domain_is_gone_exits() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = vmsnap_tests::ScratchVm::define(
        "vmsnap-t12-guard-gone",
        vmsnap_tests::ScratchOptions::default(),
        &[],
    );
    vm.start(false);
    let (mut guard, _) = Guard::start(&vm.uuid(), 3_000);
    drop(vm);
    assert_eq!(
        guard.exit_code(Duration::from_secs(20)),
        EXIT_THAWED,
        "{}",
        guard.log_text()
    );
    assert!(
        guard.log_text().contains("the domain is gone"),
        "{}",
        guard.log_text()
    );
}

/// vmsnapd keeps a standby guard, connected, for its next freeze; told its domain, it is that
/// domain's guard, with the deadline it was given.
#[test]
fn a_standby_guard_told_its_domain_guards_it() {
    let _lab = lab_lock();
    let mut guard = Guard::standby(LAB_URI);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guard.child.try_wait().unwrap().is_none(),
        "{}",
        guard.log_text()
    );
    guard.say(&format!("guard {} 60000", agent_vm_uuid()));
    assert_eq!(guard.next_line(), "ready\n", "{}", guard.log_text());
    guard.say("arm");
    assert_eq!(guard.next_line(), "armed\n", "{}", guard.log_text());
    let _frozen = Frozen::freeze();
    drop(guard.stdin.take());
    wait_thawed(Duration::from_secs(2));
    assert_eq!(guard.exit_code(Duration::from_secs(5)), EXIT_THAWED);
    let log = guard.log_text();
    assert!(log.contains("stdin closed: thawing"), "{log}");
}

/// A standby guards nothing until told: its daemon exiting first, or a line that is not
/// `guard UUID MS`, ends it without a thaw (the guest here is frozen by someone else).
#[test]
fn a_standby_guard_not_told_its_domain_thaws_nothing() {
    let _lab = lab_lock();
    let frozen = Frozen::freeze();
    let mut guard = Guard::standby(LAB_URI);
    drop(guard.stdin.take());
    assert_eq!(guard.exit_code(Duration::from_secs(10)), EXIT_DISARMED);

    let mut guard = Guard::standby(LAB_URI);
    guard.say("guard ../etc/passwd 60000");
    assert_eq!(guard.next_line(), "", "{}", guard.log_text());
    assert_eq!(guard.exit_code(Duration::from_secs(10)), EXIT_NOT_STARTED);
    assert!(
        guard.log_text().contains("expected"),
        "{}",
        guard.log_text()
    );

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(freeze_status(), "frozen");
    drop(frozen);
}

/// A standby waits for as long as vmsnapd has no freeze to do; libvirtd may restart meanwhile,
/// and the standby's connection with it. Told its domain then, it connects again.
#[test]
fn a_standby_guard_connects_again_after_a_libvirtd_restart() {
    let _lab = lab_lock();
    let mut guard = Guard::standby(LAB_URI);
    std::thread::sleep(Duration::from_millis(300));
    let _restart = RestartLibvirtdOnDrop;
    stop_libvirtd();
    assert!(Command::new("libvirtd")
        .arg("-d")
        .status()
        .unwrap()
        .success());
    wait_for(Duration::from_secs(30), "libvirtd to answer", || {
        Command::new("virsh")
            .args(["-c", LAB_URI, "version"])
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
    guard.say(&format!("guard {} 60000", agent_vm_uuid()));
    assert_eq!(guard.next_line(), "ready\n", "{}", guard.log_text());
    guard.say("disarm");
    assert_eq!(guard.next_line(), "disarmed\n", "{}", guard.log_text());
    assert_eq!(guard.exit_code(Duration::from_secs(5)), EXIT_DISARMED);
    assert!(
        guard.log_text().contains("connecting again"),
        "{}",
        guard.log_text()
    );
}
