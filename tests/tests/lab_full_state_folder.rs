//! A state folder that fills up while a snapshot runs: the snapshot fails at once and visibly
//! (not InProgress for ever), nothing is changed on the VM, no temporary file stays behind, and
//! once there is room again a restarted daemon settles the record it could not finish.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{
    config_for, virsh, wait_for, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};

/// A small tmpfs of its own, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {out:?}");
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem, then frees exactly one page: room for one small record file.
    fn fill_leaving_one_page(&self) {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let page = [0u8; 4096];
        let mut pages = 0u64;
        while file.write_all(&page).and_then(|()| file.flush()).is_ok() {
            pages += 1;
        }
        drop(file);
        assert!(pages > 0);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        file.set_len((pages - 1) * 4096).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_state_folder_that_fills_up_fails_the_snapshot_visibly_and_leaves_nothing() {
    let vm = ScratchVm::define("vmsnap-t12-full", ScratchOptions::default(), &[]);
    let fs = SmallFs::mount("256k");
    let state = fs.path().join("state");
    let config = format!(
        "state_dir = \"{}\"\n{}",
        state.display(),
        config_for(LAB_URI)
    );
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config);
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let definition = virsh(&["dumpxml", "--inactive", &vm.name]);
    let disk_folder = vm.images();
    fs.fill_leaving_one_page();

    // The first record fits; the next write of the journal does not.
    let started = daemon
        .ctl(&[
            "snapshot",
            "create",
            &vm.name,
            "s",
            "--no-wait",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(started["phase"], "InProgress", "{started}");
    let failed = wait_for(Duration::from_secs(60), "the snapshot to fail", || {
        let show = daemon
            .ctl(&["snapshot", "show", &vm.name, "s", "--output", "json"])
            .json();
        (show["phase"] == "Failed").then_some(show)
    });
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("cannot write the snapshot record"),
        "{error}"
    );
    assert!(error.contains("No space left on device"), "{error}");
    // The VM is free again, untouched, and no temporary file is left.
    assert_eq!(virsh(&["dumpxml", "--inactive", &vm.name]), definition);
    assert_eq!(vm.images(), disk_folder);
    let leftovers: Vec<String> = files_under(&state)
        .into_iter()
        .filter(|f| f.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // With room again, a restarted daemon settles the record it left behind.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    daemon.restart_with_env(&[]);
    let settled = wait_for(Duration::from_secs(60), "the record to be settled", || {
        let show = daemon
            .ctl(&["snapshot", "show", &vm.name, "s", "--output", "json"])
            .json();
        (show["phase"] == "Failed").then_some(show)
    });
    assert_eq!(settled["readyToUse"], false, "{settled}");
    daemon.ctl(&["snapshot", "delete", &vm.name, "s"]).ok();
    assert_eq!(vm.images(), disk_folder);
}
