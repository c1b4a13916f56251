//! Structured output (JSON or YAML) and the end of output on a closed pipe.
//!
//! The existing commands print through `output::print_json`; it asks [`yaml_selected`] whether
//! `-o yaml` was given and prints the same document as YAML then, so every command that has
//! `--output json` has `-o yaml` too, with the same field names.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

static YAML: AtomicBool = AtomicBool::new(false);
static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress lines.
pub fn select_quiet(yes: bool) {
    QUIET.store(yes, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Chooses YAML for every structured document printed from now on.
pub fn select_yaml(yes: bool) {
    YAML.store(yes, Ordering::Relaxed);
}

/// Whether `-o yaml` was given.
pub fn yaml_selected() -> bool {
    YAML.load(Ordering::Relaxed)
}

/// One document as YAML (starting without `---`, ending with a newline).
pub fn to_yaml<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
    serde_norway::to_string(value).map_err(|e| format!("cannot write YAML: {e}"))
}

/// One document as pretty JSON, with a final newline.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}

/// Prints `value` as YAML when `-o yaml` was given, as JSON otherwise.
pub fn print_structured<T: Serialize + ?Sized>(value: &T) -> Result<(), String> {
    let text = if yaml_selected() {
        to_yaml(value)?
    } else {
        to_json(value)?
    };
    print!("{text}");
    Ok(())
}

/// Exit status when standard output is a closed pipe (`vmsnapctl get vmsnapshot | head -1`):
/// what a shell reports for a program killed by SIGPIPE (128 + 13).
pub const BROKEN_PIPE: u8 = 141;

/// Makes a write to a closed standard output end the program quietly with [`BROKEN_PIPE`]
/// instead of a panic ("failed printing to stdout: Broken pipe", status 101). Rust ignores
/// SIGPIPE, so `print!` on a closed pipe panics; this hook recognises exactly that panic.
/// Writes to the bus socket are not affected: they still fail with an error message.
pub fn quiet_broken_pipe() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_broken_stdout(message) {
            std::process::exit(i32::from(BROKEN_PIPE));
        }
        previous(info);
    }));
}

fn is_broken_stdout(message: &str) -> bool {
    message.starts_with("failed printing to stdout") && message.contains("os error 32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_a_broken_stdout() {
        assert!(is_broken_stdout(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!is_broken_stdout(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_broken_stdout("index out of bounds"));
    }

    #[test]
    fn yaml_of_a_document() {
        #[derive(Serialize)]
        struct Doc {
            name: &'static str,
            error: Option<&'static str>,
            list: Vec<u32>,
        }
        let text = to_yaml(&Doc {
            name: "a: b",
            error: None,
            list: vec![1, 2],
        })
        .expect("serializes");
        assert_eq!(text, "name: 'a: b'\nerror: null\nlist:\n- 1\n- 2\n");
    }
}
