//! Snapshots of real TCG guests with real qemu-ga, through vmsnapctl, checked the way a user
//! would: the data written in the guest before a snapshot is in the snapshot's image; data
//! written after is not; deleting a snapshot changes no other snapshot and not the live disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use vmsnap_tests::{
    config_for, guest_exec, image_checksums, virsh, wait_for, Daemon, PrivateBus, ScratchOptions,
    ScratchVm, LAB_URI,
};
use vmsnap_tests::{image_of, show_snapshot as show};

fn daemon() -> (PrivateBus, Daemon) {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    (bus, daemon)
}

/// Waits until the daemon's inventory shows the VM (it polls libvirt).
fn wait_known(daemon: &Daemon, vm: &str) {
    wait_for(Duration::from_secs(20), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", vm]).code == Some(0)).then_some(())
    });
}

fn create(daemon: &Daemon, vm: &str, name: &str) -> Value {
    daemon
        .ctl(&["snapshot", "create", vm, name, "--output", "json"])
        .json()
}

fn indications(snapshot: &Value) -> Vec<String> {
    snapshot["indications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn online_snapshot_with_agent_holds_the_data_written_before_it() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-online");
    let (_bus, daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);

    vm.write_file("f1", 1 << 20);
    let before = vm.guest_checksums();
    let snap = create(&daemon, &vm.name, "before-upgrade");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(snap["readyToUse"], true);
    assert_eq!(indications(&snap), ["Online", "GuestAgent"]);
    assert!(snap["frozenFilesystems"].as_u64().unwrap() >= 1, "{snap}");
    assert!(snap["freezeDurationMs"].as_u64().unwrap() > 0, "{snap}");
    assert_eq!(snap["error"], Value::Null);
    // Guarded by the guard vmsnapd keeps standing by, connected before the create was asked.
    let log = daemon.log_text();
    assert!(log.contains("thaw guard taken from standby"), "{log}");

    // Written after: in the live disk, not in the snapshot.
    vm.write_file("f2", 1 << 20);
    let after = vm.guest_checksums();
    assert_ne!(before, after);
    let image = image_of(&snap);
    assert_eq!(image, vm.disk.to_str().unwrap());
    assert_eq!(image_checksums(&image), before);
    // The VM runs on, on its new overlay, thawed.
    assert_ne!(vm.disk_source(), image);
    let (code, out) = guest_exec(
        &vm.name,
        "touch /mnt/data/thawed && echo ok",
        Duration::from_secs(20),
    );
    assert_eq!((code, out.as_str()), (0, "ok\n"));

    let list = daemon
        .ctl(&["snapshot", "list", &vm.name, "--output", "json"])
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "before-upgrade");
    let table = daemon.ctl(&["snapshot", "list"]).ok().to_string();
    assert!(
        table.contains("before-upgrade") && table.contains("Online,GuestAgent"),
        "{table}"
    );
}

#[test]
fn online_snapshot_without_agent_is_crash_consistent() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let seed: &[(&str, &[u8])] = &[("f-seed", b"written before boot\n")];
    let vm = ScratchVm::define("vmsnap-t-noagent", ScratchOptions::default(), seed);
    vm.start(false);
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let expected = image_checksums(vm.disk.to_str().unwrap());
    assert!(expected.contains("f-seed"));

    let snap = create(&daemon, &vm.name, "crash");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(indications(&snap), ["Online", "NoGuestAgent"]);
    assert_eq!(snap["freezeDurationMs"], 0);
    assert_eq!(image_checksums(&image_of(&snap)), expected);
}

#[test]
fn paused_vm_is_snapshotted_without_freeze_and_stays_paused() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-paused");
    let (_bus, daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 256 << 10);
    let before = vm.guest_checksums();
    virsh(&["suspend", &vm.name]);
    wait_for(Duration::from_secs(20), "the paused state", || {
        let out = daemon
            .ctl(&["vm", "show", &vm.name, "--output", "json"])
            .json();
        (out["state"] == "paused").then_some(())
    });
    let snap = create(&daemon, &vm.name, "paused");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(indications(&snap), ["Online", "Paused"]);
    assert_eq!(snap["frozenFilesystems"], 0);
    assert_eq!(virsh(&["domstate", &vm.name]).trim(), "paused");
    virsh(&["resume", &vm.name]);
    assert_eq!(image_checksums(&image_of(&snap)), before);
}

#[test]
fn excluded_disks_are_refused_then_allowed_and_recorded() {
    let vm = ScratchVm::define(
        "vmsnap-t-excluded",
        ScratchOptions {
            cdrom: true,
            ..Default::default()
        },
        &[],
    );
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let images_before = vm.images();

    let refused = daemon.ctl(&["snapshot", "create", &vm.name, "s1"]);
    let message = refused.failure();
    assert!(
        message.contains("sda") && message.contains("cdrom"),
        "{message}"
    );
    assert!(message.contains("--allow-excluded"), "{message}");
    assert_eq!(
        daemon
            .ctl(&["snapshot", "list", &vm.name, "--output", "json"])
            .json(),
        serde_json::json!([])
    );
    assert_eq!(vm.images(), images_before);

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
    // Offline: no Online indication; the excluded cdrom makes it partial.
    assert_eq!(indications(&snap), ["PartialSnapshot"]);
    let excluded = &snap["snapshotVolumes"]["excludedVolumes"];
    assert_eq!(excluded[0]["target"], "sda");
    assert!(excluded[0]["reason"].as_str().unwrap().contains("cdrom"));
    // The shut-off VM's definition now points at the new overlay.
    assert_ne!(vm.disk_source(), vm.disk.to_str().unwrap());
}

#[test]
fn uefi_nvram_is_captured_with_the_snapshot() {
    let vm = ScratchVm::define(
        "vmsnap-t-nvram",
        ScratchOptions {
            nvram: true,
            ..Default::default()
        },
        &[],
    );
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let vars = std::fs::read(vm.dir.path().join("VARS.fd")).unwrap();
    let snap = create(&daemon, &vm.name, "uefi");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    let uuid = snap["uuid"].as_str().unwrap();
    let copy = daemon
        .state_dir()
        .join("snapshots")
        .join(vm.uuid())
        .join(uuid)
        .join("nvram");
    assert_eq!(std::fs::read(&copy).unwrap(), vars);
    // Deleting the snapshot removes the copy too.
    daemon.ctl(&["snapshot", "delete", &vm.name, "uefi"]).ok();
    assert!(!copy.exists());
}

#[test]
fn bad_and_duplicate_names_and_unknown_vm_change_nothing() {
    let vm = ScratchVm::define("vmsnap-t-names", ScratchOptions::default(), &[]);
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let long = "x".repeat(64);
    for bad in [".hidden", "-dash", "a b", "semi;colon", long.as_str()] {
        let out = daemon.ctl(&["snapshot", "create", &vm.name, "--", bad]);
        let message = out.failure();
        assert!(message.contains("snapshot name"), "{bad}: {message}");
    }
    assert_eq!(
        daemon
            .ctl(&["snapshot", "create", "vmsnap-t-nope", "ok"])
            .failure(),
        "vmsnapctl: VM 'vmsnap-t-nope' not found"
    );
    let images = vm.images();
    assert_eq!(images.len(), 1);
    create(&daemon, &vm.name, "ok");
    let images = vm.images();
    assert_eq!(images.len(), 2);
    let dup = daemon.ctl(&["snapshot", "create", &vm.name, "ok"]);
    assert_eq!(
        dup.failure(),
        format!(
            "vmsnapctl: VM '{}' already has a snapshot named 'ok'",
            vm.name
        )
    );
    assert_eq!(vm.images(), images);
    assert_eq!(
        daemon
            .ctl(&["snapshot", "show", &vm.name, "nope"])
            .failure(),
        format!("vmsnapctl: snapshot 'nope' of VM '{}' not found", vm.name)
    );
    assert_eq!(
        daemon
            .ctl(&["snapshot", "delete", &vm.name, "nope"])
            .failure(),
        format!("vmsnapctl: snapshot 'nope' of VM '{}' not found", vm.name)
    );
}

#[test]
fn a_second_operation_on_the_same_vm_is_busy() {
    let vm = ScratchVm::define("vmsnap-t-busy", ScratchOptions::default(), &[]);
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (first, second) = rt.block_on(async {
        let conn = zbus::connection::Builder::address(daemon.bus_address.as_str())
            .build()
            .await
            .unwrap();
        let manager = vmsnap_api::ManagerProxy::new(&conn).await.unwrap();
        let first = manager
            .create_snapshot(&vm.name, "one", Default::default())
            .await;
        let second = manager
            .create_snapshot(&vm.name, "two", Default::default())
            .await;
        (first, second)
    });
    assert!(first.is_ok(), "{first:?}");
    match second {
        Err(vmsnap_api::VmSnapError::Busy(message)) => {
            assert!(
                message.contains("snapshot 'one' is being created"),
                "{message}"
            )
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    wait_for(
        Duration::from_secs(30),
        "the first snapshot to settle",
        || (show(&daemon, &vm.name, "one")["phase"] == "Succeeded").then_some(()),
    );
    // Once settled, the VM takes work again.
    assert_eq!(create(&daemon, &vm.name, "two")["phase"], "Succeeded");
}

/// Checks every remaining snapshot's image and the live guest against what was recorded.
fn check_contents(
    daemon: &Daemon,
    vm: &ScratchVm,
    expected: &BTreeMap<String, String>,
    live: &str,
    online: bool,
) {
    for (name, sums) in expected {
        let snap = show(daemon, &vm.name, name);
        assert_eq!(snap["phase"], "Succeeded", "{snap}");
        assert_eq!(&image_checksums(&image_of(&snap)), sums, "snapshot {name}");
    }
    if online {
        assert_eq!(vm.guest_checksums(), live, "live disk");
    } else {
        assert_eq!(image_checksums(&vm.disk_source()), live, "live disk");
    }
}

fn delete_in_order(
    daemon: &Daemon,
    vm: &ScratchVm,
    mut expected: BTreeMap<String, String>,
    live: &str,
    order: &[&str],
    online: bool,
) {
    for name in order {
        let out = daemon.ctl(&["snapshot", "delete", &vm.name, name]);
        out.ok();
        expected.remove(*name);
        check_contents(daemon, vm, &expected, live, online);
        // One image per remaining snapshot plus the live top: nothing orphaned.
        assert_eq!(vm.images().len(), expected.len() + 1, "{:?}", vm.images());
    }
}

#[test]
fn deleting_online_in_any_order_keeps_every_other_snapshot_and_the_live_disk() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-delete");
    let (_bus, daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    for order in [
        ["b2", "b1", "b3"],
        ["b3", "b1", "b2"],
        ["b1", "b2", "b3"],
        ["b1", "b3", "b2"],
        ["b2", "b3", "b1"],
        ["b3", "b2", "b1"],
    ] {
        let mut expected = BTreeMap::new();
        for name in ["b1", "b2", "b3"] {
            vm.write_file(&format!("f-{}-{name}", order.join("")), 300 << 10);
            expected.insert(name.to_string(), vm.guest_checksums());
            assert_eq!(create(&daemon, &vm.name, name)["phase"], "Succeeded");
        }
        vm.write_file(&format!("f-{}-live", order.join("")), 100 << 10);
        let live = vm.guest_checksums();
        check_contents(&daemon, &vm, &expected, &live, true);
        delete_in_order(&daemon, &vm, expected, &live, &order, true);
        assert_eq!(vm.disk_source(), vm.disk.to_str().unwrap());
    }
}

#[test]
fn deleting_offline_in_any_order_keeps_every_other_snapshot_and_the_live_disk() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::define(
        "vmsnap-t-offdel",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    let (_bus, daemon) = daemon();
    wait_known(&daemon, &vm.name);
    let mut expected = BTreeMap::new();
    for name in ["o1", "o2", "o3"] {
        vm.start(true);
        vm.write_file(&format!("f-{name}"), 200 << 10);
        let sums = vm.guest_checksums();
        vmsnap_tests::shut_down_by_agent(&vm.name);
        expected.insert(name.to_string(), sums);
        let snap = create(&daemon, &vm.name, name);
        assert_eq!(snap["phase"], "Succeeded", "{snap}");
        assert!(indications(&snap).is_empty());
    }
    let live = image_checksums(&vm.disk_source());
    assert_eq!(&live, expected.get("o3").unwrap());
    delete_in_order(&daemon, &vm, expected, &live, &["o2", "o3", "o1"], false);
    assert_eq!(vm.disk_source(), vm.disk.to_str().unwrap());
    // And the VM still boots with everything in place.
    vm.start(true);
    assert_eq!(vm.guest_checksums(), live);
}

fn agent_frozen(vm: &str) -> bool {
    let out = std::process::Command::new("virsh")
        .args(["-c", LAB_URI, "qemu-agent-command", vm])
        .arg(r#"{"execute":"guest-fsfreeze-status"}"#)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("frozen")
        && !String::from_utf8_lossy(&out.stdout).contains("thawed")
}

#[test]
fn hung_agent_gives_a_crash_consistent_snapshot_or_fails_by_policy() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-hung");
    let bus = PrivateBus::start();
    let strict = Daemon::start(
        &bus,
        &format!("{}require_quiesce = true\n", config_for(LAB_URI)),
    );
    vmsnap_tests::wait_agent_connected(&strict, &vm.name);
    vm.write_file("f1", 128 << 10);
    let before = vm.guest_checksums();
    // The agent stops answering for 25 s, detached from the guest-exec that asks for it.
    vm.exec(
        "setsid sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 25; kill -CONT $(pidof qemu-ga)' \
         </dev/null >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_secs(2));
    let source = vm.disk_source();
    let images = vm.images();

    // require_quiesce: the snapshot fails and nothing changes.
    let out = strict.ctl(&["snapshot", "create", &vm.name, "strict", "--output", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let failed = show(&strict, &vm.name, "strict");
    assert_eq!(failed["phase"], "Failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("could not be frozen"),
        "{failed}"
    );
    assert_eq!(vm.disk_source(), source);
    assert_eq!(vm.images(), images);
    drop(strict);

    // Default policy: crash-consistent, recorded as QuiesceTimeout (the agent did not answer
    // the freeze in time), with the agent's error as its message.
    let lenient = Daemon::start(&bus, &config_for(LAB_URI));
    wait_known(&lenient, &vm.name);
    let snap = create(&lenient, &vm.name, "lenient");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(indications(&snap), ["Online", "QuiesceTimeout"]);
    let object = lenient
        .ctl(&["get", "vmsnapshot", "lenient", "-o", "json"])
        .json();
    let message = object["status"]["sourceIndications"][1]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("did not answer the freeze in time"),
        "{object}"
    );
    assert!(message.contains("not responding"), "{object}");
    assert_eq!(image_checksums(&image_of(&snap)), before);

    // Once the agent runs again, the guest is not frozen (no late freeze left behind).
    wait_for(Duration::from_secs(60), "the agent to answer again", || {
        let (code, _) = guest_exec(&vm.name, "true", Duration::from_secs(10));
        (code == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!agent_frozen(&vm.name));
    vm.write_file("f2", 4096);
}

#[test]
fn daemon_killed_mid_create_and_mid_delete_settles_on_restart() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-crash");
    let (_bus, mut daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 256 << 10);
    let keep_sums = vm.guest_checksums();
    assert_eq!(create(&daemon, &vm.name, "keep")["phase"], "Succeeded");

    // 1. Killed while the guest is frozen, before the disks are snapshotted: the thaw guard
    //    thaws at once; the restarted daemon marks the snapshot Failed and leaves no overlay.
    let images = vm.images();
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", "create-before-snapshot")]);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let _ = daemon.ctl(&["snapshot", "create", &vm.name, "frozen-crash", "--no-wait"]);
    assert!(!daemon.wait_exit(Duration::from_secs(30)).success());
    wait_for(
        Duration::from_secs(15),
        "the guard to thaw the guest",
        || (!agent_frozen(&vm.name)).then_some(()),
    );
    daemon.restart_with_env(&[]);
    wait_for(
        Duration::from_secs(30),
        "the interrupted snapshot to settle",
        || (show(&daemon, &vm.name, "frozen-crash")["phase"] == "Failed").then_some(()),
    );
    assert_eq!(vm.images(), images);
    vm.write_file("f2", 4096);

    // 2. Killed right after libvirt took the disk snapshot: the restarted daemon finds the
    //    overlays in use and settles the snapshot as Succeeded, with its data.
    let sums = vm.guest_checksums();
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", "create-after-snapshot")]);
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    let _ = daemon.ctl(&["snapshot", "create", &vm.name, "taken-crash", "--no-wait"]);
    assert!(!daemon.wait_exit(Duration::from_secs(30)).success());
    wait_for(
        Duration::from_secs(15),
        "the guard to thaw the guest",
        || (!agent_frozen(&vm.name)).then_some(()),
    );
    daemon.restart_with_env(&[]);
    wait_for(
        Duration::from_secs(30),
        "the interrupted snapshot to settle",
        || (show(&daemon, &vm.name, "taken-crash")["phase"] == "Succeeded").then_some(()),
    );
    let taken = show(&daemon, &vm.name, "taken-crash");
    assert_eq!(image_checksums(&image_of(&taken)), sums);

    // 3. Killed mid-merge while deleting: the restarted daemon finishes the delete; the other
    //    snapshots and the live disk keep their content.
    vm.write_file("f3", 128 << 10);
    let live = vm.guest_checksums();
    daemon.restart_with_env(&[("VMSNAP_TEST_CRASH_AT", "delete-mid-merge")]);
    wait_known(&daemon, &vm.name);
    let _ = daemon.ctl(&["snapshot", "delete", &vm.name, "taken-crash", "--no-wait"]);
    assert!(!daemon.wait_exit(Duration::from_secs(30)).success());
    daemon.restart_with_env(&[]);
    wait_for(
        Duration::from_secs(60),
        "the interrupted delete to finish",
        || {
            (daemon
                .ctl(&["snapshot", "show", &vm.name, "taken-crash"])
                .code
                == Some(1))
            .then_some(())
        },
    );
    let keep = show(&daemon, &vm.name, "keep");
    assert_eq!(keep["phase"], "Succeeded");
    assert_eq!(image_checksums(&image_of(&keep)), keep_sums);
    assert_eq!(vm.guest_checksums(), live);

    // The failed snapshot can be deleted; then only "keep" and the live overlay remain.
    daemon
        .ctl(&["snapshot", "delete", &vm.name, "frozen-crash"])
        .ok();
    assert_eq!(vm.images().len(), 2, "{:?}", vm.images());
}

#[test]
fn sigterm_during_a_snapshot_lets_it_finish() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t-sigterm");
    let (_bus, mut daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    vm.write_file("f1", 128 << 10);
    let sums = vm.guest_checksums();
    let _ = daemon.ctl(&["snapshot", "create", &vm.name, "inflight", "--no-wait"]);
    // Stop at once: the operation in flight finishes before vmsnapd exits.
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!agent_frozen(&vm.name));
    daemon.restart_with_env(&[]);
    let snap = show(&daemon, &vm.name, "inflight");
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(image_checksums(&image_of(&snap)), sums);
    assert!(daemon.log_text().contains("waiting for running operations"));
}

/// A disk left out of the snapshot (here a shareable one, which others may write) is not
/// frozen either: only the filesystems on the captured disks stop (the agent's
/// guest-fsfreeze-freeze-list), so the excluded disk's users are not held up.
#[test]
fn with_a_disk_left_out_only_the_captured_disks_filesystems_freeze() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::define(
        "vmsnap-t-freeze-list",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[],
    );
    let shared = vm.disk.with_file_name("shared.raw");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/make-data-disk.sh");
    vmsnap_tests::run(
        "bash",
        &[script.to_str().unwrap(), shared.to_str().unwrap(), "16M"],
    );
    virsh(&[
        "attach-disk",
        &vm.name,
        shared.to_str().unwrap(),
        "vdb",
        "--config",
        "--targetbus",
        "virtio",
        "--subdriver",
        "raw",
        "--cache",
        "none",
        "--mode",
        "shareable",
    ]);
    vm.start(true);
    vm.exec("mkdir -p /mnt/other && mount /dev/vdb /mnt/other");
    let (_bus, daemon) = daemon();
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);

    let snap = daemon
        .ctl(&[
            "snapshot",
            "create",
            &vm.name,
            "one-disk",
            "--allow-excluded",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(snap["phase"], "Succeeded", "{snap}");
    assert_eq!(
        indications(&snap),
        ["Online", "PartialSnapshot", "GuestAgent"]
    );
    assert_eq!(
        snap["snapshotVolumes"]["excludedVolumes"][0]["target"], "vdb",
        "{snap}"
    );
    // /mnt/data (vda) only; freezing everything would have counted /mnt/other too.
    assert_eq!(snap["frozenFilesystems"], 1, "{snap}");
    let (code, out) = guest_exec(
        &vm.name,
        "touch /mnt/data/thawed /mnt/other/thawed && echo ok",
        Duration::from_secs(20),
    );
    assert_eq!((code, out.as_str()), (0, "ok\n"));
}
