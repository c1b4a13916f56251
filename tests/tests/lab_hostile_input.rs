//! Input a hostile local user could send, over D-Bus directly and through vmsnapctl, against the
//! real libvirtd: each is refused with its named error, and nothing changes: libvirt's folders,
//! the domain list, vmsnapd's state folder and the VM's disk folder are byte for byte the same.
//!
//! The `..` restore target is the case that matters most: libvirt's cleanup after a failed define
//! of a domain named `..` removes libvirt's whole qemu state folder. This test must only ever run
//! with the validator in place (it is: the daemon refuses the name before looking at anything).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use vmsnap_api::{ManagerProxy, VmSnapError};
use vmsnap_tests::{
    config_for, virsh, wait_for, Daemon, PrivateBus, ScratchOptions, ScratchVm, LAB_URI,
};
use zbus::{OwnedVariant, Variant};

/// Every file under the folders a bad input could reach: path -> (type, mode, content hash).
type Fingerprint = BTreeMap<String, (String, u32, u64)>;

fn fingerprint_into(root: &Path, out: &mut Fingerprint) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let kind = meta.file_type();
        let (label, hash) = if kind.is_dir() {
            fingerprint_into(&path, out);
            ("dir", 0)
        } else if kind.is_file() {
            let mut hasher = DefaultHasher::new();
            hasher.write(&std::fs::read(&path).unwrap_or_default());
            ("file", hasher.finish())
        } else if kind.is_symlink() {
            let mut hasher = DefaultHasher::new();
            hasher.write(
                std::fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            ("symlink", hasher.finish())
        } else {
            ("other", meta.ino())
        };
        out.insert(
            path.display().to_string(),
            (label.to_string(), meta.permissions().mode() & 0o7777, hash),
        );
    }
}

/// What must not change: libvirt's configuration and state folders, the domain list, the state
/// folder of vmsnapd and the VM's own folder (its disk image and everything beside it).
fn host_fingerprint(daemon: &Daemon, vm: &ScratchVm) -> (Fingerprint, String) {
    let mut files = Fingerprint::new();
    for root in [
        Path::new("/etc/libvirt/qemu"),
        Path::new("/var/lib/libvirt/qemu/snapshot"),
        Path::new("/var/lib/libvirt/qemu/nvram"),
        Path::new("/var/lib/libvirt/qemu/save"),
        Path::new("/var/lib/libvirt/qemu/checkpoint"),
        &daemon.state_dir(),
        vm.dir.path(),
    ] {
        fingerprint_into(root, &mut files);
    }
    // The whole of /var/lib/libvirt/qemu, one level deep: a removed runtime folder or agent
    // socket of any running VM shows here.
    for entry in std::fs::read_dir("/var/lib/libvirt/qemu")
        .unwrap()
        .flatten()
    {
        files.insert(entry.path().display().to_string(), ("top".into(), 0, 0));
    }
    let mut domains: Vec<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    domains.sort();
    (files, domains.join("\n"))
}

fn string_option(value: &str) -> OwnedVariant {
    OwnedVariant::try_from(Variant::from(value)).unwrap()
}

#[test]
fn hostile_names_descriptions_and_options_are_refused_and_change_nothing() {
    let vm = ScratchVm::define(
        "vmsnap-t10-hostile",
        ScratchOptions::default(),
        &[("hello.txt", b"hello\n")],
    );
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        let out = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (out.code == Some(0)).then_some(())
    });
    // A real, restorable snapshot: without validation, a restore from it goes on to libvirt.
    // The disk is private (0600); the overlay the snapshot puts on it must be no more open.
    std::fs::set_permissions(&vm.disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "base", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    let overlay = vm.disk_source();
    assert_ne!(
        Path::new(&overlay),
        vm.disk.as_path(),
        "the VM writes to a new overlay"
    );
    let mode = std::fs::metadata(&overlay).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "overlay {overlay} has mode {mode:o}");
    let before = host_fingerprint(&daemon, &vm);
    assert!(
        before.0.len() > 3,
        "the fingerprint sees files: {:?}",
        before.0
    );

    let huge_name = "x".repeat(1 << 20);
    let long_arg = "y".repeat(100 << 10); // below Linux's 128 KiB limit for one argument
    let bad_targets = [
        "..",
        ".",
        "...",
        "../etc",
        "a/b",
        "/",
        "-rf",
        "a\nb",
        "a\u{1b}[2Jb",
        "a b",
        "ü",
    ];

    // Through vmsnapctl: a one-line message naming the rule, exit status 1.
    for target in bad_targets.iter().copied().chain([long_arg.as_str()]) {
        let out = daemon.ctl(&["restore", &vm.name, "base", &format!("--target={target}")]);
        let message = out.failure();
        assert!(message.contains("VM name"), "{target:?}: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(
            message.len() < 300,
            "the name is not echoed whole: {message}"
        );
        assert!(!message.contains('\u{1b}'), "{message:?}");
    }
    for description in ["two\nlines", "\u{1b}[31mred", &long_arg[..5000]] {
        let out = daemon.ctl(&[
            "snapshot",
            "create",
            &vm.name,
            "described",
            "--description",
            description,
        ]);
        assert!(
            out.failure().contains("description"),
            "{description:?}: {}",
            out.failure()
        );
    }
    let out = daemon.ctl(&["snapshot", "show", &long_arg, "base"]);
    assert!(out.failure().len() < 300, "{}", out.failure());

    // Over D-Bus directly, with the named errors a client matches on.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        let manager = ManagerProxy::new(&conn).await.unwrap();
        for target in bad_targets.iter().copied().chain([huge_name.as_str()]) {
            // Refused whatever the VM and snapshot: the name is checked first.
            for (vm_key, snapshot) in [(vm.name.as_str(), "base"), ("no-such-vm", "nope")] {
                let options = HashMap::from([("target", string_option(target))]);
                match manager.restore(vm_key, snapshot, options).await {
                    Err(VmSnapError::InvalidName(m)) => assert!(m.len() < 300, "{m}"),
                    other => panic!("target {:?}: {other:?}", vmsnap_api::excerpt(target)),
                }
            }
        }
        let eight_mib = "d".repeat(8 << 20);
        for description in ["a\nPhase: Succeeded", eight_mib.as_str()] {
            let options = HashMap::from([("description", string_option(description))]);
            match manager
                .create_snapshot(&vm.name, "described", options)
                .await
            {
                Err(VmSnapError::InvalidArgument(m)) => assert!(m.len() < 300, "{m}"),
                other => panic!("description: {other:?}"),
            }
        }
        match manager
            .create_snapshot(&huge_name, "s", HashMap::new())
            .await
        {
            Err(VmSnapError::NotFound(m)) => assert!(m.len() < 300, "{m}"),
            other => panic!("huge VM name: {other:?}"),
        }
        let absurd: HashMap<String, OwnedVariant> = (0..10_000)
            .map(|i| (format!("option-{i}"), OwnedVariant::from(true)))
            .collect();
        let absurd: HashMap<&str, OwnedVariant> = absurd
            .iter()
            .map(|(k, v)| (k.as_str(), v.try_clone().unwrap()))
            .collect();
        match manager.restore(&vm.name, "base", absurd).await {
            Err(VmSnapError::InvalidArgument(m)) => assert!(m.contains("options"), "{m}"),
            other => panic!("10,000 options: {other:?}"),
        }
        let unknown = HashMap::from([(huge_name.as_str(), OwnedVariant::from(true))]);
        match manager.create_snapshot(&vm.name, "s", unknown).await {
            Err(VmSnapError::InvalidArgument(m)) => assert!(m.len() < 300, "{m}"),
            other => panic!("unknown option: {other:?}"),
        }
    });

    // Nothing changed anywhere, and nothing was started.
    let after = host_fingerprint(&daemon, &vm);
    assert_eq!(before.1, after.1, "the domain list changed");
    let changed: Vec<_> = before
        .0
        .iter()
        .filter(|(path, fp)| after.0.get(*path) != Some(fp))
        .map(|(path, _)| path.clone())
        .chain(
            after
                .0
                .keys()
                .filter(|p| !before.0.contains_key(*p))
                .cloned(),
        )
        .collect();
    assert!(changed.is_empty(), "changed or new: {changed:?}");
    let list = daemon.ctl(&["restore", "list", "--output", "json"]).json();
    assert_eq!(list, serde_json::json!([]), "no restore was recorded");
    // Two megabytes of names were sent; the log holds none of them whole.
    let log = daemon.log_text();
    assert!(
        !log.contains(&"x".repeat(200)),
        "a huge name reached the log"
    );
    assert!(log.len() < 64 << 10, "log of {} bytes", log.len());
}
