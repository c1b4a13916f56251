//! The libvirt hook (config/libvirt/hooks/qemu.d/vmsnap) run as libvirt runs it, without libvirt:
//! `HOOK NAME OPERATION SUB_OPERATION EXTRA` with the domain XML on standard input, under dash.
//! A start (`prepare begin`) is refused while another process holds the exclusive flock on
//! `<lock dir>/<UUID>.lock`, with one sanitized line naming the operation and the VM; nothing
//! else refuses a start (no file, an unlocked file, other operations, XML without a valid UUID,
//! whatever the lock file holds), no path is built from an invalid UUID, and the hook never waits
//! for the lock.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmsnap_tests::wait_for;

const UUID: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
const WHAT: &str = "snapshot 'nightly' is being created";
/// A hook run may take this long at most (it never waits for the lock).
const NEVER_BLOCKS: Duration = Duration::from_secs(5);

fn hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/libvirt/hooks/qemu.d/vmsnap")
}

/// dash (Debian's /bin/sh), by its path: a test may give the hook a PATH without it.
fn dash() -> PathBuf {
    ["/usr/bin/dash", "/bin/dash"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("dash is installed")
}

/// A domain XML as libvirt formats it.
fn domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  \
         <memory unit='KiB'>196608</memory>\n  <metadata>\n    \
         <app:uuid xmlns:app='http://example.invalid/app'>ffffffff-ffff-ffff-ffff-ffffffffffff\
         </app:uuid>\n  </metadata>\n  <devices>\n    <disk type='file' device='disk'>\n      \
         <source file='/var/lib/libvirt/images/{name}.qcow2'/>\n    </disk>\n  </devices>\n\
         </domain>\n"
    )
}

#[derive(Debug)]
struct HookRun {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Runs the hook as libvirt does, with `env` added (VMSNAP_VM_LOCK_DIR and VMSNAP_CONFIG are
/// removed unless given); killed and reported if it runs longer than NEVER_BLOCKS.
fn run_hook(args: [&str; 4], xml: &str, env: &[(&str, &Path)]) -> HookRun {
    let started = Instant::now();
    let mut child = Command::new(dash())
        .arg(hook())
        .args(args)
        .env_remove("VMSNAP_VM_LOCK_DIR")
        .env_remove("VMSNAP_CONFIG")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from a thread: the hook may leave without reading it all (a broken pipe is fine).
    let mut stdin = child.stdin.take().unwrap();
    let input = xml.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > NEVER_BLOCKS {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the hook ran longer than {NEVER_BLOCKS:?} ({args:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let _ = writer.join();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    HookRun {
        code: status.code(),
        stderr,
        took,
    }
}

fn start(name: &str, uuid: &str, dir: &Path) -> HookRun {
    run_hook(
        [name, "prepare", "begin", "-"],
        &domain_xml(name, uuid),
        &[("VMSNAP_VM_LOCK_DIR", dir)],
    )
}

fn assert_allowed(run: &HookRun, what: &str) {
    assert_eq!(run.code, Some(0), "{what}: {run:?}");
    assert_eq!(run.stderr, "", "{what}: {run:?}");
}

/// An exclusive flock on a file, held by a `flock` process (as vmsnapd holds it) until dropped.
struct HeldLock {
    child: Child,
}

impl HeldLock {
    /// Takes the lock and waits until /proc/locks shows it.
    fn take(path: &Path) -> HeldLock {
        // -o: the lock is flock's alone (cat does not inherit it); cat ends when its input closes.
        let child = Command::new("flock")
            .args(["-o", "-x"])
            .arg(path)
            .arg("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let inode = std::fs::metadata(path).unwrap().ino();
        let suffix = format!(":{inode}");
        wait_for(Duration::from_secs(10), "flock to hold the lock", || {
            let locks = std::fs::read_to_string("/proc/locks").unwrap();
            locks
                .lines()
                .any(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.len() > 5
                        && fields[1] == "FLOCK"
                        && fields[3] == "WRITE"
                        && fields[5].ends_with(&suffix)
                })
                .then_some(())
        });
        HeldLock { child }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock_file(dir: &Path, uuid: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(format!("{uuid}.lock"));
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn a_start_is_refused_while_the_lock_is_held_and_allowed_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_file(dir.path(), UUID, format!("{WHAT}\nmore\n").as_bytes());
    let held = HeldLock::take(&path);
    let run = start("web-1", UUID, dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.stderr,
        format!("vmsnap: {WHAT}; start VM 'web-1' when it has finished\n")
    );
    assert!(run.took < NEVER_BLOCKS, "{run:?}");

    // Only prepare begin refuses; the other calls of a start, a stop or a migration do not.
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("prepare", "end"),
        ("stopped", "end"),
        ("release", "end"),
        ("migrate", "begin"),
        ("restore", "begin"),
        ("reconnect", "begin"),
    ] {
        let run = run_hook(
            ["web-1", op, sub, "-"],
            &domain_xml("web-1", UUID),
            &[("VMSNAP_VM_LOCK_DIR", dir.path())],
        );
        assert_allowed(&run, &format!("{op} {sub}"));
    }
    // Another VM's start is not concerned.
    assert_allowed(
        &start("web-2", "11111111-2222-4333-8444-555555555555", dir.path()),
        "another VM",
    );

    drop(held);
    // The file stays after the operation, unlocked: no operation.
    assert!(path.exists());
    assert_allowed(&start("web-1", UUID, dir.path()), "unlocked file");
}

#[test]
fn no_lock_file_or_no_lock_folder_allows_the_start() {
    let dir = tempfile::tempdir().unwrap();
    assert_allowed(&start("web-1", UUID, dir.path()), "missing file");
    assert_allowed(
        &start("web-1", UUID, &dir.path().join("missing")),
        "missing folder",
    );
    // A lock "file" that is a folder cannot be locked: allowed.
    std::fs::create_dir(dir.path().join(format!("{UUID}.lock"))).unwrap();
    assert_allowed(&start("web-1", UUID, dir.path()), "a folder");
}

#[test]
fn the_uuid_is_found_in_libvirt_xml_whatever_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_file(dir.path(), UUID, format!("{WHAT}\n").as_bytes());
    let _held = HeldLock::take(&path);
    let refused = |xml: &str| {
        let run = run_hook(
            ["web-1", "prepare", "begin", "-"],
            xml,
            &[("VMSNAP_VM_LOCK_DIR", dir.path())],
        );
        assert_eq!(run.code, Some(1), "{xml}: {run:?}");
        assert!(run.stderr.contains(WHAT), "{run:?}");
    };
    // One line; the value spread over lines with spaces around it; upper case; CRLF.
    refused(&domain_xml("web-1", UUID).replace('\n', ""));
    refused(&domain_xml("web-1", &format!("\n    {UUID}\n  ")));
    refused(&domain_xml("web-1", &UUID.to_uppercase()));
    refused(&domain_xml("web-1", UUID).replace('\n', "\r\n"));
    // A huge XML after the UUID is not a problem (the hook need not read it all).
    let big = domain_xml("web-1", UUID).replace(
        "</devices>",
        &format!("<!-- {} --></devices>", "x".repeat(4 << 20)),
    );
    refused(&big);
}

#[test]
fn an_invalid_uuid_never_becomes_a_path() {
    let dir = tempfile::tempdir().unwrap();
    // The lock folder is dir/a/b; dir/x.lock is held: "../../x" would reach it.
    let locks = dir.path().join("a/b");
    std::fs::create_dir_all(&locks).unwrap();
    let mut held = Vec::new();
    let long = format!("{UUID}0");
    let bad: Vec<&str> = vec![
        "../../x",
        "../../etc/x",
        &long,
        "",
        "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4",
        "0b1c2d3e4f50-4a6b-8c7d-9e0f1a2b3c4d0",
        "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4g",
        "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4*",
        "0b1c2d3e-4f50-4a6b-8c7d 9e0f1a2b3c4d",
        "*",
        "????????-????-????-????-????????????",
    ];
    for uuid in &bad {
        // Wherever the hook could look with this "UUID", a held lock is waiting.
        for folder in [&locks, &dir.path().to_path_buf()] {
            let path = folder.join(format!("{uuid}.lock"));
            if !uuid.contains('/') {
                std::fs::write(&path, WHAT).unwrap();
                held.push(HeldLock::take(&path));
            }
        }
    }
    let x = lock_file(dir.path(), "x", WHAT.as_bytes());
    held.push(HeldLock::take(&x));
    for uuid in &bad {
        assert_allowed(&start("web-1", uuid, &locks), &format!("uuid {uuid:?}"));
    }
    // No <uuid> at all, no XML, not XML.
    for xml in [
        "<domain type='qemu'><name>web-1</name></domain>",
        "",
        "\0\u{1b}[2J garbage",
    ] {
        let run = run_hook(
            ["web-1", "prepare", "begin", "-"],
            xml,
            &[("VMSNAP_VM_LOCK_DIR", locks.as_path())],
        );
        assert_allowed(&run, &format!("xml {xml:?}"));
    }
}

#[test]
fn hostile_lock_content_and_names_are_sanitized() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_file(dir.path(), UUID, b"");
    let held = HeldLock::take(&path);
    let refused = |name: &str| {
        let run = start(name, UUID, dir.path());
        assert_eq!(run.code, Some(1), "{run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
        run.stderr
    };
    // Empty (caught between vmsnapd's lock and its write): a generic line.
    assert_eq!(
        refused("web-1"),
        "vmsnap: an operation is running; start VM 'web-1' when it has finished\n"
    );

    // Escape sequences, C1 controls, bidirectional overrides, invalid UTF-8: removed; other
    // text (é, quotes) kept.
    let hostile = b"snapshot \x1b[31m'r\xc3\xa9d'\x1b]0;title\x07 \xc2\x9b2J\xe2\x80\xaeevil\xff\x7f\r is being created\nsecond line\n";
    std::fs::write(&path, hostile).unwrap();
    let line = refused("vm\x1b[2J\u{202e}\ttab");
    assert_eq!(
        line,
        "vmsnap: snapshot [31m'r\u{e9}d']0;title 2Jevil is being created; \
         start VM 'vm[2Jtab' when it has finished\n"
    );
    assert!(
        !line.contains('\x1b') && !line.contains('\u{9b}'),
        "{line:?}"
    );

    // Very long, without a newline: at most 200 characters, multi-byte ones kept whole.
    let long = "é".repeat(100_000);
    std::fs::write(&path, &long).unwrap();
    let line = refused("web-1");
    let what = line
        .strip_prefix("vmsnap: ")
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert_eq!(what, "é".repeat(200));
    let name = "n".repeat(5000);
    let line = refused(&name);
    assert!(
        line.ends_with(&format!(
            "start VM '{}' when it has finished\n",
            "n".repeat(200)
        )),
        "{line}"
    );

    // A 64 MiB lock file is not read to its end.
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 20).unwrap();
    let run = start("web-1", UUID, dir.path());
    assert_eq!(run.code, Some(1), "{run:?}");
    drop(held);
}

#[test]
fn the_lock_folder_comes_from_vmsnapds_config_when_not_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let locks = dir.path().join("locks");
    std::fs::create_dir(&locks).unwrap();
    let path = lock_file(&locks, UUID, format!("{WHAT}\n").as_bytes());
    let _held = HeldLock::take(&path);
    let config = dir.path().join("vmsnapd.toml");
    let with_config = |text: String| {
        std::fs::write(&config, text).unwrap();
        run_hook(
            ["web-1", "prepare", "begin", "-"],
            &domain_xml("web-1", UUID),
            &[("VMSNAP_CONFIG", config.as_path())],
        )
    };
    let run = with_config(format!(
        "# vmsnapd\nstate_dir = \"/var/lib/vmsnap\"\n  vm_lock_dir = \"{}\"  # here\n\n[lvm]\n\
         vm_lock_dir = \"/elsewhere\"\n",
        locks.display()
    ));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(WHAT), "{run:?}");
    // In a table it is not vmsnapd's key; relative paths are not used.
    for text in [
        format!("[lvm]\nvm_lock_dir = \"{}\"\n", locks.display()),
        "vm_lock_dir = \"locks\"\n".to_string(),
        format!("#: vm_lock_dir = \"{}\"\n", locks.display()),
    ] {
        assert_allowed(&with_config(text.clone()), &text);
    }
    // The environment wins over the config.
    std::fs::write(&config, format!("vm_lock_dir = \"{}\"\n", locks.display())).unwrap();
    let run = run_hook(
        ["web-1", "prepare", "begin", "-"],
        &domain_xml("web-1", UUID),
        &[
            ("VMSNAP_CONFIG", config.as_path()),
            ("VMSNAP_VM_LOCK_DIR", dir.path()),
        ],
    );
    assert_allowed(&run, "environment over config");
}

#[test]
fn without_flock_the_start_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_file(dir.path(), UUID, format!("{WHAT}\n").as_bytes());
    let _held = HeldLock::take(&path);
    // A PATH with the tools the hook uses but flock.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["tr", "sed", "head", "tail", "iconv", "cat", "printf"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists());
        if let Some(found) = found {
            std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
        }
    }
    let run = run_hook(
        ["web-1", "prepare", "begin", "-"],
        &domain_xml("web-1", UUID),
        &[("VMSNAP_VM_LOCK_DIR", dir.path()), ("PATH", bin.as_path())],
    );
    assert_allowed(&run, "no flock");
}

#[test]
fn the_hook_is_executable_posix_sh() {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(hook()).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "{mode:o}");
    let text = std::fs::read_to_string(hook()).unwrap();
    assert!(text.starts_with("#!/bin/sh\n"), "{}", &text[..40]);
    let syntax = Command::new(dash()).arg("-n").arg(hook()).output().unwrap();
    assert!(syntax.status.success(), "{syntax:?}");
}
