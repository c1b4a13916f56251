//! What `show` and `list` of snapshots and restores share: printing an object either as JSON
//! (YAML with -o yaml) for scripts or as text for people, and the label/value layout of `show`.
//! The modules of each object only say which fields and columns there are.

use serde::Serialize;

use crate::output::{dash, indent_into, print_json, show_field, show_multiline_field, table};
use crate::OutputFormat;

/// Prints `json()` as a structured document with --output json (or yaml), otherwise `text()` as
/// it is. Only the one asked for is built.
pub fn print<J: Serialize>(
    format: OutputFormat,
    json: impl FnOnce() -> J,
    text: impl FnOnce() -> String,
) -> Result<(), String> {
    match format {
        OutputFormat::Json => print_json(&json()),
        OutputFormat::Table => {
            print!("{}", text());
            Ok(())
        }
    }
}

/// As [`print`], for a list: an array of the `json` of every item, or the text `text` makes of
/// them all.
pub fn print_list<'a, T, J: Serialize>(
    format: OutputFormat,
    items: &'a [T],
    json: impl Fn(&'a T) -> J,
    text: impl FnOnce(&[T]) -> String,
) -> Result<(), String> {
    print(
        format,
        || items.iter().map(json).collect::<Vec<J>>(),
        || text(items),
    )
}

/// A table of `items`, one row of `row` each, under `headers` (see [`table`]).
pub fn table_of<T>(headers: &[&str], items: &[T], row: impl Fn(&T) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(headers, &rows)
}

/// What a [`Layout::table`] shows when it has no rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenEmpty {
    /// `Heading: none`.
    SayNone,
    /// Nothing, not even the heading.
    Omit,
}

/// The layout of a `show` command: one `Label:  value` line a field, every label padded to the
/// same width, then tables, each under its heading and indented by two spaces. Every value is
/// made terminal-safe, so none can pass for a field or a row of its own.
pub struct Layout {
    out: String,
    label_width: usize,
}

impl Layout {
    /// A layout whose labels take `label_width` characters, colon and padding included. A
    /// longer label is followed by its value directly.
    pub fn new(label_width: usize) -> Layout {
        Layout {
            out: String::new(),
            label_width,
        }
    }

    /// One `Label:  value` line.
    pub fn field(&mut self, label: &str, value: &str) {
        show_field(&mut self.out, self.label_width, label, value);
    }

    /// One `Label:  value` line, with `-` for an empty value.
    pub fn field_or_dash(&mut self, label: &str, value: &str) {
        self.field(label, &dash(value));
    }

    /// One `Label:  value` line, only when the value is not empty.
    pub fn field_if_set(&mut self, label: &str, value: &str) {
        if !value.is_empty() {
            self.field(label, value);
        }
    }

    /// A value that may span lines (an error), only when it is not empty: each continuation
    /// line is indented under the first.
    pub fn multiline_if_set(&mut self, label: &str, value: &str) {
        if !value.is_empty() {
            show_multiline_field(&mut self.out, self.label_width, label, value);
        }
    }

    /// `Heading:`, then the table of `items` (one row of `row` each) indented by two spaces;
    /// `empty` says what shows when there are no items.
    pub fn table<T>(
        &mut self,
        heading: &str,
        headers: &[&str],
        items: &[T],
        row: impl Fn(&T) -> Vec<String>,
        empty: WhenEmpty,
    ) {
        if items.is_empty() {
            if empty == WhenEmpty::SayNone {
                self.out.push_str(heading);
                self.out.push_str(": none\n");
            }
            return;
        }
        self.out.push_str(heading);
        self.out.push_str(":\n");
        indent_into(&mut self.out, &table_of(headers, items, row));
    }

    /// The text of the layout.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &(&str, &str)) -> Vec<String> {
        vec![p.0.to_string(), p.1.to_string()]
    }

    #[test]
    fn fields_are_aligned_after_padded_labels() {
        let mut layout = Layout::new(10);
        layout.field("Name", "web");
        layout.field("Long label", "x");
        layout.field("Longer label", "y");
        layout.field("Empty", "");
        layout.field_or_dash("Dash", "");
        layout.field_or_dash("Not dash", "z");
        assert_eq!(
            layout.finish(),
            "Name:     web\n\
             Long label:x\n\
             Longer label:y\n\
             Empty:\n\
             Dash:     -\n\
             Not dash: z\n"
        );
    }

    #[test]
    fn optional_fields_show_only_when_set() {
        let mut layout = Layout::new(8);
        layout.field_if_set("Gone", "");
        layout.multiline_if_set("Gone", "");
        layout.field_if_set("Here", "a\nb");
        layout.multiline_if_set("Error", "first\nsecond\n");
        assert_eq!(
            layout.finish(),
            "Here:   a\\nb\n\
             Error:  first\n\
             \x20       second\n"
        );
    }

    #[test]
    fn tables_under_headings() {
        let none: [(&str, &str); 0] = [];
        let mut layout = Layout::new(8);
        layout.field("Name", "web");
        layout.table("Said", &["A", "B"], &none, pair, WhenEmpty::SayNone);
        layout.table("Omitted", &["A", "B"], &none, pair, WhenEmpty::Omit);
        layout.table(
            "Rows",
            &["TARGET", "REASON"],
            &[("vda", "cdrom"), ("sdb\nvdz", "")],
            pair,
            WhenEmpty::Omit,
        );
        assert_eq!(
            layout.finish(),
            "Name:   web\n\
             Said: none\n\
             Rows:\n\
             \x20 TARGET    REASON\n\
             \x20 vda       cdrom\n\
             \x20 sdb\\nvdz\n"
        );
    }

    #[test]
    fn table_of_items() {
        assert_eq!(
            table_of(&["A", "B"], &[("x", "yy"), ("zzz", "")], pair),
            "A    B\nx    yy\nzzz\n"
        );
        assert_eq!(
            table_of(&["A", "B"], &[] as &[(&str, &str)], pair),
            "A  B\n"
        );
    }
}
