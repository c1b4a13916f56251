//! `vmsnapctl snapshot ...`: create, list, show and delete snapshots.

use std::collections::HashMap;

use clap::{Args, Subcommand};
use clap_complete::engine::ArgValueCandidates;
use vmsnap_api::{SnapshotPhase, VmSnapError, SNAPSHOT_INTERFACE};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use crate::bus::{Bus, ReadError};
use crate::snapshot_output::{
    print_deleted, print_snapshot, print_snapshot_list, Deleted, Snapshot,
};
use crate::watch::{Event, Progress, Stopped, Watch};
use crate::{Failure, OutputFormat};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM and wait until it has succeeded or failed.
    ///
    /// vmsnapd snapshots every disk of the VM that can be snapshotted (file disks with external
    /// qcow2 overlays, disks on LVM logical volumes with LVM snapshots), freezing the guest's
    /// filesystems through the QEMU guest agent around it when the agent is connected. The
    /// snapshot is recorded under NAME, which must be unique among the VM's snapshots.
    ///
    /// vmsnapctl waits until the snapshot leaves phase InProgress, printing on standard error
    /// what vmsnapd is doing as it goes ("vmsnapctl: freezing filesystems"), then prints the
    /// snapshot as `snapshot show` does. Pressing Ctrl-C stops the waiting, not the snapshot:
    /// vmsnapd finishes it regardless; follow it with `snapshot show`.
    ///
    /// A VM with disks that cannot be snapshotted (cdroms, read-only, shareable or network
    /// disks, ...; `vm show` says which and why) is refused unless --allow-excluded is given.
    ///
    /// Exit status: 0 when the snapshot succeeded (with --no-wait: when vmsnapd started it);
    /// 1 when vmsnapd refused the request or the snapshot failed, with the reason on standard
    /// error (with --output json the failed snapshot is still printed on standard output);
    /// 130 when the wait was interrupted with Ctrl-C.
    Create(CreateArgs),

    /// List snapshots, oldest first: of one VM, or of every VM.
    ///
    /// Columns: NAME, VM, PHASE (InProgress, Succeeded, Failed or Deleting), READY (whether the
    /// snapshot can be restored), CREATED (RFC 3339, UTC) and INDICATIONS (what its consistency
    /// rests on: Online, GuestAgent, NoGuestAgent, QuiesceFailed, Paused). With --output json:
    /// an array of the objects `snapshot show --output json` prints.
    ///
    /// Exit status: 0 on success (also when there are no snapshots); 1 on error, for instance
    /// when VM does not exist.
    List {
        /// List only the snapshots of this VM (name or UUID). Default: every VM's snapshots.
        #[arg(value_name = "VM", add = ArgValueCandidates::new(crate::complete::vm_names))]
        vm: Option<String>,
    },

    /// Show one snapshot in detail: phase, indications, freeze window and every volume.
    ///
    /// Prints the snapshot's name, VM, UUID, description, phase (and what vmsnapd is doing
    /// while it is InProgress or Deleting), whether it is ready to use, when it was created, its
    /// indications, how long the guest's filesystems were frozen, the error if it failed, and
    /// tables of the volumes it includes (with backend, virtual size and the image that holds
    /// the data) and excludes (with the reason).
    ///
    /// With --output json, field names follow KubeVirt's VirtualMachineSnapshot: name, uuid,
    /// vm, vmUuid, description, phase, readyToUse, creationTime (null until set), indications,
    /// snapshotVolumes.includedVolumes[] (target, backend, image, virtualSize in bytes),
    /// snapshotVolumes.excludedVolumes[] (target, reason), error (null unless failed),
    /// freezeDurationMs and frozenFilesystems.
    ///
    /// Exit status: 0 on success; 1 on error, for instance when there is no such snapshot.
    Show {
        /// The VM's name or UUID.
        #[arg(value_name = "VM", add = ArgValueCandidates::new(crate::complete::vm_names))]
        vm: String,
        /// The snapshot's name.
        #[arg(
            value_name = "NAME",
            add = ArgValueCandidates::new(crate::complete::snapshot_names)
        )]
        name: String,
    },

    /// Delete a snapshot and wait until it is gone.
    ///
    /// vmsnapd removes the snapshot's data without changing any other snapshot or the VM's
    /// live disks; meanwhile the snapshot is in phase Deleting. vmsnapctl waits until the
    /// snapshot has disappeared, printing on standard error what vmsnapd is doing, then prints
    /// "Deleted snapshot NAME of VM" (with --output json: {"name", "vm", "deleted": true}).
    /// If the deletion fails, the snapshot leaves phase Deleting and stays; vmsnapctl prints
    /// the reason. Pressing Ctrl-C stops the waiting, not the deletion.
    ///
    /// Exit status: 0 when the snapshot is gone (with --no-wait: when vmsnapd started deleting
    /// it); 1 when vmsnapd refused the request or the deletion failed, with the reason on
    /// standard error; 130 when the wait was interrupted with Ctrl-C.
    Delete {
        /// The VM's name or UUID.
        #[arg(value_name = "VM", add = ArgValueCandidates::new(crate::complete::vm_names))]
        vm: String,
        /// The snapshot's name.
        #[arg(
            value_name = "NAME",
            add = ArgValueCandidates::new(crate::complete::snapshot_names)
        )]
        name: String,
        /// Do not wait: return as soon as vmsnapd has accepted the deletion, and print
        /// "Deleting snapshot NAME of VM" (with --output json: "deleted": false).
        #[arg(long)]
        no_wait: bool,
    },

    /// Export a snapshot for another host that shares its storage.
    ///
    /// Prints the snapshot's content record (JSON: the VM's definition without its secrets,
    /// and each volume's RBD snapshot) for `snapshot import` on another vmsnapd host that
    /// reaches the same Ceph cluster. Only a succeeded snapshot whose every disk is on Ceph RBD
    /// can move: a snapshot of file or LVM disks has its data on this host.
    ///
    /// Exit status: 0 on success; 1 on error, for instance when the snapshot has a disk on this
    /// host.
    Export {
        /// The VM's name or UUID.
        #[arg(value_name = "VM", add = ArgValueCandidates::new(crate::complete::vm_names))]
        vm: String,
        /// The snapshot's name.
        #[arg(
            value_name = "NAME",
            add = ArgValueCandidates::new(crate::complete::snapshot_names)
        )]
        name: String,
        /// Write the record to this new file instead of standard output (an existing file is
        /// not replaced).
        #[arg(long, short = 'f', value_name = "FILE")]
        file: Option<std::path::PathBuf>,
    },

    /// Import a snapshot another host exported (`snapshot export`).
    ///
    /// vmsnapd checks the record, then that its cluster has every RBD snapshot it names, and
    /// only then records it: it is listed under its VM (defined on this host or not) and can be
    /// restored, as a new VM or, once a VM of that name and UUID is defined here, in place.
    /// Prints the snapshot as `snapshot show` does.
    ///
    /// Exit status: 0 when the snapshot was imported; 1 when vmsnapd refused it (not a record,
    /// a disk not on RBD, an RBD snapshot missing in the cluster, a snapshot of that name or
    /// UUID already here), with the reason on standard error.
    Import {
        /// The exported record; `-` reads standard input.
        #[arg(value_name = "FILE")]
        file: String,
    },

    /// Restore a VM to one of its snapshots: the same as `vmsnapctl restore VM NAME`.
    ///
    /// Takes the same arguments and flags as `vmsnapctl restore` (see its help), for users
    /// of virsh and incus, who type it this way.
    Restore(crate::restore::CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name or UUID.
    #[arg(value_name = "VM", add = ArgValueCandidates::new(crate::complete::vm_names))]
    pub vm: String,

    /// The new snapshot's name: 1 to 63 characters of A-Z a-z 0-9 . _ -, not starting with
    /// '.' or '-', unique among the VM's snapshots.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// A free-form description stored with the snapshot and shown by `snapshot show`.
    /// Default: none.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Snapshot the VM even though some of its disks cannot be snapshotted; those disks are
    /// left out and listed under "Excluded volumes" with the reason. Without this flag such a
    /// VM is refused, naming each disk and why.
    #[arg(long)]
    pub allow_excluded: bool,

    /// Do not wait: print the snapshot as it is right after vmsnapd accepted the request (phase
    /// InProgress) and exit 0. Follow it with `snapshot show`.
    #[arg(long)]
    pub no_wait: bool,
}

pub async fn run(bus: &Bus, command: SnapshotCommand, format: OutputFormat) -> Result<(), Failure> {
    match command {
        SnapshotCommand::Create(args) => create(bus, &args, format).await,
        SnapshotCommand::List { vm } => Ok(list(bus, vm.as_deref(), format).await?),
        SnapshotCommand::Show { vm, name } => Ok(show(bus, &vm, &name, format).await?),
        SnapshotCommand::Delete { vm, name, no_wait } => {
            delete(bus, &vm, &name, no_wait, format).await
        }
        SnapshotCommand::Restore(args) => crate::restore::run_create(bus, &args, format).await,
        SnapshotCommand::Export { vm, name, file } => {
            Ok(crate::transfer::export(bus, &vm, &name, file.as_deref()).await?)
        }
        SnapshotCommand::Import { file } => Ok(import(bus, &file, format).await?),
    }
}

/// The options of Manager.CreateSnapshot: `description` (s) only when given, `allow_excluded`
/// (b) only when set.
pub fn create_options(
    description: Option<&str>,
    allow_excluded: bool,
) -> Result<HashMap<&'static str, OwnedVariant>, String> {
    let mut options = HashMap::new();
    if let Some(text) = description {
        // vmsnapd's own rule, so the answer comes before anything is asked.
        vmsnap_api::validate_description(text)?;
        let value = OwnedVariant::try_from(Variant::from(text))
            .map_err(|e| format!("cannot encode the description: {e}"))?;
        options.insert("description", value);
    }
    if allow_excluded {
        options.insert("allow_excluded", OwnedVariant::from(true));
    }
    Ok(options)
}

/// The message for a refused CreateSnapshot. ExcludedDisks gets a hint at the flag that
/// overrides it, unless vmsnapd's message already names it.
fn describe_create_error(bus: &Bus, error: VmSnapError) -> String {
    match error {
        VmSnapError::ExcludedDisks(message) => with_allow_excluded_hint(message),
        other => bus.describe_api(other),
    }
}

fn with_allow_excluded_hint(message: String) -> String {
    if message.contains("--allow-excluded") {
        message
    } else {
        format!("{message} (use --allow-excluded to snapshot without them)")
    }
}

async fn create(bus: &Bus, args: &CreateArgs, format: OutputFormat) -> Result<(), Failure> {
    vmsnap_api::validate_snapshot_name(&args.name)?;
    let options = create_options(args.description.as_deref(), args.allow_excluded)?;
    let manager = bus.manager().await?;
    let path = manager
        .create_snapshot(&args.vm, &args.name, options)
        .await
        .map_err(|e| describe_create_error(bus, e))?;
    let gone = || {
        format!(
            "snapshot {} of {} was removed before it finished",
            args.name, args.vm
        )
    };

    if args.no_wait {
        let snapshot = read(bus, &path, gone).await?;
        print_snapshot(&snapshot, format)?;
        return Ok(());
    }

    let mut watch = Watch::subscribe(bus, &path, SNAPSHOT_INTERFACE).await?;
    let snapshot = watch
        .until_settled(
            SnapshotPhase::InProgress.as_str(),
            || read(bus, &path, &gone),
            |s: &Snapshot| &s.phase,
            |s| &s.progress,
            &gone,
            |_| Stopped {
                daemon_gone: format!(
                    "vmsnapd stopped while snapshot {} of {} was in progress; \
                     check it with 'vmsnapctl snapshot show {} {}'",
                    args.name, args.vm, args.vm, args.name
                ),
                interrupted: "stopped waiting; the snapshot continues in vmsnapd".to_string(),
            },
        )
        .await?;

    if snapshot.phase == SnapshotPhase::Failed.as_str() {
        if format == OutputFormat::Json {
            print_snapshot(&snapshot, format)?;
        }
        return Err(failed_message(&snapshot).into());
    }
    print_snapshot(&snapshot, format)?;
    Ok(())
}

fn failed_message(snapshot: &Snapshot) -> String {
    let error = if snapshot.error.is_empty() {
        "vmsnapd gave no reason"
    } else {
        snapshot.error.as_str()
    };
    format!(
        "snapshot {} of {} failed: {error}",
        snapshot.name, snapshot.vm
    )
}

/// Reads a snapshot; `gone` describes its absence.
async fn read(
    bus: &Bus,
    path: &OwnedObjectPath,
    gone: impl Fn() -> String,
) -> Result<Snapshot, String> {
    bus.read_snapshot(path).await.map_err(|e| match e {
        ReadError::Vanished => gone(),
        ReadError::Other(message) => message,
    })
}

fn not_found(vm: &str, name: &str) -> String {
    format!("snapshot '{name}' of VM '{vm}' not found")
}

async fn list(bus: &Bus, vm: Option<&str>, format: OutputFormat) -> Result<(), String> {
    // One call, which resolves the VM as ListSnapshots does (and fails the same way).
    let snapshots = bus.snapshot_list(vm.unwrap_or("")).await?;
    print_snapshot_list(&snapshots, format)
}

async fn import(bus: &Bus, file: &str, format: OutputFormat) -> Result<(), String> {
    let record = crate::transfer::read_record(file)?;
    let manager = bus.manager().await?;
    let path = manager
        .import_snapshot(&record)
        .await
        .map_err(|e| bus.describe_api(e))?;
    let snapshot = read(bus, &path, || {
        "the imported snapshot was removed at once".to_string()
    })
    .await?;
    print_snapshot(&snapshot, format)
}

async fn show(bus: &Bus, vm: &str, name: &str, format: OutputFormat) -> Result<(), String> {
    let manager = bus.manager().await?;
    let path = manager
        .find_snapshot(vm, name)
        .await
        .map_err(|e| bus.describe_api(e))?;
    let snapshot = read(bus, &path, || not_found(vm, name)).await?;
    print_snapshot(&snapshot, format)
}

async fn delete(
    bus: &Bus,
    vm: &str,
    name: &str,
    no_wait: bool,
    format: OutputFormat,
) -> Result<(), Failure> {
    let manager = bus.manager().await?;
    let path = manager
        .find_snapshot(vm, name)
        .await
        .map_err(|e| bus.describe_api(e))?;
    // Subscribe before the call, so that neither the disappearance nor a failure is missed.
    let mut watch = if no_wait {
        None
    } else {
        Some(Watch::subscribe(bus, &path, SNAPSHOT_INTERFACE).await?)
    };
    let before = read(bus, &path, || not_found(vm, name)).await?;
    let proxy = bus.snapshot_proxy(&path).await?;
    proxy.delete().await.map_err(|e| bus.describe_api(e))?;

    let Some(watch) = watch.as_mut() else {
        let started = Deleted {
            name: &before.name,
            vm: &before.vm,
            deleted: false,
        };
        print_deleted(&started, format)?;
        return Ok(());
    };

    // A phase other than Deleting counts as the outcome only after Deleting was seen: a change
    // that was on its way before the call (InProgress to Succeeded) says nothing about it.
    let mut deleting = before.phase == SnapshotPhase::Deleting.as_str();
    let mut progress = Progress::default();
    loop {
        match watch.next().await? {
            Event::Progress(text) => progress.show(&text),
            Event::Phase(phase) if phase == SnapshotPhase::Deleting.as_str() => deleting = true,
            Event::Phase(phase) => {
                if deleting {
                    return Err(delete_failed(bus, &path, &before, &phase).await?.into());
                }
            }
            Event::Removed => break,
            Event::DaemonGone => {
                return Err(format!(
                    "vmsnapd stopped while deleting snapshot {} of {}; \
                     check with 'vmsnapctl snapshot list {}'",
                    before.name, before.vm, before.vm
                )
                .into())
            }
            Event::Interrupted => {
                return Err(Failure::interrupted(
                    "stopped waiting; the deletion continues in vmsnapd",
                ))
            }
        }
    }
    let deleted = Deleted {
        name: &before.name,
        vm: &before.vm,
        deleted: true,
    };
    print_deleted(&deleted, format)?;
    Ok(())
}

/// The message for a deletion that ended with the snapshot still there, in phase `phase`.
async fn delete_failed(
    bus: &Bus,
    path: &OwnedObjectPath,
    before: &Snapshot,
    phase: &str,
) -> Result<String, String> {
    let reason = match bus.read_snapshot(path).await {
        Ok(now) if !now.error.is_empty() => now.error,
        Ok(_) | Err(ReadError::Vanished) => format!("the snapshot is back in phase {phase}"),
        Err(ReadError::Other(message)) => message,
    };
    Ok(format!(
        "deleting snapshot {} of {} failed: {reason}",
        before.name, before.vm
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_options_by_default() {
        let options = create_options(None, false).expect("builds");
        assert!(options.is_empty());
    }

    #[test]
    fn description_is_a_string_option() {
        let options = create_options(Some("before the upgrade"), false).expect("builds");
        assert_eq!(options.len(), 1);
        let value = options.get("description").expect("description set");
        assert_eq!(value.value_signature().to_string(), "s");
        assert_eq!(<&str>::try_from(value).ok(), Some("before the upgrade"));
    }

    #[test]
    fn empty_description_is_still_sent() {
        let options = create_options(Some(""), false).expect("builds");
        let value = options.get("description").expect("description set");
        assert_eq!(<&str>::try_from(value).ok(), Some(""));
    }

    #[test]
    fn allow_excluded_is_a_boolean_option() {
        let options = create_options(None, true).expect("builds");
        assert_eq!(options.len(), 1);
        let value = options.get("allow_excluded").expect("allow_excluded set");
        assert_eq!(value.value_signature().to_string(), "b");
        assert_eq!(bool::try_from(value).ok(), Some(true));
    }

    #[test]
    fn both_options() {
        let options = create_options(Some("x"), true).expect("builds");
        let mut keys: Vec<&str> = options.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["allow_excluded", "description"]);
    }

    #[test]
    fn excluded_disks_hint() {
        assert_eq!(
            with_allow_excluded_hint(
                "VM 'web' has disks that cannot be snapshotted: sda (cdrom)".into()
            ),
            "VM 'web' has disks that cannot be snapshotted: sda (cdrom) \
             (use --allow-excluded to snapshot without them)"
        );
        let already = "sda (cdrom); pass --allow-excluded to go ahead without them".to_string();
        assert_eq!(with_allow_excluded_hint(already.clone()), already);
    }

    #[test]
    fn failure_message_names_snapshot_vm_and_error() {
        let snapshot = Snapshot {
            name: "nightly".into(),
            uuid: "u".into(),
            vm: "db".into(),
            vm_uuid: "v".into(),
            description: String::new(),
            phase: "Failed".into(),
            ready_to_use: false,
            creation_time: String::new(),
            indications: vec![],
            included_volumes: vec![],
            excluded_volumes: vec![],
            error: "the guest agent did not answer".into(),
            error_name: String::new(),
            progress: String::new(),
            freeze_duration_ms: 0,
            frozen_filesystems: 0,
            cow_fill_percent: 0.0,
        };
        assert_eq!(
            failed_message(&snapshot),
            "snapshot nightly of db failed: the guest agent did not answer"
        );
    }
}
