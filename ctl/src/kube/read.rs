//! Reading every snapshot and restore from vmsnapd, with their object paths.

use vmsnap_api::{SourceIndication, RESTORE_INTERFACE};
use zbus::names::InterfaceName;
use zbus::OwnedObjectPath;

use crate::bus::{Bus, ReadError};
use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

pub struct SnapshotItem {
    pub path: OwnedObjectPath,
    pub snapshot: Snapshot,
    /// vmsnapd's message for each indication (read by [`read_messages`] where needed); empty
    /// from a vmsnapd that has none.
    pub messages: Vec<SourceIndication>,
}

pub struct RestoreItem {
    pub path: OwnedObjectPath,
    pub restore: Restore,
    /// The name it was applied with; empty when vmsnapd has none (named by its UUID then).
    pub name: String,
}

impl RestoreItem {
    pub fn name(&self) -> &str {
        super::model::restore_name(&self.restore, &self.name)
    }
}

/// Every snapshot, oldest first; objects that vanish while being read are left out.
pub async fn snapshots(bus: &Bus) -> Result<Vec<SnapshotItem>, String> {
    let manager = bus.manager().await?;
    let paths = manager
        .list_snapshots("")
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut items = Vec::with_capacity(paths.len());
    for path in paths {
        match bus.read_snapshot(&path).await {
            Ok(snapshot) => items.push(SnapshotItem {
                path,
                snapshot,
                messages: Vec::new(),
            }),
            Err(ReadError::Vanished) => {}
            Err(ReadError::Other(message)) => return Err(message),
        }
    }
    Ok(items)
}

/// Every restore, oldest first.
pub async fn restores(bus: &Bus) -> Result<Vec<RestoreItem>, String> {
    let manager = bus.manager().await?;
    let paths = manager
        .list_restores()
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut items = Vec::with_capacity(paths.len());
    for path in paths {
        match bus.read_restore(&path).await {
            Ok(restore) => {
                let name = optional_string_property(bus, &path, RESTORE_INTERFACE, "Name").await;
                items.push(RestoreItem {
                    path,
                    restore,
                    name,
                })
            }
            Err(ReadError::Vanished) => {}
            Err(ReadError::Other(message)) => return Err(message),
        }
    }
    Ok(items)
}

/// Reads the SourceIndications of a snapshot into `item`; none when vmsnapd does not have the
/// property.
pub async fn read_messages(bus: &Bus, item: &mut SnapshotItem) {
    let Ok(proxy) = bus.snapshot_proxy(&item.path).await else {
        return;
    };
    item.messages = proxy.source_indications().await.unwrap_or_default();
}

/// A string property that an older vmsnapd may not have: empty when it is missing.
pub async fn optional_string_property(
    bus: &Bus,
    path: &OwnedObjectPath,
    interface: &'static str,
    property: &str,
) -> String {
    let Ok(properties) = zbus::fdo::PropertiesProxy::builder(bus.connection())
        .destination(vmsnap_api::BUS_NAME)
        .path(path.clone())
        .build()
        .await
    else {
        return String::new();
    };
    let Ok(interface) = InterfaceName::try_from(interface) else {
        return String::new();
    };
    match properties.get(interface, property).await {
        Ok(value) => String::try_from(value).unwrap_or_default(),
        Err(_) => String::new(),
    }
}
