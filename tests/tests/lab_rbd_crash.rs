//! vmsnapd killed (abort, as SIGKILL leaves it) at every journal step of a snapshot create, a
//! delete and a restore of a shut-off VM whose disk is a Ceph RBD image, then started again.
//! After the restart settles what it found: every snapshot and restore is settled, the kept
//! snapshot's RBD snapshot holds what it held, the VM's disk holds what it should (its own data,
//! or the snapshot's after a restore that finished), and every vmsnap RBD snapshot and restore
//! clone in the cluster is claimed by a record or is the VM's disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use vmsnap_tests::ceph::{
    config_table, content, images, make_image, pool, purge_images, snaps_of, spec_of, write_pattern,
};
use vmsnap_tests::{
    config_for, journal_steps, restore_uuids, settled_restores, snapshot_list, virsh, wait_for,
    wait_in_inventory, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

fn config() -> String {
    format!("{}{}", config_for(LAB_URI), config_table())
}

/// Where a round starts: s0's content and the disk's.
struct Start {
    s0: String,
    disk: String,
    restores: BTreeSet<String>,
}

/// A new VM on a new RBD image: data 0x11, s0, then data 0x22.
fn setup(daemon: &Daemon, name: &str) -> (ScratchVm, Start) {
    purge_images(name);
    make_image(name, "16M");
    let vm = ScratchVm::define(
        name,
        ScratchOptions {
            rbd_image: Some(name.to_string()),
            ..Default::default()
        },
        &[],
    );
    wait_in_inventory(daemon, &vm);
    write_pattern(name, 0x11, 1088);
    let taken = daemon
        .ctl(&["snapshot", "create", name, "s0", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    write_pattern(name, 0x22, 2176);
    let start = Start {
        s0: content(&spec_of(&taken, "vda")),
        disk: content(&format!("{}/{name}", pool())),
        restores: restore_uuids(daemon),
    };
    (vm, start)
}

/// The checks after the restart settled everything; returns whether a new restore succeeded.
fn check_settled(daemon: &Daemon, vm: &ScratchVm, start: &Start, step: &str) -> bool {
    let restores = settled_restores(daemon);
    let restored = restores.iter().any(|r| {
        !start.restores.contains(r["uuid"].as_str().unwrap()) && r["phase"] == "Succeeded"
    });
    let all = wait_for(Duration::from_secs(60), "every snapshot settled", || {
        let all = snapshot_list(daemon, &vm.name);
        all.iter()
            .all(|s| s["phase"] == "Succeeded" || s["phase"] == "Failed")
            .then_some(all)
    });
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for s in &all {
        if s["name"] == "s0" && s["phase"] == "Succeeded" {
            assert_eq!(content(&spec_of(s, "vda")), start.s0, "{step}: s0 changed");
        }
        for v in s["snapshotVolumes"]["includedVolumes"].as_array().unwrap() {
            claimed.insert(v["image"].as_str().unwrap().to_string());
        }
    }
    // Every vmsnap RBD snapshot is a record's; every restore clone is the VM's disk.
    let disk = vm.disk_source();
    for image in images(&vm.name) {
        for snap in snaps_of(&image)
            .into_iter()
            .filter(|s| s.starts_with("vmsnap-"))
        {
            let spec = format!("rbd:{}/{image}@{snap}", pool());
            assert!(
                claimed.contains(&spec),
                "{step}: {spec} is claimed by no record"
            );
        }
        if image.contains("-vmsnap-r") {
            assert_eq!(
                disk,
                format!("{}/{image}", pool()),
                "{step}: the restore clone {image} is not the VM's disk"
            );
        }
    }
    virsh(&["start", &vm.name]);
    virsh(&["destroy", &vm.name]);
    restored
}

/// Runs `op` once to count its journal steps, then once per step with vmsnapd dying there,
/// each round on a fresh VM and image.
fn at_every_journal_step(
    name: &str,
    op: impl Fn(&Daemon, &str),
    check: impl Fn(&Daemon, &ScratchVm, &Start, &str),
) {
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config());
    let count = {
        let (_vm, _start) = setup(&daemon, name);
        let before = journal_steps(&daemon);
        op(&daemon, name);
        journal_steps(&daemon) - before
    };
    assert!(count >= 4, "only {count} journal steps");
    for crash_at in 1..=count {
        daemon.restart_with_env(&[]);
        let (vm, start) = setup(&daemon, name);
        daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT_JOURNAL", &crash_at.to_string())]);
        wait_in_inventory(&daemon, &vm);
        op(&daemon, name);
        let status = daemon.wait_exit(Duration::from_secs(60));
        assert!(
            !status.success(),
            "step {crash_at}: vmsnapd did not die ({status})"
        );
        daemon.restart_with_env(&[]);
        let step = format!("{name}, died at journal step {crash_at} of {count}");
        check(&daemon, &vm, &start, &step);
        // The next round's VM takes the name: its records go with the old one.
        for s in snapshot_list(&daemon, name) {
            let _ = daemon.ctl(&["snapshot", "delete", name, s["name"].as_str().unwrap()]);
        }
    }
    purge_images(name);
}

fn disk_content(vm: &ScratchVm) -> String {
    content(&vm.disk_source())
}

#[test]
fn an_rbd_create_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t17-crash-create",
        |daemon, vm| {
            let _ = daemon.ctl(&["snapshot", "create", vm, "s1"]);
        },
        |daemon, vm, start, step| {
            check_settled(daemon, vm, start, step);
            assert_eq!(disk_content(vm), start.disk, "{step}: the disk changed");
            if let Some(s1) = snapshot_list(daemon, &vm.name)
                .into_iter()
                .find(|s| s["name"] == "s1" && s["phase"] == "Succeeded")
            {
                assert_eq!(
                    content(&spec_of(&s1, "vda")),
                    start.disk,
                    "{step}: s1's content"
                );
            }
        },
    );
}

#[test]
fn an_rbd_delete_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t17-crash-delete",
        |daemon, vm| {
            let _ = daemon.ctl(&["snapshot", "delete", vm, "s0"]);
        },
        |daemon, vm, start, step| {
            check_settled(daemon, vm, start, step);
            assert_eq!(disk_content(vm), start.disk, "{step}: the disk changed");
            if snapshot_list(daemon, &vm.name)
                .iter()
                .any(|s| s["name"] == "s0")
            {
                let again = daemon.ctl(&["snapshot", "delete", &vm.name, "s0"]);
                assert_eq!(again.code, Some(0), "{step}: {again:?}");
                check_settled(daemon, vm, start, step);
            }
        },
    );
}

#[test]
fn an_rbd_restore_interrupted_at_every_journal_step_settles() {
    at_every_journal_step(
        "vmsnap-t17-crash-restore",
        |daemon, vm| {
            let _ = daemon.ctl(&["restore", vm, "s0"]);
        },
        |daemon, vm, start, step| {
            let restored = check_settled(daemon, vm, start, step);
            let now = disk_content(vm);
            if restored {
                assert_eq!(now, start.s0, "{step}: restored, but not to s0's data");
            } else {
                assert_eq!(
                    now, start.disk,
                    "{step}: not restored, but the disk changed"
                );
            }
        },
    );
}
