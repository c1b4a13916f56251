//! VMs whose disks live in Ceph RBD (the lab's single-node cluster, lab/ceph-up.sh), through
//! vmsnapctl: a snapshot is an RBD snapshot taken in the guest's freeze and holds what the guest
//! wrote before it (read back from the cluster with `rbd export`, not through vmsnap); a restore
//! in place and one as a new VM each boot with exactly that data; deletes in any order leave
//! every VM's data as it was; a VM with a qcow2 and an RBD disk is snapshotted in one freeze; a
//! cluster that stops answering fails the snapshot cleanly, thaws the guest and leaves nothing.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmsnap_tests::ceph::{
    cluster_alone, cluster_shared, config_table, content, make_image, monitor_stopped_at_pause,
    pool, purge_images, rbd, snaps_of, spec_of, write_pattern,
};
use vmsnap_tests::{
    config_for, guest_exec, virsh, wait_for, Daemon, GuestSlot, PrivateBus, ScratchOptions,
    ScratchVm, LAB_URI,
};

/// SHA-256 of file `name` in the ext4 filesystem of RBD snapshot `spec` (`pool/image@snap`),
/// read from the cluster with `rbd export` and `debugfs`, as the guest's `sha256sum` prints it.
fn file_sum_in(spec: &str, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("export.raw");
    rbd(&["export", "--no-progress", spec, raw.to_str().unwrap()]);
    let file = dir.path().join("file");
    vmsnap_tests::run(
        "debugfs",
        &[
            "-R",
            &format!("dump /{name} {}", file.display()),
            raw.to_str().unwrap(),
        ],
    );
    vmsnap_tests::run("sha256sum", &[file.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The guest's checksum of its file `name`, from `guest_checksums` output.
fn sum_in(checksums: &str, name: &str) -> String {
    checksums
        .lines()
        .find(|l| l.ends_with(&format!("./{name}")))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{name} not in {checksums}"))
        .to_string()
}

/// What the guest's files are, read from the disk, not the page cache.
fn fresh_checksums(vm: &str) -> String {
    let (code, out) = guest_exec(
        vm,
        "sync && echo 3 > /proc/sys/vm/drop_caches && cd /mnt/data && \
         find . -maxdepth 1 -type f -name 'f*' | sort | xargs -r sha256sum",
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{out}");
    out
}

fn config(extra: &str) -> String {
    format!(
        "{extra}{}{}command_timeout = \"20s\"\n",
        config_for(LAB_URI),
        config_table()
    )
}

/// A VM with a guest agent whose data disk (vda) is a new RBD image of that name; not started.
fn define_rbd_vm(name: &str) -> ScratchVm {
    // A VM of that name left running by an interrupted run holds its image open.
    vmsnap_tests::remove_domain(name);
    purge_images(name);
    make_image(name, "64M");
    ScratchVm::define(
        name,
        ScratchOptions {
            agent: true,
            rbd_image: Some(name.to_string()),
            ..Default::default()
        },
        &[],
    )
}

/// [`define_rbd_vm`], started and ready.
fn rbd_vm(name: &str) -> ScratchVm {
    let vm = define_rbd_vm(name);
    vm.start(true);
    vm
}

fn created(daemon: &Daemon, vm: &str, name: &str) -> Value {
    let out = daemon.ctl(&["snapshot", "create", vm, name, "--output", "json"]);
    let taken = out.json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    taken
}

/// Undefines a VM made by a restore when dropped.
struct Undefine(&'static str);

impl Drop for Undefine {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", LAB_URI, "destroy", self.0])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", LAB_URI, "undefine", self.0])
            .output();
    }
}

#[test]
fn an_rbd_snapshot_holds_the_guests_data_and_restores_in_place_and_as_a_new_vm() {
    let _cluster = cluster_shared();
    let _slot = GuestSlot::take();
    let name = "vmsnap-t17-rbd";
    let clone = "vmsnap-t17-rbd-clone";
    let _undefine = Undefine(clone);
    let vm = rbd_vm(name);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config(""));
    vmsnap_tests::wait_agent_connected(&daemon, name);
    let shown = daemon.ctl(&["vm", "show", name, "--output", "json"]).json();
    assert_eq!(shown["disks"][0]["backend"], "rbd", "{shown}");

    vm.write_file("f1", 300 << 10);
    let at_s1 = vm.guest_checksums();
    let s1 = created(&daemon, name, "s1");
    let indications: Vec<&str> = s1["indications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(indications.contains(&"GuestAgent"), "{s1}");
    let spec = spec_of(&s1, "vda");
    let uuid = s1["uuid"].as_str().unwrap();
    assert_eq!(spec, format!("{}/{name}@vmsnap-{uuid}", pool()));
    // The cluster itself shows it, named after the vmsnap snapshot...
    assert!(snaps_of(name).contains(&format!("vmsnap-{uuid}")));
    // ...and holds what the guest wrote before it.
    assert_eq!(file_sum_in(&spec, "f1"), sum_in(&at_s1, "f1"));

    // The data changes; a restore in place brings s1's back.
    vm.write_file("f2", 100 << 10);
    vm.exec("rm /mnt/data/f1 && sync");
    assert_ne!(vm.guest_checksums(), at_s1);
    let restored = daemon
        .ctl(&["restore", name, "s1", "--stop", "--output", "json"])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    let source = vm.disk_source();
    assert!(
        source.starts_with(&format!("{}/{name}-vmsnap-r", pool())),
        "the disk is the restore's clone: {source}"
    );
    vm.start(true);
    assert_eq!(fresh_checksums(name), at_s1, "restored in place");

    // As a new VM: a clone of its own, booting with s1's data; the source VM keeps its own.
    vm.write_file("f3", 50 << 10);
    let source_now = vm.guest_checksums();
    let new_vm = daemon
        .ctl(&[
            "restore", name, "s1", "--target", clone, "--start", "--output", "json",
        ])
        .json();
    assert_eq!(new_vm["phase"], "Succeeded", "{new_vm}");
    vmsnap_tests::wait_guest_ready(clone);
    assert_eq!(fresh_checksums(clone), at_s1, "the new VM sees s1's data");
    assert_eq!(fresh_checksums(name), source_now);

    // A snapshot of the restored VM; then s1 restored in place again: the VM moves to a second
    // clone (of s1); the first one still holds s2 and that restore's safety snapshot, and
    // nothing is cloned from it.
    let s2 = created(&daemon, name, "s2");
    let first_clone = spec_of(&s2, "vda").split('@').next().unwrap().to_string();
    assert_eq!(vm.disk_source(), first_clone);
    vm.write_file("f4", 50 << 10);
    let again = daemon
        .ctl(&[
            "restore", name, "s1", "--stop", "--start", "--output", "json",
        ])
        .json();
    assert_eq!(again["phase"], "Succeeded", "{again}");
    vmsnap_tests::wait_guest_ready(name);
    assert_eq!(fresh_checksums(name), at_s1, "restored to s1 again");
    let second_clone = vm.disk_source();
    assert_ne!(second_clone, first_clone);
    let image_name = |spec: &str| spec.rsplit('/').next().unwrap().to_string();
    let images = || -> Vec<String> {
        serde_json::from_str(&rbd(&["ls", &pool(), "--format", "json"])).unwrap()
    };

    // Every snapshot deleted, the one the clones depend on first: nobody's data changes, no
    // vmsnap snapshot stays in the cluster, and the first clone, which nothing needs any more
    // once its last snapshot is gone, goes (the original image is the user's and stays; the
    // second clone is the VM's disk).
    let mut order = vec!["s1".to_string(), "s2".to_string()];
    for s in vmsnap_tests::snapshot_list(&daemon, name) {
        let other = s["name"].as_str().unwrap().to_string();
        if !order.contains(&other) {
            order.push(other);
        }
    }
    assert_eq!(order.len(), 4, "{order:?}: s1, s2 and two safety snapshots");
    for snapshot in &order {
        assert!(
            images().contains(&image_name(&first_clone)),
            "the first clone went while a snapshot lived in it"
        );
        let deleted = daemon.ctl(&["snapshot", "delete", name, snapshot]);
        assert_eq!(deleted.code, Some(0), "{deleted:?}");
    }
    assert!(
        !snaps_of(name).iter().any(|s| s.starts_with("vmsnap-")),
        "{:?}",
        snaps_of(name)
    );
    let left = images();
    assert!(
        !left.contains(&image_name(&first_clone)),
        "{left:?}; vmsnapd on it: {:?}; rbd status: {}",
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains(&image_name(&first_clone)))
            .collect::<Vec<_>>(),
        rbd(&["status", &first_clone, "--format", "json"])
    );
    assert!(left.contains(&name.to_string()), "{left:?}");
    assert!(left.contains(&image_name(&second_clone)), "{left:?}");
    assert!(!snaps_of(&image_name(&second_clone))
        .iter()
        .any(|s| s.starts_with("vmsnap-")));
    assert_eq!(fresh_checksums(name), at_s1);
    assert_eq!(fresh_checksums(clone), at_s1);
    // The clones boot again from the cluster (s1's data now lives only in Ceph's trash).
    virsh(&["destroy", clone]);
    virsh(&["start", clone]);
    vmsnap_tests::wait_guest_ready(clone);
    assert_eq!(fresh_checksums(clone), at_s1);
    drop(vm);
    drop(_undefine);
    purge_images(name);
}

#[test]
fn a_vm_with_a_qcow2_and_an_rbd_disk_is_snapshotted_in_one_freeze_and_restored() {
    let _cluster = cluster_shared();
    let _slot = GuestSlot::take();
    let name = "vmsnap-t17-mixed";
    let vm = define_rbd_vm(name);
    vm.attach_raw_disk("vdb", 8 << 20);
    vm.start(true);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config(""));
    vmsnap_tests::wait_agent_connected(&daemon, name);
    let vdb_sum = "dd if=/dev/vdb bs=64k count=128 2>/dev/null | sha256sum";

    vm.write_file("f1", 200 << 10);
    vm.exec("head -c 1048576 /dev/urandom | dd of=/dev/vdb bs=64k conv=fsync 2>/dev/null");
    let files = vm.guest_checksums();
    let vdb = vm.exec(vdb_sum);
    let s1 = created(&daemon, name, "s1");
    assert!(s1["indications"]
        .as_array()
        .unwrap()
        .contains(&Value::from("GuestAgent")));
    let backends: Vec<&str> = s1["snapshotVolumes"]["includedVolumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends.len(), 2, "{s1}");
    assert!(
        backends.contains(&"rbd") && backends.contains(&"qcow2"),
        "{s1}"
    );

    vm.write_file("f2", 100 << 10);
    vm.exec("head -c 1048576 /dev/urandom | dd of=/dev/vdb bs=64k conv=fsync 2>/dev/null");
    let restored = daemon
        .ctl(&[
            "restore", name, "s1", "--stop", "--start", "--output", "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    vmsnap_tests::wait_guest_ready(name);
    assert_eq!(fresh_checksums(name), files);
    assert_eq!(vm.exec(vdb_sum), vdb);
    let deleted = daemon.ctl(&["snapshot", "delete", name, "s1"]);
    assert_eq!(deleted.code, Some(0), "{deleted:?}");
    assert_eq!(fresh_checksums(name), files);
    drop(vm);
    purge_images(name);
}

#[test]
fn a_cluster_that_stops_answering_mid_snapshot_fails_it_thaws_the_guest_and_leaves_nothing() {
    let _cluster = cluster_alone();
    let _slot = GuestSlot::take();
    let name = "vmsnap-t17-unreachable";
    let vm = rbd_vm(name);
    let bus = PrivateBus::start();
    let config = config("freeze_timeout = \"40s\"\nfailure_deadline = \"2m\"\n")
        .replace("command_timeout = \"20s\"", "command_timeout = \"4s\"");
    let mut daemon = Daemon::start(&bus, &config);
    daemon.restart_with_env(&[("VMSNAP_TEST_PAUSE_AT", "create-before-snapshot")]);
    vmsnap_tests::wait_agent_connected(&daemon, name);
    vm.write_file("f1", 100 << 10);
    let files = vm.guest_checksums();

    // Frozen, at the pause before the captures: the cluster stops answering there.
    let (out, stopped) = monitor_stopped_at_pause(
        &daemon,
        &["snapshot", "create", name, "s1", "--output", "json"],
        "the pause in the freeze",
    );
    let failed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(failed["phase"], "Failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("did not finish within"), "{error}");
    assert!(!error.contains('\n'), "one line: {error}");
    // Thawed: a write goes through while the monitor is still stopped.
    vm.exec("timeout 20 sh -c 'echo thawed > /mnt/data/thaw-check && sync'");
    vm.exec("rm -f /mnt/data/thaw-check && sync");
    drop(stopped);
    // Nothing of the snapshot stays in the cluster, and the guest's data is its own.
    let uuid = failed["uuid"].as_str().unwrap();
    wait_for(Duration::from_secs(30), "no RBD snapshot left", || {
        (!snaps_of(name).contains(&format!("vmsnap-{uuid}"))).then_some(())
    });
    assert_eq!(fresh_checksums(name), files);
    // The next snapshot works.
    daemon.restart_with_env(&[]);
    vmsnap_tests::wait_agent_connected(&daemon, name);
    created(&daemon, name, "s2");
    drop(vm);
    purge_images(name);
}

/// Host B shares host A's Ceph cluster (here: a second vmsnapd with its own records and bus).
/// A snapshot of an RBD-only VM exported on A is imported on B once the cluster shows its RBD
/// snapshot, and restored there as a new VM that boots with the snapshot's data; the cluster
/// stays the truth (its RBD snapshot removed through A, B shows it not ready). A record that was
/// tampered with, a second import and a snapshot of a file disk are refused.
#[test]
fn a_snapshot_exported_on_one_host_is_restored_on_another_sharing_the_cluster() {
    let _cluster = cluster_shared();
    let _slot = GuestSlot::take();
    let name = "vmsnap-t17-move";
    let clone = "vmsnap-t17-move-b";
    let _undefine = Undefine(clone);
    let vm = rbd_vm(name);
    let bus_a = PrivateBus::start();
    let host_a = Daemon::start(&bus_a, &config(""));
    vmsnap_tests::wait_agent_connected(&host_a, name);
    vm.write_file("f1", 200 << 10);
    let at_s1 = vm.guest_checksums();
    created(&host_a, name, "s1");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s1.json");
    let file_arg = file.to_str().unwrap();
    let exported = host_a.ctl(&["snapshot", "export", name, "s1", "--file", file_arg]);
    assert_eq!(exported.code, Some(0), "{exported:?}");
    let again = host_a.ctl(&["snapshot", "export", name, "s1", "--file", file_arg]);
    assert!(again.failure().contains("already exists"));

    let bus_b = PrivateBus::start();
    let host_b = Daemon::start(&bus_b, &config("verify_interval = \"1s\"\n"));
    // Tampered with: refused in one line, nothing recorded.
    let record = std::fs::read_to_string(&file).unwrap();
    let tampered = dir.path().join("tampered.json");
    std::fs::write(
        &tampered,
        record.replace("\"pool\": \"vmsnap\"", "\"pool\": \"../etc\""),
    )
    .unwrap();
    let refused = host_b.ctl(&["snapshot", "import", tampered.to_str().unwrap()]);
    assert!(refused.failure().contains("POOL"), "{refused:?}");
    assert!(vmsnap_tests::snapshot_list(&host_b, name).is_empty());

    let imported = host_b
        .ctl(&["snapshot", "import", file_arg, "--output", "json"])
        .json();
    assert_eq!(imported["name"], "s1", "{imported}");
    assert_eq!(imported["phase"], "Succeeded", "{imported}");
    assert_eq!(imported["readyToUse"], true, "{imported}");
    let twice = host_b.ctl(&["snapshot", "import", file_arg]);
    assert!(
        twice.failure().contains("already has a snapshot named"),
        "{twice:?}"
    );

    let restored = host_b
        .ctl(&[
            "restore", name, "s1", "--target", clone, "--start", "--output", "json",
        ])
        .json();
    assert_eq!(restored["phase"], "Succeeded", "{restored}");
    vmsnap_tests::wait_guest_ready(clone);
    assert_eq!(
        fresh_checksums(clone),
        at_s1,
        "host B's new VM sees s1's data"
    );

    // Deleted through host A: host B's copy is no longer ready (the cluster is the truth).
    let deleted = host_a.ctl(&["snapshot", "delete", name, "s1"]);
    assert_eq!(deleted.code, Some(0), "{deleted:?}");
    let stale = wait_for(Duration::from_secs(30), "host B to see it gone", || {
        let shown = vmsnap_tests::show_snapshot(&host_b, name, "s1");
        (shown["readyToUse"] == false).then_some(shown)
    });
    assert!(
        stale["error"].as_str().unwrap().contains("is missing"),
        "{stale}"
    );
    assert_eq!(fresh_checksums(clone), at_s1, "the clone keeps its data");

    // A snapshot of a file disk stays on its host.
    let local = ScratchVm::define("vmsnap-t17-local", ScratchOptions::default(), &[]);
    vmsnap_tests::wait_in_inventory(&host_a, &local);
    created(&host_a, &local.name, "l1");
    let stays = host_a.ctl(&["snapshot", "export", &local.name, "l1"]);
    assert!(stays.failure().contains("on this host"), "{stays:?}");
    drop(vm);
    drop(_undefine);
    purge_images(name);
}

/// Three snapshots of a shut-off RBD VM, one of them restored as a new VM (whose disk is a
/// clone of it), deleted in every order: after each delete the other snapshots, the VM's disk
/// and the clone hold what they held, and no vmsnap RBD snapshot is left without its record.
#[test]
fn rbd_snapshots_deleted_in_every_order_change_nothing_else() {
    let _cluster = cluster_shared();
    let name = "vmsnap-t17-order";
    let clone = "vmsnap-t17-order-clone";
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config(""));
    let orders = [
        ["s1", "s2", "s3"],
        ["s1", "s3", "s2"],
        ["s2", "s1", "s3"],
        ["s2", "s3", "s1"],
        ["s3", "s1", "s2"],
        ["s3", "s2", "s1"],
    ];
    for order in orders {
        let _undefine = Undefine(clone);
        vmsnap_tests::remove_domain(name);
        purge_images(name);
        make_image(name, "64M");
        let vm = ScratchVm::define(
            name,
            ScratchOptions {
                rbd_image: Some(name.to_string()),
                ..Default::default()
            },
            &[],
        );
        vmsnap_tests::wait_in_inventory(&daemon, &vm);
        let mut held = std::collections::BTreeMap::new();
        for (i, s) in ["s1", "s2", "s3"].into_iter().enumerate() {
            write_pattern(name, 0x11 * (i as u8 + 1), 1024 + 128 * i as u64);
            let taken = created(&daemon, name, s);
            held.insert(s, (spec_of(&taken, "vda"), String::new()));
        }
        for (spec, sum) in held.values_mut() {
            *sum = content(spec);
        }
        write_pattern(name, 0x44, 2048);
        let disk = content(&vm.disk_source());
        let restored = daemon
            .ctl(&["restore", name, "s2", "--target", clone, "--output", "json"])
            .json();
        assert_eq!(restored["phase"], "Succeeded", "{restored}");
        let clone_disk = virsh(&["domblklist", clone])
            .lines()
            .find_map(|l| l.trim().strip_prefix("vda").map(|s| s.trim().to_string()))
            .unwrap();
        let clone_sum = content(&clone_disk);
        assert_eq!(clone_sum, held["s2"].1, "the clone holds s2");
        for (i, s) in order.iter().enumerate() {
            let deleted = daemon.ctl(&["snapshot", "delete", name, s]);
            assert_eq!(deleted.code, Some(0), "{order:?}: {deleted:?}");
            for kept in &order[i + 1..] {
                assert_eq!(
                    content(&held[kept].0),
                    held[kept].1,
                    "{order:?}: {kept} changed"
                );
            }
            assert_eq!(
                content(&vm.disk_source()),
                disk,
                "{order:?}: the disk changed"
            );
            assert_eq!(
                content(&clone_disk),
                clone_sum,
                "{order:?}: the clone changed"
            );
        }
        assert!(
            !snaps_of(name).iter().any(|s| s.starts_with("vmsnap-")),
            "{order:?}: {:?}",
            snaps_of(name)
        );
        drop(vm);
    }
    purge_images(name);
    purge_images(clone);
}
