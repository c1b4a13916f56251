//! vmsnapd end to end on real LVM. This host's kernel has no device-mapper, so everything runs
//! inside one lab TCG guest ([`LvmGuest`]): a volume group on a second disk with thin and thick
//! LVs, a dbus-daemon, vmsnapd with libvirt's test driver (`test:///<node.xml>`, in-process)
//! standing in for the hypervisor, and vmsnapctl driving it. The test-driver domains use the LVs
//! as their disks; the test writes and checksums the LVs directly (nothing runs on them) and
//! checks what a user would: the data after restores, `lvs`, phases and errors.
//!
//! One guest for every scenario (boots are slow under TCG), in order:
//!   a. two snapshots of a thin + thick VM, restores back and forth, data and other snapshots;
//!   b. vmsnapd killed before each LVM step of a restore (thin and thick), then restarted: the
//!      restore settles with all the old data or all the snapshot's, and no LV missing or extra;
//!   c. deleting a snapshot removes its LVs only;
//!   d. a thick snapshot that overflows fails, and is not restorable;
//!   e. a VM with a file disk and an LV: its snapshot fails (the test driver makes no disk-only
//!      snapshots) and leaves no snapshot LV behind;
//!   f. restore as a new VM: a thin snapshot becomes the new VM's own thin LV with the
//!      snapshot's data; a thick one is refused, changing nothing;
//!   g. an LVM failure mid-snapshot (no space left for the thick snapshot, after the thin one
//!      was taken): Failed with LVM's own message, and no snapshot LV left behind.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmsnap_tests::{GuestSlot, LvmGuest, LvmLayout, LVM_GUEST_LAB, LVM_GUEST_VG};

const GUEST: &str = "vmsnap-lvm-daemon";
/// Thin LV vda and thick LV vdb.
const VM: &str = "lvm-vm";
const VM_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";
/// One thick LV, for the overflow.
const SMALL_VM: &str = "lvm-small";
/// A raw file (vda) and a thin LV (vdb).
const MIXED_VM: &str = "lvm-mixed";
/// One thin LV (vda), to be restored as a new VM.
const THIN_VM: &str = "lvm-thin";
const MIB: u64 = 1 << 20;
/// Size of every LV, MiB.
const LV_MIB: u64 = 32;

fn node_xml() -> String {
    let domain = |name: &str, uuid: &str, disks: &str| {
        format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>\
             <devices>{disks}<channel type='unix'>\
             <target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>\n"
        )
    };
    let lv = |lv: &str, target: &str| {
        format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='/dev/{LVM_GUEST_VG}/{lv}'/><target dev='{target}' bus='virtio'/></disk>"
        )
    };
    format!(
        "<node>\n{}{}{}{}</node>\n",
        domain(
            VM,
            VM_UUID,
            &format!("{}{}", lv("thin0", "vda"), lv("thick0", "vdb"))
        ),
        domain(
            SMALL_VM,
            "0d1e8a55-5b7e-4c8e-9a0e-2f6a7f3c1d01",
            &lv("thick1", "vda")
        ),
        domain(
            MIXED_VM,
            "0d1e8a55-5b7e-4c8e-9a0e-2f6a7f3c1d02",
            &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
                 <source file='{LVM_GUEST_LAB}/mixed-vda.raw'/><target dev='vda' bus='virtio'/></disk>{}",
                lv("thin1", "vdb")
            )
        ),
        domain(
            THIN_VM,
            "0d1e8a55-5b7e-4c8e-9a0e-2f6a7f3c1d03",
            &lv("thin2", "vda")
        ),
    )
}

/// vmsnapd's config in the guest; `lvm` is the `[lvm]` table's body.
fn config(lvm: &str) -> String {
    format!(
        "libvirt_uri = \"test://{LVM_GUEST_LAB}/node.xml\"\npolkit = false\n\
         refresh_interval = \"500ms\"\nquiesce = \"always\"\n[lvm]\n{lvm}"
    )
}

/// The fill check's interval outside the overflow scenario: each check is an `lvs`, about half
/// a second of the guest's CPU under TCG, so a check every second starved every other command.
const FILL_CHECK: Duration = Duration::from_secs(5);

/// Thick snapshots of 16 MiB (half of each 32 MiB LV): room for every write of scenarios a-c.
const ROOMY: &str = "thick_snapshot_size = \"50%\"\nthick_snapshot_min_size = \"4MiB\"\n\
                     fill_check_interval = \"5s\"\n";
/// Thick snapshots of 4 MiB, for the overflow, with a warning past 40% full, checked every
/// second so the overflow shows soon.
const TIGHT: &str = "thick_snapshot_size = \"4MiB\"\nthick_snapshot_min_size = \"4MiB\"\n\
                     fill_warning_percent = 40.0\nfill_check_interval = \"1s\"\n";

struct Lab {
    guest: LvmGuest,
}

impl Lab {
    /// Writes `mib` MiB of random data at `offset_mib` into the LV.
    fn write(&self, lv: &str, offset_mib: u64, mib: u64) {
        self.guest.exec(&format!(
            "dd if=/dev/urandom of=/dev/{LVM_GUEST_VG}/{lv} bs=1M seek={offset_mib} count={mib} \
             conv=notrunc,fsync 2>/dev/null && sync"
        ));
    }

    /// SHA-256 of a whole LV (by name) or device path, read past the page cache.
    fn sum(&self, lv: &str) -> String {
        let path = if lv.starts_with('/') {
            lv.to_string()
        } else {
            format!("/dev/{LVM_GUEST_VG}/{lv}")
        };
        self.guest.exec("sync; echo 3 > /proc/sys/vm/drop_caches");
        self.guest.checksum(&path)
    }

    /// Checksums of the VM's two disks.
    fn vm_sums(&self) -> [String; 2] {
        [self.sum("thin0"), self.sum("thick0")]
    }

    /// `snapshot create`, which must succeed; the snapshot's JSON.
    fn snapshot(&self, vm: &str, name: &str) -> Value {
        let out = self
            .guest
            .ctl(&["snapshot", "create", vm, name, "--output", "json"]);
        assert_eq!(
            out.code,
            Some(0),
            "snapshot {vm}/{name} failed: {out:?}\n{}",
            self.problems()
        );
        out.json()
    }

    fn show(&self, vm: &str, name: &str) -> Value {
        self.guest.ctl_json(&["snapshot", "show", vm, name])
    }

    /// `restore VM SNAPSHOT --stop [extra]`, which must succeed; the restore's JSON.
    fn restore(&self, vm: &str, snapshot: &str, extra: &[&str]) -> Value {
        let mut args = vec!["restore", vm, snapshot, "--stop", "--output", "json"];
        args.extend(extra);
        let out = self.guest.ctl(&args);
        assert_eq!(
            out.code,
            Some(0),
            "restore {vm} {snapshot} failed: {out:?}\n{}",
            self.problems()
        );
        let restore = out.json();
        assert_eq!(restore["phase"], "Succeeded", "{restore:#}");
        restore
    }

    /// The snapshot LV paths of a snapshot's JSON, by disk target.
    fn snapshot_lvs(snapshot: &Value) -> BTreeMap<String, String> {
        snapshot["snapshotVolumes"]["includedVolumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                assert_eq!(v["backend"], "lvm", "{snapshot:#}");
                (
                    v["target"].as_str().unwrap().to_string(),
                    v["image"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Checksums of a snapshot's LVs, by disk target.
    fn snapshot_sums(&self, snapshot: &Value) -> BTreeMap<String, String> {
        Self::snapshot_lvs(snapshot)
            .into_iter()
            .map(|(target, lv)| (target, self.sum(&lv)))
            .collect()
    }

    /// WARN and ERROR lines of vmsnapd's log, for failure messages.
    fn problems(&self) -> String {
        format!(
            "vmsnapd problems:\n{}",
            self.guest.daemon_problems().join("\n")
        )
    }

    /// Every snapshot of every VM, by name.
    fn snapshots(&self) -> Vec<Value> {
        self.guest
            .ctl_json(&["snapshot", "list"])
            .as_array()
            .unwrap()
            .clone()
    }

    /// The LVs tagged `vmsnap`: name -> tags.
    fn tagged_lvs(&self) -> BTreeMap<String, Vec<String>> {
        self.guest
            .lvs()
            .iter()
            .filter_map(|lv| {
                let tags: Vec<String> = lv["lv_tags"]
                    .as_str()
                    .unwrap()
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                tags.iter()
                    .any(|t| t == "vmsnap")
                    .then(|| (lv["lv_name"].as_str().unwrap().to_string(), tags))
            })
            .collect()
    }

    /// The LVM invariant after any operation has settled: the VG holds the pool, the origins,
    /// and exactly the snapshot LVs of existing snapshots (tagged with their snapshot), nothing
    /// else: no half-made, renamed-away or orphaned LV.
    fn assert_lvs_consistent(&self) {
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        for snapshot in self.snapshots() {
            if snapshot["phase"] != "Succeeded" {
                continue;
            }
            for lv in Self::snapshot_lvs(&snapshot).values() {
                let name = lv.rsplit('/').next().unwrap().to_string();
                expected.insert(name, snapshot["uuid"].as_str().unwrap().to_string());
            }
        }
        let tagged = self.tagged_lvs();
        for (name, uuid) in &expected {
            let tags = tagged
                .get(name)
                .unwrap_or_else(|| panic!("snapshot LV {name} is missing: {tagged:#?}"));
            assert!(
                tags.contains(&format!("vmsnap-snap-{uuid}")),
                "{name} lacks its snapshot's tag: {tags:?}"
            );
        }
        for name in tagged.keys() {
            assert!(
                expected.contains_key(name),
                "{name} is tagged vmsnap but belongs to no snapshot: {tagged:#?}"
            );
        }
        let mut names = self.guest.lv_names();
        names.retain(|n| !expected.contains_key(n));
        assert_eq!(
            names,
            ["pool", "thick0", "thick1", "thin0", "thin1", "thin2"],
            "LVs besides the origins and the snapshots' LVs"
        );
    }

    /// Waits until the newest restore has left InProgress; returns it.
    fn settled_restore(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = self.guest.ctl_json(&["restore", "list"]);
            let last = list.as_array().unwrap().last().unwrap().clone();
            if last["phase"] != "InProgress" {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "restore still in progress: {last:#}\n{}",
                self.guest.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn vmsnapd_on_real_lvm() {
    let _slot = GuestSlot::take();
    let mut guest = LvmGuest::boot(
        GUEST,
        &LvmLayout {
            pool_mib: 256,
            thin: vec![
                ("thin0".into(), LV_MIB),
                ("thin1".into(), LV_MIB),
                ("thin2".into(), LV_MIB),
            ],
            thick: vec![("thick0".into(), LV_MIB), ("thick1".into(), LV_MIB)],
        },
    );
    guest.write_file(&format!("{LVM_GUEST_LAB}/node.xml"), node_xml().as_bytes());
    guest.exec(&format!(
        "dd if=/dev/zero of={LVM_GUEST_LAB}/mixed-vda.raw bs=1M count=4 2>/dev/null"
    ));
    guest.start_daemon(&config(ROOMY), &[]);
    let mut lab = Lab { guest };

    // The inventory: both LVs are LVM disks.
    let vm = lab.guest.ctl_json(&["vm", "show", VM]);
    let backends: Vec<(&str, &str)> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["target"].as_str().unwrap(),
                d["backend"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(backends, [("vda", "lvm"), ("vdb", "lvm")], "{vm:#}");

    // On a failure, vmsnapd's log tells more than the assertion.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario_data(&lab);
        eprintln!("lvm_daemon: a. data: passed");
        scenario_crashes(&mut lab);
        eprintln!("lvm_daemon: b. crashes: passed");
        scenario_delete(&lab);
        eprintln!("lvm_daemon: c. delete: passed");
        scenario_overflow(&mut lab);
        eprintln!("lvm_daemon: d. overflow: passed");
        scenario_mixed(&lab);
        eprintln!("lvm_daemon: e. mixed: passed");
        scenario_new_vm(&lab);
        eprintln!("lvm_daemon: f. new VM: passed");
        scenario_lvm_failure(&lab);
        eprintln!("lvm_daemon: g. LVM failure: passed");
    }));
    if let Err(panic) = ran {
        let log = lab.guest.daemon_log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "vmsnapd's log in the guest (last 150 lines):\n{}",
            lines[lines.len().saturating_sub(150)..].join("\n")
        );
        std::panic::resume_unwind(panic);
    }
}

/// a. Snapshots keep the data of the moment; restores bring it back, in any order and more than
/// once, and leave every snapshot LV as it was.
fn scenario_data(lab: &Lab) {
    lab.write("thin0", 0, 8);
    lab.write("thick0", 0, 8);
    let data0 = lab.vm_sums();

    let s1 = lab.snapshot(VM, "s1");
    assert_eq!(s1["phase"], "Succeeded", "{s1:#}");
    // The test driver simulates the freeze.
    let indications: Vec<&str> = s1["indications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(
        indications.contains(&"Online") && indications.contains(&"GuestAgent"),
        "{s1:#}"
    );
    let s1_uuid = s1["uuid"].as_str().unwrap();
    let short = &s1_uuid[..8];
    let s1_lvs = Lab::snapshot_lvs(&s1);
    assert_eq!(
        s1_lvs,
        BTreeMap::from([
            (
                "vda".to_string(),
                format!("/dev/{LVM_GUEST_VG}/thin0.vmsnap-{short}")
            ),
            (
                "vdb".to_string(),
                format!("/dev/{LVM_GUEST_VG}/thick0.vmsnap-{short}")
            ),
        ])
    );
    // LVM's own view: a thin snapshot in the pool, a classic snapshot of 16 MiB, both tagged.
    let lvs = lab.guest.lvs();
    let lv = |name: &str| -> Value {
        lvs.iter()
            .find(|l| l["lv_name"] == name)
            .unwrap_or_else(|| panic!("no LV {name}: {lvs:#?}"))
            .clone()
    };
    let thin_snap = lv(&format!("thin0.vmsnap-{short}"));
    assert_eq!(thin_snap["origin"], "thin0", "{thin_snap}");
    assert_eq!(thin_snap["pool_lv"], "pool", "{thin_snap}");
    let thick_snap = lv(&format!("thick0.vmsnap-{short}"));
    assert_eq!(thick_snap["origin"], "thick0", "{thick_snap}");
    assert_eq!(
        thick_snap["lv_size"],
        (16 * MIB).to_string(),
        "{thick_snap}"
    );
    for snap in [&thin_snap, &thick_snap] {
        let tags = snap["lv_tags"].as_str().unwrap();
        for tag in [
            "vmsnap".to_string(),
            format!("vmsnap-vm-{VM_UUID}"),
            format!("vmsnap-snap-{s1_uuid}"),
        ] {
            assert!(tags.split(',').any(|t| t == tag), "{tag} missing: {snap}");
        }
    }
    assert_eq!(
        lab.snapshot_sums(&s1).into_values().collect::<Vec<_>>(),
        data0,
        "s1's LVs hold the data of the moment"
    );

    lab.write("thin0", 2, 4);
    lab.write("thick0", 2, 4);
    let data1 = lab.vm_sums();
    let s2 = lab.snapshot(VM, "s2");
    lab.write("thin0", 10, 4);
    lab.write("thick0", 10, 4);
    let data2 = lab.vm_sums();
    assert_ne!(data1, data0);
    assert_ne!(data2, data1);
    let s1_sums = lab.snapshot_sums(&s1);
    let s2_sums = lab.snapshot_sums(&s2);
    assert_eq!(s2_sums.values().cloned().collect::<Vec<_>>(), data1);
    // The next fill check shows the 4 MiB changed since in s2's thick COW space.
    let deadline = Instant::now() + FILL_CHECK * 3;
    loop {
        let fill = lab.show(VM, "s2")["cowFillPercent"].as_f64().unwrap();
        if fill > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "s2's thick COW space holds the 4 MiB changed since, yet cowFillPercent stays {fill}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // An LV in use (here: held open by a process) is not restored over: the restore fails
    // before it changes anything (no safety snapshot either).
    let lvs_before = lab.guest.lv_names();
    lab.guest.exec(&format!(
        "setsid sh -c 'exec sleep 600' </dev/{LVM_GUEST_VG}/thick0 >/dev/null 2>&1 &
         echo $! >/run/holder.pid"
    ));
    let refused = lab
        .guest
        .ctl(&["restore", VM, "s1", "--stop", "--output", "json"]);
    lab.guest.exec("kill $(cat /run/holder.pid)");
    assert_eq!(refused.code, Some(1), "{refused:?}");
    let failed: Value = serde_json::from_str(&refused.stdout).unwrap();
    assert_eq!(failed["phase"], "Failed", "{failed:#}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("thick0 is open"), "{error}");
    assert_eq!(lab.vm_sums(), data2, "a refused restore changes nothing");
    assert_eq!(lab.guest.lv_names(), lvs_before);

    // Back to s1, then to s2, then to s1 again; the safety snapshot of the first restore holds
    // what the disks had.
    let r1 = lab.restore(VM, "s1", &[]);
    assert_eq!(lab.vm_sums(), data0, "restore to s1");
    assert_eq!(
        r1["restores"],
        serde_json::json!([
            {"target": "vda", "fromImage": s1_lvs["vda"], "toImage": format!("/dev/{LVM_GUEST_VG}/thin0")},
            {"target": "vdb", "fromImage": s1_lvs["vdb"], "toImage": format!("/dev/{LVM_GUEST_VG}/thick0")},
        ]),
        "{r1:#}"
    );
    assert_eq!(lab.guest.ctl_json(&["vm", "show", VM])["state"], "shut-off");
    let safety = r1["safetySnapshot"].as_str().unwrap().to_string();
    assert!(!safety.is_empty(), "{r1:#}");
    lab.restore(VM, "s2", &["--no-safety-snapshot"]);
    assert_eq!(lab.vm_sums(), data1, "restore to s2");
    lab.restore(VM, "s1", &["--no-safety-snapshot"]);
    assert_eq!(lab.vm_sums(), data0, "restore to s1 again");
    assert_eq!(
        lab.snapshot_sums(&s1),
        s1_sums,
        "s1's LVs after the restores"
    );
    assert_eq!(
        lab.snapshot_sums(&s2),
        s2_sums,
        "s2's LVs after the restores"
    );
    lab.restore(VM, &safety, &["--no-safety-snapshot", "--start"]);
    assert_eq!(lab.vm_sums(), data2, "restore to the safety snapshot");
    assert_eq!(lab.guest.ctl_json(&["vm", "show", VM])["state"], "running");
    // s1's thick LV was merged and taken again, with its size and tags.
    let retaken = lab
        .guest
        .lvs()
        .into_iter()
        .find(|l| l["lv_name"] == format!("thick0.vmsnap-{short}"))
        .unwrap();
    assert_eq!(retaken["lv_size"], (16 * MIB).to_string(), "{retaken}");
    assert_eq!(retaken["origin"], "thick0", "{retaken}");
    for name in ["s1", "s2", safety.as_str()] {
        assert_eq!(lab.show(VM, name)["phase"], "Succeeded");
    }
    lab.guest.ctl(&["snapshot", "delete", VM, &safety]).ok();
    lab.assert_lvs_consistent();
}

/// b. vmsnapd killed before an LVM step of a restore (VMSNAP_TEST_CRASH_AT), then started again
/// without it: the restore settles, and the disks hold either all the data they had before or
/// all the snapshot's, never a mix, and no LV is missing or left over.
fn scenario_crashes(lab: &mut Lab) {
    let s2 = lab.show(VM, "s2");
    let s2_sums = lab.snapshot_sums(&s2);
    let target: Vec<String> = s2_sums.values().cloned().collect();
    for (i, step) in [
        "create-new",
        "rename-origin-to-old",
        "rename-new-to-origin",
        "remove-old",
        "untag",
        "merge",
        "retake",
    ]
    .into_iter()
    .enumerate()
    {
        // Different data than s2's before each attempt.
        lab.write("thin0", 20, 2);
        lab.write("thick0", 20, 2);
        let before = lab.vm_sums();
        assert_ne!(before.to_vec(), target);

        let restores = lab.guest.ctl_json(&["restore", "list"]);
        let restores = restores.as_array().unwrap().len();
        let crash = format!("restore-lvm-{step}");
        lab.guest
            .restart_daemon(&[("VMSNAP_TEST_CRASH_AT", crash.as_str())]);
        let mut args = vec![
            "restore",
            VM,
            "s2",
            "--stop",
            "--no-wait",
            "--output",
            "json",
        ];
        if i % 2 == 1 {
            args.push("--no-safety-snapshot");
        }
        let started = lab.guest.ctl(&args);
        // vmsnapctl may see vmsnapd vanish before it answers.
        if started.code != Some(0) {
            eprintln!("lvm_daemon: restore with a crash at {step}: {started:?}");
        }
        lab.guest.wait_daemon_exit(Duration::from_secs(120));
        let log = lab.guest.daemon_log();
        assert!(
            log.lines()
                .any(|l| l.contains("VMSNAP_TEST_CRASH_AT: aborting") && l.contains(&crash)),
            "vmsnapd did not stop at {crash}:\n{log}"
        );
        lab.guest.restart_daemon(&[]);
        let restore = lab.settled_restore();
        assert_eq!(
            lab.guest
                .ctl_json(&["restore", "list"])
                .as_array()
                .unwrap()
                .len(),
            restores + 1,
            "the restore with a crash at {step} is listed"
        );
        let after = lab.vm_sums();
        eprintln!(
            "lvm_daemon: crash at {step}: restore {} {}",
            restore["phase"], restore["error"]
        );
        match restore["phase"].as_str().unwrap() {
            "Succeeded" => assert_eq!(after.to_vec(), target, "crash at {step}: {restore:#}"),
            "Failed" => assert_eq!(after, before, "crash at {step}: {restore:#}"),
            other => panic!("crash at {step}: phase {other}: {restore:#}"),
        }
        assert_eq!(
            lab.snapshot_sums(&s2),
            s2_sums,
            "s2's LVs after the crash at {step}"
        );
        lab.assert_lvs_consistent();
        // Safety snapshots of these restores go again, to keep the VG small.
        for snapshot in lab.snapshots() {
            let name = snapshot["name"].as_str().unwrap();
            if name.starts_with("pre-restore-") {
                lab.guest.ctl(&["snapshot", "delete", VM, name]).ok();
            }
        }
        lab.assert_lvs_consistent();
    }
    // s2 still restores normally.
    lab.restore(VM, "s2", &["--no-safety-snapshot"]);
    assert_eq!(lab.vm_sums().to_vec(), target);
}

/// c. Deleting a snapshot removes its LVs and nothing else.
fn scenario_delete(lab: &Lab) {
    let s1 = lab.show(VM, "s1");
    let s2 = lab.show(VM, "s2");
    let s2_sums = lab.snapshot_sums(&s2);
    let origins = lab.vm_sums();
    lab.guest.ctl(&["snapshot", "delete", VM, "s1"]).ok();
    let names = lab.guest.lv_names();
    for lv in Lab::snapshot_lvs(&s1).values() {
        let name = lv.rsplit('/').next().unwrap();
        assert!(
            !names.iter().any(|n| n == name),
            "{name} still there: {names:?}"
        );
    }
    let tag = format!("vmsnap-snap-{}", s1["uuid"].as_str().unwrap());
    assert!(
        !lab.tagged_lvs().values().any(|tags| tags.contains(&tag)),
        "an LV still carries {tag}"
    );
    assert_eq!(lab.snapshot_sums(&s2), s2_sums);
    assert_eq!(lab.vm_sums(), origins);
    assert!(lab
        .guest
        .ctl(&["snapshot", "show", VM, "s1"])
        .failure()
        .contains("s1"));
    lab.assert_lvs_consistent();
}

/// d. A thick snapshot whose copy-on-write space overflows fails, says why, and cannot be
/// restored; the other snapshots are untouched.
fn scenario_overflow(lab: &mut Lab) {
    lab.guest.start_daemon(&config(TIGHT), &[]);
    let s2_sums = lab.snapshot_sums(&lab.show(VM, "s2"));
    lab.write("thick1", 0, 1);
    let snap = lab.snapshot(SMALL_VM, "small");
    let lv = Lab::snapshot_lvs(&snap)["vda"].clone();
    let size = lab
        .guest
        .lvs()
        .iter()
        .find(|l| lv.ends_with(&format!("/{}", l["lv_name"].as_str().unwrap())))
        .unwrap()["lv_size"]
        .clone();
    assert_eq!(size, (4 * MIB).to_string(), "COW space of {lv}");

    // Half full: the fill shows.
    lab.write("thick1", 8, 2);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fill = lab.show(SMALL_VM, "small")["cowFillPercent"]
            .as_f64()
            .unwrap();
        if fill > 40.0 {
            assert!(fill < 100.0, "{fill}");
            break;
        }
        assert!(Instant::now() < deadline, "cowFillPercent stays at {fill}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Past fill_warning_percent vmsnapd warns, once (the same check set the fill).
    let warnings: Vec<String> = lab
        .guest
        .daemon_problems()
        .into_iter()
        .filter(|l| l.contains("copy-on-write space is") && l.contains("snapshot=small"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    // Overflow: more changes than 4 MiB.
    lab.write("thick1", 12, 8);
    let started = Instant::now();
    let failed = loop {
        let shown = lab.show(SMALL_VM, "small");
        if shown["phase"] == "Failed" {
            break shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the overflowed snapshot is still {}: {shown:#}\n{}",
            shown["phase"],
            lab.problems()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "lvm_daemon: overflow seen after {:?}: {}",
        started.elapsed(),
        failed["error"]
    );
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("overflow") && error.contains(&lv[5..]),
        "{failed:#}"
    );
    assert_eq!(failed["readyToUse"], false, "{failed:#}");
    let refused = lab.guest.ctl(&["restore", SMALL_VM, "small", "--stop"]);
    let message = refused.failure();
    assert!(message.contains("small"), "{message}");
    eprintln!("lvm_daemon: restore of the overflowed snapshot: {message}");
    assert_eq!(lab.snapshot_sums(&lab.show(VM, "s2")), s2_sums);
    assert_eq!(lab.show(VM, "s2")["phase"], "Succeeded");
    // Deleting the failed snapshot removes its (invalid) LV.
    lab.guest
        .ctl(&["snapshot", "delete", SMALL_VM, "small"])
        .ok();
    lab.assert_lvs_consistent();
}

/// e. A snapshot of a VM with a file disk and an LV fails with the test driver (no disk-only
/// snapshots there), after its LV snapshot was taken under the freeze: that LV is removed again.
fn scenario_mixed(lab: &Lab) {
    let before = lab.tagged_lvs();
    let out = lab
        .guest
        .ctl(&["snapshot", "create", MIXED_VM, "mixed", "--output", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    eprintln!(
        "lvm_daemon: mixed snapshot: {}",
        out.stderr.lines().last().unwrap_or_default()
    );
    let snap: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(snap["phase"], "Failed", "{snap:#}");
    assert_eq!(
        lab.tagged_lvs(),
        before,
        "no LV left by the failed snapshot"
    );
    // LVM's metadata archive shows the snapshot LV was made, then removed.
    let name = format!("thin1.vmsnap-{}", &snap["uuid"].as_str().unwrap()[..8]);
    let lv = format!("{LVM_GUEST_VG}/{name}");
    let history = lab
        .guest
        .exec("grep -h '^description' /etc/lvm/archive/*.vg");
    let ran = |command: &str| {
        history
            .lines()
            .any(|l| l.contains(&format!("'{command} ")) && l.contains(&name))
    };
    assert!(ran("lvcreate"), "{lv} was never created:\n{history}");
    assert!(ran("lvremove"), "{lv} was not removed:\n{history}");
    // The file disk's overlay is gone too.
    let files = lab.guest.exec(&format!("ls {LVM_GUEST_LAB}"));
    assert!(!files.contains(".qcow2"), "{files}");
    lab.assert_lvs_consistent();
}

/// f. Restore as a new VM: a thin snapshot becomes a new thin LV of the new VM, holding the
/// snapshot's data while the source keeps its own; a thick snapshot is refused up front.
fn scenario_new_vm(lab: &Lab) {
    // A VM with a thick disk cannot become a new VM without a full copy: refused, nothing made.
    let lvs_before = lab.guest.lv_names();
    let refused = lab.guest.ctl(&[
        "restore",
        VM,
        "s2",
        "--target",
        "lvm-vm-copy",
        "--output",
        "json",
    ]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    let failed: Value = serde_json::from_str(&refused.stdout).unwrap();
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("disk vdb is a thick LVM snapshot"),
        "{error}"
    );
    assert_eq!(
        lab.guest.lv_names(),
        lvs_before,
        "a refused restore makes no LV"
    );
    let vms = lab.guest.ctl_json(&["vm", "list"]);
    assert!(
        !vms.to_string().contains("lvm-vm-copy"),
        "no VM was defined: {vms:#}"
    );

    // A thin-only VM: its snapshot becomes a new VM with its own LV.
    lab.write("thin2", 0, 4);
    let at_snapshot = lab.sum("thin2");
    let snap = lab.snapshot(THIN_VM, "t1");
    lab.write("thin2", 0, 4);
    let source_now = lab.sum("thin2");
    assert_ne!(source_now, at_snapshot);
    let out = lab.guest.ctl(&[
        "restore",
        THIN_VM,
        "t1",
        "--target",
        "lvm-thin-copy",
        "--output",
        "json",
    ]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", lab.problems());
    let restore = out.json();
    assert_eq!(restore["phase"], "Succeeded", "{restore:#}");
    let copy_lv = restore["restores"][0]["toImage"]
        .as_str()
        .unwrap()
        .to_string();
    let short = &restore["uuid"].as_str().unwrap()[..8];
    assert_eq!(
        copy_lv,
        format!("/dev/{LVM_GUEST_VG}/lvm-thin-copy-vda-r{short}"),
        "{restore:#}"
    );
    assert_eq!(
        lab.sum(&copy_lv),
        at_snapshot,
        "the new VM's disk holds t1's data"
    );
    assert_eq!(lab.sum("thin2"), source_now, "the source VM keeps its data");
    assert_eq!(
        lab.snapshot_sums(&snap)["vda"],
        at_snapshot,
        "t1's LV is unchanged"
    );
    let copy = lab.guest.ctl_json(&["vm", "show", "lvm-thin-copy"]);
    assert_eq!(copy["disks"][0]["source"], copy_lv.as_str(), "{copy:#}");
    assert_eq!(copy["disks"][0]["backend"], "lvm", "{copy:#}");
    // The clone is the new VM's plain disk now: no restore marker left, not a vmsnap snapshot.
    let name = copy_lv.rsplit('/').next().unwrap();
    let lv = lab
        .guest
        .lvs()
        .into_iter()
        .find(|l| l["lv_name"] == name)
        .unwrap();
    assert_eq!(lv["lv_tags"], "", "{lv}");
}

/// g. The VG has no room for the thick snapshot (vdb) once the thin one (vda, in the pool) is
/// taken: the snapshot fails with LVM's own words, and the thin snapshot LV is removed again.
fn scenario_lvm_failure(lab: &Lab) {
    lab.guest.exec(&format!(
        "lvcreate -q -y -l 100%FREE -n filler {LVM_GUEST_VG} >/dev/null"
    ));
    let before = lab.tagged_lvs();
    let out = lab
        .guest
        .ctl(&["snapshot", "create", VM, "no-room", "--output", "json"]);
    lab.guest
        .exec(&format!("lvremove -q -y {LVM_GUEST_VG}/filler >/dev/null"));
    assert_eq!(out.code, Some(1), "{out:?}");
    let failed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(failed["phase"], "Failed", "{failed:#}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.starts_with("disk vdb: lvm lvcreate failed: ") && error.contains("free space"),
        "LVM's own message, on one line: {error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
    assert_eq!(lab.tagged_lvs(), before, "no snapshot LV left behind");
    // The thin snapshot had been made (LVM's metadata archive says so) and was removed.
    let name = format!("thin0.vmsnap-{}", &failed["uuid"].as_str().unwrap()[..8]);
    let history = lab
        .guest
        .exec("grep -h '^description' /etc/lvm/archive/*.vg");
    for command in ["lvcreate", "lvremove"] {
        assert!(
            history
                .lines()
                .any(|l| l.contains(&format!("'{command} ")) && l.contains(&name)),
            "no {command} of {name}:\n{history}"
        );
    }
    // Not assert_lvs_consistent: scenario f left the new VM's LV, which is no snapshot's.
    lab.guest.ctl(&["snapshot", "delete", VM, "no-room"]).ok();
}
