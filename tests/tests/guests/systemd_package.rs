//! vmsnap as an administrator gets it: the Debian package (packaging/build-deb.sh) installed with
//! dpkg in a Debian 12 guest booted with systemd as PID 1, journald, udev, dbus and polkitd
//! (lab/build-systemd-guest.sh), with LVM on a second disk and libvirt's test driver
//! (`test:///<node.xml>`, in-process) standing in for the hypervisor. Everything runs through the
//! guest agent; the guest boots once for all scenarios (TCG is slow), which run in order:
//!   a. dpkg -i: the service is enabled and active (Type=notify: systemd saw READY=1);
//!   b. systemctl reload re-reads the config; a broken config is refused and the service stays;
//!   c. LVM thin + thick snapshot, restore and delete done by the service under the shipped
//!      unit's hardening; journald carries the VM= and SNAPSHOT= fields;
//!   d. D-Bus activation: with the service stopped, `vmsnapctl vm list` starts it;
//!   e. polkit: an unprivileged user is refused create/delete/restore; a rule file grants one
//!      action to a group; root may;
//!   f. watchdog: vmsnapd stopped with SIGSTOP while a snapshot waits for LVM is killed and
//!      restarted by systemd within WatchdogSec, and the restarted daemon settles that snapshot;
//!   g. `apt remove` and reinstall keep every snapshot usable; `apt purge` removes the config but
//!      keeps the records and snapshot LVs;
//!   h. `systemd-analyze security` rates the unit (the score is in README).
//! The package is first installed as the previous release built it (the commit named in
//! packaging/previous-release, built from its own tree by lab/build-previous-release.sh, cached
//! in the lab folder): a snapshot taken by that release (its records in format 1) restores after
//! the upgrade to this tree's package, built from the binaries the test suite runs. Every other
//! scenario runs on this tree's package.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmsnap_tests::{
    bin, guest_exec_output, lab_dir, require_lab, run, shell_quote, virsh, wait_for, GuestOutput,
    GuestSlot, LAB_URI,
};

const GUEST: &str = "vmsnap-systemd-guest";
const VG: &str = "vmsnaplab";
/// A test-driver domain with a thin LV (vda) and a thick LV (vdb).
const VM: &str = "lvm-vm";
const NODE_XML: &str = "/var/lib/vmsnap-lab/node.xml";
const CONFIG: &str = "/etc/vmsnap/vmsnapd.toml";
/// The version the previous release's package is built with (older than this tree's).
const OLD_VERSION: &str = "0.0.9-1";
/// The unit's WatchdogSec.
const WATCHDOG: Duration = Duration::from_secs(30);
/// The exposure `systemd-analyze security` gives the shipped unit may not grow past this.
const MAX_EXPOSURE: f64 = 3.0;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The guest: a libvirt domain booting the cached image through a qcow2 overlay, with a raw disk
/// for LVM (vdb) and a read-only disk holding the two .debs (vdc). Removed on drop.
struct SystemdGuest {
    dir: tempfile::TempDir,
    _slot: GuestSlot,
}

impl SystemdGuest {
    fn boot() -> SystemdGuest {
        require_lab();
        let slot = GuestSlot::take();
        let image = lab_dir().join("systemd-guest");
        // A no-op when lab/up.sh built it already (the stamp matches the script).
        run(
            "bash",
            &[
                workspace_root()
                    .join("lab/build-systemd-guest.sh")
                    .to_str()
                    .unwrap(),
                image.to_str().unwrap(),
            ],
        );
        remove_domain();
        let dir = tempfile::Builder::new()
            .prefix("systemd-guest.")
            .tempdir_in(lab_dir())
            .unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                image.join("root.raw").to_str().unwrap(),
                "-F",
                "raw",
                &path("root.qcow2"),
            ],
        );
        run("truncate", &["-s", "1G", &path("lvm.raw")]);
        build_debs(&dir.path().join("debs"));
        run("truncate", &["-s", "96M", &path("debs.raw")]);
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-L",
                "vmsnap-debs",
                "-d",
                &path("debs"),
                &path("debs.raw"),
            ],
        );
        let disk = |file: &str, format: &str, target: &str, extra: &str| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
                 <source file='{}'/><target dev='{target}' bus='virtio'/>{extra}</disk>",
                path(file)
            )
        };
        // Two vCPUs: QEMU runs each on a host thread (multi-threaded TCG), so systemd, the
        // service and its LVM commands get the host's second core beside the test's commands.
        let xml = format!(
            "<domain type='qemu'><name>{GUEST}</name><memory unit='MiB'>1024</memory>\
             <vcpu>2</vcpu><os><type arch='x86_64' machine='pc'>hvm</type>\
             <kernel>{}</kernel><initrd>{}</initrd>\
             <cmdline>root=/dev/vda rw console=ttyS0</cmdline></os><features><acpi/></features>\
             <cpu mode='custom' match='exact'><model>qemu64</model></cpu>\
             <on_poweroff>destroy</on_poweroff><devices>{}{}{}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{}'/><target port='0'/></serial>\
             <video><model type='none'/></video><memballoon model='none'/></devices></domain>",
            image.join("vmlinuz").display(),
            image.join("initrd.img").display(),
            disk("root.qcow2", "qcow2", "vda", ""),
            disk("lvm.raw", "raw", "vdb", ""),
            disk("debs.raw", "raw", "vdc", "<readonly/>"),
            path("console.log"),
        );
        std::fs::write(dir.path().join("domain.xml"), xml).unwrap();
        virsh(&["define", &path("domain.xml")]);
        let guest = SystemdGuest { dir, _slot: slot };
        let started = Instant::now();
        virsh(&["start", GUEST]);
        wait_for(Duration::from_secs(300), "the guest agent", || {
            let ping = Command::new("virsh")
                .args(["-c", LAB_URI, "qemu-agent-command", GUEST])
                .arg(r#"{"execute":"guest-ping"}"#)
                .output()
                .unwrap();
            ping.status.success().then_some(())
        });
        let state = guest.try_exec("systemctl is-system-running --wait");
        eprintln!(
            "systemd guest: agent and systemd up {:.1} s after virsh start ({})",
            started.elapsed().as_secs_f64(),
            state.stdout.trim()
        );
        assert!(
            matches!(state.stdout.trim(), "running" | "degraded"),
            "{state:?}\n{}",
            guest.console()
        );
        guest.exec("mkdir -p /mnt/debs && mount -o ro LABEL=vmsnap-debs /mnt/debs");
        guest
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs a shell command in the guest; panics unless it exits 0. Returns its stdout.
    fn exec(&self, script: &str) -> String {
        let out = self.try_exec(script);
        assert_eq!(
            out.code, 0,
            "guest command failed: {script}\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    fn try_exec(&self, script: &str) -> GuestOutput {
        guest_exec_output(GUEST, script, Duration::from_secs(300))
    }

    /// `vmsnapctl ARGS` as root.
    fn ctl(&self, args: &[&str]) -> GuestOutput {
        self.try_exec(&format!("vmsnapctl {}", quote_all(args)))
    }

    /// `vmsnapctl ARGS` as the unprivileged user alice.
    fn ctl_as_alice(&self, args: &[&str]) -> GuestOutput {
        self.try_exec(&format!(
            "runuser -u alice -- vmsnapctl {}",
            quote_all(args)
        ))
    }

    /// `vmsnapctl ARGS --output json` as root, which must succeed.
    fn ctl_json(&self, args: &[&str]) -> Value {
        let out = self.exec(&format!("vmsnapctl {} --output json", quote_all(args)));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// `systemctl show vmsnapd -p PROPERTY --value`.
    fn unit_property(&self, property: &str) -> String {
        self.exec(&format!("systemctl show vmsnapd -p {property} --value"))
            .trim()
            .to_string()
    }

    fn active_state(&self) -> String {
        self.unit_property("ActiveState")
    }

    fn main_pid(&self) -> u32 {
        self.unit_property("MainPID").parse().unwrap()
    }

    /// vmsnapd's journal entries since `cursor` (all if None), as `journalctl -o json` gives them.
    fn journal(&self, cursor: Option<&str>) -> Vec<Value> {
        let after = cursor
            .map(|c| format!("--after-cursor={}", shell_quote(c)))
            .unwrap_or_default();
        self.exec(&format!("journalctl -u vmsnapd -o json --no-pager {after}"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The journal's current end, to read only what comes after.
    fn journal_cursor(&self) -> String {
        let out = self.exec("journalctl -u vmsnapd -n 1 -o json --no-pager");
        let entry: Value = serde_json::from_str(out.trim()).unwrap();
        entry["__CURSOR"].as_str().unwrap().to_string()
    }

    /// Waits for a journal entry of vmsnapd after `cursor` whose MESSAGE starts with `message`.
    fn wait_journal(&self, cursor: &str, message: &str) -> Value {
        wait_for(
            Duration::from_secs(60),
            &format!("'{message}' in the journal"),
            || {
                self.journal(Some(cursor)).into_iter().find(|e| {
                    e["MESSAGE"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
                })
            },
        )
    }

    /// SHA-256 of an LV, read past the page cache.
    fn sum(&self, lv: &str) -> String {
        let out = self.exec(&format!(
            "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum {}",
            shell_quote(lv)
        ));
        out.split_whitespace().next().unwrap().to_string()
    }

    /// Checksums of the VM's two disks.
    fn vm_sums(&self) -> [String; 2] {
        [
            self.sum(&format!("/dev/{VG}/thin0")),
            self.sum(&format!("/dev/{VG}/thick0")),
        ]
    }

    /// Writes 4 MiB of random data at the start of both of the VM's disks.
    fn scribble(&self) {
        self.exec(&format!(
            "for lv in thin0 thick0; do dd if=/dev/urandom of=/dev/{VG}/$lv bs=1M count=4 \
             conv=notrunc,fsync 2>/dev/null; done; sync"
        ));
    }

    /// Names of the VG's visible LVs.
    fn lv_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .exec(&format!("lvs --noheadings -o lv_name {VG}"))
            .split_whitespace()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    fn snapshot(&self, name: &str) -> Value {
        let out = self.ctl(&["snapshot", "create", VM, name, "--output", "json"]);
        assert_eq!(out.code, 0, "snapshot {name}: {out:?}");
        let snapshot: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(snapshot["phase"], "Succeeded", "{snapshot:#}");
        snapshot
    }

    fn restore(&self, snapshot: &str) -> Value {
        let out = self.ctl(&["restore", VM, snapshot, "--stop", "--output", "json"]);
        assert_eq!(out.code, 0, "restore {snapshot}: {out:?}");
        let restore: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(restore["phase"], "Succeeded", "{restore:#}");
        restore
    }

    /// Deletes every snapshot named `pre-restore-*` (the restores' safety snapshots).
    fn delete_safety_snapshots(&self) {
        for s in self.ctl_json(&["snapshot", "list", VM]).as_array().unwrap() {
            let name = s["name"].as_str().unwrap();
            if name.starts_with("pre-restore-") {
                let out = self.ctl(&["snapshot", "delete", VM, name]);
                assert_eq!(out.code, 0, "{out:?}");
            }
        }
    }
}

impl Drop for SystemdGuest {
    fn drop(&mut self) {
        remove_domain();
    }
}

fn remove_domain() {
    for args in [["destroy", GUEST], ["undefine", GUEST]] {
        let _ = Command::new("virsh")
            .args(["-c", LAB_URI])
            .args(args)
            .output();
    }
}

fn quote_all(args: &[&str]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Puts two packages in `out`: the previous release's, as version OLD_VERSION (built once and
/// cached), and this tree's, from the binaries under test.
fn build_debs(out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let previous = run(
        "bash",
        &[
            workspace_root()
                .join("lab/build-previous-release.sh")
                .to_str()
                .unwrap(),
            lab_dir().join("previous-release").to_str().unwrap(),
            OLD_VERSION,
        ],
    );
    let previous = previous.lines().last().unwrap().trim().to_string();
    std::fs::copy(
        &previous,
        out.join(format!("vmsnap_{OLD_VERSION}_amd64.deb")),
    )
    .unwrap();
    let binaries = bin("vmsnapd").parent().unwrap().to_path_buf();
    let output = Command::new("bash")
        .arg(workspace_root().join("packaging/build-deb.sh"))
        .arg("--from")
        .arg(&binaries)
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "build-deb.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The .deb of the current build (the one that is not OLD_VERSION), as a path in the guest.
fn current_deb(guest: &SystemdGuest) -> String {
    let list = guest.exec("ls /mnt/debs/*.deb");
    list.lines()
        .find(|l| !l.contains(OLD_VERSION))
        .unwrap()
        .to_string()
}

fn old_deb() -> String {
    format!("/mnt/debs/vmsnap_{OLD_VERSION}_amd64.deb")
}

/// vmsnapd's config in the guest: the test driver's node file as hypervisor, polkit on (the
/// default); `extra` is appended before the [lvm] table.
fn config(extra: &str) -> String {
    format!(
        "libvirt_uri = \"test://{NODE_XML}\"\nrefresh_interval = \"500ms\"\nquiesce = \"always\"\n\
         {extra}[lvm]\nthick_snapshot_size = \"50%\"\nthick_snapshot_min_size = \"4MiB\"\n"
    )
}

fn write_file(guest: &SystemdGuest, path: &str, content: &str) {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(content);
    guest.exec(&format!("echo {data} | base64 -d > {}", shell_quote(path)));
}

#[test]
fn the_debian_package_under_systemd() {
    let started = Instant::now();
    let mut step = Instant::now();
    let guest = SystemdGuest::boot();
    let mut lap = |what: &str| {
        eprintln!(
            "systemd guest: {what}: {:.1} s",
            step.elapsed().as_secs_f64()
        );
        step = Instant::now();
    };
    lap("boot (image check, the two .debs, virsh start to systemd up)");
    scenario_install(&guest);
    lap("install of the previous release");
    scenario_upgrade(&guest);
    lap("upgrade to this tree's package");
    scenario_reload(&guest);
    lap("reload");
    scenario_lvm_and_journal(&guest);
    lap("LVM and journald");
    scenario_activation(&guest);
    lap("D-Bus activation");
    scenario_polkit(&guest);
    lap("polkit");
    scenario_watchdog(&guest);
    lap("watchdog");
    scenario_package_lifecycle(&guest);
    lap("remove, reinstall, upgrade, purge");
    scenario_security(&guest);
    lap("systemd-analyze security");
    eprintln!(
        "systemd guest: all scenarios: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// a. dpkg -i installs with its Depends met by Debian's packages; the service is enabled and
/// active, which for Type=notify means systemd got READY=1 (and the STATUS= it came with).
fn scenario_install(guest: &SystemdGuest) {
    let out = guest.try_exec(&format!("dpkg -i {}", old_deb()));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        guest
            .exec("dpkg-query -W -f='${Status} ${Version}' vmsnap")
            .trim(),
        format!("install ok installed {OLD_VERSION}")
    );
    assert_eq!(guest.exec("systemctl is-enabled vmsnapd").trim(), "enabled");
    assert_eq!(guest.active_state(), "active");
    assert_eq!(guest.unit_property("Type"), "notify");
    assert_eq!(guest.unit_property("StatusText"), "serving");
    // The activation alias exists, so that D-Bus activation finds the unit.
    guest.exec("test -L /etc/systemd/system/dbus-org.vmsnap.VmSnap1.service");

    // The lab's hypervisor: LVs on vdb, used by a test-driver domain.
    guest.exec(&format!(
        "set -e; pvcreate -q -ff -y /dev/vdb; vgcreate -q {VG} /dev/vdb
         lvcreate -q -L 256m -T {VG}/pool; lvcreate -q -V 32m -T {VG}/pool -n thin0
         lvcreate -q -L 32m -n thick0 {VG}; mkdir -p {}",
        Path::new(NODE_XML).parent().unwrap().display()
    ));
    let lv = |lv: &str, target: &str| {
        format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='/dev/{VG}/{lv}'/><target dev='{target}' bus='virtio'/></disk>"
        )
    };
    write_file(
        guest,
        NODE_XML,
        &format!(
            "<node><domain type='test'><name>{VM}</name>\
             <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>{}{}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>\
             </channel></devices></domain></node>\n",
            lv("thin0", "vda"),
            lv("thick0", "vdb")
        ),
    );
    write_file(guest, CONFIG, &config(""));
    // The libvirt URI changes only with a restart.
    guest.exec("systemctl restart vmsnapd");
    let vms = guest.ctl_json(&["vm", "list"]);
    assert_eq!(vms[0]["name"], VM, "{vms:#}");
}

/// The upgrade from the previous release: a snapshot that release took (thin and thick LVs, its
/// record in format 1) is there after `dpkg -i` of this tree's package, which restarts vmsnapd,
/// and restores. The administrator's edited config is kept (--force-confold, as answering the
/// conffile question "keep" does).
fn scenario_upgrade(guest: &SystemdGuest) {
    guest.scribble();
    let then = guest.vm_sums();
    let taken = guest.snapshot("from-previous");
    let uuid = taken["uuid"].as_str().unwrap().to_string();
    let record = guest.exec(&format!("cat /var/lib/vmsnap/snapshots/*/{uuid}.json"));
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["version"], 1, "the previous release writes format 1");
    guest.scribble();
    assert_ne!(guest.vm_sums(), then);

    let pid = guest.main_pid();
    let deb = current_deb(guest);
    let out = guest.try_exec(&format!("dpkg -i --force-confold {deb}"));
    assert_eq!(out.code, 0, "{out:?}");
    let version = guest.exec("dpkg-query -W -f='${Version}' vmsnap");
    assert!(
        deb.contains(&format!("_{}_", version.trim())) && version.trim() != OLD_VERSION,
        "{version} from {deb}"
    );
    assert_eq!(guest.active_state(), "active");
    assert_ne!(guest.main_pid(), pid, "the upgrade did not restart vmsnapd");
    guest.exec("test -x /etc/libvirt/hooks/qemu.d/vmsnap");
    let shown = guest.ctl_json(&["snapshot", "show", VM, "from-previous"]);
    assert_eq!(shown["phase"], "Succeeded", "{shown:#}");
    assert_eq!(shown["readyToUse"], true, "{shown:#}");
    guest.restore("from-previous");
    assert_eq!(
        guest.vm_sums(),
        then,
        "the previous release's snapshot did not restore"
    );
    guest.delete_safety_snapshots();
    let out = guest.ctl(&["snapshot", "delete", VM, "from-previous"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// b. systemctl reload applies a changed config in the running daemon; a broken one is refused,
/// and the daemon keeps serving with the old one.
fn scenario_reload(guest: &SystemdGuest) {
    let pid = guest.main_pid();
    let cursor = guest.journal_cursor();
    write_file(
        guest,
        CONFIG,
        &config("freeze_timeout = \"4s\"\nrequire_quiesce = true\n"),
    );
    guest.exec("systemctl reload vmsnapd");
    let reloaded = guest.wait_journal(&cursor, "configuration reloaded");
    assert_eq!(reloaded["REQUIRE_QUIESCE"], "true", "{reloaded:#}");
    assert_eq!(reloaded["FREEZE_TIMEOUT_MS"], "4000", "{reloaded:#}");
    assert_eq!(guest.main_pid(), pid);

    let cursor = guest.journal_cursor();
    write_file(guest, CONFIG, "freeze_timeout = \"soon\"\n");
    guest.exec("systemctl reload vmsnapd");
    guest.wait_journal(&cursor, "configuration not reloaded");
    assert_eq!(guest.active_state(), "active");
    assert_eq!(guest.main_pid(), pid);
    assert_eq!(guest.ctl_json(&["vm", "list"])[0]["name"], VM);

    write_file(guest, CONFIG, &config(""));
    guest.exec("systemctl reload vmsnapd");
}

/// c. Thin and thick LVM snapshot, restore and delete by the installed service, under the
/// shipped unit's sandbox; the snapshot's journal entries carry VM= and SNAPSHOT=.
fn scenario_lvm_and_journal(guest: &SystemdGuest) {
    guest.scribble();
    let before = guest.vm_sums();
    let cursor = guest.journal_cursor();
    let snapshot = guest.snapshot("s1");
    let volumes = snapshot["snapshotVolumes"]["includedVolumes"]
        .as_array()
        .unwrap();
    assert_eq!(volumes.len(), 2, "{snapshot:#}");
    for volume in volumes {
        assert_eq!(volume["backend"], "lvm", "{snapshot:#}");
        guest.exec(&format!(
            "test -b {}",
            shell_quote(volume["image"].as_str().unwrap())
        ));
    }
    let lv_kinds = guest.exec(&format!("lvs --noheadings -o lv_name,segtype {VG}"));
    assert!(
        lv_kinds.contains("thin0.vmsnap-") && lv_kinds.contains("thick0.vmsnap-"),
        "{lv_kinds}"
    );

    let entries = guest.journal(Some(&cursor));
    assert!(
        entries
            .iter()
            .any(|e| e["VM"] == VM && e["SNAPSHOT"] == "s1" && e["MESSAGE"] == "creating snapshot"),
        "no journal entry with VM={VM} SNAPSHOT=s1: {entries:#?}"
    );

    guest.scribble();
    assert_ne!(guest.vm_sums(), before);
    guest.restore("s1");
    assert_eq!(
        guest.vm_sums(),
        before,
        "the restore did not bring s1's data back"
    );

    let out = guest.ctl(&["snapshot", "delete", VM, "s1"]);
    assert_eq!(out.code, 0, "{out:?}");
    let uuid = snapshot["uuid"].as_str().unwrap();
    let left: Vec<String> = guest
        .lv_names()
        .into_iter()
        .filter(|lv| lv.contains(&uuid[..8]))
        .collect();
    assert!(left.is_empty(), "s1's LVs are left: {left:?}");
    guest.delete_safety_snapshots();
    assert_eq!(guest.vm_sums(), before);
}

/// d. With the service stopped, the first D-Bus call starts it through systemd.
fn scenario_activation(guest: &SystemdGuest) {
    guest.exec("systemctl stop vmsnapd");
    assert_eq!(guest.active_state(), "inactive");
    let vms = guest.ctl_json(&["vm", "list"]);
    assert_eq!(vms[0]["name"], VM);
    assert_eq!(guest.active_state(), "active");
}

/// e. polkit decides for callers on the system bus: alice (no session, no group) may list but
/// not change anything; a rule file grants snapshot creation to a group she then joins, and
/// nothing else; root may do everything.
fn scenario_polkit(guest: &SystemdGuest) {
    let denied = "not authorized: polkit denies";
    assert_eq!(guest.ctl_as_alice(&["vm", "list"]).code, 0);
    root_snapshot(guest, "by-root");
    for args in [
        &["snapshot", "create", VM, "by-alice"][..],
        &["snapshot", "delete", VM, "by-root"],
        &["restore", VM, "by-root", "--stop"],
    ] {
        let out = guest.ctl_as_alice(args);
        assert!(
            out.code != 0 && out.stderr.contains(denied),
            "alice {args:?}: {out:?}"
        );
    }

    guest.exec("groupadd vmsnap-snapshotters && usermod -aG vmsnap-snapshotters alice");
    write_file(
        guest,
        "/etc/polkit-1/rules.d/50-vmsnap-lab.rules",
        "polkit.addRule(function(action, subject) {\n\
         \x20 if (action.id == \"org.vmsnap.snapshot.create\" &&\n\
         \x20     subject.isInGroup(\"vmsnap-snapshotters\")) {\n\
         \x20   return polkit.Result.YES;\n\
         \x20 }\n});\n",
    );
    // polkitd re-reads its rules when the folder changes; give it the time that takes.
    let created = wait_for(Duration::from_secs(30), "polkit to grant the rule", || {
        let out = guest.ctl_as_alice(&["snapshot", "create", VM, "by-alice", "--output", "json"]);
        (out.code == 0).then_some(out)
    });
    let snapshot: Value = serde_json::from_str(&created.stdout).unwrap();
    assert_eq!(snapshot["phase"], "Succeeded", "{snapshot:#}");
    for args in [
        &["snapshot", "delete", VM, "by-alice"][..],
        &["restore", VM, "by-root", "--stop"],
    ] {
        let out = guest.ctl_as_alice(args);
        assert!(
            out.code != 0 && out.stderr.contains(denied),
            "alice {args:?}: {out:?}"
        );
    }
    for name in ["by-alice", "by-root"] {
        let out = guest.ctl(&["snapshot", "delete", VM, name]);
        assert_eq!(out.code, 0, "root deleting {name}: {out:?}");
    }
    guest.exec("rm /etc/polkit-1/rules.d/50-vmsnap-lab.rules");
}

fn root_snapshot(guest: &SystemdGuest, name: &str) -> Value {
    guest.snapshot(name)
}

/// f. A snapshot waits for LVM (the test holds the VG's lock) when vmsnapd is stopped with
/// SIGSTOP: its watchdog pings stop, systemd kills it within WatchdogSec and starts it again, and
/// the new vmsnapd settles the interrupted snapshot (failed and cleaned up, or completed) once
/// LVM is free.
fn scenario_watchdog(guest: &SystemdGuest) {
    let pid = guest.main_pid();
    let restarts: u32 = guest.unit_property("NRestarts").parse().unwrap();
    guest.exec(&format!(
        "setsid flock -o /run/lock/lvm/V_{VG} sleep 600 </dev/null >/dev/null 2>&1 &
         echo $! >/run/vmsnap-lab-lock.pid
         i=0; while flock -n /run/lock/lvm/V_{VG} true; do
           i=$((i + 1)); [ $i -lt 300 ] || exit 1; sleep 0.1
         done
         setsid vmsnapctl snapshot create {VM} inflight </dev/null >/run/vmsnap-lab-inflight.log 2>&1 &"
    ));
    // In flight: the record exists and an LVM command of vmsnapd's waits for the lock.
    wait_for(
        Duration::from_secs(60),
        "the snapshot to wait for LVM",
        || {
            let phase = guest.try_exec(&format!(
                "vmsnapctl snapshot show {VM} inflight --output json"
            ));
            // vmsnapd's children but its thaw guard: an LVM command.
            let waiting = guest
                .try_exec(&format!(
                "ps -o args= --ppid {pid} | grep -v thaw-guard | grep -q -e lvcreate -e lvs -e lvm"
            ))
                .code
                == 0;
            (phase.code == 0 && phase.stdout.contains("InProgress") && waiting).then_some(())
        },
    );
    let cursor = guest.journal_cursor();
    // The guest's clock (µs since the epoch) at SIGSTOP, to compare with the journal's.
    let stopped_at: u64 = guest
        .exec(&format!("kill -STOP {pid} && date +%s%6N"))
        .trim()
        .parse()
        .unwrap();
    let stopped = Instant::now();
    wait_for(
        WATCHDOG + Duration::from_secs(90),
        "systemd to restart vmsnapd",
        || {
            let now = guest.main_pid();
            (now != 0 && now != pid && guest.active_state() == "active").then_some(())
        },
    );
    eprintln!(
        "systemd guest: vmsnapd restarted and ready {:.1} s after SIGSTOP",
        stopped.elapsed().as_secs_f64()
    );
    let timeout = guest.wait_journal(&cursor, "vmsnapd.service: Watchdog timeout");
    let timed_out_at: u64 = timeout["__REALTIME_TIMESTAMP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The last ping came at most WatchdogSec before the SIGSTOP; 3 s for the timer slack of a
    // TCG guest on a busy host.
    let after = Duration::from_micros(timed_out_at.saturating_sub(stopped_at));
    eprintln!(
        "systemd guest: watchdog timeout {:.1} s after SIGSTOP",
        after.as_secs_f64()
    );
    assert!(
        after <= WATCHDOG + Duration::from_secs(3),
        "the watchdog fired {after:?} after SIGSTOP"
    );
    let new_restarts: u32 = guest.unit_property("NRestarts").parse().unwrap();
    assert_eq!(new_restarts, restarts + 1);

    // The whole session: flock (which holds the lock) and its sleep.
    guest.exec("/bin/kill -TERM -- -$(cat /run/vmsnap-lab-lock.pid)");
    let settled = wait_for(Duration::from_secs(120), "the snapshot to settle", || {
        let snapshot = guest.ctl_json(&["snapshot", "show", VM, "inflight"]);
        (snapshot["phase"] != "InProgress").then_some(snapshot)
    });
    let uuid = settled["uuid"].as_str().unwrap();
    let lvs: Vec<String> = guest
        .lv_names()
        .into_iter()
        .filter(|lv| lv.contains(&uuid[..8]))
        .collect();
    match settled["phase"].as_str().unwrap() {
        "Failed" => assert!(lvs.is_empty(), "a failed snapshot left {lvs:?}"),
        "Succeeded" => assert_eq!(lvs.len(), 2, "{lvs:?} {settled:#}"),
        other => panic!("unexpected phase {other}: {settled:#}"),
    }
    let out = guest.ctl(&["snapshot", "delete", VM, "inflight"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// g. apt remove stops the service and keeps records, config and snapshot LVs; reinstalling
/// brings the snapshot back, and it restores; purge keeps the records and LVs too.
fn scenario_package_lifecycle(guest: &SystemdGuest) {
    guest.scribble();
    let kept = guest.vm_sums();
    let snapshot = guest.snapshot("kept");
    let uuid = snapshot["uuid"].as_str().unwrap().to_string();
    guest.scribble();

    let out = guest.try_exec("apt-get remove -y vmsnap");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        guest.exec("dpkg-query -W -f='${Status}' vmsnap").trim(),
        "deinstall ok config-files"
    );
    assert_ne!(guest.active_state(), "active");
    guest.exec("pgrep -x vmsnapd && exit 1 || true");
    guest.exec(&format!("test -s {CONFIG} && grep -q test:// {CONFIG}"));
    let records = guest.exec("ls -A /var/lib/vmsnap");
    assert!(!records.trim().is_empty(), "no records left after remove");
    assert_eq!(
        guest
            .lv_names()
            .iter()
            .filter(|lv| lv.contains(&uuid[..8]))
            .count(),
        2
    );

    let deb = current_deb(guest);
    let out = guest.try_exec(&format!("dpkg -i --force-confold {deb}"));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(guest.active_state(), "active");
    let listed = guest.ctl_json(&["snapshot", "show", VM, "kept"]);
    assert_eq!(listed["phase"], "Succeeded", "{listed:#}");
    assert_eq!(listed["uuid"], uuid.as_str());
    guest.restore("kept");
    assert_eq!(guest.vm_sums(), kept, "the kept snapshot did not restore");
    guest.delete_safety_snapshots();

    // Purge removes the package's config, never data: the records and the snapshot's LVs stay,
    // and a new install, configured again, finds the snapshot.
    let out = guest.try_exec("apt-get purge -y vmsnap");
    assert_eq!(out.code, 0, "{out:?}");
    guest.exec(&format!("test ! -e /usr/bin/vmsnapd && test ! -e {CONFIG}"));
    guest.exec(&format!("grep -rqs {uuid} /var/lib/vmsnap"));
    assert_eq!(
        guest
            .lv_names()
            .iter()
            .filter(|lv| lv.contains(&uuid[..8]))
            .count(),
        2
    );
    let out = guest.try_exec(&format!("dpkg -i {deb}"));
    assert_eq!(out.code, 0, "{out:?}");
    write_file(guest, CONFIG, &config(""));
    guest.exec("systemctl restart vmsnapd");
    let listed = guest.ctl_json(&["snapshot", "show", VM, "kept"]);
    assert_eq!(listed["phase"], "Succeeded", "{listed:#}");
    assert_eq!(listed["uuid"], uuid.as_str());
    let out = guest.ctl(&["snapshot", "delete", VM, "kept"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// h. The unit's exposure as systemd rates it; README records it, with what is left open.
fn scenario_security(guest: &SystemdGuest) {
    let out = guest.exec("systemd-analyze security vmsnapd --no-pager");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out}"));
    eprintln!("systemd guest: {}", line.trim());
    let exposure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "the unit's exposure grew to {exposure}:\n{out}"
    );
}
