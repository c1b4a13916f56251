//! Reading every snapshot and restore from vmsnapd, with their object paths.

use vmsnap_api::SourceIndication;
use zbus::OwnedObjectPath;

use crate::bus::Bus;
use crate::objects::Objects;
use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

pub struct SnapshotItem {
    pub path: OwnedObjectPath,
    pub snapshot: Snapshot,
    /// vmsnapd's message for each indication; empty from a vmsnapd that has none.
    pub messages: Vec<SourceIndication>,
    /// The recorded definition, read separately ([`domain_xml`]) where needed; `None` when
    /// not read, empty, or from a vmsnapd that has none.
    pub domain_xml: Option<String>,
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

/// Every snapshot, oldest first, with its SourceIndications (messages), read in one call (the
/// definitions are read by [`domain_xml`] where needed); objects removed between the listing
/// and the read are left out.
pub async fn snapshots(bus: &Bus) -> Result<Vec<SnapshotItem>, String> {
    let manager = bus.manager().await?;
    let paths = manager
        .list_snapshots("")
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut objects = bus.snapshot_objects("").await?;
    snapshots_from(paths, &mut objects)
}

/// A snapshot's recorded definition (GetDomainXml: vmsnapd reads it from the record on disk;
/// it is in no listing); `None` when empty, or the snapshot is gone.
pub async fn domain_xml(bus: &Bus, path: &OwnedObjectPath) -> Result<Option<String>, String> {
    bus.domain_xml(path).await
}

/// The snapshots at `paths`, in that order, from `objects`.
pub fn snapshots_from(
    paths: Vec<OwnedObjectPath>,
    objects: &mut Objects,
) -> Result<Vec<SnapshotItem>, String> {
    let mut items = Vec::with_capacity(paths.len());
    for path in paths {
        let Some(mut properties) = objects.take_snapshot(&path) else {
            continue;
        };
        let snapshot = properties.snapshot()?;
        let messages = properties.source_indications()?;
        items.push(SnapshotItem {
            path,
            snapshot,
            messages,
            domain_xml: None,
        });
    }
    Ok(items)
}

/// Every restore, oldest first, read in one call.
pub async fn restores(bus: &Bus) -> Result<Vec<RestoreItem>, String> {
    let manager = bus.manager().await?;
    let paths = manager
        .list_restores()
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut objects = bus.restore_objects().await?;
    restores_from(paths, &mut objects)
}

/// The restores at `paths`, in that order, from `objects`.
pub fn restores_from(
    paths: Vec<OwnedObjectPath>,
    objects: &mut Objects,
) -> Result<Vec<RestoreItem>, String> {
    let mut items = Vec::with_capacity(paths.len());
    for path in paths {
        let Some(mut properties) = objects.take_restore(&path) else {
            continue;
        };
        let restore = properties.restore()?;
        let name = properties.restore_name()?;
        items.push(RestoreItem {
            path,
            restore,
            name,
        });
    }
    Ok(items)
}

/// Every snapshot and every restore, as [`snapshots`] and [`restores`] give them.
pub async fn snapshots_and_restores(
    bus: &Bus,
) -> Result<(Vec<SnapshotItem>, Vec<RestoreItem>), String> {
    let manager = bus.manager().await?;
    let snapshot_paths = manager
        .list_snapshots("")
        .await
        .map_err(|e| bus.describe_api(e))?;
    let restore_paths = manager
        .list_restores()
        .await
        .map_err(|e| bus.describe_api(e))?;
    let mut snapshot_objects = bus.snapshot_objects("").await?;
    let mut restore_objects = bus.restore_objects().await?;
    Ok((
        snapshots_from(snapshot_paths, &mut snapshot_objects)?,
        restores_from(restore_paths, &mut restore_objects)?,
    ))
}
