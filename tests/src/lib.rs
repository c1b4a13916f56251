//! Test harness: a private dbus-daemon per test, vmsnapd and vmsnapctl as real processes, and
//! access to the lab (see lab/up.sh) for tests that need real libvirt and guests.
//!
//! The binaries are the workspace's own build (`cargo build --workspace` first; lab/test.sh does).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod browser;
pub mod ceph;

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
        // Other users' processes connect too (the authorization tests).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("bus.sock");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            permissive_bus_config(&format!("unix:path={}", socket.display())),
        )
        .unwrap();
        let (child, address) = spawn_dbus_daemon(&config);
        PrivateBus {
            address,
            child,
            _dir: dir,
        }
    }

    /// Stops the dbus-daemon now (as a crash or a stop of the bus would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A system-like bus configuration listening on `listen` (a D-Bus address) where everyone may
/// own, send and receive anything.
pub fn permissive_bus_config(listen: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#
    )
}

/// Starts `dbus-daemon` with this config file; returns it and the address it listens on (empty
/// if it refused the config).
pub fn spawn_dbus_daemon(config: &Path) -> (Child, String) {
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
    (child, line.trim().to_string())
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running vmsnapd on a private bus, stopped (SIGTERM) on drop. Its state directory lives in
/// its own temporary directory unless the config names one, and survives restarts.
pub struct Daemon {
    child: Option<Child>,
    pub bus_address: String,
    pub log: PathBuf,
    config_path: PathBuf,
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
        Daemon::spawn_with_env(bus, config, &[])
    }

    /// Starts vmsnapd with extra environment variables, without waiting for anything.
    pub fn spawn_with_env(bus: &PrivateBus, config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("vmsnapd.toml");
        let mut config = config.to_string();
        if !config.contains("state_dir") {
            // First: after a [table] header it would belong to that table.
            config.insert_str(
                0,
                &format!("state_dir = \"{}\"\n", dir.path().join("state").display()),
            );
        }
        if !config.contains("vm_lock_dir") {
            // Its own: daemons of tests running at once may see the same VM UUIDs (test:///'s
            // domains); a test of the libvirt hook names the lab's (the hook's) on purpose.
            config.insert_str(
                0,
                &format!("vm_lock_dir = \"{}\"\n", dir.path().join("locks").display()),
            );
        }
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("vmsnapd.log");
        let mut daemon = Daemon {
            child: None,
            bus_address: bus.address.clone(),
            log,
            config_path,
            dir,
        };
        daemon.launch(env);
        daemon
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn launch(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("vmsnapd"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--bus-address")
            .arg(&self.bus_address)
            .env("VMSNAP_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Stops (if running) and starts vmsnapd again with the same config and state, with extra
    /// environment variables, and waits until it owns its name.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch(env);
        let address = self.bus_address.clone();
        wait_for(Duration::from_secs(30), "vmsnapd to own its name", || {
            if let Some(status) = self.try_wait() {
                panic!("vmsnapd exited early ({status}):\n{}", self.log_text());
            }
            name_has_owner(&address).then_some(())
        });
    }

    /// Waits for vmsnapd to exit on its own (e.g. at a crash point) and returns how it ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for(timeout, "vmsnapd to exit", || self.try_wait())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
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
    ctl_with_input(bus_address, args, "")
}

/// vmsnapctl with `input` on standard input (a manifest for `apply -f -`, say).
pub fn ctl_with_input(bus_address: &str, args: &[&str], input: &str) -> CtlOutput {
    let mut child = Command::new(bin("vmsnapctl"))
        .arg("--bus-address")
        .arg(bus_address)
        .args(args)
        .env_remove("VMSNAP_BUS_ADDRESS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that does not read its input may exit first: a broken pipe is no error here.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, input.as_bytes());
    }
    let output: Output = child.wait_with_output().unwrap();
    CtlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A KubeVirt VirtualMachineSnapshot manifest, as in KubeVirt's documentation.
pub fn snapshot_manifest(name: &str, vm: &str) -> String {
    format!(
        "apiVersion: snapshot.kubevirt.io/v1alpha1\nkind: VirtualMachineSnapshot\nmetadata:\n  \
         name: {name}\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    \
         name: {vm}\n"
    )
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
        "libvirt_uri = \"{uri}\"\nrefresh_interval = \"200ms\"\nreconnect_interval = \"300ms\"\n"
    )
}

/// A system-like dbus-daemon: the stock system bus's default policy (everything denied but
/// talking to the bus itself, signals and replies) plus the shipped policy file, nothing else.
/// Its directory is reachable by every user; stopped on drop.
pub struct SystemBus {
    pub address: String,
    child: Child,
    /// A folder beside the bus that tests may use (readable by everyone).
    pub dir: TempDir,
}

impl SystemBus {
    pub fn start() -> SystemBus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("system_bus_socket");
        let config = dir.path().join("system.conf");
        let policy = workspace_root().join("config/dbus/system.d/org.vmsnap.VmSnap1.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus" />
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
                socket = socket.display(),
                policy = policy.display()
            ),
        )
        .unwrap();
        let (child, address) = spawn_dbus_daemon(&config);
        assert!(!address.is_empty(), "dbus-daemon refused the config");
        SystemBus {
            address,
            child,
            dir,
        }
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs virsh against the lab's libvirt; returns stdout, panics on failure.
pub fn virsh(args: &[&str]) -> String {
    let output = virsh_output(args);
    assert!(
        output.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs virsh against the lab's libvirt and returns what it did, failed or not.
///
/// A VM start that libvirt 9.0 refuses with "failed to load cgroup BPF prog: Resource temporarily
/// unavailable" is run again, up to 5 times in all. On this host libvirt guards each VM's devices
/// with a cgroup BPF program, the kernel's verifier gives up with EAGAIN when a signal (another
/// libvirtd child exiting, as happens when VMs start at once) is pending for the loading thread,
/// and libvirt, unlike libbpf (`PROG_LOAD_ATTEMPTS`), does not retry. The failed start changed
/// nothing (seen once in CI: two lab VMs started 18 ms apart). vmsnapd retries the same way.
pub fn virsh_output(args: &[&str]) -> std::process::Output {
    let starts = matches!(args.first(), Some(&"start") | Some(&"create"));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let output = Command::new("virsh")
            .args(["-c", LAB_URI])
            .args(args)
            .output()
            .unwrap();
        let interrupted = String::from_utf8_lossy(&output.stderr)
            .contains("failed to load cgroup BPF prog: Resource temporarily unavailable");
        if !(starts && interrupted && attempts < 5) {
            return output;
        }
    }
}

/// Shuts a lab VM down through its guest agent and waits until it is shut off. libvirt 9.0 may
/// answer "End of file from agent socket" when qemu-ga closes its channel as the guest powers
/// off before libvirt has seen QEMU's SHUTDOWN event (seen on a loaded machine); the guest shuts
/// down all the same, so the domain's state, not virsh's exit status, says whether it worked.
pub fn shut_down_by_agent(name: &str) {
    let output = Command::new("virsh")
        .args(["-c", LAB_URI, "shutdown", name, "--mode", "agent"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || stderr.contains("End of file from agent socket"),
        "virsh shutdown {name} --mode agent failed: {stderr}"
    );
    wait_for(Duration::from_secs(60), "the VM to shut off", || {
        (virsh(&["domstate", name]).trim() == "shut off").then_some(())
    });
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
    let out = guest_exec_output(vm, script, timeout);
    (out.code, out.stdout)
}

/// What a command run in a guest printed, and its exit code (-1 if it died of a signal).
#[derive(Debug)]
pub struct GuestOutput {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// A process stopped with SIGSTOP; continued when dropped, so a failing test never leaves it
/// stopped.
pub struct Stopped(String);

impl Stopped {
    pub fn new(pid: &str) -> Stopped {
        let status = Command::new("kill").args(["-STOP", pid]).status().unwrap();
        assert!(status.success(), "kill -STOP {pid}");
        Stopped(pid.to_string())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// Like [`guest_exec`], with the command's standard error too.
pub fn guest_exec_output(vm: &str, script: &str, timeout: Duration) -> GuestOutput {
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
    let decode = |field: &str| {
        let data = status["return"][field].as_str().unwrap_or("");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    GuestOutput {
        code: status["return"]["exitcode"].as_i64().unwrap_or(-1),
        stdout: decode("out-data"),
        stderr: decode("err-data"),
    }
}

/// `word` quoted for /bin/sh.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// A throwaway TCG VM built from the lab's guest kernel and initramfs, with its own data disk in
/// its own directory (so the overlays snapshots create land there too). Destroyed, undefined and
/// removed on drop.
pub struct ScratchVm {
    pub name: String,
    pub dir: TempDir,
    pub disk: PathBuf,
}

/// How a scratch VM is made.
#[derive(Debug, Clone, Default)]
pub struct ScratchOptions {
    /// Give it a guest agent channel (and run qemu-ga).
    pub agent: bool,
    /// Add a cloud-init style cdrom.
    pub cdrom: bool,
    /// Add `<os><nvram>` with a variables file of random bytes (the VM is never started then,
    /// since the lab has no UEFI firmware).
    pub nvram: bool,
    /// Memory in MiB; 0 means the lab's usual 192.
    pub memory_mib: u32,
    /// Virtual CPUs; 0 means one. QEMU runs each on a host thread of its own (multi-threaded
    /// TCG), so a guest that runs vmsnapd and its LVM commands beside the test's commands gets
    /// the host's second core.
    pub vcpus: u32,
    /// The data disk (vda) is this RBD image of the lab's Ceph pool (lab/ceph-up.sh), reached
    /// with the lab's Ceph user and libvirt secret, instead of a qcow2 file; the caller made
    /// the image (lab/ceph-image.sh).
    pub rbd_image: Option<String>,
}

/// A key of the lab's Ceph cluster (lab/ceph-up.sh's ceph.env, VMSNAP_CEPH_*), e.g. `CONF`.
pub fn ceph_env(key: &str) -> String {
    let env = std::fs::read_to_string(lab_dir().join("ceph/ceph.env"))
        .expect("the lab's Ceph cluster (lab/ceph-up.sh)");
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("VMSNAP_CEPH_{key}=")))
        .unwrap_or_else(|| panic!("VMSNAP_CEPH_{key} missing from ceph.env"))
        .to_string()
}

pub fn lab_dir() -> PathBuf {
    PathBuf::from(std::env::var("VMSNAP_LAB_DIR").unwrap_or_else(|_| "/var/lib/vmsnap-lab".into()))
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl ScratchVm {
    /// Defines the VM (not started). `seed` files go into the data disk's filesystem root.
    pub fn define(name: &str, options: ScratchOptions, seed: &[(&str, &[u8])]) -> ScratchVm {
        require_lab();
        remove_domain(name);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(lab_dir())
            .unwrap();
        let seed_dir = dir.path().join("seed");
        std::fs::create_dir_all(&seed_dir).unwrap();
        for (file, content) in seed {
            std::fs::write(seed_dir.join(file), content).unwrap();
        }
        let disk = dir.path().join(format!("{name}-vda.qcow2"));
        let guest = lab_dir().join("guest");
        let mut devices = match &options.rbd_image {
            Some(image) => format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='writeback'/>\
                 <auth username='{user}'><secret type='ceph' uuid='{secret}'/></auth>\
                 <source protocol='rbd' name='{pool}/{image}'><host name='{host}' port='{port}'/></source>\
                 <target dev='vda' bus='virtio'/></disk>",
                user = ceph_env("USER"),
                secret = ceph_env("SECRET_UUID"),
                pool = ceph_env("POOL"),
                host = ceph_env("MON_HOST"),
                port = ceph_env("MON_PORT"),
            ),
            None => {
                run(
                    "bash",
                    &[
                        workspace_root()
                            .join("lab/make-data-disk.sh")
                            .to_str()
                            .unwrap(),
                        disk.to_str().unwrap(),
                        "64M",
                        seed_dir.to_str().unwrap(),
                    ],
                );
                format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                     <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                    disk.display()
                )
            }
        };
        if options.cdrom {
            let iso = dir.path().join("cidata.img");
            std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
            devices.push_str(&format!(
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
                 <source file='{}'/><target dev='sda' bus='sata'/><readonly/></disk>",
                iso.display()
            ));
        }
        if options.agent {
            devices.push_str(
                "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
            );
        }
        let mut os = format!(
            "<type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
             <cmdline>console=ttyS0 quiet</cmdline>",
            guest.join("vmlinuz").display(),
            guest.join("initrd.gz").display()
        );
        if options.nvram {
            let vars = dir.path().join("VARS.fd");
            let bytes: Vec<u8> = (0..131072u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            std::fs::write(&vars, bytes).unwrap();
            os = format!(
                "<type arch='x86_64' machine='q35'>hvm</type>\
                 <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
                 <nvram>{}</nvram>",
                vars.display()
            );
        }
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory}</memory><vcpu>{vcpus}</vcpu>\
             <os>{os}</os><features><acpi/></features><cpu mode='custom' match='exact'><model>qemu64</model></cpu>\
             <on_poweroff>destroy</on_poweroff><devices>{devices}\
             <serial type='file'><source path='{}'/><target port='0'/></serial>\
             <video><model type='none'/></video><memballoon model='none'/></devices></domain>",
            dir.path().join("console.log").display(),
            memory = if options.memory_mib == 0 {
                192
            } else {
                options.memory_mib
            },
            vcpus = options.vcpus.max(1),
        );
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml).unwrap();
        virsh(&["define", xml_path.to_str().unwrap()]);
        ScratchVm {
            name: name.to_string(),
            dir,
            disk,
        }
    }

    /// A VM with a guest agent, started and ready (agent answering, data disk mounted).
    pub fn running_with_agent(name: &str) -> ScratchVm {
        let vm = ScratchVm::define(
            name,
            ScratchOptions {
                agent: true,
                ..Default::default()
            },
            &[],
        );
        vm.start(true);
        vm
    }

    /// Starts it and, with an agent, waits until the agent answers and the data disk is mounted.
    pub fn start(&self, agent: bool) {
        virsh(&["start", &self.name]);
        if agent {
            wait_guest_ready(&self.name);
        }
    }

    /// Runs a shell command in the guest; panics unless it exits 0.
    pub fn exec(&self, script: &str) -> String {
        let (code, out) = guest_exec(&self.name, script, Duration::from_secs(120));
        assert_eq!(code, 0, "guest command failed: {script}\n{out}");
        out
    }

    /// Files in the guest's /mnt/data with their SHA-256, as `sha256sum` prints them, sorted.
    pub fn guest_checksums(&self) -> String {
        self.exec(
            "cd /mnt/data && find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum",
        )
    }

    /// Writes `size` random bytes to /mnt/data/NAME in the guest and syncs.
    pub fn write_file(&self, name: &str, size: usize) {
        self.exec(&format!(
            "head -c {size} /dev/urandom > /mnt/data/{name} && sync"
        ));
    }

    pub fn uuid(&self) -> String {
        virsh(&["domuuid", &self.name]).trim().to_string()
    }

    pub fn disk_source(&self) -> String {
        disk_of(&self.name, "vda")
    }

    /// Image files in the VM's directory (data disk and overlays).
    pub fn images(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".qcow2"))
            .collect();
        names.sort();
        names
    }
}

/// Waits until a running lab guest's agent answers and its data disk is mounted.
pub fn wait_guest_ready(name: &str) {
    wait_for(Duration::from_secs(120), "the guest's agent", || {
        let out = Command::new("virsh")
            .args([
                "-c",
                LAB_URI,
                "qemu-agent-command",
                name,
                r#"{"execute":"guest-ping"}"#,
            ])
            .output()
            .ok()?;
        output_ok(&out).then_some(())
    });
    wait_for(Duration::from_secs(60), "/mnt/data in the guest", || {
        let (code, _) = guest_exec(
            name,
            "grep -q ' /mnt/data ' /proc/mounts",
            Duration::from_secs(20),
        );
        (code == 0).then_some(())
    });
}

fn output_ok(out: &Output) -> bool {
    out.status.success()
}

impl Drop for ScratchVm {
    fn drop(&mut self) {
        remove_domain(&self.name);
    }
}

/// Destroys and undefines domain `name` if it is there (a leftover of an interrupted run).
pub fn remove_domain(name: &str) {
    let _ = Command::new("virsh")
        .args(["-c", LAB_URI, "destroy", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", LAB_URI, "undefine", name, "--nvram"])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", LAB_URI, "undefine", name])
        .output();
}

/// The files `f*` in the ext4 filesystem of a (possibly backed) disk image, with their SHA-256,
/// formatted like `sha256sum` in the guest. Reads a flattened copy, so the image is not touched
/// and may be in use by a running VM.
pub fn image_checksums(image: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("flat.raw");
    run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", image, raw.to_str().unwrap()],
    );
    // Replays the journal of a crash-consistent image; the copy is ours to change.
    let _ = Command::new("e2fsck").args(["-fy"]).arg(&raw).output();
    let listing = run("debugfs", &["-R", "ls -p /", raw.to_str().unwrap()]);
    let mut names: Vec<String> = listing
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| n.starts_with('f'))
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let dump = dir.path().join("dump");
        run(
            "debugfs",
            &[
                "-R",
                &format!("dump /{name} {}", dump.display()),
                raw.to_str().unwrap(),
            ],
        );
        let sum = run("sha256sum", &[dump.to_str().unwrap()]);
        let hash = sum.split_whitespace().next().unwrap();
        out.push_str(&format!("{hash}  ./{name}\n"));
    }
    out
}

/// Checks the introspection of `interface` at `path` against the committed
/// `config/dbus/<interface>.xml`, or rewrites that file when VMSNAP_UPDATE_INTROSPECTION is set.
pub fn check_introspection(address: &str, path: &str, interface: &str) {
    let output = Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(["call", vmsnap_api::BUS_NAME, path])
        .args([
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
            "--json=short",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let xml = reply["data"][0].as_str().unwrap();
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options).unwrap();
    let node = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(interface))
        .unwrap_or_else(|| panic!("{path} does not serve {interface}"));
    let mut served = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    for line in xml[node.range()]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let indent = if line.starts_with("<interface") || line.starts_with("</interface") {
            "  "
        } else {
            "    "
        };
        served.push_str(indent);
        served.push_str(line);
        served.push('\n');
    }
    served.push_str("</node>\n");
    let committed_path = workspace_root().join(format!("config/dbus/{interface}.xml"));
    if std::env::var_os("VMSNAP_UPDATE_INTROSPECTION").is_some() {
        if let Some(dir) = committed_path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&committed_path, &served).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert_eq!(
        committed,
        served,
        "the served {interface} differs from {}; if the change is deliberate, rerun with \
         VMSNAP_UPDATE_INTROSPECTION=1",
        committed_path.display()
    );
}

static GUESTS_BOOTING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static GUEST_SLOT_FREE: std::sync::Condvar = std::sync::Condvar::new();

/// At most two tests of a test binary run guests at once: TCG on two cores. Held for the
/// test's duration.
pub struct GuestSlot;

impl GuestSlot {
    pub fn take() -> GuestSlot {
        let mut running = GUESTS_BOOTING.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= 2 {
            running = GUEST_SLOT_FREE
                .wait(running)
                .unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        GuestSlot
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut running = GUESTS_BOOTING.lock().unwrap_or_else(|e| e.into_inner());
        *running -= 1;
        GUEST_SLOT_FREE.notify_one();
    }
}

/// Waits until vmsnapd's inventory shows the VM's agent connected.
pub fn wait_agent_connected(daemon: &Daemon, vm: &str) {
    wait_for(
        Duration::from_secs(60),
        "the agent in the inventory",
        || {
            let out = daemon.ctl(&["vm", "show", vm, "--output", "json"]);
            (out.code == Some(0) && out.json()["agent"] == "connected").then_some(())
        },
    );
}

const LIBVIRTD_PID_FILE: &str = "/run/libvirtd.pid";

/// The running libvirtd's pid, from its pid file.
pub fn libvirtd_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(LIBVIRTD_PID_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // PID 1 may not reap here: a zombie is not a running libvirtd.
    (!status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("zombie")))
    .then_some(pid)
}

/// Starts libvirtd again if the test leaves it stopped (on failure too).
pub struct RestartLibvirtdOnDrop;

impl Drop for RestartLibvirtdOnDrop {
    fn drop(&mut self) {
        if libvirtd_pid().is_none() {
            let _ = Command::new("libvirtd").arg("-d").status();
        }
    }
}

/// Stops the lab's libvirtd (SIGTERM) and waits until it is gone; pair it with
/// [`RestartLibvirtdOnDrop`], declared first.
pub fn stop_libvirtd() {
    let pid = libvirtd_pid().expect("libvirtd runs (lab/up.sh)");
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for(Duration::from_secs(30), "libvirtd to stop", || {
        libvirtd_pid().is_none().then_some(())
    });
}

/// `vmsnapctl snapshot show VM NAME --output json`.
pub fn show_snapshot(daemon: &Daemon, vm: &str, name: &str) -> serde_json::Value {
    daemon
        .ctl(&["snapshot", "show", vm, name, "--output", "json"])
        .json()
}

/// The image of a snapshot's first included volume, from its JSON.
pub fn image_of(snapshot: &serde_json::Value) -> String {
    snapshot["snapshotVolumes"]["includedVolumes"][0]["image"]
        .as_str()
        .unwrap()
        .to_string()
}

impl ScratchVm {
    /// Adds a virtio disk with this image to the VM's definition (before it starts), as `target`
    /// (vdb, vdc, ...: the guest sees them in target order).
    pub fn attach_disk(&self, image: &Path, target: &str, format: &str, readonly: bool) {
        let mut args = vec![
            "attach-disk",
            &self.name,
            image.to_str().unwrap(),
            target,
            "--config",
            "--targetbus",
            "virtio",
            "--driver",
            "qemu",
            "--subdriver",
            format,
            "--cache",
            "unsafe",
        ];
        if readonly {
            args.push("--mode");
            args.push("readonly");
        }
        virsh(&args);
    }

    /// Adds a sparse raw disk of `size` bytes, in the VM's directory, as `target`; returns its path.
    pub fn attach_raw_disk(&self, target: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(format!("{}-{target}.raw", self.name));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        self.attach_disk(&path, target, "raw", false);
        path
    }
}

/// Builds a payload disk (raw ext4, label vmsnap-payload) with `binaries` in bin/ and their
/// libraries in lib/ (lab/guest-payload.sh); in a lab guest, mounted on /mnt/payload, they run
/// with `LD_LIBRARY_PATH=/mnt/payload/lib`.
pub fn make_guest_payload(out: &Path, binaries: &[&Path]) {
    let script = workspace_root().join("lab/guest-payload.sh");
    let mut args = vec![script.to_str().unwrap(), out.to_str().unwrap()];
    args.extend(binaries.iter().map(|b| b.to_str().unwrap()));
    run("bash", &args);
}

/// The volume group an [`LvmGuest`] creates on its raw disk.
pub const LVM_GUEST_VG: &str = "vmsnaplab";
/// Where an [`LvmGuest`] keeps its files (on the guest's data disk, so they survive restarts of
/// vmsnapd): vmsnapd.toml, vmsnapd.log, state/, and whatever the test writes there.
pub const LVM_GUEST_LAB: &str = "/mnt/data/lab";
/// The guest's private bus, served by a dbus-daemon from the payload.
pub const LVM_GUEST_BUS: &str = "unix:path=/run/vmsnaplab/bus.sock";
const LVM_GUEST_PAYLOAD: &str = "/mnt/payload";

/// The logical volumes an [`LvmGuest`] creates in [`LVM_GUEST_VG`]: thin LVs in a thin pool
/// named `pool`, and thick LVs; sizes in MiB.
#[derive(Debug, Clone)]
pub struct LvmLayout {
    pub pool_mib: u64,
    pub thin: Vec<(String, u64)>,
    pub thick: Vec<(String, u64)>,
}

/// A lab guest in which vmsnapd itself runs against real LVM: a scratch VM (512 MiB) with a raw
/// disk (vdb) holding the volume group [`LVM_GUEST_VG`] and a payload disk (vdc, see
/// [`make_guest_payload`]) with vmsnapd, vmsnapctl, dbus-daemon and qemu-img, mounted on
/// /mnt/payload (and first in PATH of every command run through [`LvmGuest::exec`]).
/// vmsnapd talks to libvirt's test driver (a `test:///<node.xml>` URI, in-process, no libvirtd)
/// and serves on a dbus-daemon of the guest ([`LVM_GUEST_BUS`]); vmsnapctl runs in the guest
/// too. Everything goes through the guest agent. The VM is removed on drop.
pub struct LvmGuest {
    pub vm: ScratchVm,
    daemon_pid: Option<u32>,
}

impl LvmGuest {
    /// Defines and boots the guest, mounts the payload, creates the volume group and `layout`,
    /// and starts the guest's dbus-daemon. vmsnapd is not started yet ([`LvmGuest::start_daemon`]).
    pub fn boot(name: &str, layout: &LvmLayout) -> LvmGuest {
        let vm = ScratchVm::define(
            name,
            ScratchOptions {
                agent: true,
                memory_mib: 512,
                vcpus: 2,
                ..Default::default()
            },
            &[],
        );
        vm.attach_raw_disk("vdb", 1 << 30);
        let payload = vm.dir.path().join("payload.raw");
        make_guest_payload(
            &payload,
            &[
                &bin("vmsnapd"),
                &bin("vmsnapctl"),
                Path::new("/usr/bin/dbus-daemon"),
                // vmsnapd's file disks need it (overlays, image chains).
                Path::new("/usr/bin/qemu-img"),
            ],
        );
        vm.attach_disk(&payload, "vdc", "raw", true);
        vm.start(true);
        let guest = LvmGuest {
            vm,
            daemon_pid: None,
        };
        guest.exec(&format!(
            "set -e; mkdir -p {LVM_GUEST_PAYLOAD} {LVM_GUEST_LAB}/state /run/vmsnaplab
             mount -o ro \"$(findfs LABEL=vmsnap-payload)\" {LVM_GUEST_PAYLOAD}"
        ));
        let vg = LVM_GUEST_VG;
        let mut script = format!(
            "set -e; pvcreate -q -ff -y /dev/vdb; vgcreate -q {vg} /dev/vdb
             lvcreate -q -L {}m -T {vg}/pool\n",
            layout.pool_mib
        );
        for (lv, mib) in &layout.thin {
            script.push_str(&format!("lvcreate -q -V {mib}m -T {vg}/pool -n {lv}\n"));
        }
        for (lv, mib) in &layout.thick {
            script.push_str(&format!("lvcreate -q -L {mib}m -n {lv} {vg}\n"));
        }
        // No udev in the guest: LVM makes the /dev/VG/LV links itself (udev_rules = 0).
        for (lv, _) in layout.thin.iter().chain(&layout.thick) {
            script.push_str(&format!("test -b /dev/{vg}/{lv}\n"));
        }
        guest.exec(&script);
        guest.write_file(
            "/run/vmsnaplab/bus.conf",
            permissive_bus_config(LVM_GUEST_BUS).as_bytes(),
        );
        guest.exec(&format!(
            "cd /; LD_LIBRARY_PATH={LVM_GUEST_PAYLOAD}/lib setsid {LVM_GUEST_PAYLOAD}/bin/dbus-daemon \
             --config-file=/run/vmsnaplab/bus.conf --nofork </dev/null >/run/vmsnaplab/dbus.log 2>&1 &
             i=0; while [ ! -S /run/vmsnaplab/bus.sock ]; do
               i=$((i + 1)); [ $i -lt 100 ] || {{ cat /run/vmsnaplab/dbus.log; exit 1; }}; sleep 0.1
             done"
        ));
        guest
    }

    /// Runs a shell command in the guest; panics unless it exits 0. Returns its stdout.
    pub fn exec(&self, script: &str) -> String {
        let out = self.try_exec(script);
        assert_eq!(
            out.code, 0,
            "guest command failed: {script}\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Runs a shell command in the guest (PATH has the payload's binaries first).
    pub fn try_exec(&self, script: &str) -> GuestOutput {
        guest_exec_output(
            &self.vm.name,
            &format!("PATH={LVM_GUEST_PAYLOAD}/bin:$PATH\n{script}"),
            Duration::from_secs(300),
        )
    }

    /// Writes a file in the guest.
    pub fn write_file(&self, path: &str, content: &[u8]) {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(content);
        self.exec(&format!("echo {data} | base64 -d > {}", shell_quote(path)));
    }

    /// Writes vmsnapd's config file (`LVM_GUEST_LAB/vmsnapd.toml`); `state_dir` is added unless
    /// the text sets it. Takes effect at the next (re)start.
    pub fn write_daemon_config(&self, config: &str) {
        let mut config = config.to_string();
        if !config.contains("state_dir") {
            // First: after a table header it would belong to that table.
            config.insert_str(0, &format!("state_dir = \"{LVM_GUEST_LAB}/state\"\n"));
        }
        self.write_file(&format!("{LVM_GUEST_LAB}/vmsnapd.toml"), config.as_bytes());
    }

    /// Writes the config and starts vmsnapd, waiting until it answers on the bus.
    pub fn start_daemon(&mut self, config: &str, env: &[(&str, &str)]) {
        self.write_daemon_config(config);
        self.restart_daemon(env);
    }

    /// Starts vmsnapd in the background (with `VMSNAP_LOG=debug` and `env`, output appended to
    /// `LVM_GUEST_LAB/vmsnapd.log`) without waiting for anything.
    pub fn spawn_daemon(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon_pid.is_none(), "vmsnapd is already running");
        let env: String = env
            .iter()
            .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
            .collect();
        let out = self.exec(&format!(
            "cd /; echo \"=== vmsnapd start $(date +%T) {env}\" >>{LVM_GUEST_LAB}/vmsnapd.log
             VMSNAP_LOG=debug {env}LD_LIBRARY_PATH={LVM_GUEST_PAYLOAD}/lib setsid \
             {LVM_GUEST_PAYLOAD}/bin/vmsnapd --config {LVM_GUEST_LAB}/vmsnapd.toml \
             --bus-address {LVM_GUEST_BUS} </dev/null >>{LVM_GUEST_LAB}/vmsnapd.log 2>&1 &
             echo $!"
        ));
        self.daemon_pid = Some(out.trim().parse().unwrap());
    }

    /// (Re)starts vmsnapd (stopping it first if it runs) and waits until it answers on the bus.
    pub fn restart_daemon(&mut self, env: &[(&str, &str)]) {
        if self.daemon_running() {
            self.stop_daemon();
        }
        self.daemon_pid = None;
        self.spawn_daemon(env);
        let pid = self.daemon_pid.unwrap();
        let out = self.try_exec(&format!(
            "{ALIVE}
             i=0; until VMSNAP_BUS_ADDRESS={LVM_GUEST_BUS} vmsnapctl vm list >/dev/null 2>&1; do
               alive {pid} || exit 3
               i=$((i + 1)); [ $i -lt 300 ] || exit 4; sleep 0.1
             done"
        ));
        assert_eq!(
            out.code,
            0,
            "vmsnapd did not come up ({}):\n{}",
            if out.code == 3 {
                "it exited"
            } else {
                "timeout"
            },
            self.daemon_log()
        );
    }

    /// The pid (in the guest) of the vmsnapd started last.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon_pid
    }

    /// Whether the vmsnapd started last still runs (a zombie does not count).
    pub fn daemon_running(&self) -> bool {
        let Some(pid) = self.daemon_pid else {
            return false;
        };
        self.try_exec(&format!("{ALIVE}\nalive {pid}")).code == 0
    }

    /// Waits until the vmsnapd started last has exited (e.g. at a crash point).
    pub fn wait_daemon_exit(&mut self, timeout: Duration) {
        let pid = self.daemon_pid.expect("vmsnapd was started");
        let tenths = timeout.as_millis() / 100;
        let out = self.try_exec(&format!(
            "{ALIVE}
             i=0; while alive {pid}; do i=$((i + 1)); [ $i -lt {tenths} ] || exit 4; sleep 0.1; done"
        ));
        assert_eq!(
            out.code,
            0,
            "vmsnapd (pid {pid}) still runs after {timeout:?}:\n{}",
            self.daemon_log()
        );
        self.daemon_pid = None;
    }

    /// Kills vmsnapd with SIGKILL and waits until it is gone.
    pub fn kill_daemon(&mut self) {
        self.signal_daemon("KILL");
    }

    /// Stops vmsnapd with SIGTERM and waits until it is gone.
    pub fn stop_daemon(&mut self) {
        self.signal_daemon("TERM");
    }

    fn signal_daemon(&mut self, signal: &str) {
        let pid = self.daemon_pid.expect("vmsnapd was started");
        let out = self.try_exec(&format!(
            "{ALIVE}
             kill -{signal} {pid} 2>/dev/null
             i=0; while alive {pid}; do i=$((i + 1)); [ $i -lt 300 ] || exit 4; sleep 0.1; done"
        ));
        assert_eq!(
            out.code,
            0,
            "vmsnapd did not end on SIG{signal}:\n{}",
            self.daemon_log()
        );
        self.daemon_pid = None;
    }

    /// Runs vmsnapctl in the guest against the guest's vmsnapd.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let out = self.try_exec(&format!(
            "VMSNAP_BUS_ADDRESS={LVM_GUEST_BUS} LD_LIBRARY_PATH={LVM_GUEST_PAYLOAD}/lib \
             vmsnapctl {}",
            args.join(" ")
        ));
        CtlOutput {
            code: Some(out.code as i32),
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    /// `vmsnapctl ARGS --output json`, which must succeed; its output parsed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        self.ctl(&args).json()
    }

    /// Everything vmsnapd logged in this guest (all its runs).
    pub fn daemon_log(&self) -> String {
        self.try_exec(&format!("cat {LVM_GUEST_LAB}/vmsnapd.log"))
            .stdout
    }

    /// The WARN and ERROR lines of vmsnapd's log.
    pub fn daemon_problems(&self) -> Vec<String> {
        self.daemon_log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// Every LV of [`LVM_GUEST_VG`] (hidden ones too), as `lvs --reportformat json` reports
    /// them: lv_name, lv_attr, lv_size (bytes), origin, pool_lv, lv_tags, data_percent,
    /// snap_percent.
    pub fn lvs(&self) -> Vec<serde_json::Value> {
        let out = self.exec(&format!(
            "lvs -a --reportformat json --units b --nosuffix \
             -o lv_name,lv_attr,lv_size,origin,pool_lv,lv_tags,data_percent,snap_percent {LVM_GUEST_VG}"
        ));
        let report: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("lvs printed no JSON ({e}): {out}"));
        report["report"][0]["lv"].as_array().unwrap().clone()
    }

    /// Names of the LVs of [`LVM_GUEST_VG`] (not hidden ones), sorted.
    pub fn lv_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lvs()
            .iter()
            .filter_map(|lv| lv["lv_name"].as_str())
            .filter(|n| !n.starts_with('['))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// SHA-256 of a whole block device (or file) in the guest.
    pub fn checksum(&self, path: &str) -> String {
        let out = self.exec(&format!("sha256sum {}", shell_quote(path)));
        out.split_whitespace().next().unwrap().to_string()
    }
}

/// Shell function `alive PID`: the process exists and is not a zombie (the lab guest's init may
/// not reap orphans).
const ALIVE: &str =
    "alive() { [ -e /proc/$1/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$1/status; }";

/// A disk's content as a guest would read it, whole: SHA-256 of the flattened image (read with
/// -U: no lock taken).
pub fn flat_sum(image: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("flat.raw");
    run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", image, raw.to_str().unwrap()],
    );
    run("sha256sum", &[raw.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes 64 KiB of `byte` at `offset_kib` into a shut-off VM's qcow2 top image, as the guest
/// would.
pub fn write_pattern(image: &str, byte: u8, offset_kib: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {byte} {offset_kib}k 64k"),
            image,
        ],
    );
}

/// Waits until vmsnapd's inventory shows `vm` as libvirt has it now (its UUID: a VM defined
/// again under the same name is a new VM, which an inventory a moment old does not know yet).
pub fn wait_in_inventory(daemon: &Daemon, vm: &ScratchVm) {
    let uuid = vm.uuid();
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        let shown = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (shown.code == Some(0) && shown.json()["uuid"] == uuid.as_str()).then_some(())
    });
}

/// The UUIDs of the restores on record.
pub fn restore_uuids(daemon: &Daemon) -> std::collections::BTreeSet<String> {
    daemon
        .ctl(&["restore", "list", "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uuid"].as_str().unwrap().to_string())
        .collect()
}

/// Every restore, once each has settled (Succeeded or Failed): a restarted vmsnapd settles
/// what it found in the background.
pub fn settled_restores(daemon: &Daemon) -> Vec<serde_json::Value> {
    wait_for(Duration::from_secs(120), "every restore settled", || {
        let all = daemon.ctl(&["restore", "list", "--output", "json"]).json();
        let all = all.as_array().unwrap().clone();
        all.iter()
            .all(|r| r["phase"] == "Succeeded" || r["phase"] == "Failed")
            .then_some(all)
    })
}

/// A VM's snapshots as `vmsnapctl snapshot list --output json` gives them.
pub fn snapshot_list(daemon: &Daemon, vm: &str) -> Vec<serde_json::Value> {
    daemon
        .ctl(&["snapshot", "list", vm, "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .clone()
}

/// How many journal steps vmsnapd has logged (debug log: "journal step").
pub fn journal_steps(daemon: &Daemon) -> usize {
    daemon.log_text().matches("journal step").count()
}

/// The backing chain of `image`, top first, as `qemu-img info --backing-chain` names it.
pub fn backing_chain(image: &str) -> Vec<String> {
    let out = run(
        "qemu-img",
        &["info", "-U", "--backing-chain", "--output", "json", image],
    );
    let chain: serde_json::Value = serde_json::from_str(&out).unwrap();
    chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

/// The source of disk `target` of domain `name`, as `virsh domblklist` shows it.
pub fn disk_of(name: &str, target: &str) -> String {
    virsh(&["domblklist", name])
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(target)).then(|| words.next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("{name} has no disk {target}"))
}

/// Every image in the VM's folder is used: in the chain of its disk, or named by one of
/// `snapshots` (as `snapshot list --output json` gives them). `step` names the moment.
pub fn assert_every_image_used(vm: &ScratchVm, snapshots: &[serde_json::Value], step: &str) {
    let mut named = std::collections::BTreeSet::new();
    for s in snapshots {
        for v in s["snapshotVolumes"]["includedVolumes"].as_array().unwrap() {
            named.insert(v["image"].as_str().unwrap().to_string());
        }
    }
    named.extend(backing_chain(&vm.disk_source()));
    for file in vm.images() {
        let path = vm.dir.path().join(&file).to_string_lossy().into_owned();
        assert!(named.contains(&path), "{step}: {file} is used by nothing");
    }
}
