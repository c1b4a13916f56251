//! `vmsnapctl get vmsnapshot|vmsnapshotcontent|vmrestore [NAME]`.

use clap::Args;
use serde_json::Value;

use super::cell;
use super::model::{self, Kind};
use super::read::{self, RestoreItem, SnapshotItem};
use super::time::{age, now};
use crate::bus::Bus;
use crate::emit;
use crate::{Failure, Format};

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list: vmsnapshot (VirtualMachineSnapshot), vmsnapshotcontent
    /// (VirtualMachineSnapshotContent: the recorded definition and volume backups) or vmrestore
    /// (VirtualMachineRestore); plural and full names (virtualmachinesnapshots,
    /// virtualmachinesnapshots.snapshot.kubevirt.io, ...) are accepted as by oc.
    #[arg(value_name = "RESOURCE")]
    pub resource: String,

    /// Only the object(s) of this name. Snapshot names are unique per VM only: every VM's
    /// snapshot of that name is listed.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,

    /// Print the table without its header line.
    #[arg(long)]
    pub no_headers: bool,
}

/// One object as `get` prints it: its KubeVirt document and its table row.
pub struct Listed {
    pub name: String,
    pub object: Value,
    pub row: Vec<String>,
    pub wide: Vec<String>,
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        "<none>".to_string()
    } else {
        cell(text)
    }
}

fn time_cell(text: &str, now: i64) -> String {
    if text.is_empty() {
        "<none>".to_string()
    } else {
        age(text, now)
    }
}

pub fn snapshot_listed(item: &SnapshotItem, now: i64) -> Listed {
    let s = &item.snapshot;
    Listed {
        name: s.name.clone(),
        object: model::snapshot_object(s, &item.messages),
        row: vec![
            cell(&s.name),
            model::VM_KIND.to_string(),
            cell(&s.vm),
            cell(&s.phase),
            s.ready_to_use.to_string(),
            time_cell(&s.creation_time, now),
            or_none(&s.error),
        ],
        wide: vec![or_none(&model::indications(s).join(",")), cell(&s.uuid)],
    }
}

pub fn content_listed(item: &SnapshotItem, now: i64) -> Listed {
    let s = &item.snapshot;
    let name = model::content_name(&s.uuid);
    Listed {
        row: vec![
            cell(&name),
            s.ready_to_use.to_string(),
            time_cell(&s.creation_time, now),
            or_none(&s.error),
        ],
        wide: vec![
            cell(&s.name),
            cell(&s.vm),
            s.included_volumes.len().to_string(),
        ],
        name,
        object: model::content_object(s, item.domain_xml.as_deref()),
    }
}

pub fn restore_listed(item: &RestoreItem, now: i64) -> Listed {
    let r = &item.restore;
    Listed {
        name: item.name().to_string(),
        object: model::restore_object(r, &item.name),
        row: vec![
            cell(item.name()),
            model::VM_KIND.to_string(),
            cell(&r.target),
            r.complete.to_string(),
            time_cell(&r.restore_time, now),
            or_none(&r.error),
        ],
        wide: vec![cell(&r.snapshot), cell(&r.phase), cell(&r.uuid)],
    }
}

fn headers(kind: Kind, wide: bool) -> Vec<&'static str> {
    let mut h = match kind {
        Kind::Snapshot => vec![
            "NAME",
            "SOURCEKIND",
            "SOURCENAME",
            "PHASE",
            "READYTOUSE",
            "CREATIONTIME",
            "ERROR",
        ],
        Kind::Content => vec!["NAME", "READYTOUSE", "CREATIONTIME", "ERROR"],
        Kind::Restore => vec![
            "NAME",
            "TARGETKIND",
            "TARGETNAME",
            "COMPLETE",
            "RESTORETIME",
            "ERROR",
        ],
    };
    if wide {
        h.extend(match kind {
            Kind::Snapshot => vec!["INDICATIONS", "UID"],
            Kind::Content => vec!["SNAPSHOT", "SOURCENAME", "VOLUMES"],
            Kind::Restore => vec!["SNAPSHOT", "PHASE", "UID"],
        });
    }
    h
}

/// kubectl's table: columns padded to their widest cell, three spaces apart.
pub fn render_table(headers: &[&str], rows: &[Vec<String>], no_headers: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    let all: Vec<&Vec<String>> = if no_headers {
        rows.iter().collect()
    } else {
        std::iter::once(&header).chain(rows).collect()
    };
    for row in all {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<width$}   "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints listed objects in the chosen format. `single` is true when one object was asked for
/// by name and found once: structured output is then the object itself, otherwise a List.
pub fn print(
    kind: Kind,
    items: Vec<Listed>,
    format: Format,
    single: bool,
    no_headers: bool,
) -> Result<(), String> {
    match format {
        Format::Json | Format::Yaml => {
            let document = if single && items.len() == 1 {
                items
                    .into_iter()
                    .next()
                    .map(|l| l.object)
                    .unwrap_or(Value::Null)
            } else {
                model::list(items.into_iter().map(|l| l.object).collect())
            };
            emit::print_structured(&document)
        }
        Format::Name => {
            for item in &items {
                println!("{}", kind.qualified_name(&cell(&item.name)));
            }
            Ok(())
        }
        Format::Table | Format::Wide => {
            if items.is_empty() {
                eprintln!("No resources found");
                return Ok(());
            }
            let wide = format == Format::Wide;
            let rows: Vec<Vec<String>> = items
                .into_iter()
                .map(|l| {
                    let mut row = l.row;
                    if wide {
                        row.extend(l.wide);
                    }
                    row
                })
                .collect();
            print!("{}", render_table(&headers(kind, wide), &rows, no_headers));
            Ok(())
        }
    }
}

/// Every object of `kind` (named `name`, if given), as `get` lists them.
pub async fn collect(bus: &Bus, kind: Kind, name: Option<&str>) -> Result<Vec<Listed>, String> {
    let now = now();
    let mut listed = Vec::new();
    match kind {
        Kind::Snapshot => {
            for item in read::snapshots(bus).await? {
                if name.is_none_or(|n| n == item.snapshot.name) {
                    listed.push(snapshot_listed(&item, now));
                }
            }
        }
        Kind::Content => {
            for mut item in read::snapshots(bus).await? {
                if name.is_none_or(|n| n == model::content_name(&item.snapshot.uuid)) {
                    item.domain_xml = read::domain_xml(bus, &item.path).await?;
                    listed.push(content_listed(&item, now));
                }
            }
        }
        Kind::Restore => {
            for item in read::restores(bus).await? {
                if name.is_none_or(|n| n == item.name() || n == item.restore.uuid) {
                    listed.push(restore_listed(&item, now));
                }
            }
        }
    }
    Ok(listed)
}

pub fn kind_of(resource: &str) -> Result<Kind, String> {
    Kind::from_resource(resource).ok_or_else(|| {
        format!(
            "the server doesn't have a resource type {resource:?} \
             (known: vmsnapshot, vmsnapshotcontent, vmrestore)"
        )
    })
}

pub async fn run(bus: &Bus, args: GetArgs, format: Format) -> Result<(), Failure> {
    let kind = kind_of(&args.resource)?;
    let items = collect(bus, kind, args.name.as_deref()).await?;
    if let Some(name) = &args.name {
        if items.is_empty() {
            return Err(kind.not_found(name).into());
        }
    }
    Ok(print(
        kind,
        items,
        format,
        args.name.is_some(),
        args.no_headers,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::model::tests::{restore, snapshot};

    fn snapshot_item() -> SnapshotItem {
        SnapshotItem {
            path: zbus::OwnedObjectPath::try_from("/x").expect("path"),
            snapshot: snapshot(),
            messages: Vec::new(),
            domain_xml: None,
        }
    }

    #[test]
    fn snapshot_table() {
        let now = super::super::time::parse_rfc3339("2026-11-26T14:08:12Z").unwrap_or(0);
        let mut failed = snapshot_item();
        failed.snapshot.name = "b\nad".into();
        failed.snapshot.phase = "Failed".into();
        failed.snapshot.ready_to_use = false;
        failed.snapshot.error = "agent gone".into();
        let rows = vec![
            snapshot_listed(&snapshot_item(), now).row,
            snapshot_listed(&failed, now).row,
        ];
        assert_eq!(
            render_table(&headers(Kind::Snapshot, false), &rows, false),
            "NAME            SOURCEKIND       SOURCENAME   PHASE       READYTOUSE   CREATIONTIME   ERROR\n\
             my-vmsnapshot   VirtualMachine   my-vm        Succeeded   true         5m             <none>\n\
             b\\nad           VirtualMachine   my-vm        Failed      false        5m             agent gone\n"
        );
        assert_eq!(
            render_table(&headers(Kind::Snapshot, false), &rows, true)
                .lines()
                .count(),
            2
        );
    }

    #[test]
    fn restore_table() {
        let item = RestoreItem {
            path: zbus::OwnedObjectPath::try_from("/x").expect("path"),
            restore: restore(),
            name: "my-vmrestore".into(),
        };
        let now = super::super::time::parse_rfc3339("2026-11-26T15:00:32Z").unwrap_or(0);
        let rows = vec![restore_listed(&item, now).row];
        assert_eq!(
            render_table(&headers(Kind::Restore, false), &rows, false),
            "NAME           TARGETKIND       TARGETNAME   COMPLETE   RESTORETIME   ERROR\n\
             my-vmrestore   VirtualMachine   my-vm        true       30s           <none>\n"
        );
    }
}
