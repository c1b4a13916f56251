//! A disk too full for a delete's merge. The VM's images live in a small tmpfs of their own.
//! Both merges are covered each time: of a lower layer (the oldest snapshot, the next one's image
//! on top of it) and of the VM's active layer.
//!
//! Short of room up front (the tmpfs shrunk after the data is written): the delete is refused
//! before it changes anything, with a clear one-line error. The snapshot stays Succeeded and
//! ready with the same content, every image file is as it was, and the VM still starts
//! (offline) or keeps running and writing (online). Once there is room the same delete
//! succeeds.
//!
//! Room at the check, taken away during the merge (another writer fills the folder while
//! vmsnapd waits at its pause point before the merge): the merge fails at once with a clear
//! one-line error, and nothing is lost: the VM's disk and the other snapshot hold what they
//! held, every image in the folder is still used. The snapshot is Failed and not offered for
//! restore (its image may hold merged data). The folder stays full, so a running guest's next
//! write that needs new space fails too and QEMU pauses it (I/O error): vmsnapd must show it
//! paused, and once there is room the resumed guest goes on with its files intact and the
//! same delete succeeds.
//!
//! Every write lands where the image merged into has nothing yet (fresh offsets offline; online
//! no file is ever deleted, so the guest never reuses blocks), so each merge needs new space.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{
    assert_every_image_used, config_for, flat_sum, guest_exec, image_of, lab_dir, run,
    show_snapshot, snapshot_list, virsh, virsh_output, wait_agent_connected, wait_for,
    wait_in_inventory, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

const MIB: u64 = 1 << 20;
/// What the folder may hold while the VM's data is written: more than any step needs.
const ROOMY: u64 = 256 * MIB;
/// Free space left in the folder for a delete refused up front: room for the guest's own few
/// writes, far from what the merge needs (the data on top plus vmsnapd's 4 MiB margin).
const SLACK: u64 = 6 * MIB;
/// Free space the other writer leaves during a merge: less than the merge writes.
const LEFT: u64 = 3 * MIB / 2;
/// Data written after a snapshot: what its merge has to copy. Eight of these (with the guest's
/// small files) fit the guest's 64 MiB disk without deleting anything.
const DATA_MIB: u64 = 8;
/// The other writer's file in the folder.
const FILLER: &str = "filler";
/// vmsnapd's pause point between its check of the room and the merge.
const PAUSE_AT: (&str, &str) = ("VMSNAP_TEST_PAUSE_AT", "delete-before-merge");

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

    /// Another writer takes all but [`LEFT`] of the free space.
    fn fill(&self) {
        let size = self.free().saturating_sub(LEFT);
        let filler = self.folder().join(FILLER);
        run(
            "fallocate",
            &["-l", &size.to_string(), filler.to_str().unwrap()],
        );
    }

    /// The other writer's file goes: room again.
    fn unfill(&self) {
        std::fs::remove_file(self.folder().join(FILLER)).unwrap();
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

    /// The image files' own bytes (SHA-256), by name; with `live`, the VM's top is left out (the
    /// running guest writes to it).
    fn image_files(&self, live: bool) -> Vec<(String, String)> {
        let top = self.vm.disk_source();
        self.vm
            .images()
            .into_iter()
            .map(|f| self.folder().join(f))
            .filter(|path| !(live && path == Path::new(&top)))
            .map(|path| {
                let path = path.to_str().unwrap().to_string();
                let sum = run("sha256sum", &[&path]);
                (path, sum.split_whitespace().next().unwrap().to_string())
            })
            .collect()
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

/// What must not change while a delete is refused or fails for lack of space, and after it
/// succeeds.
struct Kept {
    /// The VM's disk as the guest sees it (offline: its flat content; online: its files).
    disk: String,
    /// The snapshot being deleted, its flat content (kept only while it is refused).
    own: String,
    /// Other snapshots, by name, with their flat content.
    snapshots: Vec<(String, String)>,
    /// Every image file's bytes (kept only while the delete is refused).
    files: Vec<(String, String)>,
}

/// How one VM is looked at around a delete that is short of room. Each gets the daemon (it is
/// restarted between the two ways) and the step.
struct Checks<'a> {
    /// The VM runs: its top image changes under the test.
    live: bool,
    /// The VM's disk as the guest sees it.
    disk: &'a dyn Fn(&Daemon) -> String,
    /// While the folder is still short after the refused delete.
    refused: &'a dyn Fn(&Daemon, &str),
    /// While the folder is still full after the failed merge.
    full: &'a dyn Fn(&Daemon, &str),
    /// Once there is room again: before the delete is retried, and after.
    room: &'a dyn Fn(&Daemon, &str),
}

/// How the folder runs short of room for the delete's merge.
#[derive(Clone, Copy, Debug)]
enum Shortage {
    /// Before the delete: vmsnapd refuses it, changing nothing.
    UpFront,
    /// After vmsnapd checked the room, before the merge: the merge fails.
    MidMerge,
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

/// How many times vmsnapd has paused at its pause point so far (its log survives restarts).
fn pauses(daemon: &Daemon) -> usize {
    daemon.log_text().matches("VMSNAP_TEST_PAUSE_AT").count()
}

/// Deletes `name` with the folder short of room for its merge, as `shortage` says; with room
/// again the delete succeeds. `others` are the snapshots it keeps.
fn delete_short_of_room(
    daemon: &Daemon,
    vm: &SmallFolderVm,
    name: &str,
    others: &[&str],
    checks: &Checks,
    shortage: Shortage,
) {
    let before = Kept {
        disk: (checks.disk)(daemon),
        own: flat_sum(&image_of(&show_snapshot(daemon, &vm.vm.name, name))),
        snapshots: others
            .iter()
            .map(|s| {
                let image = image_of(&show_snapshot(daemon, &vm.vm.name, s));
                (s.to_string(), flat_sum(&image))
            })
            .collect(),
        files: vm.image_files(checks.live),
    };
    let step = format!("deleting {name}, short of room {shortage:?}");
    let delete = || daemon.ctl(&["--quiet", "snapshot", "delete", &vm.vm.name, name]);
    match shortage {
        Shortage::UpFront => {
            vm.shrink();
            let out = delete();
            let error = out.failure();
            eprintln!("{step}: {error} ({} KiB free)", vm.free() / 1024);
            assert!(error.contains("no space left on device"), "{step}: {error}");
            assert!(error.contains("nothing was changed"), "{step}: {error}");
            // Still what it was, and saying why it is still there.
            let shown = show_snapshot(daemon, &vm.vm.name, name);
            assert_eq!(shown["phase"], "Succeeded", "{step}: {shown}");
            assert_eq!(shown["readyToUse"], true, "{step}: {shown}");
            let recorded = shown["error"].as_str().unwrap_or_default();
            assert!(
                recorded.contains("no space left on device"),
                "{step}: {shown}"
            );
            assert_eq!(
                flat_sum(&image_of(&shown)),
                before.own,
                "{step}: {name} changed"
            );
            assert_eq!(
                vm.image_files(checks.live),
                before.files,
                "{step}: an image changed"
            );
            check_snapshots(daemon, vm, &before, &step);
            assert_eq!(
                (checks.disk)(daemon),
                before.disk,
                "{step}: the VM's disk changed"
            );
            (checks.refused)(daemon, &step);
            vm.resize(ROOMY);
        }
        Shortage::MidMerge => {
            let paused = pauses(daemon);
            let out = std::thread::scope(|scope| {
                let ctl = scope.spawn(delete);
                // The room was checked; vmsnapd waits 3 s before merging.
                wait_for(
                    Duration::from_secs(60),
                    "the pause before the merge",
                    || (pauses(daemon) > paused).then_some(()),
                );
                vm.fill();
                ctl.join().unwrap()
            });
            let error = out.failure();
            eprintln!("{step}: {error} ({} KiB free)", vm.free() / 1024);
            assert!(error.contains("no space left on device"), "{step}: {error}");
            // Settled, not left Deleting, and not offered for restore: its image may hold
            // merged data.
            let shown = show_snapshot(daemon, &vm.vm.name, name);
            assert_eq!(shown["phase"], "Failed", "{step}: {shown}");
            assert_eq!(shown["readyToUse"], false, "{step}: {shown}");
            (checks.full)(daemon, &step);
            vm.unfill();
            check_snapshots(daemon, vm, &before, &step);
        }
    }

    (checks.room)(daemon, &step);
    assert_eq!(
        (checks.disk)(daemon),
        before.disk,
        "{step}: the VM's disk changed"
    );

    let step = format!("deleting {name} with room again");
    let out = delete();
    assert_eq!(out.code, Some(0), "{step}: {out:?}");
    assert!(
        snapshot_list(daemon, &vm.vm.name)
            .iter()
            .all(|s| s["name"] != name),
        "{step}: still listed"
    );
    check_snapshots(daemon, vm, &before, &step);
    (checks.room)(daemon, &step);
    assert_eq!(
        (checks.disk)(daemon),
        before.disk,
        "{step}: the VM's disk changed"
    );
}

/// Writes `mib` MiB of `byte` at `offset_mib` into a shut-off VM's top image, as the guest
/// would.
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
fn offline_a_delete_short_of_room_is_refused_or_fails_clearly_and_loses_nothing() {
    let vm = SmallFolderVm::define("vmsnap-t12-fulldisk-off", ScratchOptions::default());
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_in_inventory(&daemon, &vm.vm);
    let name = vm.vm.name.clone();

    let disk = |_: &Daemon| flat_sum(&vm.vm.disk_source());
    let starts = |_: &Daemon, step: &str| {
        let out = virsh_output(&["start", &name]);
        assert!(
            out.status.success(),
            "{step}: the VM does not start: {out:?}"
        );
        virsh(&["destroy", &name]);
    };
    let checks = Checks {
        live: false,
        disk: &disk,
        refused: &starts,
        full: &starts,
        room: &starts,
    };
    // Each write goes to offsets written by none before (16 MiB and up: past the filesystem's
    // metadata), so that each merge needs new space.
    // s0 on the nearly empty disk, then data on top of it: s1's image.
    snapshot(&daemon, &name, "s0");
    write_offline(&vm.vm, 0x5a, 16, DATA_MIB);
    snapshot(&daemon, &name, "s1");
    write_offline(&vm.vm, 0x6b, 48, 1);
    // s1's image merged into s0's (the lower layer; the VM's top is rebased).
    delete_short_of_room(&daemon, &vm, "s0", &["s1"], &checks, Shortage::UpFront);
    // The VM's top merged into s1's image (now the base) and the definition updated.
    write_offline(&vm.vm, 0x7c, 24, DATA_MIB);
    delete_short_of_room(&daemon, &vm, "s1", &[], &checks, Shortage::UpFront);

    // The same two merges, the folder filled while vmsnapd waits between check and merge.
    daemon.restart_with_env(&[PAUSE_AT]);
    snapshot(&daemon, &name, "s2");
    write_offline(&vm.vm, 0x8d, 32, DATA_MIB);
    snapshot(&daemon, &name, "s3");
    write_offline(&vm.vm, 0x9e, 49, 1);
    delete_short_of_room(&daemon, &vm, "s2", &["s3"], &checks, Shortage::MidMerge);
    write_offline(&vm.vm, 0xaf, 40, DATA_MIB);
    delete_short_of_room(&daemon, &vm, "s3", &[], &checks, Shortage::MidMerge);
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
fn online_a_delete_short_of_room_is_refused_or_fails_clearly_and_loses_nothing() {
    let vm = SmallFolderVm::define(
        "vmsnap-t12-fulldisk-on",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
    );
    vm.vm.start(true);
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_agent_connected(&daemon, &vm.vm.name);
    let name = vm.vm.name.clone();
    let data = (DATA_MIB * MIB) as usize;

    let disk = |_: &Daemon| vm.vm.guest_checksums();
    // Refused, the guest never noticed: it runs, and writes new data although the folder is
    // still short.
    let refused = |daemon: &Daemon, step: &str| {
        assert_eq!(agreed_state(daemon, &name, step), "running", "{step}");
        let script = "head -c 65536 /dev/urandom >> /mnt/data/alive && sync";
        let (code, out) = guest_exec(&name, script, Duration::from_secs(30));
        assert_eq!(code, 0, "{step}: the guest cannot write: {out}");
        assert_eq!(agreed_state(daemon, &name, step), "running", "{step}");
    };
    // The guest's files written while the folder was full, one per failure (never deleted: a
    // freed block could take the next data where the base image has it already).
    let written = Cell::new(0);
    let spawned = Cell::new(None::<String>);
    // The failed merge leaves the folder full; the guest's next write that needs a new cluster
    // of its top image fails there too, and QEMU pauses the guest (werror=enospc, the default).
    let full = |daemon: &Daemon, step: &str| {
        // It may be paused already: the guest's own writeback (atime, journal) can come first.
        let state = agreed_state(daemon, &name, step);
        eprintln!("{step}: after the failure the VM is {state}");
        if state == "running" {
            written.set(written.get() + 1);
            let file = format!("w{}", written.get());
            guest_spawn(
                &name,
                &format!("head -c 2097152 /dev/urandom > /mnt/data/{file} && sync"),
            );
            spawned.set(Some(file));
        }
        wait_for(Duration::from_secs(60), "the guest to pause", || {
            (virsh(&["domstate", &name]).trim() == "paused").then_some(())
        });
        let reason = virsh(&["domstate", "--reason", &name]);
        eprintln!("{step}: the VM is {}", reason.trim());
        assert_eq!(reason.trim(), "paused (I/O error)", "{step}");
        assert_eq!(agreed_state(daemon, &name, step), "paused", "{step}");
    };
    // With room, the guest goes on where it stopped.
    let room = |daemon: &Daemon, step: &str| {
        if virsh(&["domstate", &name]).trim() == "paused" {
            virsh(&["resume", &name]);
        }
        assert_eq!(agreed_state(daemon, &name, step), "running", "{step}");
        if let Some(file) = spawned.take() {
            wait_for(Duration::from_secs(60), "the guest's write to end", || {
                let script = format!("sync; test \"$(stat -c %s /mnt/data/{file})\" = 2097152");
                (guest_exec(&name, &script, Duration::from_secs(30)).0 == 0).then_some(())
            });
        }
    };
    let checks = Checks {
        live: true,
        disk: &disk,
        refused: &refused,
        full: &full,
        room: &room,
    };
    vm.vm.write_file("f0", 65536);
    snapshot(&daemon, &name, "s0");
    vm.vm.write_file("f1", data);
    snapshot(&daemon, &name, "s1");
    vm.vm.write_file("f2", 65536);
    // A block commit of s1's image (a lower layer) into s0's, the VM running on top.
    delete_short_of_room(&daemon, &vm, "s0", &["s1"], &checks, Shortage::UpFront);
    // An active commit of the VM's top into s1's image, pivoting the VM onto it.
    vm.vm.write_file("f3", data);
    delete_short_of_room(&daemon, &vm, "s1", &[], &checks, Shortage::UpFront);

    // The same two merges, the folder filled while vmsnapd waits between check and merge.
    daemon.restart_with_env(&[PAUSE_AT]);
    wait_agent_connected(&daemon, &name);
    snapshot(&daemon, &name, "s2");
    vm.vm.write_file("f4", data);
    snapshot(&daemon, &name, "s3");
    vm.vm.write_file("f5", 65536);
    delete_short_of_room(&daemon, &vm, "s2", &["s3"], &checks, Shortage::MidMerge);
    vm.vm.write_file("f6", data);
    delete_short_of_room(&daemon, &vm, "s3", &[], &checks, Shortage::MidMerge);
    assert_eq!(vm.vm.images().len(), 1, "{:?}", vm.vm.images());
}
