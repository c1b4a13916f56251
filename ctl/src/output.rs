//! Rendering: tables for people, JSON with stable field names for scripts.

use serde::Serialize;
use vmsnap_api::{terminal_safe, terminal_safe_multiline, DiskInfo};

use crate::OutputFormat;

/// A VM as vmsnapctl prints it. The JSON field names are part of the CLI's interface.
#[derive(Debug, Serialize)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    pub state: String,
    pub agent: String,
    pub disks: Vec<DiskInfo>,
}

pub fn print_vm_list(vms: &[Vm], format: OutputFormat) -> Result<(), String> {
    match format {
        OutputFormat::Json => print_json(&vms),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = vms
                .iter()
                .map(|vm| {
                    let disks = vm
                        .disks
                        .iter()
                        .map(|d| format!("{}:{}", d.target, d.backend))
                        .collect::<Vec<_>>()
                        .join(" ");
                    vec![
                        vm.name.clone(),
                        vm.state.clone(),
                        vm.agent.clone(),
                        if disks.is_empty() { "-".into() } else { disks },
                    ]
                })
                .collect();
            print!("{}", table(&["NAME", "STATE", "AGENT", "DISKS"], &rows));
            Ok(())
        }
    }
}

pub fn print_vm(vm: &Vm, format: OutputFormat) -> Result<(), String> {
    match format {
        OutputFormat::Json => print_json(vm),
        OutputFormat::Table => {
            let mut out = String::new();
            show_field(&mut out, 8, "Name", &vm.name);
            show_field(&mut out, 8, "UUID", &vm.uuid);
            show_field(&mut out, 8, "State", &vm.state);
            show_field(&mut out, 8, "Agent", &vm.agent);
            print!("{out}");
            println!("Disks:");
            let rows: Vec<Vec<String>> = vm
                .disks
                .iter()
                .map(|d| {
                    vec![
                        d.target.clone(),
                        d.device.clone(),
                        d.backend.clone(),
                        dash(&d.format),
                        dash(&d.source),
                        dash(&d.reason),
                    ]
                })
                .collect();
            for line in table(
                &[
                    "TARGET",
                    "DEVICE",
                    "BACKEND",
                    "FORMAT",
                    "SOURCE",
                    "EXCLUDED BECAUSE",
                ],
                &rows,
            )
            .lines()
            {
                println!("  {line}");
            }
            Ok(())
        }
    }
}

pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// `None` for an empty string: JSON null for "not set".
pub fn none_if_empty(s: &str) -> Option<&str> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

/// Appends one `Label:   value` line of a `show` layout. The value is made terminal-safe (a
/// newline in it shows as `\n`), so that no part of a value can pass for a field of its own.
pub fn show_field(out: &mut String, label_width: usize, label: &str, value: &str) {
    let label = format!("{label}:");
    let value = terminal_safe(value);
    out.push_str(format!("{label:<label_width$}{value}").trim_end());
    out.push('\n');
}

/// As [`show_field`], for a value that may span lines (an error): each continuation line is
/// indented under the first, so none can pass for a field either.
pub fn show_multiline_field(out: &mut String, label_width: usize, label: &str, value: &str) {
    let label = format!("{label}:");
    let value = terminal_safe_multiline(value).replace('\n', &format!("\n{:label_width$}", ""));
    out.push_str(format!("{label:<label_width$}{value}").trim_end());
    out.push('\n');
}

/// Appends `text` with every line indented by two spaces.
pub fn indent_into(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Prints a document as JSON, or as YAML when -o yaml was given.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), String> {
    crate::emit::print_structured(value)
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
/// Every cell is made terminal-safe first: a value can neither break the layout nor send escape
/// sequences.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| terminal_safe(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let width = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["a-long-name".into(), "running".into()],
                vec!["b".into(), "shut-off".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         STATE\na-long-name  running\nb            shut-off\n"
        );
    }

    #[test]
    fn json_field_names_are_stable() {
        let vm = Vm {
            name: "web".into(),
            uuid: "u".into(),
            state: "running".into(),
            agent: "connected".into(),
            disks: vec![DiskInfo {
                target: "vda".into(),
                device: "disk".into(),
                source: "/a.qcow2".into(),
                format: "qcow2".into(),
                backend: "qcow2".into(),
                reason: String::new(),
            }],
        };
        let json = serde_json::to_value(&vm).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "web", "uuid": "u", "state": "running", "agent": "connected",
                "disks": [{"target": "vda", "device": "disk", "source": "/a.qcow2",
                           "format": "qcow2", "backend": "qcow2", "reason": ""}]
            })
        );
    }
}
