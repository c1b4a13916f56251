//! `vmsnapctl restore ...`: restore a VM to a snapshot, list and show restores.
//!
//! `restore` takes either a subcommand (`list`, `show RESTORE`) or the arguments of a restore
//! (`VM SNAPSHOT [flags]`): clap tries the first word as a subcommand and otherwise reads the
//! words as arguments (`args_conflicts_with_subcommands`); `subcommand_negates_reqs` keeps VM and
//! SNAPSHOT required only when no subcommand is given. A VM named `list` or `show` is restored
//! with `restore -- list SNAPSHOT`.
//!
//! Since any option, a global one included, makes clap read what follows as the arguments of a
//! restore, [`hoist_global_options`] first moves global options given right after `restore`
//! (`restore -o json list`) in front of it, where they mean the same.

use std::collections::HashMap;
use std::ffi::OsString;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Subcommand};
use vmsnap_api::{RestorePhase, VmSnapError, RESTORE_INTERFACE};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use crate::bus::{Bus, ReadError};
use crate::restore_output::{print_restore, print_restore_list, Restore};
use crate::watch::{Stopped, Watch};
use crate::{Failure, OutputFormat};

/// `vmsnapctl restore`: a subcommand, or the arguments of a restore.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    // Keep `help` free as a VM name: `restore --help` and `restore list --help` still work.
    disable_help_subcommand = true,
    subcommand_value_name = "COMMAND",
    subcommand_help_heading = "Commands"
)]
pub struct RestoreArgs {
    #[command(subcommand)]
    pub command: Option<RestoreCommand>,

    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Debug, Subcommand)]
pub enum RestoreCommand {
    /// List every restore, oldest first.
    ///
    /// Columns: UUID (its first 8 characters, enough for `restore show`), VM (the VM the
    /// snapshot belongs to), SNAPSHOT, TARGET (the VM that was restored: the same VM, or the new
    /// one made with --target), PHASE (InProgress, Succeeded or Failed), COMPLETE (whether the
    /// restore has finished successfully) and RESTORED (when it completed, RFC 3339, UTC). With
    /// --output json: an array of the objects `restore show --output json` prints.
    ///
    /// Exit status: 0 on success (also when there are no restores); 1 on error.
    List,

    /// Show one restore in detail: phase, safety snapshot and what happened to every disk.
    ///
    /// RESTORE is the restore's UUID, or a prefix of it of at least 4 characters that no other
    /// restore shares (the 8 characters `restore list` shows will do).
    ///
    /// Prints the UUID, the VM and snapshot, the target (marked "(new VM)" when the restore
    /// created a VM), the phase (and what vmsnapd is doing while it is InProgress), whether it
    /// is complete, when it was requested and when it completed, the safety snapshot taken
    /// before it, the error if it failed, and tables of: the restored disks (TARGET, FROM: the
    /// snapshot's image, left unchanged, TO: the disk's new image on top of it); the detached
    /// disks (disks attached after the snapshot was taken: removed from the VM's definition,
    /// their images left untouched); and the disks not restored (excluded from the snapshot:
    /// back in the definition, but their content was never captured, so it is whatever it is
    /// now).
    ///
    /// With --output json, field names follow KubeVirt's VirtualMachineRestore status: uuid,
    /// vm, snapshot, target, newVm, phase, complete, creationTime, restoreTime (null until
    /// complete), restores[] (target, fromImage, toImage), detachedDisks[] (target, source),
    /// notRestored[] (target, reason), safetySnapshot (null if none) and error (null unless
    /// failed).
    ///
    /// Exit status: 0 on success; 1 on error, for instance when no restore or more than one
    /// matches RESTORE.
    Show {
        /// The restore's UUID, or a unique prefix of it of at least 4 characters.
        #[arg(value_name = "RESTORE")]
        restore: String,
    },
}

/// The arguments of `vmsnapctl restore VM SNAPSHOT`. VM and SNAPSHOT are options here only so
/// that `restore list` and `restore show` can do without them; clap requires them otherwise.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM to restore, by name or UUID: the VM the snapshot belongs to.
    #[arg(
        value_name = "VM",
        required = true,
        add = clap_complete::engine::ArgValueCandidates::new(crate::complete::vm_names)
    )]
    pub vm: Option<String>,

    /// The name of the VM's snapshot to restore (see `vmsnapctl snapshot list VM`).
    #[arg(
        value_name = "SNAPSHOT",
        required = true,
        add = clap_complete::engine::ArgValueCandidates::new(crate::complete::snapshot_names)
    )]
    pub snapshot: Option<String>,

    /// Restore into a new VM named NEWVM instead of in place. The new VM gets a new UUID and
    /// new MAC addresses and disks of its own on top of the snapshot's images; VM itself, its
    /// disks and its snapshots are left untouched, and VM may keep running. NEWVM must not
    /// exist yet.
    #[arg(long, value_name = "NEWVM", value_parser = NonEmptyStringValueParser::new())]
    pub target: Option<String>,

    /// Shut VM down first if it is running or paused (gracefully, then forcibly when the guest
    /// does not stop in time). Without it, an in-place restore of a VM that is not shut off is
    /// refused. Not with --target, which leaves VM alone.
    #[arg(long, conflicts_with = "target")]
    pub stop: bool,

    /// Start the restored VM (VM, or NEWVM with --target) once the restore has succeeded.
    /// Default: leave it shut off.
    #[arg(long)]
    pub start: bool,

    /// Do not take the safety snapshot (pre-restore-<time>) of VM's current state before an
    /// in-place restore. Whatever VM's disks hold now and no snapshot holds is then lost for
    /// good. No effect with --target.
    #[arg(long)]
    pub no_safety_snapshot: bool,

    /// Do not wait: print the restore as it is right after vmsnapd accepted the request (phase
    /// InProgress) and exit 0. Follow it with `restore show`.
    #[arg(long)]
    pub no_wait: bool,
}

/// How many words starting at `args[i]` make up one of vmsnapctl's global options (`-o json`,
/// `-ojson`, `--output json`, `--output=json`, and the same for `--bus-address`, `-H`/`--host`;
/// `-q`/`--quiet`), if one starts there.
fn global_option_len(args: &[OsString], i: usize) -> Option<usize> {
    let word = args.get(i)?.to_str()?;
    let has_value = i + 1 < args.len();
    for long in ["--output", "--bus-address", "--host"] {
        if word == long {
            return has_value.then_some(2);
        }
        if word
            .strip_prefix(long)
            .is_some_and(|rest| rest.starts_with('='))
        {
            return Some(1);
        }
    }
    if word == "-q" || word == "--quiet" {
        return Some(1);
    }
    for short in ["-o", "-H"] {
        if word == short {
            return has_value.then_some(2);
        }
        if word
            .strip_prefix(short)
            .is_some_and(|rest| !rest.is_empty())
        {
            return Some(1);
        }
    }
    None
}

/// Moves the global options that directly follow the `restore` command word in front of it, so
/// that `vmsnapctl restore -o json list` is `restore list`, as `vmsnapctl -o json restore list`
/// is. Global options mean the same wherever they stand; everything else is left as it is.
pub fn hoist_global_options(mut args: Vec<OsString>) -> Vec<OsString> {
    let mut command = 1;
    while let Some(len) = global_option_len(&args, command) {
        command += len;
    }
    if args.get(command).and_then(|word| word.to_str()) != Some("restore") {
        return args;
    }
    let mut end = command + 1;
    while let Some(len) = global_option_len(&args, end) {
        end += len;
    }
    if let Some(words) = args.get_mut(command..end) {
        words.rotate_left(1);
    }
    args
}

pub async fn run(bus: &Bus, args: RestoreArgs, format: OutputFormat) -> Result<(), Failure> {
    match args.command {
        Some(RestoreCommand::List) => Ok(list(bus, format).await?),
        Some(RestoreCommand::Show { restore }) => Ok(show(bus, &restore, format).await?),
        None => {
            let (Some(vm), Some(snapshot)) = (&args.create.vm, &args.create.snapshot) else {
                // clap requires both without a subcommand; this is only a guard.
                return Err(
                    "restore needs a VM and a snapshot, or 'list' or 'show RESTORE'"
                        .to_string()
                        .into(),
                );
            };
            restore(bus, vm, snapshot, &args.create, format).await
        }
    }
}

/// `vmsnapctl restore VM SNAPSHOT` (and its alias `vmsnapctl snapshot restore VM SNAPSHOT`).
pub async fn run_create(bus: &Bus, args: &CreateArgs, format: OutputFormat) -> Result<(), Failure> {
    let (Some(vm), Some(snapshot)) = (&args.vm, &args.snapshot) else {
        return Err("restore needs a VM and a snapshot".to_string().into());
    };
    restore(bus, vm, snapshot, args, format).await
}

/// The options of Manager.Restore: `target` (s) only with --target, `stop_target` (b) only with
/// --stop, `start` (b) only with --start, `safety_snapshot` (b, false) only with
/// --no-safety-snapshot. Whatever is left out takes vmsnapd's default.
pub fn restore_options(args: &CreateArgs) -> Result<HashMap<&'static str, OwnedVariant>, String> {
    let mut options = HashMap::new();
    if let Some(target) = &args.target {
        // vmsnapd's own rule, so the answer comes before anything is asked.
        vmsnap_api::validate_vm_name(target)?;
        let value = OwnedVariant::try_from(Variant::from(target.as_str()))
            .map_err(|e| format!("cannot encode the target name: {e}"))?;
        options.insert("target", value);
    }
    if args.stop {
        options.insert("stop_target", OwnedVariant::from(true));
    }
    if args.start {
        options.insert("start", OwnedVariant::from(true));
    }
    if args.no_safety_snapshot {
        options.insert("safety_snapshot", OwnedVariant::from(false));
    }
    Ok(options)
}

/// The message for a refused Restore. VmRunning gets a hint at the flag that overrides it,
/// unless vmsnapd's message already names it.
fn describe_restore_error(bus: &Bus, error: VmSnapError) -> String {
    match error {
        VmSnapError::VmRunning(message) => with_stop_hint(message),
        other => bus.describe_api(other),
    }
}

fn with_stop_hint(message: String) -> String {
    if message.contains("--stop") {
        message
    } else {
        format!("{message} (stop it first, or pass --stop)")
    }
}

async fn restore(
    bus: &Bus,
    vm: &str,
    snapshot: &str,
    args: &CreateArgs,
    format: OutputFormat,
) -> Result<(), Failure> {
    let options = restore_options(args)?;
    let manager = bus.manager().await?;
    let path = manager
        .restore(vm, snapshot, options)
        .await
        .map_err(|e| describe_restore_error(bus, e))?;
    let gone =
        || format!("the restore of {vm} to snapshot {snapshot} was removed before it finished");

    if args.no_wait {
        let restore = read(bus, &path, gone).await?;
        print_restore(&restore, format)?;
        return Ok(());
    }

    let mut watch = Watch::subscribe(bus, &path, RESTORE_INTERFACE).await?;
    let restore = watch
        .until_settled(
            RestorePhase::InProgress.as_str(),
            || read(bus, &path, &gone),
            |r: &Restore| &r.phase,
            |r| &r.progress,
            &gone,
            |r| Stopped {
                daemon_gone: format!(
                    "vmsnapd stopped while the restore of {vm} to snapshot {snapshot} was in \
                     progress; check it with 'vmsnapctl restore show {}'",
                    r.short_uuid()
                ),
                interrupted: format!(
                    "stopped waiting; the restore continues in vmsnapd \
                     (follow it with 'vmsnapctl restore show {}')",
                    r.short_uuid()
                ),
            },
        )
        .await?;

    if restore.phase == RestorePhase::Failed.as_str() {
        if format == OutputFormat::Json {
            print_restore(&restore, format)?;
        }
        return Err(failed_message(&restore, vm, snapshot).into());
    }
    print_restore(&restore, format)?;
    Ok(())
}

/// `restore of VM to snapshot SNAPSHOT failed: ERROR`, with the names vmsnapd recorded (falling
/// back to the ones given on the command line).
fn failed_message(restore: &Restore, vm: &str, snapshot: &str) -> String {
    let or = |recorded: &str, given: &str| {
        if recorded.is_empty() {
            given.to_string()
        } else {
            recorded.to_string()
        }
    };
    let error = if restore.error.is_empty() {
        "vmsnapd gave no reason"
    } else {
        restore.error.as_str()
    };
    format!(
        "restore of {} to snapshot {} failed: {error}",
        or(&restore.vm, vm),
        or(&restore.snapshot, snapshot)
    )
}

/// Reads a restore; `gone` describes its absence.
async fn read(
    bus: &Bus,
    path: &OwnedObjectPath,
    gone: impl Fn() -> String,
) -> Result<Restore, String> {
    bus.read_restore(path).await.map_err(|e| match e {
        ReadError::Vanished => gone(),
        ReadError::Other(message) => message,
    })
}

/// Every restore, oldest first, read in one call; those removed between the listing and the
/// read are left out.
async fn read_all(bus: &Bus) -> Result<Vec<Restore>, String> {
    let manager = bus.manager().await?;
    let paths = manager
        .list_restores()
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut objects = bus.restore_objects().await?;
    let mut restores = Vec::with_capacity(paths.len());
    for path in &paths {
        if let Some(mut properties) = objects.take_restore(path) {
            restores.push(properties.restore()?);
        }
    }
    Ok(restores)
}

async fn list(bus: &Bus, format: OutputFormat) -> Result<(), String> {
    let restores = read_all(bus).await?;
    print_restore_list(&restores, format)
}

async fn show(bus: &Bus, query: &str, format: OutputFormat) -> Result<(), String> {
    let restores = read_all(bus).await?;
    let restore = resolve(&restores, query)?;
    print_restore(restore, format)
}

/// Shortest UUID prefix `restore show` accepts.
pub const MIN_PREFIX: usize = 4;

/// The restore `query` names: the one whose UUID it is, or the only one whose UUID starts with
/// it (at least [`MIN_PREFIX`] characters). Case does not matter.
pub fn resolve<'a>(restores: &'a [Restore], query: &str) -> Result<&'a Restore, String> {
    if let Some(exact) = restores.iter().find(|r| r.uuid.eq_ignore_ascii_case(query)) {
        return Ok(exact);
    }
    if query.chars().count() < MIN_PREFIX {
        return Err(format!(
            "'{query}' is too short to pick a restore: give its UUID or at least \
             {MIN_PREFIX} of its first characters (see 'vmsnapctl restore list')"
        ));
    }
    let wanted = query.to_ascii_lowercase();
    let matches: Vec<&Restore> = restores
        .iter()
        .filter(|r| r.uuid.to_ascii_lowercase().starts_with(&wanted))
        .collect();
    match matches.as_slice() {
        [] => Err(format!(
            "no restore has a UUID starting with '{query}' (see 'vmsnapctl restore list')"
        )),
        [only] => Ok(only),
        several => {
            let uuids: Vec<&str> = several.iter().map(|r| r.uuid.as_str()).collect();
            Err(format!(
                "'{query}' matches {} restores ({}); give more of the UUID",
                several.len(),
                uuids.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> CreateArgs {
        CreateArgs {
            vm: Some("web".into()),
            snapshot: Some("before-upgrade".into()),
            target: None,
            stop: false,
            start: false,
            no_safety_snapshot: false,
            no_wait: false,
        }
    }

    fn hoisted(argv: &[&str]) -> Vec<String> {
        let args = argv.iter().map(OsString::from).collect();
        hoist_global_options(args)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn global_options_after_restore_move_in_front_of_it() {
        assert_eq!(
            hoisted(&["vmsnapctl", "restore", "-o", "json", "list"]),
            ["vmsnapctl", "-o", "json", "restore", "list"]
        );
        assert_eq!(
            hoisted(&[
                "vmsnapctl",
                "--bus-address",
                "unix:path=/b",
                "restore",
                "--output=json",
                "-ojson",
                "--bus-address",
                "unix:path=/c",
                "show",
                "7e3f"
            ]),
            [
                "vmsnapctl",
                "--bus-address",
                "unix:path=/b",
                "--output=json",
                "-ojson",
                "--bus-address",
                "unix:path=/c",
                "restore",
                "show",
                "7e3f"
            ]
        );
    }

    #[test]
    fn everything_else_stays_where_it_is() {
        for argv in [
            &["vmsnapctl", "restore", "list"][..],
            &["vmsnapctl", "restore", "web", "snap", "-o", "json"],
            &[
                "vmsnapctl",
                "restore",
                "--stop",
                "-o",
                "json",
                "web",
                "snap",
            ],
            &["vmsnapctl", "restore", "-o"],
            &["vmsnapctl", "-o", "json", "snapshot", "-o", "json", "list"],
            &["vmsnapctl", "--help", "restore", "-o", "json"],
            &["vmsnapctl", "restore", "--", "-o", "json"],
            &["vmsnapctl"],
            &[],
        ] {
            assert_eq!(hoisted(argv), argv, "{argv:?}");
        }
    }

    fn keys(options: &HashMap<&'static str, OwnedVariant>) -> Vec<&'static str> {
        let mut keys: Vec<&str> = options.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn no_options_by_default() {
        let options = restore_options(&args()).expect("builds");
        assert!(options.is_empty());
    }

    #[test]
    fn target_is_a_string_option() {
        let mut a = args();
        a.target = Some("web-copy".into());
        let options = restore_options(&a).expect("builds");
        assert_eq!(keys(&options), ["target"]);
        let value = options.get("target").expect("target set");
        assert_eq!(value.value_signature().to_string(), "s");
        assert_eq!(<&str>::try_from(value).ok(), Some("web-copy"));
    }

    #[test]
    fn flags_are_boolean_options() {
        let mut a = args();
        a.stop = true;
        a.start = true;
        a.no_safety_snapshot = true;
        let options = restore_options(&a).expect("builds");
        assert_eq!(keys(&options), ["safety_snapshot", "start", "stop_target"]);
        for (key, expected) in [
            ("stop_target", true),
            ("start", true),
            ("safety_snapshot", false),
        ] {
            let value = options.get(key).expect("set");
            assert_eq!(value.value_signature().to_string(), "b", "{key}");
            assert_eq!(bool::try_from(value).ok(), Some(expected), "{key}");
        }
    }

    #[test]
    fn each_flag_alone() {
        let mut a = args();
        a.stop = true;
        assert_eq!(keys(&restore_options(&a).expect("builds")), ["stop_target"]);
        let mut a = args();
        a.start = true;
        assert_eq!(keys(&restore_options(&a).expect("builds")), ["start"]);
        let mut a = args();
        a.no_safety_snapshot = true;
        assert_eq!(
            keys(&restore_options(&a).expect("builds")),
            ["safety_snapshot"]
        );
        // --no-wait is the client's business only.
        let mut a = args();
        a.no_wait = true;
        assert!(restore_options(&a).expect("builds").is_empty());
    }

    #[test]
    fn vm_running_hint() {
        assert_eq!(
            with_stop_hint("VM 'web' is running".into()),
            "VM 'web' is running (stop it first, or pass --stop)"
        );
        let already = "VM 'web' is running; pass --stop to shut it down first".to_string();
        assert_eq!(with_stop_hint(already.clone()), already);
    }

    fn restore_with(uuid: &str) -> Restore {
        Restore {
            uuid: uuid.into(),
            vm: "web".into(),
            snapshot: "before-upgrade".into(),
            target: "web".into(),
            new_vm: false,
            phase: "Failed".into(),
            complete: false,
            creation_time: String::new(),
            restore_time: String::new(),
            restores: vec![],
            detached_disks: vec![],
            not_restored: vec![],
            safety_snapshot: String::new(),
            error: "qemu-img failed".into(),
            error_name: String::new(),
            progress: String::new(),
        }
    }

    #[test]
    fn failure_message_names_vm_snapshot_and_error() {
        let r = restore_with("u");
        assert_eq!(
            failed_message(&r, "0f6b3a52", "x"),
            "restore of web to snapshot before-upgrade failed: qemu-img failed"
        );
        let mut r = restore_with("u");
        r.vm.clear();
        r.snapshot.clear();
        r.error.clear();
        assert_eq!(
            failed_message(&r, "db", "nightly"),
            "restore of db to snapshot nightly failed: vmsnapd gave no reason"
        );
    }

    #[test]
    fn resolve_by_uuid_or_unique_prefix() {
        let restores = [
            restore_with("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182"),
            restore_with("7e3f9999-0000-4000-8000-000000000002"),
            restore_with("0badc0de-0000-4000-8000-000000000003"),
        ];
        let uuid_of = |q: &str| resolve(&restores, q).map(|r| r.uuid.clone());
        assert_eq!(
            uuid_of("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182").as_deref(),
            Ok("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182")
        );
        assert_eq!(
            uuid_of("7E3F1C2A-9B4D-4E8F-A1C2-3D4E5F607182").as_deref(),
            Ok("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182")
        );
        assert_eq!(
            uuid_of("7e3f1c2a").as_deref(),
            Ok("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182")
        );
        assert_eq!(
            uuid_of("0bad").as_deref(),
            Ok("0badc0de-0000-4000-8000-000000000003")
        );
        assert_eq!(
            uuid_of("7e3f9").as_deref(),
            Ok("7e3f9999-0000-4000-8000-000000000002")
        );
    }

    #[test]
    fn resolve_refuses_short_unknown_and_ambiguous() {
        let restores = [
            restore_with("7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182"),
            restore_with("7e3f9999-0000-4000-8000-000000000002"),
        ];
        let short = resolve(&restores, "7e3").expect_err("too short");
        assert!(short.contains("at least 4"), "{short}");
        let none = resolve(&restores, "abcd").expect_err("unknown");
        assert_eq!(
            none,
            "no restore has a UUID starting with 'abcd' (see 'vmsnapctl restore list')"
        );
        let both = resolve(&restores, "7e3f").expect_err("ambiguous");
        assert_eq!(
            both,
            "'7e3f' matches 2 restores (7e3f1c2a-9b4d-4e8f-a1c2-3d4e5f607182, \
             7e3f9999-0000-4000-8000-000000000002); give more of the UUID"
        );
        assert!(resolve(&[], "7e3f1c2a").is_err());
        assert!(resolve(&restores, "").is_err());
    }
}
