//! vmsnap as a system service: install.sh into a DESTDIR (and its reverse), the shipped D-Bus
//! policy, activation file and polkit actions, and the policy enforced by a system-like
//! dbus-daemon that loads only the shipped policy file (an unprivileged user may read but not
//! own the name; root owns it). Uses libvirt's test driver; the bus tests need root (CI and
//! lab/test.sh run as root) to make and switch to an unprivileged user.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use vmsnap_tests::{bin, config_for, find_vm, name_has_owner, wait_for, SystemBus};

const BUS_NAME: &str = vmsnap_api::BUS_NAME;
const POLICY: &str = "config/dbus/system.d/org.vmsnap.VmSnap1.conf";
const ACTIVATION: &str = "config/dbus/system-services/org.vmsnap.VmSnap1.service";
const POLKIT: &str = "config/polkit/org.vmsnap.policy";
/// Not authorization.rs's user, which that test makes a member of a group its polkit rule names.
const TEST_USER: &str = "vmsnap-test-policy";

/// vmsnapctl's man pages: one per command.
const MAN_PAGES: &[&str] = &[
    "vmsnapctl.1",
    "vmsnapctl-vm.1",
    "vmsnapctl-vm-list.1",
    "vmsnapctl-vm-show.1",
    "vmsnapctl-snapshot.1",
    "vmsnapctl-snapshot-create.1",
    "vmsnapctl-snapshot-list.1",
    "vmsnapctl-snapshot-show.1",
    "vmsnapctl-snapshot-delete.1",
    "vmsnapctl-snapshot-restore.1",
    "vmsnapctl-snapshot-export.1",
    "vmsnapctl-snapshot-import.1",
    "vmsnapctl-restore.1",
    "vmsnapctl-restore-list.1",
    "vmsnapctl-restore-show.1",
    "vmsnapctl-apply.1",
    "vmsnapctl-get.1",
    "vmsnapctl-wait.1",
    "vmsnapctl-delete.1",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace_root().join(relative)).unwrap()
}

/// The directory of the workspace's built binaries (vmsnapctl-gen included).
fn binaries() -> PathBuf {
    bin("vmsnapctl-gen");
    bin("vmsnapd").parent().unwrap().to_path_buf()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs install.sh with these arguments and environment (PREFIX and DESTDIR only as given).
fn install_sh(args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new("bash")
        .arg(workspace_root().join("install.sh"))
        .args(args)
        .env_remove("PREFIX")
        .env_remove("DESTDIR")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .unwrap()
}

fn install(destdir: &Path, prefix: Option<&str>) -> Output {
    let from = binaries();
    let mut env: Vec<(&str, &Path)> = vec![("DESTDIR", destdir)];
    if let Some(prefix) = prefix {
        env.push(("PREFIX", Path::new(prefix)));
    }
    let output = install_sh(&["--from", from.to_str().unwrap()], &env);
    assert!(output.status.success(), "install.sh failed: {output:?}");
    output
}

/// Every file under `dir`, relative to it, with its permission bits.
fn files_under(dir: &Path) -> Vec<(String, u32)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u32)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(base, &entry.path(), out);
            } else {
                let relative = entry.path().strip_prefix(base).unwrap().to_path_buf();
                out.push((
                    format!("/{}", relative.display()),
                    meta.permissions().mode() & 0o7777,
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn expected_files(prefix: &str) -> BTreeSet<(String, u32)> {
    let mut files: BTreeSet<(String, u32)> = [
        ("/bin/vmsnapd", 0o755),
        ("/bin/vmsnapctl", 0o755),
        ("/lib/systemd/system/vmsnapd.service", 0o644),
        ("/share/dbus-1/system.d/org.vmsnap.VmSnap1.conf", 0o644),
        (
            "/share/dbus-1/system-services/org.vmsnap.VmSnap1.service",
            0o644,
        ),
        ("/share/polkit-1/actions/org.vmsnap.policy", 0o644),
        ("/share/man/man5/vmsnapd.toml.5", 0o644),
        ("/share/man/man8/vmsnapd.8", 0o644),
        ("/share/bash-completion/completions/vmsnapctl", 0o644),
        ("/share/zsh/vendor-completions/_vmsnapctl", 0o644),
        ("/share/fish/vendor_completions.d/vmsnapctl.fish", 0o644),
    ]
    .into_iter()
    .map(|(path, mode)| (format!("{prefix}{path}"), mode))
    .collect();
    for page in MAN_PAGES {
        files.insert((format!("{prefix}/share/man/man1/{page}"), 0o644));
    }
    files.insert(("/etc/vmsnap/vmsnapd.toml".to_string(), 0o644));
    // libvirtd looks for its hooks in /etc only, whatever the prefix.
    files.insert(("/etc/libvirt/hooks/qemu.d/vmsnap".to_string(), 0o755));
    // The Cockpit page, as built into cockpit/dist (lab/build-cockpit.sh).
    let dist = workspace_root().join("cockpit/dist");
    assert!(
        dist.join("index.html").exists(),
        "cockpit/dist is missing: build the Cockpit page with lab/build-cockpit.sh"
    );
    for (path, _) in files_under(&dist) {
        files.insert((format!("{prefix}/share/cockpit/vmsnap{path}"), 0o644));
    }
    files
}

#[test]
fn install_puts_every_file_where_distributions_expect_it_and_uninstall_removes_them() {
    let destdir = tempfile::tempdir().unwrap();
    let d = destdir.path();
    let output = install(d, None);
    assert!(output.stderr.is_empty(), "install is quiet: {output:?}");

    let installed: BTreeSet<(String, u32)> = files_under(d).into_iter().collect();
    assert_eq!(installed, expected_files("/usr"));

    // Shipped files as they are in the repository (PREFIX=/usr changes nothing).
    for (installed, shipped) in [
        ("usr/share/dbus-1/system.d/org.vmsnap.VmSnap1.conf", POLICY),
        (
            "usr/share/dbus-1/system-services/org.vmsnap.VmSnap1.service",
            ACTIVATION,
        ),
        ("usr/share/polkit-1/actions/org.vmsnap.policy", POLKIT),
        (
            "usr/lib/systemd/system/vmsnapd.service",
            "systemd/vmsnapd.service",
        ),
        ("etc/vmsnap/vmsnapd.toml", "config/vmsnapd.toml"),
        (
            "etc/libvirt/hooks/qemu.d/vmsnap",
            "config/libvirt/hooks/qemu.d/vmsnap",
        ),
    ] {
        assert_eq!(
            std::fs::read_to_string(d.join(installed)).unwrap(),
            read(shipped),
            "{installed}"
        );
    }
    assert_eq!(
        std::fs::read(d.join("usr/bin/vmsnapctl")).unwrap(),
        std::fs::read(bin("vmsnapctl")).unwrap()
    );

    // Man pages: roff, one per command, naming it.
    for page in MAN_PAGES {
        let text = std::fs::read_to_string(d.join("usr/share/man/man1").join(page)).unwrap();
        let title = page.trim_end_matches(".1");
        assert!(
            text.lines()
                .any(|l| l.starts_with(".TH") && l.contains(title)),
            "{page}: {text}"
        );
        assert!(text.contains(".SH NAME"), "{page}");
        assert!(text.contains(".SH \"EXIT STATUS\""), "{page}");
        assert!(text.contains(".SH \"SEE ALSO\""), "{page}");
    }
    let main_page = std::fs::read_to_string(d.join("usr/share/man/man1/vmsnapctl.1")).unwrap();
    assert!(main_page.contains(".SH EXAMPLES"), "{main_page}");
    // vmsnapd(8) and vmsnapd.toml(5), shipped as written; the latter names every key of the
    // documented config.
    for (installed, shipped) in [
        ("usr/share/man/man8/vmsnapd.8", "man/vmsnapd.8"),
        ("usr/share/man/man5/vmsnapd.toml.5", "man/vmsnapd.toml.5"),
    ] {
        let text = std::fs::read_to_string(d.join(installed)).unwrap();
        assert_eq!(text, read(shipped), "{installed}");
        for section in [".SH \"SEE ALSO\"", ".SH EXAMPLES"] {
            assert!(text.contains(section), "{installed} lacks {section}");
        }
    }
    assert!(read("man/vmsnapd.8").contains(".SH \"EXIT STATUS\""));
    let keys_page = read("man/vmsnapd.toml.5");
    for line in read("config/vmsnapd.toml").lines() {
        let Some(entry) = line.strip_prefix("#: ") else {
            continue;
        };
        if entry.starts_with('[') {
            continue;
        }
        let key = entry.split(" = ").next().unwrap();
        assert!(
            keys_page.contains(&format!(".B {} = ", key)),
            "vmsnapd.toml.5 does not document {key}"
        );
    }
    let create =
        std::fs::read_to_string(d.join("usr/share/man/man1/vmsnapctl-snapshot-create.1")).unwrap();
    assert!(create.contains("allow\\-excluded"), "{create}");

    // Completions: each in its shell's format, bash's at least syntactically valid.
    let bash = d.join("usr/share/bash-completion/completions/vmsnapctl");
    let bash_text = std::fs::read_to_string(&bash).unwrap();
    // Dynamic: the shell asks vmsnapctl (COMPLETE=bash vmsnapctl -- WORDS).
    assert!(
        bash_text.contains("-F _clap_complete_vmsnapctl vmsnapctl"),
        "{bash_text}"
    );
    assert!(bash_text.contains("COMPLETE=\"bash\""), "{bash_text}");
    let syntax = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(syntax.status.success(), "{syntax:?}");
    let zsh =
        std::fs::read_to_string(d.join("usr/share/zsh/vendor-completions/_vmsnapctl")).unwrap();
    assert!(zsh.starts_with("#compdef vmsnapctl"), "{zsh}");
    let fish =
        std::fs::read_to_string(d.join("usr/share/fish/vendor_completions.d/vmsnapctl.fish"))
            .unwrap();
    assert!(fish.contains("--command vmsnapctl"), "{fish}");

    // Idempotent; an existing (edited) config is never overwritten.
    let config = d.join("etc/vmsnap/vmsnapd.toml");
    let edited = "libvirt_uri = \"qemu:///session\"\n";
    std::fs::write(&config, edited).unwrap();
    let again = install(d, None);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("kept"),
        "{again:?}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    let reinstalled: BTreeSet<(String, u32)> = files_under(d).into_iter().collect();
    assert_eq!(reinstalled, expected_files("/usr"));

    // Uninstall removes everything install put but the config, and says it kept that.
    let output = install_sh(&["--uninstall"], &[("DESTDIR", d)]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("vmsnapd.toml"), "{stdout}");
    assert_eq!(
        files_under(d),
        vec![("/etc/vmsnap/vmsnapd.toml".to_string(), 0o644)]
    );
    // Uninstalling twice is fine too.
    let output = install_sh(&["--uninstall"], &[("DESTDIR", d)]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn install_honours_prefix() {
    let destdir = tempfile::tempdir().unwrap();
    let d = destdir.path();
    install(d, Some("/opt/vmsnap"));
    let installed: BTreeSet<(String, u32)> = files_under(d).into_iter().collect();
    assert_eq!(installed, expected_files("/opt/vmsnap"));
    // The unit and the activation file start the binary where it was installed.
    let unit =
        std::fs::read_to_string(d.join("opt/vmsnap/lib/systemd/system/vmsnapd.service")).unwrap();
    let exec_start: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(exec_start.len(), 1, "{unit}");
    assert!(
        exec_start[0].starts_with("ExecStart=/opt/vmsnap/bin/vmsnapd"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/bin/vmsnapd"), "{unit}");
    let activation = std::fs::read_to_string(
        d.join("opt/vmsnap/share/dbus-1/system-services/org.vmsnap.VmSnap1.service"),
    )
    .unwrap();
    assert!(
        activation
            .lines()
            .any(|l| l == "Exec=/opt/vmsnap/bin/vmsnapd"),
        "{activation}"
    );

    let output = install_sh(
        &["--uninstall"],
        &[("DESTDIR", d), ("PREFIX", Path::new("/opt/vmsnap"))],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        files_under(d),
        vec![("/etc/vmsnap/vmsnapd.toml".to_string(), 0o644)]
    );
}

#[test]
fn install_refuses_bad_arguments_with_one_clear_line() {
    let destdir = tempfile::tempdir().unwrap();
    let d = destdir.path();
    for (args, expected) in [
        (&["--bogus"][..], "unknown argument '--bogus'"),
        (&["--from"], "--from needs a directory"),
        (
            &["--from", "/nonexistent/vmsnap"],
            "/nonexistent/vmsnap does not exist",
        ),
    ] {
        let output = install_sh(args, &[("DESTDIR", d)]);
        assert!(!output.status.success(), "{args:?}: {output:?}");
        let stderr = stderr_of(&output);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("install.sh: "), "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = install_sh(
        &["--no-build"],
        &[("DESTDIR", d), ("PREFIX", Path::new("usr"))],
    );
    assert!(
        stderr_of(&output).contains("PREFIX must be an absolute path"),
        "{output:?}"
    );
    assert!(files_under(d).is_empty(), "nothing installed on errors");
}

fn parse_xml(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, options).unwrap()
}

/// The interfaces the daemon serves, from the committed introspection XML.
fn vmsnap_interfaces() -> BTreeSet<String> {
    let mut interfaces = BTreeSet::new();
    for entry in std::fs::read_dir(workspace_root().join("config/dbus")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(interface) = name.strip_suffix(".xml") {
            interfaces.insert(interface.to_string());
        }
    }
    assert!(
        interfaces.contains("org.vmsnap.VmSnap1.Manager"),
        "{interfaces:?}"
    );
    interfaces
}

#[test]
fn dbus_policy_lets_only_root_own_the_name_and_opens_only_the_vmsnap_interfaces() {
    let text = read(POLICY);
    let doc = parse_xml(&text);
    let root = doc.root_element();
    assert!(root.has_tag_name("busconfig"));
    let policies: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("policy"))
        .collect();
    assert_eq!(
        root.children().filter(|n| n.is_element()).count(),
        policies.len(),
        "only <policy> elements"
    );

    let mut owners = Vec::new();
    let mut sends = BTreeSet::new();
    for policy in &policies {
        let context = (
            policy.attribute("user"),
            policy.attribute("group"),
            policy.attribute("context"),
        );
        for rule in policy.children().filter(|n| n.is_element()) {
            assert!(
                rule.has_tag_name("allow"),
                "only allow rules (the system bus denies the rest): {:?}",
                rule
            );
            if let Some(name) = rule.attribute("own") {
                owners.push((context, name.to_string()));
            }
            assert!(rule.attribute("own_prefix").is_none());
            if rule.attribute("own").is_none() {
                // Every send rule names the destination and an interface: no blanket holes.
                assert_eq!(context, (None, None, Some("default")), "{rule:?}");
                assert_eq!(rule.attribute("send_destination"), Some(BUS_NAME));
                let interface = rule.attribute("send_interface").unwrap();
                assert_ne!(interface, "*");
                let member = rule.attribute("send_member");
                sends.insert((interface.to_string(), member.map(str::to_string)));
                let allowed: Vec<_> = rule.attributes().map(|a| a.name()).collect();
                for attribute in allowed {
                    assert!(
                        ["send_destination", "send_interface", "send_member"].contains(&attribute),
                        "{attribute} in {rule:?}"
                    );
                }
            }
        }
    }
    assert_eq!(
        owners,
        vec![((Some("root"), None, None), BUS_NAME.to_string())],
        "only root may own {BUS_NAME}"
    );

    let standard = [
        ("org.freedesktop.DBus.Introspectable", Some("Introspect")),
        ("org.freedesktop.DBus.Properties", Some("Get")),
        ("org.freedesktop.DBus.Properties", Some("GetAll")),
        ("org.freedesktop.DBus.Peer", None),
        (
            "org.freedesktop.DBus.ObjectManager",
            Some("GetManagedObjects"),
        ),
    ];
    let mut expected: BTreeSet<(String, Option<String>)> = standard
        .iter()
        .map(|(i, m)| (i.to_string(), m.map(str::to_string)))
        .collect();
    for interface in vmsnap_interfaces() {
        expected.insert((interface, None));
    }
    assert_eq!(sends, expected);
    assert!(!sends.contains(&(
        "org.freedesktop.DBus.Properties".to_string(),
        Some("Set".to_string())
    )));
}

#[test]
fn polkit_actions_are_separate_rights_for_active_admins() {
    let text = read(POLKIT);
    let doc = parse_xml(&text);
    let root = doc.root_element();
    assert!(root.has_tag_name("policyconfig"));
    let actions: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("action"))
        .collect();
    let ids: Vec<&str> = actions.iter().map(|a| a.attribute("id").unwrap()).collect();
    assert_eq!(
        ids,
        [
            "org.vmsnap.snapshot.create",
            "org.vmsnap.snapshot.delete",
            "org.vmsnap.restore"
        ]
    );
    let child_text = |node: &roxmltree::Node, tag: &str| -> String {
        node.children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mut messages = BTreeSet::new();
    for action in &actions {
        let description = child_text(action, "description");
        let message = child_text(action, "message");
        assert!(description.len() > 10, "{description:?}");
        assert!(
            message.starts_with("Authentication is required to"),
            "{message:?}"
        );
        messages.insert(message);
        let defaults = action
            .children()
            .find(|n| n.has_tag_name("defaults"))
            .unwrap();
        assert_eq!(child_text(&defaults, "allow_any"), "no");
        assert_eq!(child_text(&defaults, "allow_inactive"), "no");
        assert_eq!(child_text(&defaults, "allow_active"), "auth_admin_keep");
    }
    assert_eq!(messages.len(), 3, "each action says what it is about");
}

#[test]
fn activation_file_starts_the_unit() {
    let text = read(ACTIVATION);
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(lines.next(), Some("[D-BUS Service]"));
    let keys: BTreeSet<&str> = lines.collect();
    let expected: BTreeSet<&str> = [
        "Name=org.vmsnap.VmSnap1",
        "Exec=/usr/bin/vmsnapd",
        "User=root",
        "SystemdService=vmsnapd.service",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
    // The unit it names is the one install.sh installs.
    assert!(workspace_root().join("systemd/vmsnapd.service").is_file());
}

/// The unprivileged user the bus tests run clients as: made (a system user without home) when
/// missing. Returns its uid and gid.
fn test_user() -> (u32, u32) {
    static MADE: Mutex<()> = Mutex::new(());
    let _guard = MADE.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        is_root(),
        "this test needs root to make and become an unprivileged user (CI and lab/test.sh run as root)"
    );
    let id = |flag: &str| Command::new("id").args([flag, TEST_USER]).output().unwrap();
    if !id("-u").status.success() {
        let output = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "useradd: {output:?}");
    }
    let number = |flag: &str| -> u32 {
        let output = id(flag);
        assert!(output.status.success(), "id {flag}: {output:?}");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    let (uid, gid) = (number("-u"), number("-g"));
    assert_ne!(uid, 0);
    (uid, gid)
}

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// vmsnapd (as root) on the bus with libvirt's test driver, stopped (SIGTERM) on drop.
struct RootDaemon {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl RootDaemon {
    fn start(bus: &SystemBus) -> RootDaemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vmsnapd.toml");
        std::fs::write(
            &config,
            format!(
                "{}state_dir = \"{}\"\nvm_lock_dir = \"{}\"\n",
                config_for("test:///default"),
                dir.path().join("state").display(),
                dir.path().join("locks").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("vmsnapd.log");
        let child = Command::new(bin("vmsnapd"))
            .arg("--config")
            .arg(&config)
            .arg("--bus-address")
            .arg(&bus.address)
            .env("VMSNAP_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = RootDaemon {
            child,
            log,
            _dir: dir,
        };
        wait_for(Duration::from_secs(30), "vmsnapd to own its name", || {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("vmsnapd exited early ({status}):\n{}", daemon.log_text());
            }
            name_has_owner(&bus.address).then_some(())
        });
        daemon
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RootDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let stopped = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `program args` as the unprivileged test user (no supplementary groups).
fn as_user(user: (u32, u32), program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1))
        .arg("--clear-groups")
        .arg(program)
        .args(args)
        .env_remove("VMSNAP_BUS_ADDRESS")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap()
}

fn busctl_as_user(user: (u32, u32), bus: &SystemBus, args: &[&str]) -> Output {
    let address = format!("--address={}", bus.address);
    let mut all = vec![address.as_str()];
    all.extend_from_slice(args);
    as_user(user, Path::new("/usr/bin/busctl"), &all)
}

/// A copy of vmsnapctl the test user can run wherever the workspace lives.
fn vmsnapctl_for_user(bus: &SystemBus) -> PathBuf {
    let copy = bus.dir.path().join("vmsnapctl");
    std::fs::copy(bin("vmsnapctl"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

fn request_name_as_user(user: (u32, u32), bus: &SystemBus) -> Output {
    busctl_as_user(
        user,
        bus,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RequestName",
            "su",
            BUS_NAME,
            "4",
        ],
    )
}

#[test]
fn on_a_system_bus_only_root_owns_the_name_and_anyone_reads() {
    let user = test_user();
    let bus = SystemBus::start();

    // The user reaches the bus (the bus itself answers it) but may not own the name, free or not.
    let hello = busctl_as_user(user, &bus, &["list", "--no-pager"]);
    assert!(hello.status.success(), "{hello:?}");
    let refused = request_name_as_user(user, &bus);
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = stderr_of(&refused);
    assert!(stderr.contains("Access denied"), "{stderr}");
    assert!(!name_has_owner(&bus.address));

    // Root may: vmsnapd takes the name.
    let daemon = RootDaemon::start(&bus);
    let refused = request_name_as_user(user, &bus);
    assert!(!refused.status.success(), "{refused:?}");

    // The user reads through vmsnapctl: VMs, one VM, snapshots, restores.
    let vmsnapctl = vmsnapctl_for_user(&bus);
    let ctl = |args: &[&str]| {
        let mut all = vec!["--bus-address", bus.address.as_str()];
        all.extend_from_slice(args);
        let output = as_user(user, &vmsnapctl, &all);
        assert!(
            output.status.success(),
            "vmsnapctl {args:?} as {TEST_USER}: {output:?}\nvmsnapd:\n{}",
            daemon.log_text()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let list: serde_json::Value =
        serde_json::from_str(&ctl(&["vm", "list", "--output", "json"])).unwrap();
    let vm = find_vm(&list, "test").unwrap_or_else(|| panic!("{list}"));
    assert_eq!(vm["state"], "running");
    let show: serde_json::Value =
        serde_json::from_str(&ctl(&["vm", "show", "test", "--output", "json"])).unwrap();
    assert_eq!(show["name"], "test");
    assert!(ctl(&["vm", "list"]).starts_with("NAME"));
    let snapshots: serde_json::Value =
        serde_json::from_str(&ctl(&["snapshot", "list", "--output", "json"])).unwrap();
    assert_eq!(snapshots, serde_json::json!([]));
    let restores: serde_json::Value =
        serde_json::from_str(&ctl(&["restore", "list", "--output", "json"])).unwrap();
    assert_eq!(restores, serde_json::json!([]));

    // And through the standard interfaces: properties, introspection, the object manager.
    let manager = "/org/vmsnap/VmSnap1/Manager";
    let version = busctl_as_user(
        user,
        &bus,
        &[
            "get-property",
            BUS_NAME,
            manager,
            "org.vmsnap.VmSnap1.Manager",
            "LibvirtUri",
        ],
    );
    assert!(version.status.success(), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "s \"test:///default\""
    );
    let introspect = busctl_as_user(
        user,
        &bus,
        &[
            "call",
            BUS_NAME,
            manager,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
        ],
    );
    assert!(introspect.status.success(), "{introspect:?}");
    let objects = busctl_as_user(
        user,
        &bus,
        &[
            "call",
            BUS_NAME,
            "/org/vmsnap/VmSnap1",
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ],
    );
    assert!(objects.status.success(), "{objects:?}");
    let ping = busctl_as_user(
        user,
        &bus,
        &["call", BUS_NAME, "/", "org.freedesktop.DBus.Peer", "Ping"],
    );
    assert!(ping.status.success(), "{ping:?}");

    // The bus itself rejects what the policy does not open: setting a property, other interfaces.
    for args in [
        &[
            "set-property",
            BUS_NAME,
            manager,
            "org.vmsnap.VmSnap1.Manager",
            "LibvirtUri",
            "s",
            "qemu:///system",
        ][..],
        &[
            "call",
            BUS_NAME,
            manager,
            "org.example.NotVmsnap",
            "Anything",
        ],
    ] {
        let rejected = busctl_as_user(user, &bus, args);
        assert!(!rejected.status.success(), "{args:?}: {rejected:?}");
        let stderr = stderr_of(&rejected);
        assert!(stderr.contains("Access denied"), "{args:?}: {stderr}");
    }
    assert!(name_has_owner(&bus.address), "vmsnapd still serves");
    drop(daemon);
}
