//! A disk filling up during a delete's merge. The VM's images live in a small tmpfs of their
//! own, shrunk (after the data is written) so that merging the deleted snapshot's image cannot
//! fit. The delete fails at once with a clear one-line error saying so, and nothing is lost: the
//! VM's disk and the other snapshot hold what they held, every image in the folder is still
//! used, the VM still starts (offline) or keeps running as QEMU really has it (online). Once
//! there is room again the same delete succeeds. Both merges are covered: of a lower layer (the
//! oldest snapshot, the next one's image on top of it) and of the VM's active layer.
//!
//! A failed merge leaves the folder full (the base keeps what was copied into it), so a running
//! guest's next write that needs new space fails too and QEMU pauses it (I/O error): vmsnapd
//! must show it paused, and once there is room the resumed guest goes on with its files intact.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{
    assert_every_image_used, config_for, flat_sum, guest_exec, image_of, lab_dir, run,
    show_snapshot, snapshot_list, virsh, wait_agent_connected, wait_for, wait_in_inventory, Daemon,
    PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

const MIB: u64 = 1 << 20;
/// What the folder may hold while the VM's data is written: more than any step needs.
const ROOMY: u64 = 256 * MIB;
/// Free space left in the folder for the failing delete: room for the guest's own few writes
/// and qemu-img's metadata, far from the megabytes the merge needs.
const SLACK: u64 = 6 * MIB;
/// Data written after a snapshot: what its merge has to copy.
const BIG_MIB: u64 = 24;

/// A scratch VM whose folder (its disk and every overlay made next to it) is a tmpfs of its own.
/// On drop the VM is stopped first (QEMU holds the images open), then the tmpfs unmounted.
struct SmallFolderVm {
    vm: ScratchVm,
}

impl SmallFolderVm {
    fn define(name: &str, options: ScratchOptions) -> SmallFolderVm {
        let vm = ScratchVm::define(name, options, &[]);
        // The folder's files move onto the tmpfs mounted over it: same paths, new filesystem.
        let stash = tempfile::tempdir_in(lab_dir()).unwrap();
        let folder = vm.dir.path().to_str().unwrap().to_string();
        let stash_path = stash.path().to_str().unwrap().to_string();
        run("cp", &["-a", &format!("{folder}/."), &stash_path]);
        let folder_vm = SmallFolderVm { vm };
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={ROOMY},mode=0700"),
                "tmpfs",
                &folder,
            ],
        );
        run("cp", &["-a", &format!("{stash_path}/."), &folder]);
        folder_vm
    }

    fn folder(&self) -> &Path {
        self.vm.dir.path()
    }

    fn used(&self) -> u64 {
        let out = run(
            "df",
            &["--output=used", "-B1", self.folder().to_str().unwrap()],
        );
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    fn free(&self) -> u64 {
        let out = run(
            "df",
            &["--output=avail", "-B1", self.folder().to_str().unwrap()],
        );
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    fn resize(&self, bytes: u64) {
        run(
            "mount",
            &[
                "-o",
                &format!("remount,size={bytes}"),
                self.folder().to_str().unwrap(),
            ],
        );
    }

    /// Leaves only [`SLACK`] free.
    fn shrink(&self) {
        self.resize(self.used() + SLACK);
    }

    /// Files in the folder that are neither the VM's own nor images (a temporary file of a
    /// merge, say).
    fn strays(&self) -> Vec<String> {
        let mut strays: Vec<String> = std::fs::read_dir(self.folder())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                !n.ends_with(".qcow2")
                    && !["seed", "domain.xml", "console.log"].contains(&n.as_str())
            })
            .collect();
        strays.sort();
        strays
    }
}

impl Drop for SmallFolderVm {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", LAB_URI, "destroy", &self.vm.name])
            .output();
        let _ = Command::new("umount").arg(self.vm.dir.path()).status();
    }
}

fn snapshot(daemon: &Daemon, vm: &str, name: &str) {
    let taken = daemon
        .ctl(&["snapshot", "create", vm, name, "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
}

/// What must not change while a delete fails for lack of space, and after it succeeds.
struct Kept {
    /// The VM's disk as the guest sees it (offline: its flat content; online: its files).
    disk: String,
    /// Other snapshots, by name, with their flat content.
    snapshots: Vec<(String, String)>,
}

/// How one VM is looked at around a delete that runs out of room.
struct Checks<'a> {
    /// The VM's disk as the guest sees it.
    disk: &'a dyn Fn() -> String,
    /// While the folder is still full after the failed delete.
    full: &'a dyn Fn(&str),
    /// Once there is room again: before the delete is retried, and after.
    room: &'a dyn Fn(&str),
}

/// Everything but the VM's disk: read from the images, so the guest need not answer.
fn check_snapshots(daemon: &Daemon, vm: &SmallFolderVm, kept: &Kept, step: &str) {
    for (name, content) in &kept.snapshots {
        let shown = show_snapshot(daemon, &vm.vm.name, name);
        assert_eq!(shown["phase"], "Succeeded", "{step}: {shown}");
        assert_eq!(shown["readyToUse"], true, "{step}: {shown}");
        assert_eq!(
            &flat_sum(&image_of(&shown)),
            content,
            "{step}: {name} changed"
        );
    }
    let all = snapshot_list(daemon, &vm.vm.name);
    assert_every_image_used(&vm.vm, &all, step);
    assert_eq!(
        vm.strays(),
        Vec::<String>::new(),
        "{step}: files left behind"
    );
}

/// Deletes `name` with the folder too full for its merge: it fails, clearly and at once, and
/// nothing is lost; with room again the delete succeeds. `others` are the snapshots it keeps.
fn delete_without_room(
    daemon: &Daemon,
    vm: &SmallFolderVm,
    name: &str,
    others: &[&str],
    checks: &Checks,
) {
    let before = Kept {
        disk: (checks.disk)(),
        snapshots: others
            .iter()
            .map(|s| {
                let image = image_of(&show_snapshot(daemon, &vm.vm.name, s));
                (s.to_string(), flat_sum(&image))
            })
            .collect(),
    };
    vm.shrink();
    let step = format!("deleting {name} without room");
    let out = daemon.ctl(&["--quiet", "snapshot", "delete", &vm.vm.name, name]);
    let error = out.failure();
    eprintln!("{step}: {error} ({} KiB left free)", vm.free() / 1024);
    assert!(error.contains("no space left on device"), "{step}: {error}");
    // Settled, not left Deleting, and not offered for restore: its image may hold merged data.
    let shown = show_snapshot(daemon, &vm.vm.name, name);
    assert_eq!(shown["phase"], "Failed", "{step}: {shown}");
    assert_eq!(shown["readyToUse"], false, "{step}: {shown}");
    check_snapshots(daemon, vm, &before, &step);
    (checks.full)(&step);

    vm.resize(ROOMY);
    (checks.room)(&step);
    assert_eq!(
        (checks.disk)(),
        before.disk,
        "{step}: the VM's disk changed"
    );

    let step = format!("deleting {name} with room again");
    let out = daemon.ctl(&["--quiet", "snapshot", "delete", &vm.vm.name, name]);
    assert_eq!(out.code, Some(0), "{step}: {out:?}");
    assert!(
        snapshot_list(daemon, &vm.vm.name)
            .iter()
            .all(|s| s["name"] != name),
        "{step}: still listed"
    );
    check_snapshots(daemon, vm, &before, &step);
    (checks.room)(&step);
    assert_eq!(
        (checks.disk)(),
        before.disk,
        "{step}: the VM's disk changed"
    );
}

/// Writes `mib` MiB of `byte` at `offset_mib` into a shut-off VM's top image, as the guest
/// would (past the filesystem's metadata at the start of the disk).
fn write_offline(vm: &ScratchVm, byte: u8, offset_mib: u64, mib: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {byte} {offset_mib}M {mib}M"),
            &vm.disk_source(),
        ],
    );
}

#[test]
fn offline_a_merge_that_fills_the_disk_fails_clearly_and_loses_nothing() {
    let vm = SmallFolderVm::define("vmsnap-t12-fulldisk-off", ScratchOptions::default());
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_in_inventory(&daemon, &vm.vm);
    let name = vm.vm.name.clone();

    // s0 on the nearly empty disk, then much data on top of it: s1's image.
    snapshot(&daemon, &name, "s0");
    write_offline(&vm.vm, 0x5a, 16, BIG_MIB);
    snapshot(&daemon, &name, "s1");
    write_offline(&vm.vm, 0x6b, 48, 1);

    let disk = || flat_sum(&vm.vm.disk_source());
    let starts = |step: &str| {
        let out = Command::new("virsh")
            .args(["-c", LAB_URI, "start", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{step}: the VM does not start: {out:?}"
        );
        virsh(&["destroy", &name]);
    };
    let checks = Checks {
        disk: &disk,
        full: &starts,
        room: &starts,
    };
    // s1's image merged into s0's (the lower layer; the VM's top is rebased).
    delete_without_room(&daemon, &vm, "s0", &["s1"], &checks);
    // The VM's top merged into s1's image (now the base) and the definition updated.
    write_offline(&vm.vm, 0x7c, 32, BIG_MIB);
    delete_without_room(&daemon, &vm, "s1", &[], &checks);
    assert_eq!(vm.vm.images().len(), 1, "{:?}", vm.vm.images());
}

/// Starts `script` in the guest through its agent without waiting for it (it may never end
/// while the guest is paused).
fn guest_spawn(vm: &str, script: &str) {
    let request = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script]}
    });
    virsh(&["qemu-agent-command", vm, &request.to_string()]);
}

/// The VM's state as libvirt has it and as vmsnapd shows it, once they agree.
fn agreed_state(daemon: &Daemon, name: &str, step: &str) -> String {
    let mut last = (String::new(), String::new());
    let agreed = (0..100).find_map(|_| {
        let libvirt = virsh(&["domstate", name]).trim().to_string();
        let shown = daemon.ctl(&["vm", "show", name, "--output", "json"]).json()["state"]
            .as_str()
            .unwrap()
            .to_string();
        if libvirt == shown {
            return Some(libvirt);
        }
        last = (libvirt, shown);
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    agreed.unwrap_or_else(|| panic!("{step}: libvirt says {}, vmsnapd shows {}", last.0, last.1))
}

#[test]
fn online_a_block_commit_that_fills_the_disk_fails_clearly_and_loses_nothing() {
    let vm = SmallFolderVm::define(
        "vmsnap-t12-fulldisk-on",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
    );
    vm.vm.start(true);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_agent_connected(&daemon, &vm.vm.name);
    let name = vm.vm.name.clone();
    let big = (BIG_MIB * MIB) as usize;

    vm.vm.write_file("f0", 65536);
    snapshot(&daemon, &name, "s0");
    vm.vm.write_file("f1", big);
    snapshot(&daemon, &name, "s1");
    vm.vm.write_file("f2", 65536);

    let disk = || vm.vm.guest_checksums();
    let spawned = std::cell::Cell::new(false);
    // The failed merge leaves the folder full; the guest's next write that needs a new cluster
    // of its top image fails there too, and QEMU pauses the guest (werror=enospc, the default).
    let full = |step: &str| {
        // It may be paused already: the guest's own writeback (atime, journal) can come first.
        let state = agreed_state(&daemon, &name, step);
        eprintln!("{step}: after the failure the VM is {state}");
        if state == "running" {
            guest_spawn(&name, "head -c 4194304 /dev/urandom > /mnt/data/w && sync");
            spawned.set(true);
        }
        wait_for(Duration::from_secs(60), "the guest to pause", || {
            (virsh(&["domstate", &name]).trim() == "paused").then_some(())
        });
        let reason = virsh(&["domstate", "--reason", &name]);
        eprintln!("{step}: the VM is {}", reason.trim());
        assert_eq!(reason.trim(), "paused (I/O error)", "{step}");
        assert_eq!(agreed_state(&daemon, &name, step), "paused", "{step}");
    };
    // With room, the guest goes on where it stopped.
    let room = |step: &str| {
        if virsh(&["domstate", &name]).trim() == "paused" {
            virsh(&["resume", &name]);
        }
        assert_eq!(agreed_state(&daemon, &name, step), "running", "{step}");
        if spawned.replace(false) {
            wait_for(Duration::from_secs(60), "the guest's write to end", || {
                let script = "sync; test \"$(stat -c %s /mnt/data/w)\" = 4194304";
                (guest_exec(&name, script, Duration::from_secs(30)).0 == 0).then_some(())
            });
        }
    };
    let checks = Checks {
        disk: &disk,
        full: &full,
        room: &room,
    };
    // A block commit of s1's image (a lower layer) into s0's, the VM running on top.
    delete_without_room(&daemon, &vm, "s0", &["s1"], &checks);
    // An active commit of the VM's top into s1's image, pivoting the VM onto it.
    vm.vm.exec("rm -f /mnt/data/f1 /mnt/data/w && sync");
    vm.vm.write_file("f3", big);
    delete_without_room(&daemon, &vm, "s1", &[], &checks);
    assert_eq!(vm.vm.images().len(), 1, "{:?}", vm.vm.images());
}
