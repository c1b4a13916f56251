//! vmsnapd as a systemd service: the notify protocol (READY=1 only once it serves, WATCHDOG=1 at
//! the configured interval, RELOADING=1/READY=1 around SIGHUP), configuration reload, and the
//! unit file as systemd-analyze sees it. Uses libvirt's test driver and a private bus.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use vmsnap_tests::{bin, config_for, name_has_owner, wait_for, Daemon, PrivateBus};

/// Collects the datagrams vmsnapd sends to NOTIFY_SOCKET.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Waits for a message containing `line`; returns every message seen up to it.
    fn wait_for_line(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|l| l == line);
                seen.push(message);
                if found {
                    return seen;
                }
            }
        }
        panic!("no {line} within {timeout:?}; got {seen:?}");
    }
}

#[test]
fn ready_only_once_serving_then_watchdog_pings() {
    let bus = PrivateBus::start();
    let notify = NotifySocket::new();
    let _daemon = Daemon::spawn_with_env(
        &bus,
        &config_for("test:///default"),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    notify.wait_for_line("READY=1", Duration::from_secs(20));
    // READY=1 came after the name was taken, with the objects in place.
    assert!(name_has_owner(&bus.address));
    // At least three pings in 1.5 s with a 0.4 s watchdog (pinged every 0.2 s).
    let started = Instant::now();
    for _ in 0..3 {
        notify.wait_for_line("WATCHDOG=1", Duration::from_secs(2));
    }
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[test]
fn sighup_reloads_the_configuration_and_a_broken_one_is_refused() {
    let bus = PrivateBus::start();
    let notify = NotifySocket::new();
    let mut daemon = Daemon::spawn_with_env(
        &bus,
        &config_for("test:///default"),
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.wait_for_line("READY=1", Duration::from_secs(20));
    let pid = daemon.pid().unwrap().to_string();

    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        format!("{config}freeze_timeout = \"4s\"\nrequire_quiesce = true\n"),
    )
    .unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let seen = notify.wait_for_line("READY=1", Duration::from_secs(10));
    assert!(seen.iter().any(|m| m.contains("RELOADING=1")), "{seen:?}");
    assert!(daemon.try_wait().is_none(), "{}", daemon.log_text());
    wait_for(Duration::from_secs(5), "the reload in the log", || {
        let log = daemon.log_text();
        (log.contains("configuration reloaded") && log.contains("require_quiesce=true"))
            .then_some(())
    });

    // A broken file: the running configuration stays, and so does the daemon.
    std::fs::write(daemon.config_path(), "freeze_timeout = \"soon\"\n").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    notify.wait_for_line("READY=1", Duration::from_secs(10));
    wait_for(Duration::from_secs(5), "the refusal in the log", || {
        daemon
            .log_text()
            .contains("configuration not reloaded")
            .then_some(())
    });
    assert_eq!(
        daemon.ctl(&["vm", "list", "--output", "json"]).json()[0]["name"],
        "test"
    );
}

/// systemd sends SIGTERM (`systemctl stop`) as soon as it may, i.e. right after READY=1: the
/// daemon must already be listening for it and stop cleanly, not die of the default action.
#[test]
fn sigterm_right_after_ready_stops_cleanly() {
    let bus = PrivateBus::start();
    let notify = NotifySocket::new();
    let mut daemon = Daemon::spawn_with_env(
        &bus,
        &config_for("test:///default"),
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.wait_for_line("READY=1", Duration::from_secs(20));
    let pid = daemon.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = daemon.wait_exit(Duration::from_secs(20));
    let log = daemon.log_text();
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("stopping") && log.contains("stopped"), "{log}");
    notify.wait_for_line("STOPPING=1", Duration::from_secs(1));
}

#[test]
fn systemd_accepts_the_unit() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/vmsnapd.service"),
    )
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmsnapd.service");
    // verify checks that ExecStart exists: point it at the built binary.
    std::fs::write(
        &path,
        unit.replace("/usr/bin/vmsnapd", bin("vmsnapd").to_str().unwrap()),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
