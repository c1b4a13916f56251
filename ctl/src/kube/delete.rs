//! `vmsnapctl delete vmsnapshot NAME`, `delete vmrestore NAME`, `delete -f FILE`.

use std::time::Duration;

use clap::Args;

use super::apply::read_source;
use super::manifest;
use super::model::Kind;
use super::read;
use super::wait::parse_objects;
use crate::bus::Bus;
use crate::Failure;

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The objects: TYPE NAME... or TYPE/NAME... (vmsnapshot, vmrestore). Not with -f.
    #[arg(value_name = "TYPE NAME")]
    pub objects: Vec<String>,

    /// Delete the objects a manifest names (YAML or JSON, - for standard input).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "objects"
    )]
    pub files: Vec<String>,

    /// Do not fail when an object does not exist.
    #[arg(long)]
    pub ignore_not_found: bool,

    /// Wait until each object is gone (the default), or with --wait=false return once vmsnapd
    /// has accepted the deletion.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub wait: bool,
}

const POLL: Duration = Duration::from_millis(200);

async fn delete_snapshot(bus: &Bus, name: &str, wait: bool) -> Result<bool, String> {
    let items: Vec<_> = read::snapshots(bus)
        .await?
        .into_iter()
        .filter(|i| i.snapshot.name == name)
        .collect();
    let item = match items.as_slice() {
        [] => return Ok(false),
        [one] => one,
        several => {
            let vms: Vec<&str> = several.iter().map(|i| i.snapshot.vm.as_str()).collect();
            return Err(format!(
                "{name:?} is ambiguous: VMs {} each have a snapshot of that name; use \
                 'vmsnapctl snapshot delete VM {name}'",
                vms.join(", ")
            ));
        }
    };
    let proxy = bus.snapshot_proxy(&item.path).await?;
    proxy.delete().await.map_err(|e| bus.describe_api(e))?;
    if wait {
        let mut deleting_seen = false;
        loop {
            match bus.read_snapshot(&item.path).await {
                Err(crate::bus::ReadError::Vanished) => break,
                Err(crate::bus::ReadError::Other(m)) => return Err(m),
                Ok(s) if s.phase == "Deleting" => deleting_seen = true,
                Ok(s) if deleting_seen && s.phase == "Failed" => {
                    return Err(format!("deletion failed: {}", s.error));
                }
                Ok(_) => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(true)
}

async fn delete_restore(bus: &Bus, name: &str, wait: bool) -> Result<bool, String> {
    let items = read::restores(bus).await?;
    let Some(item) = items
        .iter()
        .find(|i| i.name() == name || i.restore.uuid == name)
    else {
        return Ok(false);
    };
    let proxy = vmsnap_api::RestoreProxy::builder(bus.connection())
        .path(item.path.clone())
        .build()
        .await
        .map_err(|e| bus.describe(&e))?;
    proxy.delete().await.map_err(|e| bus.describe_api(e))?;
    if wait {
        loop {
            match bus.read_restore(&item.path).await {
                Err(crate::bus::ReadError::Vanished) => break,
                Err(crate::bus::ReadError::Other(m)) => return Err(m),
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
    }
    Ok(true)
}

pub async fn run(bus: &Bus, args: DeleteArgs) -> Result<(), Failure> {
    let targets: Vec<(Kind, String)> = if args.files.is_empty() {
        parse_objects(&args.objects)?
    } else {
        let mut all = Vec::new();
        for file in &args.files {
            let text = read_source(file)?;
            let source = if file == "-" {
                "<stdin>"
            } else {
                file.as_str()
            };
            all.extend(
                manifest::references(&text, source)?
                    .into_iter()
                    .map(|r| (r.kind, r.name)),
            );
        }
        all
    };
    let mut failed = None;
    for (kind, name) in &targets {
        let result = match kind {
            Kind::Snapshot => delete_snapshot(bus, name, args.wait).await,
            Kind::Restore => delete_restore(bus, name, args.wait).await,
            Kind::Content => Err(
                "a VirtualMachineSnapshotContent goes with its VirtualMachineSnapshot: \
                 delete the snapshot"
                    .to_string(),
            ),
        };
        let shown = super::cell(name);
        match result {
            Ok(true) => println!(
                "{}.{} {shown:?} deleted",
                kind.singular(),
                super::model::GROUP
            ),
            Ok(false) if args.ignore_not_found => {}
            Ok(false) => {
                eprintln!("vmsnapctl: {}", kind.not_found(name));
                failed = Some(kind.not_found(name));
            }
            Err(e) => {
                eprintln!(
                    "vmsnapctl: {}.{} {shown:?}: {e}",
                    kind.singular(),
                    super::model::GROUP
                );
                failed = Some(e);
            }
        }
    }
    match failed {
        // Each error was printed where it happened; the exit status says one happened.
        Some(_) => Err(Failure {
            message: String::new(),
            code: 1,
        }),
        None => Ok(()),
    }
}
