//! Test harness: a private dbus-daemon per test, vmsnapd and vmsnapctl as real processes, and
//! access to the lab (see lab/up.sh) for tests that need real libvirt and guests.
//!
//! The binaries are the workspace's own build (`cargo build --workspace` first; lab/test.sh does).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Names of the lab's VMs (lab/up.sh).
pub const LAB_AGENT_VM: &str = "vmsnap-lab-agent";
pub const LAB_NOAGENT_VM: &str = "vmsnap-lab-noagent";
pub const LAB_MIXED_VM: &str = "vmsnap-lab-mixed";
pub const LAB_URI: &str = "qemu:///system";

/// Path of a workspace binary, next to the test executable's `deps` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// Polls `check` until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private system-like dbus-daemon, stopped on drop.
pub struct PrivateBus {
    pub address: String,
    child: Child,
    _dir: TempDir,
}

impl PrivateBus {
    pub fn start() -> PrivateBus {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bus.sock");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            // It warns that it cannot raise its fd limit when not started as a real system bus.
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon runs (lab/install-packages.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        PrivateBus {
            address: line.trim().to_string(),
            child,
            _dir: dir,
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running vmsnapd on a private bus, stopped (SIGTERM) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub bus_address: String,
    pub log: PathBuf,
    dir: TempDir,
}

impl Daemon {
    /// Starts vmsnapd with this config text and waits until it owns its bus name.
    pub fn start(bus: &PrivateBus, config: &str) -> Daemon {
        let mut daemon = Daemon::spawn(bus, config);
        let address = daemon.bus_address.clone();
        wait_for(Duration::from_secs(30), "vmsnapd to own its name", || {
            if let Some(status) = daemon.try_wait() {
                panic!("vmsnapd exited early ({status}):\n{}", daemon.log_text());
            }
            name_has_owner(&address).then_some(())
        });
        daemon
    }

    /// Starts vmsnapd without waiting for anything.
    pub fn spawn(bus: &PrivateBus, config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("vmsnapd.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("vmsnapd.log");
        let child = Command::new(bin("vmsnapd"))
            .arg("--config")
            .arg(&config_path)
            .arg("--bus-address")
            .arg(&bus.address)
            .env("VMSNAP_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            bus_address: bus.address.clone(),
            log,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if vmsnapd has exited (the process is reaped then).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon still running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmsnapd did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs vmsnapctl against this daemon's bus.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        ctl(&self.bus_address, args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// What a vmsnapctl run printed, and how it ended.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "vmsnapctl failed: {self:?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts the documented failure shape: exit 1, one line on stderr, nothing on stdout.
    pub fn failure(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected exit 1: {self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "one line: {self:?}");
        assert!(self.stdout.is_empty(), "no stdout: {self:?}");
        self.stderr.trim_end()
    }
}

pub fn ctl(bus_address: &str, args: &[&str]) -> CtlOutput {
    let output: Output = Command::new(bin("vmsnapctl"))
        .arg("--bus-address")
        .arg(bus_address)
        .args(args)
        .env_remove("VMSNAP_BUS_ADDRESS")
        .output()
        .unwrap();
    CtlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether org.vmsnap.VmSnap1 is owned on the bus at `address`.
pub fn name_has_owner(address: &str) -> bool {
    let output = Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(["call", "org.freedesktop.DBus", "/org/freedesktop/DBus"])
        .args([
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            vmsnap_api::BUS_NAME,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "b true"
}

/// A config for vmsnapd against `uri`, refreshing quickly so tests see changes fast.
pub fn config_for(uri: &str) -> String {
    format!(
        "libvirt_uri = \"{uri}\"\nrefresh_interval_ms = 200\nreconnect_interval_ms = 300\n\
         state_dir = \"/var/lib/vmsnap-test\"\n"
    )
}

/// Runs virsh against the lab's libvirt; returns stdout, panics on failure.
pub fn virsh(args: &[&str]) -> String {
    let output = Command::new("virsh")
        .args(["-c", LAB_URI])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Panics with instructions unless the lab is up: libvirtd answers and the lab VMs exist.
pub fn require_lab() {
    let output = Command::new("virsh")
        .args(["-c", LAB_URI, "list", "--all", "--name"])
        .output();
    let names = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => panic!("libvirtd is not reachable at {LAB_URI}: bring the lab up with lab/up.sh"),
    };
    for vm in [LAB_AGENT_VM, LAB_NOAGENT_VM, LAB_MIXED_VM] {
        assert!(
            names.lines().any(|l| l.trim() == vm),
            "lab VM {vm} is missing: bring the lab up with lab/up.sh"
        );
    }
}

/// Finds a VM by name in `vmsnapctl vm list --output json` output.
pub fn find_vm<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|vm| vm["name"] == name)
}

/// Runs `script` with /bin/sh inside a lab guest through its agent (guest-exec); returns the
/// exit code and stdout. Panics if the agent does not answer or the command outlives `timeout`.
pub fn guest_exec(vm: &str, script: &str, timeout: Duration) -> (i64, String) {
    use base64::Engine as _;
    let request = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}
    });
    let reply: serde_json::Value =
        serde_json::from_str(&virsh(&["qemu-agent-command", vm, &request.to_string()])).unwrap();
    let pid = reply["return"]["pid"].as_i64().unwrap();
    let status_request =
        serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string();
    let status = wait_for(timeout, "the guest command to finish", || {
        let status: serde_json::Value =
            serde_json::from_str(&virsh(&["qemu-agent-command", vm, &status_request])).unwrap();
        (status["return"]["exited"] == true).then_some(status)
    });
    let out = status["return"]["out-data"].as_str().unwrap_or("");
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(out)
        .unwrap();
    (
        status["return"]["exitcode"].as_i64().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
    )
}
