//! vmsnapctl: the command-line client of vmsnapd.
//!
//! The whole client is this library; the `vmsnapctl` binary only calls [`main`]. The library
//! exists so that `vmsnapctl-gen` can build man pages and shell completions from the same clap
//! definition ([`command`]).

mod bus;
mod output;
mod restore;
mod restore_output;
mod snapshot;
mod snapshot_output;
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
/// --output json for scripts; field names are stable. Exit status: 0 on success, 1 on any
/// error, with a one-line message on standard error; 130 when a command that waits for vmsnapd
/// is interrupted with Ctrl-C (vmsnapd carries on with the work).
#[derive(Debug, Parser)]
#[command(name = "vmsnapctl", version, about, long_about)]
struct Cli {
    /// Talk to vmsnapd on this D-Bus address instead of the system bus.
    #[arg(long, global = true, value_name = "ADDRESS", env = BUS_ADDRESS_ENV)]
    bus_address: Option<String>,

    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,

    #[command(subcommand)]
    command: Command,
}

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
    /// restore: vmsnapd finishes it regardless. Phases: InProgress, Succeeded, Failed.
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
    let cli = Cli::parse_from(restore::hoist_global_options(std::env::args_os().collect()));
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
            eprintln!("vmsnapctl: {}", vmsnap_api::terminal_safe(&failure.message));
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let bus = Bus::connect(cli.bus_address.as_deref()).await?;
    match cli.command {
        Command::Vm(command) => Ok(vm::run(&bus, command, cli.output).await?),
        Command::Snapshot(command) => snapshot::run(&bus, command, cli.output).await,
        Command::Restore(args) => restore::run(&bus, args, cli.output).await,
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
        assert_eq!(cli.output, OutputFormat::Json);
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
        assert_eq!(cli.output, OutputFormat::Json);
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
