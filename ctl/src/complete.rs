//! Dynamic shell completion of VM and snapshot names (clap_complete's `CompleteEnv`): the
//! shell asks `COMPLETE=bash vmsnapctl -- WORDS...` and vmsnapctl answers with candidates, asking
//! vmsnapd for the names. It reaches vmsnapd as configured by the environment
//! (`VMSNAP_BUS_ADDRESS`, `VMSNAP_HOST`), within a short time; when it cannot, it offers nothing
//! rather than an error in the middle of the user's command line.

use std::time::Duration;

use clap_complete::engine::CompletionCandidate;

use crate::bus::Bus;

/// How long a completion may take to ask vmsnapd.
const LIMIT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy)]
enum Names {
    Vms,
    Snapshots,
}

/// VM names, with their state as help.
pub fn vm_names() -> Vec<CompletionCandidate> {
    candidates(Names::Vms)
}

/// Snapshot names of every VM, with the VM as help.
pub fn snapshot_names() -> Vec<CompletionCandidate> {
    candidates(Names::Snapshots)
}

fn candidates(names: Names) -> Vec<CompletionCandidate> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        match tokio::time::timeout(LIMIT, fetch(names)).await {
            Ok(Ok(list)) => list,
            _ => Vec::new(),
        }
    })
}

async fn connect() -> Result<Bus, String> {
    let address = std::env::var(vmsnap_api::BUS_ADDRESS_ENV).ok();
    match std::env::var("VMSNAP_HOST") {
        Ok(host) if !host.is_empty() => {
            let parsed = crate::remote::parse_host(&host)?;
            let ssh = std::env::var(crate::remote::SSH_ENV).unwrap_or_else(|_| "ssh".to_string());
            let address = crate::remote::ssh_address(&ssh, &parsed, address.as_deref());
            Bus::connect_described(address, host).await
        }
        _ => Bus::connect(address.as_deref()).await,
    }
}

async fn fetch(names: Names) -> Result<Vec<CompletionCandidate>, String> {
    let bus = connect().await?;
    let manager = bus.manager().await?;
    let mut out: Vec<(String, String)> = Vec::new();
    match names {
        Names::Vms => {
            for vm in bus.vms(&manager).await? {
                out.push((vm.name, vm.state));
            }
        }
        Names::Snapshots => {
            for item in crate::kube::read::snapshots(&bus).await? {
                let s = item.snapshot;
                if !out.iter().any(|(name, _)| *name == s.name) {
                    out.push((s.name, format!("of {}", s.vm)));
                }
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(name, help)| CompletionCandidate::new(name).help(Some(help.into())))
        .collect())
}
