//! `vmsnapctl vm ...`: the VM inventory.

use clap::Subcommand;

use crate::bus::{Bus, ReadError};
use crate::output::{print_vm, print_vm_list};
use crate::OutputFormat;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List every VM: name, state, guest agent and how each disk would be snapshotted.
    ///
    /// Exit status: 0 on success (also when there are no VMs); 1 on error, for instance when
    /// vmsnapd cannot be reached.
    List,
    /// Show one VM in detail, including why any disk is excluded from snapshots.
    ///
    /// Exit status: 0 on success; 1 on error, for instance when there is no such VM.
    Show {
        /// The VM's name or UUID.
        #[arg(add = clap_complete::engine::ArgValueCandidates::new(crate::complete::vm_names))]
        vm: String,
    },
}

pub async fn run(bus: &Bus, command: VmCommand, format: OutputFormat) -> Result<(), String> {
    match command {
        VmCommand::List => list(bus, format).await,
        VmCommand::Show { vm } => show(bus, &vm, format).await,
    }
}

async fn list(bus: &Bus, format: OutputFormat) -> Result<(), String> {
    let manager = bus.manager().await?;
    let vms = bus.vms(&manager).await?;
    let status = bus.libvirt_status(&manager).await?;
    if let Some(warning) = status {
        eprintln!(
            "vmsnapctl: warning: {}",
            vmsnap_api::terminal_safe(&warning)
        );
    }
    print_vm_list(&vms, format)
}

async fn show(bus: &Bus, vm: &str, format: OutputFormat) -> Result<(), String> {
    let manager = bus.manager().await?;
    let path = manager.find_vm(vm).await.map_err(|e| bus.describe_api(e))?;
    let vm = bus.read_vm(path).await.map_err(|e| match e {
        ReadError::Vanished => format!("VM '{vm}' not found"),
        ReadError::Other(message) => message,
    })?;
    print_vm(&vm, format)
}
