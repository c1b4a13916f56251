//! Outside actors on a shut-off VM's disk: another process writing its image, or the image gone.
//! A snapshot then fails with words that say so, and nothing changes: not the definition, not the
//! disk folder, not the image the other process writes.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vmsnap_tests::{
    config_for, flat_sum, image_checksums, virsh, virsh_output, wait_for, write_pattern, Daemon,
    PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

/// Whether another process holds QEMU's image locks on `image` (its "not shared: write" lock,
/// byte 201), read from /proc/locks, which takes no lock itself.
fn image_locked_by_another(image: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(image).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&format!(":{inode} ")) && l.ends_with(" 201 201"))
}

fn failed_snapshot(daemon: &Daemon, vm: &str, name: &str) -> Value {
    let out = daemon.ctl(&["snapshot", "create", vm, name, "--output", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let shown = daemon
        .ctl(&["snapshot", "show", vm, name, "--output", "json"])
        .json();
    assert_eq!(shown["phase"], "Failed", "{shown}");
    shown
}

#[test]
fn a_shut_off_vm_whose_image_another_process_writes_or_that_is_gone_is_not_snapshotted() {
    let vm = ScratchVm::define(
        "vmsnap-t12-actors",
        ScratchOptions::default(),
        &[("hello.txt", b"hello\n")],
    );
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let definition = virsh(&["dumpxml", "--inactive", &vm.name]);
    let images = vm.images();
    let disk = vm.disk.to_str().unwrap().to_string();

    // Another process holds the image open read-write (qemu-io, as a backup tool or another
    // QEMU would).
    let mut writer = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 60000", &disk])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "qemu-io to lock the image", || {
        image_locked_by_another(&disk).then_some(())
    });
    let shown = failed_snapshot(&daemon, &vm.name, "while-written");
    let error = shown["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("disk vda: {disk} is in use by another process")),
        "{error}"
    );
    let _ = writer.kill();
    let _ = writer.wait();
    assert_eq!(virsh(&["dumpxml", "--inactive", &vm.name]), definition);
    assert_eq!(vm.images(), images);
    let content = image_checksums(&disk);

    // The image is gone (moved away by someone).
    let moved = vm.dir.path().join("moved-away.img");
    std::fs::rename(&disk, &moved).unwrap();
    let shown = failed_snapshot(&daemon, &vm.name, "while-gone");
    let error = shown["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("disk vda: {disk} is missing")),
        "{error}"
    );
    std::fs::rename(&moved, &disk).unwrap();
    assert_eq!(virsh(&["dumpxml", "--inactive", &vm.name]), definition);
    assert_eq!(vm.images(), images);

    // Back to normal, a snapshot works and holds what the image held.
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "after", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    assert_eq!(image_checksums(&disk), content);
}

#[test]
fn a_snapshot_whose_image_or_backing_file_is_gone_is_not_offered_and_nothing_changes() {
    let vm = ScratchVm::define("vmsnap-t12-gone", ScratchOptions::default(), &[]);
    let bus = PrivateBus::start();
    let config = format!("verify_interval = \"1s\"\n{}", config_for(LAB_URI));
    let mut daemon = Daemon::start(&bus, &config);
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    for name in ["g1", "g2"] {
        let taken = daemon
            .ctl(&["snapshot", "create", &vm.name, name, "--output", "json"])
            .json();
        assert_eq!(taken["phase"], "Succeeded", "{taken}");
    }
    // Someone removes g1's image, which g2's image (and the VM's disk) builds on.
    let g1_image = vmsnap_tests::image_of(&vmsnap_tests::show_snapshot(&daemon, &vm.name, "g1"));
    let kept = vm.dir.path().join("kept-aside.qcow2");
    std::fs::rename(&g1_image, &kept).unwrap();
    let definition = virsh(&["dumpxml", "--inactive", &vm.name]);
    let images = vm.images();

    // g2's own image is there, but not its backing file: refused before anything, the safety
    // snapshot included.
    let out = daemon.ctl(&["restore", &vm.name, "g2"]);
    let message = out.failure();
    assert!(message.contains("backing chain"), "{message}");
    let names: Vec<String> = daemon
        .ctl(&["snapshot", "list", &vm.name, "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["g1", "g2"], "no safety snapshot was taken");
    assert_eq!(virsh(&["dumpxml", "--inactive", &vm.name]), definition);
    assert_eq!(vm.images(), images);

    // Without a restart: within verify_interval, g1 is not offered for restore, and says why.
    let g1 = wait_for(Duration::from_secs(30), "g1 to be not ready", || {
        let g1 = vmsnap_tests::show_snapshot(&daemon, &vm.name, "g1");
        (g1["readyToUse"] == false).then_some(g1)
    });
    assert!(g1["error"].as_str().unwrap().contains("is missing"), "{g1}");
    let g2 = vmsnap_tests::show_snapshot(&daemon, &vm.name, "g2");
    assert_eq!(g2["readyToUse"], true, "g2's own image is there: {g2}");

    // After a restart, too.
    daemon.restart_with_env(&[]);
    let g1 = vmsnap_tests::show_snapshot(&daemon, &vm.name, "g1");
    assert_eq!(g1["readyToUse"], false, "{g1}");
    assert!(g1["error"].as_str().unwrap().contains("is missing"), "{g1}");
    let refused = daemon.ctl(&["restore", &vm.name, "g1"]);
    assert!(
        refused.failure().contains("not ready to use"),
        "{refused:?}"
    );

    // With the image back, it is ready again, without a restart.
    std::fs::rename(&kept, &g1_image).unwrap();
    let g1 = wait_for(Duration::from_secs(30), "g1 to be ready again", || {
        let g1 = vmsnap_tests::show_snapshot(&daemon, &vm.name, "g1");
        (g1["readyToUse"] == true).then_some(g1)
    });
    assert!(g1["error"].is_null(), "{g1}");
}

#[test]
fn an_undefined_vms_disk_keeps_its_content_when_the_snapshot_it_builds_on_is_deleted() {
    let vm = ScratchVm::define("vmsnap-t12-undef", ScratchOptions::default(), &[]);
    let clone = "vmsnap-t12-undef-copy";
    undefine_leftover(clone);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let snapshot = |name: &str| {
        let taken = daemon
            .ctl(&["snapshot", "create", &vm.name, name, "--output", "json"])
            .json();
        assert_eq!(taken["phase"], "Succeeded", "{taken}");
    };
    snapshot("x");
    write_pattern(&vm.disk_source(), 0xaa, 1024);
    snapshot("y");
    write_pattern(&vm.disk_source(), 0xbb, 2048);
    let y_sum = flat_sum(&vmsnap_tests::image_of(&vmsnap_tests::show_snapshot(
        &daemon, &vm.name, "y",
    )));

    // X becomes a new VM, which someone then undefines; its disk stays (virsh keeps it).
    let restored = daemon
        .ctl(&[
            "restore", &vm.name, "x", "--target", clone, "--output", "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    let clone_disk = vmsnap_tests::disk_of(clone, "vda");
    write_pattern(&clone_disk, 0xcc, 3072);
    let clone_sum = flat_sum(&clone_disk);
    virsh(&["undefine", clone]);
    wait_for(
        Duration::from_secs(30),
        "vmsnapd to see the VM gone",
        || (daemon.ctl(&["vm", "show", clone]).code == Some(1)).then_some(()),
    );

    // Deleting X must not merge Y's data into the image the undefined VM's disk builds on.
    daemon.ctl(&["snapshot", "delete", &vm.name, "x"]).ok();
    assert_eq!(
        flat_sum(&clone_disk),
        clone_sum,
        "the undefined VM's disk changed"
    );
    let y = vmsnap_tests::show_snapshot(&daemon, &vm.name, "y");
    assert_eq!(
        flat_sum(&vmsnap_tests::image_of(&y)),
        y_sum,
        "snapshot y changed"
    );
    std::fs::remove_file(&clone_disk).unwrap();
}

#[test]
fn snapshots_outlive_their_vm_and_become_a_new_vm_without_touching_its_disk() {
    let vm = ScratchVm::define("vmsnap-t12-gonevm", ScratchOptions::default(), &[]);
    let copy = "vmsnap-t12-gonevm-copy";
    undefine_leftover(copy);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    for (name, byte) in [("s1", 0x11), ("s2", 0x22)] {
        write_pattern(&vm.disk_source(), byte, 512);
        let taken = daemon
            .ctl(&["snapshot", "create", &vm.name, name, "--output", "json"])
            .json();
        assert_eq!(taken["phase"], "Succeeded", "{taken}");
    }
    write_pattern(&vm.disk_source(), 0x33, 4096);
    let top = vm.disk_source();
    let top_sum = flat_sum(&top);
    let s2_sum = flat_sum(&vmsnap_tests::image_of(&vmsnap_tests::show_snapshot(
        &daemon, &vm.name, "s2",
    )));

    // The VM is undefined (its disks stay, as virsh leaves them).
    virsh(&["undefine", &vm.name]);
    wait_for(
        Duration::from_secs(30),
        "vmsnapd to see the VM gone",
        || (daemon.ctl(&["vm", "show", &vm.name]).code == Some(1)).then_some(()),
    );
    // Its snapshots are still listed, shown and restorable, as a new VM.
    let listed = daemon
        .ctl(&["snapshot", "list", &vm.name, "--output", "json"])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(
        vmsnap_tests::show_snapshot(&daemon, &vm.name, "s1")["readyToUse"],
        true
    );
    let in_place = daemon.ctl(&["restore", &vm.name, "s2"]);
    assert!(
        in_place.failure().contains("no longer defined"),
        "{in_place:?}"
    );
    let restored = daemon
        .ctl(&[
            "restore", &vm.name, "s2", "--target", copy, "--output", "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    let copy_disk = vmsnap_tests::disk_of(copy, "vda");
    assert_eq!(flat_sum(&copy_disk), s2_sum, "the new VM holds s2's data");

    // Deleting s1 leaves the undefined VM's disk (and the new VM's) as they were.
    daemon.ctl(&["snapshot", "delete", &vm.name, "s1"]).ok();
    assert_eq!(flat_sum(&top), top_sum, "the undefined VM's disk changed");
    assert_eq!(flat_sum(&copy_disk), s2_sum, "the new VM's disk changed");
    undefine_leftover(copy);
}

/// A VM an earlier, failed run of these tests may have left defined.
fn undefine_leftover(name: &str) {
    let _ = Command::new("virsh")
        .args(["-c", LAB_URI, "destroy", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", LAB_URI, "undefine", name])
        .output();
}

/// A restore of a VM with a snapshot `s` and data written since, paused just before it changes
/// the VM, while an admin runs `virsh start`. Returns the daemon, the restore's UUID and what
/// `virsh start` answered.
fn start_during_a_restore(
    bus: &PrivateBus,
    vm: &ScratchVm,
    config: &str,
) -> (Daemon, String, std::process::Output) {
    let mut daemon = Daemon::start(bus, config);
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    write_pattern(&vm.disk_source(), 0x44, 1024);

    // The restore pauses just before it changes the VM; an admin starts the VM meanwhile.
    daemon.restart_with_env(&[("VMSNAP_TEST_PAUSE_AT", "restore-before-define")]);
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let started = daemon
        .ctl(&["restore", &vm.name, "s", "--no-wait", "--output", "json"])
        .json();
    let uuid = started["uuid"].as_str().unwrap().to_string();
    wait_for(
        Duration::from_secs(30),
        "the restore to reach its pause",
        || {
            daemon
                .log_text()
                .contains("VMSNAP_TEST_PAUSE_AT: pausing")
                .then_some(())
        },
    );
    let start = virsh_output(&["start", &vm.name]);
    (daemon, uuid, start)
}

fn restore_end(daemon: &Daemon, uuid: &str) -> Value {
    wait_for(Duration::from_secs(60), "the restore to end", || {
        let shown = daemon
            .ctl(&["restore", "show", uuid, "--output", "json"])
            .json();
        (shown["phase"] != "InProgress").then_some(shown)
    })
}

/// Without the libvirt hook (here: vmsnapd's VM locks where the hook does not look, as every
/// test daemon has them unless it asks for the hook's), libvirt
/// cannot refuse the start; vmsnapd sees the VM running before it changes anything.
#[test]
fn a_vm_started_by_someone_else_during_a_restore_is_not_restored_under_it() {
    let vm = ScratchVm::define(
        "vmsnap-t12-racestart",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    let locks = tempfile::tempdir().unwrap();
    let config = format!(
        "vm_lock_dir = \"{}\"\n{}",
        locks.path().display(),
        config_for(LAB_URI)
    );
    let bus = PrivateBus::start();
    let (daemon, uuid, start) = start_during_a_restore(&bus, &vm, &config);
    assert!(start.status.success(), "{start:?}");
    // Its disk as the restore, paused, found it (the safety snapshot's overlay on top).
    let before_restore = vm.disk_source();
    let failed = restore_end(&daemon, &uuid);
    assert_eq!(failed["phase"], "Failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("was started during the restore"), "{error}");
    // It runs on its own disk, which holds what was written after the snapshot; the restore's
    // new overlays are gone.
    assert!(virsh(&["domstate", &vm.name]).contains("running"));
    assert_eq!(vm.disk_source(), before_restore);
    let planned = failed["restores"].as_array().unwrap();
    assert!(!planned.is_empty(), "{failed}");
    for volume in planned {
        let to = volume["toImage"].as_str().unwrap();
        assert!(!std::path::Path::new(to).exists(), "{to} was left behind");
    }
    virsh(&["destroy", &vm.name]);
}

/// With the libvirt hook the lab installs (/etc/libvirt/hooks/qemu.d/vmsnap, as the package
/// does), libvirt refuses the start and says which operation runs; the restore completes, and
/// the VM starts afterwards on the restored disk.
#[test]
fn the_libvirt_hook_refuses_to_start_a_vm_during_its_restore() {
    assert!(
        std::path::Path::new("/etc/libvirt/hooks/qemu.d/vmsnap").exists(),
        "the lab's libvirt hook is missing: run lab/up.sh"
    );
    let vm = ScratchVm::define(
        "vmsnap-t12-hook",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    // The lock folder the hook looks in (vmsnapd's default).
    let config = format!("vm_lock_dir = \"/run/vmsnap/vms\"\n{}", config_for(LAB_URI));
    let bus = PrivateBus::start();
    let (daemon, uuid, start) = start_during_a_restore(&bus, &vm, &config);
    let refusal = String::from_utf8_lossy(&start.stderr).into_owned();
    assert!(!start.status.success(), "the start was not refused");
    assert!(
        refusal.contains("vmsnap: it is being restored to snapshot 's'"),
        "{refusal}"
    );
    assert!(refusal.contains(&vm.name), "{refusal}");
    let done = restore_end(&daemon, &uuid);
    assert_eq!(done["phase"], "Succeeded", "{done}");
    let restored: Vec<&str> = done["restores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["toImage"].as_str().unwrap())
        .collect();
    assert_eq!(restored, [vm.disk_source().as_str()]);
    virsh(&["start", &vm.name]);
    assert!(virsh(&["domstate", &vm.name]).contains("running"));
    virsh(&["destroy", &vm.name]);
}

/// A configuration whose inventory is never read again in full during a test: what libvirt
/// sends no event for stays unseen.
fn config_without_reconcile() -> String {
    format!(
        "libvirt_uri = \"{LAB_URI}\"\nrefresh_interval = \"1h\"\nreconnect_interval = \"300ms\"\n"
    )
}

/// An admin's `virsh snapshot-create-as --disk-only` of a running domain's vda into `file`.
fn virsh_disk_only_snapshot(domain: &str, file: &str) {
    virsh(&[
        "snapshot-create-as",
        domain,
        "--name",
        "admin",
        "--disk-only",
        "--atomic",
        "--no-metadata",
        "--diskspec",
        &format!("vda,snapshot=external,file={file}"),
    ]);
}

/// The source of a VM's first disk as vmsnapd shows it.
fn shown_source(daemon: &Daemon, vm: &str) -> String {
    daemon.ctl(&["vm", "show", vm, "--output", "json"]).json()["disks"][0]["source"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// After an admin's disk-only snapshot on top of the layer vmsnap merged away: the disk is the
/// admin's overlay on `base`, the layer is gone, and the guest reads `before` from its disk
/// (caches dropped) and after a cold start.
fn assert_merged_under_admin_overlay(
    domain: &str,
    admin_top: &str,
    base: &str,
    merged: &str,
    before: &str,
) {
    assert_eq!(vmsnap_tests::disk_of(domain, "vda"), admin_top);
    assert_eq!(
        vmsnap_tests::backing_chain(admin_top),
        vec![admin_top.to_string(), base.to_string()]
    );
    assert!(
        !std::path::Path::new(merged).exists(),
        "the merged layer {merged} is left"
    );
    let checksums = || {
        let script = "sync && echo 3 > /proc/sys/vm/drop_caches && cd /mnt/data && \
             find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum";
        let (code, out) = vmsnap_tests::guest_exec(domain, script, Duration::from_secs(120));
        assert_eq!(code, 0, "{out}");
        out
    };
    assert_eq!(checksums(), before);
    virsh(&["destroy", domain]);
    virsh(&["start", domain]);
    vmsnap_tests::wait_guest_ready(domain);
    assert_eq!(checksums(), before);
    assert_eq!(vmsnap_tests::disk_of(domain, "vda"), admin_top);
}

/// An admin takes a disk-only snapshot of a running VM with virsh, into a folder vmsnapd knows
/// nothing of. libvirt sends no event for that, so vmsnapd's inventory (here never read again
/// in full) still shows the disk's old top. Deleting a vmsnap snapshot below it must act on
/// the real chain: the domains using the images at stake are read again for the delete. The
/// merge goes into the right layers, the admin's overlay keeps working, the guest's files stay.
#[test]
fn a_delete_after_a_disk_only_snapshot_taken_with_virsh_merges_the_real_chain() {
    // Declared first, so dropped after the VM that uses it.
    let admin_dir = tempfile::tempdir().unwrap();
    let vm = ScratchVm::running_with_agent("vmsnap-t13-virsh-snap");
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_without_reconcile());
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let base = vm.disk_source();
    vm.write_file("f1", 256 * 1024);
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s1", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    let vmsnap_top = vm.disk_source();
    assert_ne!(vmsnap_top, base);
    wait_for(
        Duration::from_secs(30),
        "vmsnapd to show the snapshot's overlay",
        || (shown_source(&daemon, &vm.name) == vmsnap_top).then_some(()),
    );
    vm.write_file("f2", 256 * 1024);

    let admin_top = admin_dir.path().join("admin-top.qcow2");
    let admin_top = admin_top.to_str().unwrap().to_string();
    virsh_disk_only_snapshot(&vm.name, &admin_top);
    assert_eq!(vm.disk_source(), admin_top);
    vm.write_file("f3", 256 * 1024);
    // What makes this case: vmsnapd has not seen the admin's snapshot.
    assert_eq!(
        shown_source(&daemon, &vm.name),
        vmsnap_top,
        "libvirt reported the disk-only snapshot (this test needs the inventory not to know)"
    );
    let before = vm.guest_checksums();

    daemon.ctl(&["snapshot", "delete", &vm.name, "s1"]).ok();

    // vmsnap's overlay was merged into the base beneath the admin's overlay, and removed.
    assert_merged_under_admin_overlay(&vm.name, &admin_top, &base, &vmsnap_top, &before);
}

/// The same outside change on a VM other than the operation's: a snapshot's VM is gone, a new
/// VM made from that snapshot runs, and an admin takes a disk-only snapshot of the new VM with
/// virsh (no event). Deleting the snapshot merges the new VM's layer on it into the snapshot's
/// image: that must be done on the new VM's real chain, which vmsnapd reads again because the
/// VM uses the image at stake, not as its inventory last showed it.
#[test]
fn a_delete_merges_another_vms_real_chain_after_a_disk_only_snapshot_taken_with_virsh() {
    let admin_dir = tempfile::tempdir().unwrap();
    let copy = "vmsnap-t13-virsh-copy";
    undefine_leftover(copy);
    let vm = ScratchVm::define(
        "vmsnap-t13-virsh-gone",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_without_reconcile());
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let base = vm.disk_source();
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "s1", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    let restored = daemon
        .ctl(&[
            "restore", &vm.name, "s1", "--target", copy, "--output", "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    // The first VM goes, with its disk (as `virsh undefine --remove-all-storage` would).
    let first_top = vm.disk_source();
    virsh(&["undefine", &vm.name]);
    std::fs::remove_file(&first_top).unwrap();

    virsh(&["start", copy]);
    vmsnap_tests::wait_guest_ready(copy);
    let copy_layer = vmsnap_tests::disk_of(copy, "vda");
    wait_for(
        Duration::from_secs(30),
        "vmsnapd to show the new VM running",
        || {
            let shown = daemon.ctl(&["vm", "show", copy, "--output", "json"]);
            (shown.code == Some(0) && shown.json()["state"] == "running").then_some(())
        },
    );
    assert_eq!(shown_source(&daemon, copy), copy_layer);
    let admin_top = admin_dir.path().join("admin-top.qcow2");
    let admin_top = admin_top.to_str().unwrap().to_string();
    virsh_disk_only_snapshot(copy, &admin_top);
    let (code, out) = vmsnap_tests::guest_exec(
        copy,
        "head -c 262144 /dev/urandom > /mnt/data/f-after && sync && cd /mnt/data && \
         find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum",
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{out}");
    let before = out;
    assert_eq!(
        shown_source(&daemon, copy),
        copy_layer,
        "libvirt reported the disk-only snapshot (this test needs the inventory not to know)"
    );

    daemon.ctl(&["snapshot", "delete", &vm.name, "s1"]).ok();

    assert_merged_under_admin_overlay(copy, &admin_top, &base, &copy_layer, &before);
    undefine_leftover(copy);
}
