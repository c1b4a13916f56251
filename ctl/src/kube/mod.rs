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
/// the terminal (vmsnap's one escaper, [`vmsnap_api::terminal_safe`]).
pub fn cell(text: &str) -> String {
    vmsnap_api::terminal_safe(text).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cells_escape_control_characters() {
        assert_eq!(super::cell("plain"), "plain");
        assert_eq!(super::cell("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }
}
