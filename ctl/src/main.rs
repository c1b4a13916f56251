//! vmsnapctl: the command-line client of vmsnapd.

mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vmsnap_api::{
    ManagerProxy, VirtualMachineProxy, VmSnapError, BUS_ADDRESS_ENV, BUS_NAME, MANAGER_PATH,
};
use zbus::{Connection, DBusError, OwnedObjectPath};

use crate::output::{print_vm, print_vm_list, Vm};

/// Snapshots and restores of libvirt/QEMU virtual machines, through the vmsnapd daemon.
///
/// vmsnapctl talks to vmsnapd over D-Bus (the system bus by default). Every command accepts
/// --output json for scripts; field names are stable. Exit status: 0 on success, 1 on any
/// error, with a one-line message on standard error.
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
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// List every VM: name, state, guest agent and how each disk would be snapshotted.
    List,
    /// Show one VM in detail, including why any disk is excluded from snapshots.
    Show {
        /// The VM's name or UUID.
        vm: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Err(message) => {
            eprintln!("vmsnapctl: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let bus = Bus::connect(cli.bus_address.as_deref()).await?;
    match cli.command {
        Command::Vm(VmCommand::List) => {
            let manager = bus.manager().await?;
            let paths = manager.list_vms().await.map_err(|e| bus.describe_api(e))?;
            let mut vms = Vec::with_capacity(paths.len());
            for path in paths {
                match bus.read_vm(path).await {
                    Ok(vm) => vms.push(vm),
                    // Undefined between the listing and the read: it is simply gone.
                    Err(ReadError::Vanished) => {}
                    Err(ReadError::Other(message)) => return Err(message),
                }
            }
            let status = bus.libvirt_status(&manager).await?;
            if let Some(warning) = status {
                eprintln!("vmsnapctl: warning: {warning}");
            }
            print_vm_list(&vms, cli.output)
        }
        Command::Vm(VmCommand::Show { vm }) => {
            let manager = bus.manager().await?;
            let path = manager
                .find_vm(&vm)
                .await
                .map_err(|e| bus.describe_api(e))?;
            let vm = bus.read_vm(path).await.map_err(|e| match e {
                ReadError::Vanished => format!("VM '{vm}' not found"),
                ReadError::Other(message) => message,
            })?;
            print_vm(&vm, cli.output)
        }
    }
}

enum ReadError {
    Vanished,
    Other(String),
}

struct Bus {
    connection: Connection,
    description: String,
}

impl Bus {
    async fn connect(address: Option<&str>) -> Result<Bus, String> {
        let (builder, description) = match address {
            Some(address) => (
                zbus::connection::Builder::address(address),
                format!("the D-Bus bus at {address}"),
            ),
            None => (
                zbus::connection::Builder::system(),
                "the D-Bus system bus".to_string(),
            ),
        };
        let connection = builder
            .build()
            .await
            .map_err(|e| format!("cannot connect to {description}: {e}"))?;
        Ok(Bus {
            connection,
            description,
        })
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, String> {
        ManagerProxy::builder(&self.connection)
            .path(MANAGER_PATH)
            .build()
            .await
            .map_err(|e| self.describe(&e))
    }

    async fn read_vm(&self, path: OwnedObjectPath) -> Result<Vm, ReadError> {
        let proxy = VirtualMachineProxy::builder(&self.connection)
            .path(path)
            .build()
            .await
            .map_err(|e| ReadError::Other(self.describe(&e)))?;
        let read = async {
            Ok::<_, zbus::Error>(Vm {
                name: proxy.name().await?,
                uuid: proxy.uuid().await?,
                state: proxy.state().await?,
                agent: proxy.agent().await?,
                disks: proxy.disks().await?,
            })
        };
        read.await.map_err(|e| match error_name(&e).as_deref() {
            Some("org.freedesktop.DBus.Error.UnknownObject")
            | Some("org.freedesktop.DBus.Error.UnknownInterface")
            | Some("org.freedesktop.DBus.Error.UnknownProperty") => ReadError::Vanished,
            _ => ReadError::Other(self.describe(&e)),
        })
    }

    /// A warning when libvirt is unavailable, since the listed data may then be stale.
    async fn libvirt_status(&self, manager: &ManagerProxy<'_>) -> Result<Option<String>, String> {
        let connected = manager
            .libvirt_connected()
            .await
            .map_err(|e| self.describe(&e))?;
        if connected {
            return Ok(None);
        }
        let error = manager
            .libvirt_error()
            .await
            .map_err(|e| self.describe(&e))?;
        Ok(Some(format!(
            "vmsnapd cannot reach libvirt ({error}); VMs are shown as last seen"
        )))
    }

    fn describe_api(&self, error: VmSnapError) -> String {
        match error {
            VmSnapError::ZBus(e) => self.describe(&e),
            VmSnapError::AccessDenied(m) => format!("access denied: {m}"),
            other => other.user_message(),
        }
    }

    /// One line for a transport or bus error, naming the common causes plainly.
    fn describe(&self, error: &zbus::Error) -> String {
        let description = error_description(error);
        match error_name(error).as_deref() {
            Some("org.freedesktop.DBus.Error.ServiceUnknown")
            | Some("org.freedesktop.DBus.Error.NameHasNoOwner") => format!(
                "vmsnapd is not running (nothing owns {BUS_NAME} on {})",
                self.description
            ),
            Some("org.freedesktop.DBus.Error.AccessDenied")
            | Some("org.vmsnap.VmSnap1.Error.AccessDenied") => {
                format!("access denied: {description}")
            }
            _ => description,
        }
    }
}

fn error_name(error: &zbus::Error) -> Option<String> {
    match error {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(e) => Some(e.name().to_string()),
        _ => None,
    }
}

fn error_description(error: &zbus::Error) -> String {
    match error {
        zbus::Error::MethodError(name, description, _) => {
            description.clone().unwrap_or_else(|| name.to_string())
        }
        zbus::Error::FDO(e) => e
            .description()
            .map(str::to_string)
            .unwrap_or_else(|| e.name().to_string()),
        other => other.to_string(),
    }
}
