//! Restore, end to end through vmsnapctl against real guests: the data a user destroyed comes
//! back byte for byte; the definition comes back; a restore can be undone; a snapshot can be
//! restored into a new VM; deletes stay correct once history branches; a daemon killed
//! mid-restore settles on restart.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use vmsnap_tests::{
    config_for, image_checksums, run, virsh, wait_for, Daemon, PrivateBus, ScratchOptions,
    ScratchVm, LAB_URI,
};
use vmsnap_tests::{image_of, show_snapshot as show};

fn daemon_for(vm: &ScratchVm) -> (PrivateBus, Daemon) {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        let out = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (out.code == Some(0)).then_some(out.json())
    });
    (bus, daemon)
}

/// Writes a data set of many files of varied sizes under /mnt/data/set.
fn write_data_set(vm: &ScratchVm, files: usize) {
    vm.exec(&format!(
        "mkdir -p /mnt/data/set && i=0; while [ $i -lt {files} ]; do \
         head -c $(( (i * 7919) % 65536 + 1 )) /dev/urandom > /mnt/data/set/file-$i; i=$((i+1)); done; sync"
    ));
}

fn data_set_checksums(vm: &ScratchVm) -> String {
    vm.exec("cd /mnt/data && find set -type f | sort | xargs -r sha256sum")
}

fn stop(vm: &ScratchVm) {
    vmsnap_tests::shut_down_by_agent(&vm.name);
}

fn restore(daemon: &Daemon, args: &[&str]) -> Value {
    let mut full = vec!["restore"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--output", "json"]);
    daemon.ctl(&full).json()
}

fn snapshot(daemon: &Daemon, vm: &str, name: &str) -> Value {
    let out = daemon
        .ctl(&["snapshot", "create", vm, name, "--output", "json"])
        .json();
    assert_eq!(out["phase"], "Succeeded", "{out}");
    out
}

#[test]
fn destroyed_data_comes_back_and_the_restore_can_be_undone() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-r-e2e");
    let (_bus, daemon) = daemon_for(&vm);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    write_data_set(&vm, 120);
    let good = data_set_checksums(&vm);
    assert_eq!(good.lines().count(), 120);
    snapshot(&daemon, &vm.name, "good");

    // The accident.
    vm.exec("rm -rf /mnt/data/set && sync");
    assert_eq!(data_set_checksums(&vm), "");

    // Refused while running; nothing changes.
    let refused = daemon.ctl(&["restore", &vm.name, "good"]);
    let message = refused.failure();
    assert!(
        message.contains("is running") && message.contains("--stop"),
        "{message}"
    );
    assert_eq!(
        daemon.ctl(&["restore", "list", "--output", "json"]).json(),
        serde_json::json!([])
    );

    stop(&vm);
    let restored = restore(&daemon, &[&vm.name, "good"]);
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    assert_eq!(restored["complete"], true);
    assert!(restored["restoreTime"].is_string());
    let safety = restored["safetySnapshot"].as_str().unwrap().to_string();
    assert!(safety.starts_with("pre-restore-"), "{restored}");
    // The safety snapshot is a snapshot like any other: listed, shown, restorable.
    let shown = daemon
        .ctl(&["snapshot", "show", &vm.name, &safety, "--output", "json"])
        .json();
    assert_eq!(shown["phase"], "Succeeded", "{shown}");
    let listed = daemon
        .ctl(&["snapshot", "list", &vm.name, "--output", "json"])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(restored["restores"][0]["target"], "vda");
    vm.start(true);
    assert_eq!(
        data_set_checksums(&vm),
        good,
        "every file back, byte for byte"
    );

    // The snapshot is still usable: restore it again after more damage.
    vm.exec("rm -f /mnt/data/set/file-1* && sync");
    stop(&vm);
    let again = restore(&daemon, &[&vm.name, "good", "--no-safety-snapshot"]);
    assert_eq!(again["phase"], "Succeeded", "{again}");
    assert_eq!(again["safetySnapshot"], Value::Null);
    vm.start(true);
    assert_eq!(data_set_checksums(&vm), good);

    // Undo the first restore through its safety snapshot: the data set is gone again, as it
    // was right before that restore.
    stop(&vm);
    let undo = restore(
        &daemon,
        &[&vm.name, &safety, "--no-safety-snapshot", "--start"],
    );
    assert_eq!(undo["phase"], "Succeeded", "{undo}");
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vmsnap_tests::wait_guest_ready(&vm.name);
    assert_eq!(data_set_checksums(&vm), "");

    let list = daemon.ctl(&["restore", "list", "--output", "json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 3);
    vmsnap_tests::check_introspection(
        &daemon.bus_address,
        &vmsnap_api::restore_path(list[0]["uuid"].as_str().unwrap()),
        vmsnap_api::RESTORE_INTERFACE,
    );
    let table = daemon.ctl(&["restore", "list"]).ok().to_string();
    assert!(table.contains("good"), "{table}");
}

#[test]
fn the_definition_comes_back_and_disks_attached_later_are_detached() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-r-def");
    let (_bus, daemon) = daemon_for(&vm);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 64 << 10);
    let sums = vm.guest_checksums();
    let memory_then = virsh(&["dominfo", &vm.name]);
    snapshot(&daemon, &vm.name, "s1");

    // After the snapshot: more memory, and a new disk.
    let extra = vm.dir.path().join("extra.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            extra.to_str().unwrap(),
            "16M",
        ],
    );
    virsh(&["setmaxmem", &vm.name, "262144", "--config"]);
    virsh(&[
        "attach-disk",
        &vm.name,
        extra.to_str().unwrap(),
        "vdb",
        "--subdriver",
        "qcow2",
        "--config",
    ]);
    assert!(virsh(&["domblklist", &vm.name, "--inactive"]).contains("vdb"));
    let extra_before = std::fs::read(&extra).unwrap();

    // One command: stop, restore, start.
    let restored = restore(&daemon, &[&vm.name, "s1", "--stop", "--start"]);
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    assert_eq!(restored["detachedDisks"][0]["target"], "vdb", "{restored}");
    assert_eq!(
        restored["detachedDisks"][0]["source"],
        extra.to_str().unwrap()
    );
    assert!(!virsh(&["domblklist", &vm.name, "--inactive"]).contains("vdb"));
    let max_memory = |info: &str| {
        info.lines()
            .find(|l| l.starts_with("Max memory"))
            .map(str::to_string)
    };
    assert_eq!(
        max_memory(&virsh(&["dominfo", &vm.name])),
        max_memory(&memory_then)
    );
    // The detached disk's image is untouched.
    assert_eq!(std::fs::read(&extra).unwrap(), extra_before);
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vmsnap_tests::wait_guest_ready(&vm.name);
    assert_eq!(vm.guest_checksums(), sums);
}

#[test]
fn a_snapshot_restored_as_a_new_vm_boots_with_its_data_and_the_source_keeps_its_own() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-r-src");
    let (_bus, daemon) = daemon_for(&vm);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 200 << 10);
    let then = vm.guest_checksums();
    snapshot(&daemon, &vm.name, "s1");
    vm.write_file("f2", 100 << 10);
    let now = vm.guest_checksums();

    let clone_name = "vmsnap-r-clone";
    let _cleanup = CloneCleanup(clone_name);
    let refused = daemon.ctl(&["restore", &vm.name, "s1", "--target", &vm.name]);
    assert!(refused.failure().contains("already exists"));
    let restored = restore(
        &daemon,
        &[&vm.name, "s1", "--target", clone_name, "--start"],
    );
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    assert_eq!(restored["newVm"], true);
    assert_eq!(restored["error"], Value::Null, "{restored}");
    assert_ne!(
        virsh(&["domuuid", clone_name]),
        virsh(&["domuuid", &vm.name])
    );
    let clone_disk = restored["restores"][0]["toImage"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(clone_disk.contains(clone_name));

    vmsnap_tests::wait_guest_ready(clone_name);
    let (_, clone_sums) = vmsnap_tests::guest_exec(
        clone_name,
        "cd /mnt/data && find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum",
        Duration::from_secs(30),
    );
    assert_eq!(clone_sums, then);
    // The source runs on, with its own data.
    assert_eq!(vm.guest_checksums(), now);
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "running");

    // The snapshot's image now backs two running chains, the source's and the clone's:
    // deleting the snapshot must merge nothing into it, and both VMs keep their data.
    let image = restored["restores"][0]["fromImage"]
        .as_str()
        .unwrap()
        .to_string();
    let image_sum = || run("sha256sum", &[&image]);
    let before = image_sum();
    daemon.ctl(&["snapshot", "delete", &vm.name, "s1"]).ok();
    assert_eq!(image_sum(), before, "the shared image was written");
    assert_eq!(vm.guest_checksums(), now);
    let (_, clone_after) = vmsnap_tests::guest_exec(
        clone_name,
        "cd /mnt/data && find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum",
        Duration::from_secs(30),
    );
    assert_eq!(clone_after, then);
}

struct CloneCleanup(&'static str);

impl Drop for CloneCleanup {
    fn drop(&mut self) {
        let dir = virsh_quiet(&["domblklist", self.0]);
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "destroy", self.0])
            .output();
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "undefine", self.0, "--nvram"])
            .output();
        for line in dir.lines() {
            if let Some(path) = line
                .split_whitespace()
                .nth(1)
                .filter(|p| p.contains(self.0))
            {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn virsh_quiet(args: &[&str]) -> String {
    std::process::Command::new("virsh")
        .args(["-c", LAB_URI])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// S1, S2; restore S1; S3; then delete S1, S2 and S3 in `order`, checking every remaining
/// snapshot and the live disk after each step.
fn deletes_stay_correct_when_history_branches(vm_name: &str, order: [&str; 3]) {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent(vm_name);
    let (_bus, daemon) = daemon_for(&vm);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let mut expected = BTreeMap::new();
    for (name, order) in [("s1", 0), ("s2", 1)] {
        vm.write_file(&format!("f{order}"), 150 << 10);
        expected.insert(name.to_string(), vm.guest_checksums());
        snapshot(&daemon, &vm.name, name);
    }
    // Back to s1, then a new branch.
    stop(&vm);
    let restored = restore(
        &daemon,
        &[&vm.name, "s1", "--no-safety-snapshot", "--start"],
    );
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vmsnap_tests::wait_guest_ready(&vm.name);
    assert_eq!(&vm.guest_checksums(), expected.get("s1").unwrap());
    vm.write_file("f-branch", 120 << 10);
    expected.insert("s3".into(), vm.guest_checksums());
    snapshot(&daemon, &vm.name, "s3");
    vm.write_file("f-live", 50 << 10);
    let live = vm.guest_checksums();

    let check = |expected: &BTreeMap<String, String>| {
        for (name, sums) in expected {
            let snap = show(&daemon, &vm.name, name);
            assert_eq!(snap["phase"], "Succeeded", "{snap}");
            assert_eq!(&image_checksums(&image_of(&snap)), sums, "snapshot {name}");
        }
        assert_eq!(vm.guest_checksums(), live, "live disk");
    };
    check(&expected);
    // s1's image backs both branches: deleting s1 must not merge anything into it.
    for name in order {
        daemon.ctl(&["snapshot", "delete", &vm.name, name]).ok();
        expected.remove(name);
        check(&expected);
    }
    // Nothing claims the old branch any more: its images are gone, only the live chain stays.
    let chain = run(
        "qemu-img",
        &["info", "-U", "--backing-chain", &vm.disk_source()],
    );
    let chain_len = chain.lines().filter(|l| l.starts_with("image:")).count();
    assert_eq!(vm.images().len(), chain_len, "{:?}\n{chain}", vm.images());
}

#[test]
fn branched_history_delete_oldest_first() {
    deletes_stay_correct_when_history_branches("vmsnap-r-branch1", ["s1", "s2", "s3"]);
}

#[test]
fn branched_history_delete_newest_first() {
    deletes_stay_correct_when_history_branches("vmsnap-r-branch2", ["s3", "s2", "s1"]);
}

#[test]
fn branched_history_delete_abandoned_branch_first() {
    deletes_stay_correct_when_history_branches("vmsnap-r-branch3", ["s2", "s3", "s1"]);
}

#[test]
fn uefi_variables_come_back_and_excluded_disks_are_reported() {
    let vm = ScratchVm::define(
        "vmsnap-r-uefi",
        ScratchOptions {
            nvram: true,
            cdrom: true,
            ..Default::default()
        },
        &[],
    );
    let (_bus, daemon) = daemon_for(&vm);
    let vars = vm.dir.path().join("VARS.fd");
    let then = std::fs::read(&vars).unwrap();
    let snap = daemon
        .ctl(&[
            "snapshot",
            "create",
            &vm.name,
            "s1",
            "--allow-excluded",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    // The firmware changes its variables later.
    std::fs::write(&vars, vec![0x5a; then.len()]).unwrap();
    let restored = restore(&daemon, &[&vm.name, "s1", "--no-safety-snapshot"]);
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    assert_eq!(std::fs::read(&vars).unwrap(), then);
    assert_eq!(restored["notRestored"][0]["target"], "sda", "{restored}");
    assert!(restored["notRestored"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("cdrom"));
    // The cdrom is back in the definition as recorded.
    assert!(virsh(&["domblklist", &vm.name, "--inactive"]).contains("sda"));
    let table = daemon
        .ctl(&["restore", "show", restored["uuid"].as_str().unwrap()])
        .ok()
        .to_string();
    assert!(table.contains("Not restored"), "{table}");
}

#[test]
fn a_snapshot_whose_image_is_gone_is_refused() {
    let vm = ScratchVm::define("vmsnap-r-missing", ScratchOptions::default(), &[]);
    let (_bus, daemon) = daemon_for(&vm);
    let snap = daemon
        .ctl(&["snapshot", "create", &vm.name, "s1", "--output", "json"])
        .json();
    // Someone removes the snapshot's image behind vmsnap's back (the VM runs on its overlay,
    // which no longer has a backing file: it is never started here).
    let image = snap["snapshotVolumes"]["includedVolumes"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::rename(&image, format!("{image}.moved")).unwrap();
    let refused = daemon.ctl(&["restore", &vm.name, "s1"]);
    let message = refused.failure();
    assert!(message.contains("is missing"), "{message}");
    assert_eq!(
        daemon.ctl(&["restore", "list", "--output", "json"]).json(),
        serde_json::json!([])
    );
    std::fs::rename(format!("{image}.moved"), &image).unwrap();
}

#[test]
fn daemon_killed_mid_restore_settles_on_restart() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-r-crash");
    let (_bus, mut daemon) = daemon_for(&vm);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 64 << 10);
    let then = vm.guest_checksums();
    snapshot(&daemon, &vm.name, "s1");
    vm.write_file("f2", 64 << 10);
    let now = vm.guest_checksums();
    stop(&vm);
    let before = vm.disk_source();

    // Killed before the new definition is in place: the VM is left as it was.
    let first = restore_killed_at(&mut daemon, &vm, "restore-before-define", 0);
    assert_eq!(first["phase"], "Failed", "{first}");
    assert!(
        first["error"].as_str().unwrap().contains("left as it was"),
        "{first}"
    );
    assert_eq!(vm.disk_source(), before);
    vm.start(true);
    assert_eq!(vm.guest_checksums(), now);
    stop(&vm);

    // Killed after it: the restart finishes the restore.
    let second = restore_killed_at(&mut daemon, &vm, "restore-after-define", 1);
    assert_eq!(second["phase"], "Succeeded", "{second}");
    vm.start(true);
    assert_eq!(vm.guest_checksums(), then);
}

/// Restores `vm` to s1 with vmsnapd set to die at `point`, restarts it, and returns the `index`th
/// restore once the restarted daemon has settled it.
fn restore_killed_at(daemon: &mut Daemon, vm: &ScratchVm, point: &str, index: usize) -> Value {
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", point)]);
    let _ = daemon.ctl(&[
        "restore",
        &vm.name,
        "s1",
        "--no-safety-snapshot",
        "--no-wait",
    ]);
    assert!(!daemon.wait_exit(Duration::from_secs(30)).success());
    daemon.restart_with_env(&[]);
    wait_for(Duration::from_secs(30), "the restore to settle", || {
        let list = daemon.ctl(&["restore", "list", "--output", "json"]).json();
        let r = list.as_array().unwrap().get(index).cloned()?;
        (r["phase"] != "InProgress").then_some(r)
    })
}
