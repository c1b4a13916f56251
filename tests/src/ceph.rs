//! The lab's Ceph cluster (lab/ceph-up.sh) as the RBD tests reach it: as its admin, from the
//! host, never through vmsnap.

use std::process::Command;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::Value;

use crate::ceph_env;

/// The lab's one cluster, shared by the tests of a test binary that run at once.
static CLUSTER: RwLock<()> = RwLock::new(());

/// Held by a test that uses the cluster, for its duration: the cluster answers meanwhile. Take
/// it before a `GuestSlot`, so that no test waits for it holding a slot.
pub fn cluster_shared() -> RwLockReadGuard<'static, ()> {
    CLUSTER.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test that makes the cluster stop answering (stops its monitor), for its duration:
/// it then runs with no other test of its binary using the cluster, whose commands would time
/// out meanwhile (a restore failing on `rbd snap ls`, a replaced clone kept because it could
/// not be checked). Taken before a `GuestSlot`, as [`cluster_shared`].
pub fn cluster_alone() -> RwLockWriteGuard<'static, ()> {
    CLUSTER.write().unwrap_or_else(|e| e.into_inner())
}

/// Stops the cluster's monitor (SIGSTOP) until the result is dropped: the cluster stops
/// answering. Hold [`cluster_alone`] meanwhile.
pub fn stop_monitor() -> crate::Stopped {
    let conf = ceph_env("CONF");
    let run = std::path::Path::new(&conf)
        .parent()
        .expect("ceph.conf is in a folder")
        .join("run/mon.a.pid");
    let pid = std::fs::read_to_string(&run).expect("the monitor's pid file");
    crate::Stopped::new(pid.trim())
}

/// Runs vmsnapctl `args` against `daemon` (started with `VMSNAP_TEST_PAUSE_AT`) and stops the
/// monitor once vmsnapd is at the pause (`at`, for the failure message): the operation goes on
/// with a cluster that does not answer. Its output, and the monitor, stopped until dropped.
pub fn monitor_stopped_at_pause(
    daemon: &crate::Daemon,
    args: &[&str],
    at: &str,
) -> (crate::CtlOutput, crate::Stopped) {
    std::thread::scope(|scope| {
        let ctl = scope.spawn(|| daemon.ctl(args));
        crate::wait_for(std::time::Duration::from_secs(60), at, || {
            daemon
                .log_text()
                .contains("VMSNAP_TEST_PAUSE_AT")
                .then_some(())
        });
        let stopped = stop_monitor();
        (ctl.join().expect("vmsnapctl's thread"), stopped)
    })
}

/// `rbd` as the lab's admin; its standard output, panicking on failure.
pub fn rbd(args: &[&str]) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(ceph_env("CONF"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// vmsnapd's `[rbd]` table for the lab's cluster (last in a configuration: a table).
pub fn config_table() -> String {
    format!("[rbd]\nceph_conf = \"{}\"\n", ceph_env("CONF"))
}

/// The lab's RBD pool.
pub fn pool() -> String {
    ceph_env("POOL")
}

/// The pool's images whose name starts with `prefix`.
pub fn images(prefix: &str) -> Vec<String> {
    let listed: Vec<String> =
        serde_json::from_str(&rbd(&["ls", &pool(), "--format", "json"])).unwrap_or_default();
    listed
        .into_iter()
        .filter(|i| i.starts_with(prefix))
        .collect()
}

/// Removes every image whose name starts with `prefix`, with its snapshots: restores' clones
/// (`-vmsnap-r`) before the images they were cloned from.
pub fn purge_images(prefix: &str) {
    for _pass in 0..3 {
        let mut mine = images(prefix);
        if mine.is_empty() {
            return;
        }
        mine.sort_by_key(|i| !i.contains("-vmsnap-r"));
        for image in mine {
            let spec = format!("{}/{image}", pool());
            for args in [
                &["snap", "purge", "--no-progress"][..],
                &["rm", "--no-progress"][..],
            ] {
                let _ = Command::new("rbd")
                    .arg("-c")
                    .arg(ceph_env("CONF"))
                    .args(args)
                    .arg(&spec)
                    .output();
            }
        }
    }
}

/// A new RBD image of `size` (as truncate takes it) holding an empty ext4 filesystem.
pub fn make_image(name: &str, size: &str) {
    let script = crate::workspace_root().join("lab/ceph-image.sh");
    crate::run("bash", &[script.to_str().unwrap(), name, size]);
}

/// The snapshots of image `name` (user namespace).
pub fn snaps_of(name: &str) -> Vec<String> {
    let listed: Vec<Value> = serde_json::from_str(&rbd(&[
        "snap",
        "ls",
        &format!("{}/{name}", pool()),
        "--format",
        "json",
    ]))
    .unwrap();
    listed
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// SHA-256 of an image or snapshot's whole content (`pool/image[@snap]`).
pub fn content(spec: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("export.raw");
    rbd(&["export", "--no-progress", spec, raw.to_str().unwrap()]);
    crate::run("sha256sum", &[raw.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes 64 KiB of `byte` at `offset_kib` into image `name`, through QEMU's rbd driver.
pub fn write_pattern(name: &str, byte: u8, offset_kib: u64) {
    let target = format!("rbd:{}/{name}:conf={}", pool(), ceph_env("CONF"));
    crate::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P {byte} {offset_kib}k 64k"),
            &target,
        ],
    );
}

/// The RBD snapshot (`pool/image@snap`) of a snapshot's volume on disk `target`, from its JSON.
pub fn spec_of(snapshot: &Value, target: &str) -> String {
    let volume = snapshot["snapshotVolumes"]["includedVolumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["target"] == target)
        .unwrap_or_else(|| panic!("no volume {target} in {snapshot}"))
        .clone();
    assert_eq!(volume["backend"], "rbd", "{volume}");
    volume["image"]
        .as_str()
        .unwrap()
        .strip_prefix("rbd:")
        .unwrap()
        .to_string()
}
