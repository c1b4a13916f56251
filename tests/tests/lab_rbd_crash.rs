//! vmsnapd killed (abort, as SIGKILL leaves it) at every journal step of a snapshot create, a
//! delete and a restore of a shut-off VM whose disk is a Ceph RBD image, then started again.
//! After the restart settles what it found: every snapshot and restore is settled, the kept
//! snapshot's RBD snapshot holds what it held, the VM's disk holds what it should (its own data,
//! or the snapshot's after a restore that finished), and every vmsnap RBD snapshot and restore
//! clone in the cluster is claimed by a record or is the VM's disk.
//!
//! And the check whether a restore clone an in-place restore replaced is still needed, when
//! vmsnapd dies between a delete's RBD snapshot removal and that check, or the cluster stops
//! answering there: the clone goes once the check is made again (at the next start, or after
//! the next delete on the VM), and nothing else changes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use vmsnap_tests::ceph::{
    cluster_alone, cluster_shared, config_table, content, images, make_image,
    monitor_stopped_at_pause, pool, purge_images, snaps_of, spec_of, write_pattern,
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
    let _cluster = cluster_shared();
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
    let _cluster = cluster_shared();
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
    let _cluster = cluster_shared();
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

/// The crash and pause point between a delete's RBD snapshot removal and the orphan check of
/// its image (the daemon's `rbd::BEFORE_ORPHAN_CHECK`).
const BEFORE_ORPHAN_CHECK: &str = "rbd-before-orphan-check";

/// A VM whose disk moved twice by restores of s0 in place (without safety snapshots): from its
/// image to clone A (s1 taken in A), then to clone B (s2 taken in B). A, replaced, stays while
/// s1 lives in it.
struct Replaced {
    vm: ScratchVm,
    /// The replaced clone (`pool/image`).
    clone_a: String,
    /// The VM's disk now.
    clone_b: String,
    /// What must not change: every snapshot but s1, both images the VM uses or used first.
    kept: Vec<(String, String)>,
}

fn restore_in_place(daemon: &Daemon, name: &str) {
    let restored = daemon
        .ctl(&[
            "restore",
            name,
            "s0",
            "--no-safety-snapshot",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
}

fn image_of(spec: &str) -> &str {
    spec.rsplit('/').next().unwrap()
}

fn replaced_clone(daemon: &Daemon, name: &str) -> Replaced {
    let (vm, _start) = setup(daemon, name);
    restore_in_place(daemon, name);
    let clone_a = vm.disk_source();
    write_pattern(image_of(&clone_a), 0x33, 3264);
    let s1 = daemon
        .ctl(&["snapshot", "create", name, "s1", "--output", "json"])
        .json();
    assert_eq!(s1["phase"], "Succeeded", "{s1}");
    write_pattern(image_of(&clone_a), 0x44, 4352);
    restore_in_place(daemon, name);
    let clone_b = vm.disk_source();
    assert_ne!(clone_a, clone_b);
    assert!(images(name).contains(&image_of(&clone_a).to_string()));
    write_pattern(image_of(&clone_b), 0x55, 5440);
    let s2 = daemon
        .ctl(&["snapshot", "create", name, "s2", "--output", "json"])
        .json();
    assert_eq!(s2["phase"], "Succeeded", "{s2}");
    let mut kept: Vec<(String, String)> = snapshot_list(daemon, name)
        .iter()
        .filter(|s| s["name"] != "s1")
        .map(|s| {
            let spec = spec_of(s, "vda");
            let sum = content(&spec);
            (spec, sum)
        })
        .collect();
    for spec in [format!("{}/{name}", pool()), clone_b.clone()] {
        let sum = content(&spec);
        kept.push((spec, sum));
    }
    Replaced {
        vm,
        clone_a,
        clone_b,
        kept,
    }
}

/// After the check was made again: A is gone, B is the VM's disk, nothing kept changed, no
/// check is left pending.
fn check_replaced_gone(daemon: &Daemon, scene: &Replaced, what: &str) {
    let name = &scene.vm.name;
    let a = image_of(&scene.clone_a).to_string();
    wait_for(
        Duration::from_secs(60),
        "the replaced clone removed",
        || (!images(name).contains(&a)).then_some(()),
    );
    assert!(
        !snapshot_list(daemon, name)
            .iter()
            .any(|s| s["name"] == "s1"),
        "{what}: s1 is deleted"
    );
    assert_eq!(scene.vm.disk_source(), scene.clone_b, "{what}");
    for (spec, sum) in &scene.kept {
        assert_eq!(&content(spec), sum, "{what}: {spec} changed");
    }
    let pending = daemon.state_dir().join("rbd-orphan-checks");
    let left: Vec<_> = std::fs::read_dir(&pending)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{what}: still pending: {left:?}");
}

fn orphan_check_config() -> String {
    format!("{}command_timeout = \"4s\"\n", config())
}

/// vmsnapd dies after the delete of s1, A's last snapshot, removed its RBD snapshot and
/// before it checked whether A is still needed: after the restart A is gone, and nothing
/// else changed.
#[test]
fn a_replaced_clone_is_removed_after_a_crash_before_its_check() {
    let _cluster = cluster_shared();
    let name = "vmsnap-t17-crash-orphan";
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &orphan_check_config());
    let scene = replaced_clone(&daemon, name);
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", BEFORE_ORPHAN_CHECK)]);
    wait_in_inventory(&daemon, &scene.vm);
    let _ = daemon.ctl(&["snapshot", "delete", name, "s1"]);
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "vmsnapd did not die ({status})");
    // Died there: the RBD snapshot is gone, the clone not yet.
    let a = image_of(&scene.clone_a);
    assert!(images(name).contains(&a.to_string()));
    assert!(!snaps_of(a).iter().any(|s| s.starts_with("vmsnap-")));
    daemon.restart_with_env(&[]);
    check_replaced_gone(&daemon, &scene, "after the restart");
    drop(scene);
    purge_images(name);
}

/// The delete of s1 removes its RBD snapshot, then the cluster stops answering (its monitor
/// stopped) before the check of A: the delete succeeds and A stays. Once the cluster answers
/// again, `retry` makes the check again and A goes.
fn a_replaced_clone_left_unchecked_goes_at(name: &str, retry: impl Fn(&mut Daemon)) {
    let _cluster = cluster_alone();
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &orphan_check_config());
    let scene = replaced_clone(&daemon, name);
    daemon.restart_with_env(&[("VMSNAP_TEST_PAUSE_AT", BEFORE_ORPHAN_CHECK)]);
    wait_in_inventory(&daemon, &scene.vm);
    let (deleted, stopped) = monitor_stopped_at_pause(
        &daemon,
        &["snapshot", "delete", name, "s1"],
        "the pause before the check",
    );
    drop(stopped);
    assert_eq!(deleted.code, Some(0), "{deleted:?}");
    assert!(
        daemon
            .log_text()
            .contains("cannot tell whether a replaced image is still needed"),
        "the check was not made"
    );
    let a = image_of(&scene.clone_a).to_string();
    assert!(images(name).contains(&a), "A stays while it is unchecked");
    retry(&mut daemon);
    check_replaced_gone(&daemon, &scene, name);
    drop(scene);
    purge_images(name);
}

#[test]
fn a_replaced_clone_left_unchecked_goes_at_the_next_start() {
    a_replaced_clone_left_unchecked_goes_at("vmsnap-t17-orphan-start", |daemon| {
        daemon.restart_with_env(&[]);
    });
}

#[test]
fn a_replaced_clone_left_unchecked_goes_after_the_next_delete_on_the_vm() {
    let name = "vmsnap-t17-orphan-delete";
    // The same daemon (still pausing 3 s before each check): s3, taken and deleted on B.
    a_replaced_clone_left_unchecked_goes_at(name, |daemon| {
        let s3 = daemon
            .ctl(&["snapshot", "create", name, "s3", "--output", "json"])
            .json();
        assert_eq!(s3["phase"], "Succeeded", "{s3}");
        let deleted = daemon.ctl(&["snapshot", "delete", name, "s3"]);
        assert_eq!(deleted.code, Some(0), "{deleted:?}");
    });
}
