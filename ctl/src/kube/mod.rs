//! KubeVirt's objects on the host: `get`, `apply -f`, `wait` and `delete` of
//! VirtualMachineSnapshot, VirtualMachineSnapshotContent and VirtualMachineRestore.

pub mod apply;
pub mod delete;
pub mod get;
pub mod manifest;
pub mod model;
pub mod read;
pub mod time;
pub mod wait;

/// A user-controlled string as one table cell: control characters (a newline in a
/// description, an escape sequence) are shown escaped, so a cell never breaks the table or
/// the terminal. The one place table cells of these commands are escaped.
pub fn cell(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cells_escape_control_characters() {
        assert_eq!(super::cell("plain"), "plain");
        assert_eq!(super::cell("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }
}
