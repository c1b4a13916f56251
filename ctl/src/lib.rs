//! vmsnapctl: the command-line client of vmsnapd.
//!
//! The whole client is this library; the `vmsnapctl` binary only calls [`main`]. The library
//! exists so that `vmsnapctl-gen` can build man pages and shell completions from the same clap
//! definition ([`command`]).

mod bus;
mod complete;
mod emit;
mod kube;
mod objects;
mod output;
mod remote;
mod restore;
mod restore_output;
mod show;
mod snapshot;
mod snapshot_output;
mod transfer;
mod vm;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use vmsnap_api::BUS_ADDRESS_ENV;

use crate::bus::Bus;
use crate::restore::RestoreArgs;
use crate::snapshot::SnapshotCommand;
use crate::vm::VmCommand;

/// Snapshots and restores of libvirt/QEMU virtual machines, through the vmsnapd daemon.
///
/// vmsnapctl talks to vmsnapd over D-Bus (the system bus by default). Every command accepts
/// --output json (or -o yaml) for scripts; field names are stable. Besides its own commands,
/// vmsnapctl speaks KubeVirt's objects the way oc does: `apply -f` of VirtualMachineSnapshot
/// and VirtualMachineRestore manifests, `get`, `wait` and `delete`.
///
/// Exit status (every command): 0 on success; 1 on an error, with a one-line message on
/// standard error (`wait`: also when it timed out); 2 when the command line is wrong (unknown
/// option, missing argument); 130 when a command that waits for vmsnapd is interrupted with
/// Ctrl-C (vmsnapd carries on with the work); 141 when standard output is a closed pipe
/// (`vmsnapctl get vmsnapshot | head -1`): the output ends quietly there.
#[derive(Debug, Parser)]
#[command(name = "vmsnapctl", version, about, long_about)]
struct Cli {
    /// Talk to vmsnapd on this D-Bus address instead of the system bus (with -H: an address
    /// on the remote host).
    #[arg(long, global = true, value_name = "ADDRESS", env = BUS_ADDRESS_ENV)]
    bus_address: Option<String>,

    /// Talk to vmsnapd of another hypervisor over SSH, as systemctl -H does: D-Bus through
    /// `ssh -xT [USER@]HOST systemd-stdio-bridge` (systemd-stdio-bridge must be installed
    /// there). Keys and known hosts are ssh's own; VMSNAP_SSH names another ssh program.
    #[arg(
        short = 'H',
        long = "host",
        global = true,
        value_name = "[USER@]HOST[:PORT]",
        env = "VMSNAP_HOST"
    )]
    host: Option<String>,

    /// Output format: table, json or yaml everywhere; name and wide (more columns) for `get`.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    /// Print no progress lines on standard error while waiting for vmsnapd.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

/// The output format given with -o.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, one document on standard output.
    Json,
    /// YAML, one document on standard output (the JSON document's fields).
    Yaml,
    /// `get`: TYPE.GROUP/NAME of each object, one per line.
    Name,
    /// `get`: the table with more columns.
    Wide,
}

impl Format {
    /// The format of the commands that know tables and structured documents only.
    fn basic(self) -> Result<OutputFormat, String> {
        match self {
            Format::Table => Ok(OutputFormat::Table),
            Format::Json | Format::Yaml => Ok(OutputFormat::Json),
            Format::Name | Format::Wide => Err(
                "-o name and -o wide are for 'vmsnapctl get'; use table, json or yaml here"
                    .to_string(),
            ),
        }
    }
}

/// Tables or structured documents (JSON, or YAML when -o yaml was given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// JSON, one document on standard output.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Virtual machines known to libvirt, with their agent and disks.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Snapshots of VMs: create, list, show, delete.
    ///
    /// A snapshot captures every disk of a VM that can be snapshotted, at one point in time,
    /// with the guest's filesystems frozen through the QEMU guest agent when one is connected.
    /// Snapshots are named per VM; commands take the VM (name or UUID) and the snapshot's name.
    /// Phases follow KubeVirt's VirtualMachineSnapshot: InProgress, Succeeded, Failed, and
    /// Deleting while vmsnapd removes one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a VM to one of its snapshots; list and show restores.
    ///
    /// `vmsnapctl restore VM SNAPSHOT` restores VM (name or UUID) to its snapshot SNAPSHOT: every
    /// disk the snapshot captured gets back the content it had then, as a new image on top of
    /// the snapshot's image (which stays unchanged, so the same snapshot can be restored again),
    /// and the VM's definition goes back to the one recorded with the snapshot. vmsnapctl waits
    /// until the restore has succeeded or failed, printing on standard error what vmsnapd is
    /// doing, then prints the restore as `restore show` does. Ctrl-C stops the waiting, not the
    /// restore: vmsnapd finishes it regardless. Phases: InProgress, Succeeded, Failed (and
    /// Waiting, for a restore applied with a targetReadinessPolicy that waits for the VM to be
    /// shut off: see `vmsnapctl apply`).
    ///
    /// In place (the default), VM must be shut off: a running or paused VM is refused unless
    /// --stop is given, which makes vmsnapd shut it down first. Before changing anything,
    /// vmsnapd takes a safety snapshot of VM's current state, named pre-restore-<time>, so that
    /// the restore can be undone with `vmsnapctl restore VM pre-restore-<time>`;
    /// --no-safety-snapshot skips it. Disks attached to VM after the snapshot was taken are
    /// detached from it, their images left untouched; disks the snapshot excluded are back in
    /// the definition, but their content was never captured and is not restored. `restore
    /// show` lists both.
    ///
    /// With --target NEWVM, the snapshot is restored into a new VM named NEWVM, with a new UUID
    /// and new MAC addresses so that it can run next to VM. VM, its disks and its snapshots are
    /// left untouched, and VM may keep running.
    ///
    /// `restore list` lists restores; `restore show RESTORE` shows one, by UUID or a unique
    /// prefix of it. To restore a VM that is named list or show, put -- before the VM:
    /// `vmsnapctl restore -- list SNAPSHOT`.
    ///
    /// Exit status: 0 when the restore succeeded (with --no-wait: when vmsnapd started it);
    /// 1 when vmsnapd refused the request (no such VM or snapshot, VM is running, NEWVM exists,
    /// another operation runs on VM, ...) or the restore failed, with the reason on standard
    /// error (with --output json the failed restore is still printed on standard output); 2 when
    /// the command line is wrong; 130 when the wait was interrupted with Ctrl-C.
    Restore(RestoreArgs),
    /// Create VirtualMachineSnapshots and VirtualMachineRestores from manifests, as oc apply.
    ///
    /// Reads YAML or JSON (several documents separated by ---, and kind: List) with apiVersion
    /// snapshot.kubevirt.io/v1alpha1 or v1beta1. Every document is checked before anything is
    /// done: unknown fields, other kinds, a source or target that is not a kubevirt.io
    /// VirtualMachine and values vmsnap does not support (deletionPolicy: Retain, patches,
    /// volumeRestorePolicy other than RandomizeNames, volumeOwnershipPolicy,
    /// volumeRestoreOverrides) are refused with one line naming the field, and nothing is
    /// created. `status`, metadata.uid, creationTimestamp, resourceVersion and generation are
    /// ignored, so `vmsnapctl get ... -o yaml | vmsnapctl apply -f -` says unchanged.
    /// metadata.namespace is accepted and means nothing on one host.
    ///
    /// VirtualMachineSnapshot: metadata.name is the snapshot's name, spec.source.name the VM
    /// (name or UUID), spec.failureDeadline (a Go duration such as 1m30s) how long vmsnapd
    /// may take before it gives up. The annotation snapshot.vmsnap.org/description carries a
    /// description; snapshot.vmsnap.org/allow-excluded: "true" acknowledges disks that cannot
    /// be snapshotted (cdroms, read-only, network disks), which are otherwise refused.
    ///
    /// VirtualMachineRestore: spec.virtualMachineSnapshotName names the snapshot (when
    /// several VMs have a snapshot of that name, the target's own is taken, and without one
    /// the restore is refused, listing the VMs); spec.target.name is the snapshot's VM
    /// (restored in place, after a safety snapshot), or a VM that does not exist (created
    /// from the snapshot); another existing VM is refused. spec.targetReadinessPolicy for an
    /// in-place restore of a VM that is not shut off: StopTarget (shut it down),
    /// FailImmediate, WaitGracePeriod (the default: wait up to the grace period, 5 minutes by
    /// default, for it to be shut off, then fail) or WaitEventually (wait until it is).
    ///
    /// Prints, per object, what oc prints: `virtualmachinesnapshot.snapshot.kubevirt.io/NAME
    /// created` or `unchanged`. A changed spec of an existing object is refused as immutable.
    /// A VirtualMachineSnapshotContent (vmsnapd records one with each snapshot) can only be
    /// applied unchanged, as `get vmsnapshotcontent -o yaml` prints it.
    /// apply does not wait: follow with `vmsnapctl wait`.
    ///
    /// Exit status: 0 when every object was created or unchanged; 1 otherwise; 2 on a wrong
    /// command line.
    Apply(kube::apply::ApplyArgs),
    /// List KubeVirt-shaped objects: vmsnapshot, vmsnapshotcontent, vmrestore.
    ///
    /// The table has oc's columns: for snapshots NAME, SOURCEKIND, SOURCENAME, PHASE,
    /// READYTOUSE, CREATIONTIME (age), ERROR; for contents NAME, READYTOUSE, CREATIONTIME,
    /// ERROR; for restores NAME, TARGETKIND, TARGETNAME, COMPLETE, RESTORETIME, ERROR. -o wide
    /// adds INDICATIONS and UID (snapshots), SNAPSHOT, SOURCENAME, VOLUMES (contents),
    /// SNAPSHOT, PHASE, UID (restores). -o json|yaml prints the objects (one object when NAME
    /// was given and matched once, otherwise a List) with metadata, spec and status as
    /// KubeVirt names them; -o name prints TYPE.GROUP/NAME.
    ///
    /// Exit status: 0 on success (also when there are no objects: "No resources found" on
    /// standard error); 1 when NAME does not exist or on an error; 2 on a wrong command line.
    Get(kube::get::GetArgs),
    /// Wait for a condition of objects: condition=Ready, condition=Failure, ... or delete.
    ///
    /// `vmsnapctl wait --for=condition=Ready vmsnapshot/NAME --timeout=5m` returns once the
    /// snapshot is ready to use; `--for=delete` once the object is gone. Prints
    /// `TYPE.GROUP/NAME condition met` per object.
    ///
    /// Exit status: 0 when every object met the condition; 1 when the timeout passed ("timed
    /// out waiting for the condition on ...") or an object does not exist; 2 on a wrong
    /// command line; 130 when interrupted with Ctrl-C.
    Wait(kube::wait::WaitArgs),
    /// Delete snapshots and restores: delete vmsnapshot NAME, delete vmrestore NAME, delete -f.
    ///
    /// Deleting a snapshot removes its data as `snapshot delete` does; deleting a restore
    /// removes its record only (the restored VM stays as it is). Waits until each object is
    /// gone unless --wait=false. Prints `TYPE.GROUP "NAME" deleted` per object.
    ///
    /// Exit status: 0 when every object was deleted; 1 when one does not exist (unless
    /// --ignore-not-found) or could not be deleted; 2 on a wrong command line.
    Delete(kube::delete::DeleteArgs),
}

/// How a command ends when it does not succeed: a one-line message and an exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    /// Exit status of a wait interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    pub const INTERRUPTED: u8 = 130;

    pub fn interrupted(message: &str) -> Failure {
        Failure {
            message: message.to_string(),
            code: Failure::INTERRUPTED,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, code: 1 }
    }
}

/// The clap definition of vmsnapctl's command line, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// vmsnapctl's entry point: parses the process's arguments, runs the command and returns the
/// exit status.
pub fn main() -> ExitCode {
    // `COMPLETE=bash vmsnapctl -- WORDS...`: answer the shell's completion request and exit.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    emit::quiet_broken_pipe();
    let cli = Cli::parse_from(restore::hoist_global_options(std::env::args_os().collect()));
    emit::select_yaml(cli.output == Format::Yaml);
    emit::select_quiet(cli.quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmsnapctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // The message may carry what the daemon echoed back: one safe line.
            if !failure.message.is_empty() {
                eprintln!("vmsnapctl: {}", vmsnap_api::terminal_safe(&failure.message));
            }
            ExitCode::from(failure.code)
        }
    }
}

/// The bus of the command line: local, another address, or a host's over SSH.
async fn connect(cli: &Cli) -> Result<Bus, String> {
    match &cli.host {
        None => Bus::connect(cli.bus_address.as_deref()).await,
        Some(host) => {
            let parsed = remote::parse_host(host)?;
            let ssh = std::env::var(remote::SSH_ENV).unwrap_or_else(|_| "ssh".to_string());
            let address = remote::ssh_address(&ssh, &parsed, cli.bus_address.as_deref());
            let bus_name = cli.bus_address.as_deref().unwrap_or("the system bus");
            Bus::connect_described(address, format!("{bus_name} of {host} (over ssh)")).await
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let format = cli.output;
    if let Command::Apply(args) = &cli.command {
        // A manifest that is wrong is refused before anything else, vmsnapd or not.
        let manifests = kube::apply::load(args)?;
        let bus = connect(&cli).await?;
        return kube::apply::apply(&bus, &manifests).await;
    }
    let bus = connect(&cli).await?;
    match cli.command {
        Command::Vm(command) => Ok(vm::run(&bus, command, format.basic()?).await?),
        Command::Snapshot(command) => snapshot::run(&bus, command, format.basic()?).await,
        Command::Restore(args) => restore::run(&bus, args, format.basic()?).await,
        Command::Apply(args) => {
            let manifests = kube::apply::load(&args)?;
            kube::apply::apply(&bus, &manifests).await
        }
        Command::Get(args) => kube::get::run(&bus, args, format).await,
        Command::Wait(args) => kube::wait::run(&bus, args).await,
        Command::Delete(args) => kube::delete::run(&bus, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_argument_is_documented() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            assert!(
                command.get_about().is_some() || path == " vmsnapctl",
                "{path} has no help"
            );
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{path} {id} has no help");
            }
            for sub in command.get_subcommands() {
                if sub.get_name() != "help" {
                    check(sub, &path);
                }
            }
        }
        check(&Cli::command(), "");
    }

    #[test]
    fn snapshot_create_parses_its_flags() {
        let cli = Cli::try_parse_from([
            "vmsnapctl",
            "snapshot",
            "create",
            "web",
            "before-upgrade",
            "--description",
            "kernel 6.12",
            "--allow-excluded",
            "--no-wait",
        ])
        .expect("parses");
        let Command::Snapshot(SnapshotCommand::Create(args)) = cli.command else {
            panic!("not snapshot create: {cli:?}");
        };
        assert_eq!(args.vm, "web");
        assert_eq!(args.name, "before-upgrade");
        assert_eq!(args.description.as_deref(), Some("kernel 6.12"));
        assert!(args.allow_excluded);
        assert!(args.no_wait);
    }

    #[test]
    fn snapshot_create_defaults() {
        let cli =
            Cli::try_parse_from(["vmsnapctl", "snapshot", "create", "web", "x"]).expect("parses");
        let Command::Snapshot(SnapshotCommand::Create(args)) = cli.command else {
            panic!("not snapshot create: {cli:?}");
        };
        assert_eq!(args.description, None);
        assert!(!args.allow_excluded);
        assert!(!args.no_wait);
    }

    #[test]
    fn snapshot_list_vm_is_optional() {
        for (argv, expected) in [
            (&["vmsnapctl", "snapshot", "list"][..], None),
            (&["vmsnapctl", "snapshot", "list", "web"][..], Some("web")),
        ] {
            let cli = Cli::try_parse_from(argv).expect("parses");
            let Command::Snapshot(SnapshotCommand::List { vm }) = cli.command else {
                panic!("not snapshot list: {cli:?}");
            };
            assert_eq!(vm.as_deref(), expected);
        }
    }

    #[test]
    fn snapshot_show_and_delete_need_vm_and_name() {
        assert!(Cli::try_parse_from(["vmsnapctl", "snapshot", "show", "web"]).is_err());
        assert!(Cli::try_parse_from(["vmsnapctl", "snapshot", "delete", "web"]).is_err());
        let cli = Cli::try_parse_from([
            "vmsnapctl",
            "-o",
            "json",
            "snapshot",
            "delete",
            "web",
            "x",
            "--no-wait",
        ])
        .expect("parses");
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(
            cli.command,
            Command::Snapshot(SnapshotCommand::Delete { no_wait: true, .. })
        ));
    }

    /// Parses as `main` does, global options after `restore` included.
    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        let args = argv.iter().map(std::ffi::OsString::from).collect();
        Cli::try_parse_from(restore::hoist_global_options(args))
    }

    fn parse_restore(argv: &[&str]) -> restore::RestoreArgs {
        let cli = parse(argv).expect("parses");
        let Command::Restore(args) = cli.command else {
            panic!("not restore: {cli:?}");
        };
        args
    }

    #[test]
    fn snapshot_restore_is_an_alias_of_restore() {
        let cli =
            parse(&["vmsnapctl", "snapshot", "restore", "vm1", "snap1", "--stop"]).expect("parses");
        let Command::Snapshot(SnapshotCommand::Restore(args)) = cli.command else {
            panic!("not snapshot restore: {cli:?}");
        };
        assert_eq!(args.vm.as_deref(), Some("vm1"));
        assert_eq!(args.snapshot.as_deref(), Some("snap1"));
        assert!(args.stop);
        assert!(parse(&["vmsnapctl", "snapshot", "restore", "vm1"]).is_err());
    }

    #[test]
    fn kube_commands_parse() {
        let cli = parse(&["vmsnapctl", "get", "vmsnapshots", "-o", "yaml"]).expect("parses");
        assert_eq!(cli.output, Format::Yaml);
        assert!(matches!(cli.command, Command::Get(_)));
        assert!(parse(&["vmsnapctl", "apply"]).is_err());
        assert!(matches!(
            parse(&["vmsnapctl", "apply", "-f", "-"]).map(|c| c.command),
            Ok(Command::Apply(_))
        ));
        assert!(parse(&["vmsnapctl", "wait", "vmsnapshot/a"]).is_err());
        assert!(matches!(
            parse(&[
                "vmsnapctl",
                "wait",
                "--for=delete",
                "vmsnapshot/a",
                "--timeout=1m"
            ])
            .map(|c| c.command),
            Ok(Command::Wait(_))
        ));
        assert!(parse(&["vmsnapctl", "delete", "vmsnapshot", "a", "-f", "x"]).is_err());
        assert!(parse(&["vmsnapctl", "-q", "vm", "list"]).is_ok_and(|c| c.quiet));
    }

    #[test]
    fn restore_list_parses() {
        for argv in [
            &["vmsnapctl", "restore", "list"][..],
            &["vmsnapctl", "-o", "json", "restore", "list"],
            &["vmsnapctl", "restore", "list", "-o", "json"],
            &["vmsnapctl", "restore", "-o", "json", "list"],
            &["vmsnapctl", "restore", "--output=json", "list"],
        ] {
            let args = parse_restore(argv);
            assert!(
                matches!(args.command, Some(restore::RestoreCommand::List)),
                "{argv:?}: {args:?}"
            );
        }
        let cli = parse(&["vmsnapctl", "restore", "-o", "json", "list"]).expect("parses");
        assert_eq!(cli.output, Format::Json);
        let cli = parse(&["vmsnapctl", "restore", "-H", "root@hv2", "-q", "list"]).expect("parses");
        assert_eq!(cli.host.as_deref(), Some("root@hv2"));
        assert!(cli.quiet);
        assert!(matches!(
            cli.command,
            Command::Restore(RestoreArgs {
                command: Some(restore::RestoreCommand::List),
                ..
            })
        ));
    }

    #[test]
    fn restore_show_parses() {
        let args = parse_restore(&["vmsnapctl", "restore", "show", "7e3f1c2a"]);
        let Some(restore::RestoreCommand::Show { restore }) = args.command else {
            panic!("not restore show: {args:?}");
        };
        assert_eq!(restore, "7e3f1c2a");
        assert!(parse(&["vmsnapctl", "restore", "show"]).is_err());
        assert!(parse(&["vmsnapctl", "restore", "show", "a", "b"]).is_err());
        assert!(parse(&["vmsnapctl", "restore", "show", "7e3f", "--stop"]).is_err());
        assert!(parse(&["vmsnapctl", "restore", "list", "extra"]).is_err());
    }

    #[test]
    fn restore_vm_snapshot_parses_its_flags() {
        let args = parse_restore(&["vmsnapctl", "restore", "vm1", "snap1", "--stop", "--start"]);
        assert!(args.command.is_none());
        let create = args.create;
        assert_eq!(create.vm.as_deref(), Some("vm1"));
        assert_eq!(create.snapshot.as_deref(), Some("snap1"));
        assert_eq!(create.target, None);
        assert!(create.stop);
        assert!(create.start);
        assert!(!create.no_safety_snapshot);
        assert!(!create.no_wait);

        let args = parse_restore(&[
            "vmsnapctl",
            "restore",
            "--target",
            "vm1-copy",
            "vm1",
            "snap1",
            "--no-safety-snapshot",
            "--no-wait",
        ]);
        let create = args.create;
        assert_eq!(create.target.as_deref(), Some("vm1-copy"));
        assert!(create.no_safety_snapshot);
        assert!(create.no_wait);
        assert!(!create.stop);
        assert!(!create.start);
    }

    #[test]
    fn restore_defaults() {
        let create = parse_restore(&["vmsnapctl", "restore", "vm1", "snap1"]).create;
        assert_eq!(create.target, None);
        assert!(!create.stop && !create.start && !create.no_safety_snapshot && !create.no_wait);
    }

    #[test]
    fn restore_subcommand_names_as_vm_or_snapshot_names() {
        // A VM named list or show: after --.
        let args = parse_restore(&["vmsnapctl", "restore", "--", "list", "snap1"]);
        assert!(args.command.is_none());
        assert_eq!(args.create.vm.as_deref(), Some("list"));
        assert_eq!(args.create.snapshot.as_deref(), Some("snap1"));
        // After the VM, list and show are plain snapshot names.
        let args = parse_restore(&["vmsnapctl", "restore", "vm1", "show"]);
        assert!(args.command.is_none());
        assert_eq!(args.create.snapshot.as_deref(), Some("show"));
        // After a restore flag, too.
        let args = parse_restore(&["vmsnapctl", "restore", "--stop", "list", "snap1"]);
        assert!(args.command.is_none());
        assert_eq!(args.create.vm.as_deref(), Some("list"));
        // help is no subcommand of restore: a VM may be called so.
        let args = parse_restore(&["vmsnapctl", "restore", "help", "snap1"]);
        assert_eq!(args.create.vm.as_deref(), Some("help"));
    }

    #[test]
    fn restore_refuses_bad_command_lines() {
        for argv in [
            &["vmsnapctl", "restore"][..],
            &["vmsnapctl", "restore", "vm1"],
            &["vmsnapctl", "restore", "vm1", "snap1", "extra"],
            &["vmsnapctl", "restore", "vm1", "snap1", "--target", ""],
            &["vmsnapctl", "restore", "vm1", "snap1", "--target"],
            &[
                "vmsnapctl",
                "restore",
                "vm1",
                "snap1",
                "--target",
                "x",
                "--stop",
            ],
            &["vmsnapctl", "restore", "--stop", "list"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?} parsed");
        }
    }
}
