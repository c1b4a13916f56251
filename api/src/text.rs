//! Rules for every string a user hands to vmsnap (names, descriptions) and for showing strings
//! that came from elsewhere (libvirt, records, the bus) on a terminal or in a log.
//!
//! The daemon validates with these before anything reaches libvirt, a path or a log; clients
//! (vmsnapctl, the Cockpit page) apply the same rules to give the same answer early.

use std::borrow::Cow;

/// Longest snapshot name, in bytes (all allowed characters are ASCII).
pub const MAX_SNAPSHOT_NAME: usize = 63;

/// Longest VM name vmsnap gives to libvirt, in bytes. libvirt stores a domain as `NAME.xml` and
/// its UEFI variables as `NAME_VARS.fd`, each a single path component of at most 255 bytes.
pub const MAX_VM_NAME: usize = 200;

/// Longest snapshot description, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;

/// How many characters of a foreign string an error or log line shows.
pub const EXCERPT_CHARS: usize = 64;

/// Characters that change what a terminal shows without being text: C0/C1 controls (escape
/// sequences, newlines, carriage returns, backspace) and the Unicode bidirectional overrides and
/// isolates, which reorder the text around them.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every [unsafe character](is_unsafe_char) written as an escape (`\n`, `\u{1b}`), so
/// that it prints as exactly one piece of text on one line.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    escape_unsafe(s, false)
}

/// As [`terminal_safe`], but newlines stay: for values a caller lays out over several lines
/// itself (indenting each continuation, so no line can pass for another field).
pub fn terminal_safe_multiline(s: &str) -> Cow<'_, str> {
    escape_unsafe(s, true)
}

fn escape_unsafe(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_here = |c: char| is_unsafe_char(c) && !(keep_newlines && c == '\n');
    if !s.chars().any(unsafe_here) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_here(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Longest error message a record keeps (and the bus shows), in characters.
pub const MAX_ERROR_CHARS: usize = 1000;

/// An operation's error as its record keeps it (and the bus shows it): at most
/// [`MAX_ERROR_CHARS`] characters.
pub fn record_error(error: &str) -> String {
    clip(error, MAX_ERROR_CHARS).into_owned()
}

/// At most `max_chars` characters of `s`, with a marker saying how long it really was.
pub fn clip(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => {
            let more = s[cut..].chars().count();
            Cow::Owned(format!("{}...[{more} more characters]", &s[..cut]))
        }
    }
}

/// A foreign string as an error message or a log line may show it: terminal-safe and at most
/// [`EXCERPT_CHARS`] characters once escaped, with a marker saying how much was left out.
pub fn excerpt(s: &str) -> String {
    let mut shown = String::new();
    let (mut shown_chars, mut taken) = (0, 0);
    for c in s.chars() {
        let escaped: String = if is_unsafe_char(c) {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        let width = escaped.chars().count();
        if shown_chars + width > EXCERPT_CHARS {
            break;
        }
        shown.push_str(&escaped);
        shown_chars += width;
        taken += 1;
    }
    let left = s.chars().count() - taken;
    if left > 0 {
        shown.push_str(&format!("...[{left} more characters]"));
    }
    shown
}

fn describe(what: &str, name: &str) -> String {
    format!("{what} \"{}\"", excerpt(name))
}

/// Checks a snapshot name: 1-63 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
/// The error text is meant for users.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    validate_name(
        "snapshot name",
        name,
        MAX_SNAPSHOT_NAME,
        "A-Z a-z 0-9 . _ -",
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
    )
}

/// Checks the name of a VM vmsnap is to define (the target of a restore as a new VM): 1-200
/// characters of `A-Z a-z 0-9 . _ - +`, not starting with `.` or `-`. This is narrower than what
/// libvirt accepts: nothing that can act as a path component (`.`, `..`), a path separator, an
/// option, or change what a terminal shows.
pub fn validate_vm_name(name: &str) -> Result<(), String> {
    validate_name("VM name", name, MAX_VM_NAME, "A-Z a-z 0-9 . _ - +", |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+')
    })
}

fn validate_name(
    what: &str,
    name: &str,
    max: usize,
    allowed: &str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > max {
        return Err(format!(
            "{} is {} bytes long; the limit is {max}",
            describe(what, name),
            name.len()
        ));
    }
    if let Some(bad) = name.chars().find(|c| !is_allowed(*c)) {
        return Err(format!(
            "{} contains '{}'; use only {allowed}",
            describe(what, name),
            bad.escape_default()
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "{} must not start with '.' or '-'",
            describe(what, name)
        ));
    }
    Ok(())
}

/// Checks a snapshot description: at most [`MAX_DESCRIPTION`] bytes of text on one line (no
/// control characters, no bidirectional overrides).
pub fn validate_description(description: &str) -> Result<(), String> {
    if description.len() > MAX_DESCRIPTION {
        return Err(format!(
            "the description is {} bytes long; the limit is {MAX_DESCRIPTION}",
            description.len()
        ));
    }
    if let Some(bad) = description.chars().find(|c| is_unsafe_char(*c)) {
        return Err(format!(
            "the description contains the control character {}; use one line of text",
            bad.escape_default()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character class a name could hold, with whether a VM name (`vm`) and a snapshot
    /// name (`snap`) take it in the middle of a name.
    const CLASSES: &[(&str, bool, bool)] = &[
        ("a", true, true),
        ("Z", true, true),
        ("7", true, true),
        (".", true, true),
        ("_", true, true),
        ("-", true, true),
        ("+", true, false),
        (" ", false, false),
        ("/", false, false),
        ("\\", false, false),
        ("\0", false, false),
        ("\n", false, false),
        ("\r", false, false),
        ("\t", false, false),
        ("\u{1b}", false, false),
        ("\u{7f}", false, false),
        ("\u{85}", false, false),
        ("\u{202e}", false, false),
        ("'", false, false),
        ("\"", false, false),
        ("$", false, false),
        ("*", false, false),
        (":", false, false),
        (";", false, false),
        ("<", false, false),
        ("&", false, false),
        ("ü", false, false),
        ("名", false, false),
        ("\u{ff0f}", false, false), // fullwidth solidus
        ("😀", false, false),
    ];

    #[test]
    fn each_character_class_in_the_middle_of_a_name() {
        for (class, vm_ok, snap_ok) in CLASSES {
            let name = format!("a{class}b");
            assert_eq!(validate_vm_name(&name).is_ok(), *vm_ok, "VM name {name:?}");
            assert_eq!(
                validate_snapshot_name(&name).is_ok(),
                *snap_ok,
                "snapshot name {name:?}"
            );
        }
    }

    #[test]
    fn names_that_are_or_start_like_path_components_or_options() {
        for name in [
            "", ".", "..", "...", "....", ".a", "..a", "-", "--", "-a", "--force", "a/..", "../a",
            "/", "a/b",
        ] {
            assert!(validate_vm_name(name).is_err(), "VM name {name:?}");
            assert!(
                validate_snapshot_name(name).is_err(),
                "snapshot name {name:?}"
            );
        }
        for name in [
            "a.",
            "a..",
            "a...b",
            "a-",
            "a_",
            "_a",
            "0",
            "a+b",
            "vm.example.com",
        ] {
            assert!(validate_vm_name(name).is_ok(), "VM name {name:?}");
        }
    }

    #[test]
    fn lengths_at_the_limits() {
        assert!(validate_vm_name(&"v".repeat(MAX_VM_NAME)).is_ok());
        assert!(validate_vm_name(&"v".repeat(MAX_VM_NAME + 1)).is_err());
        assert!(validate_snapshot_name(&"s".repeat(MAX_SNAPSHOT_NAME)).is_ok());
        assert!(validate_snapshot_name(&"s".repeat(MAX_SNAPSHOT_NAME + 1)).is_err());
        assert!(validate_description(&"d".repeat(MAX_DESCRIPTION)).is_ok());
        assert!(validate_description(&"d".repeat(MAX_DESCRIPTION + 1)).is_err());
        // The limit counts bytes: 2-byte characters reach it at half the count.
        assert!(validate_description(&"ü".repeat(MAX_DESCRIPTION / 2)).is_ok());
        assert!(validate_description(&"ü".repeat(MAX_DESCRIPTION / 2 + 1)).is_err());
    }

    #[test]
    fn errors_about_huge_names_stay_short_and_printable() {
        let huge = format!("{}\u{1b}[2J", "x".repeat(1 << 20));
        for error in [
            validate_vm_name(&huge),
            validate_snapshot_name(&huge),
            validate_description(&huge),
            validate_vm_name("a\u{1b}[31mred"),
        ]
        .map(|result| result.expect_err("refused"))
        {
            assert!(error.len() < 200, "{error}");
            assert!(!error.chars().any(is_unsafe_char), "{error:?}");
        }
    }

    #[test]
    fn descriptions() {
        for good in [
            "",
            "before the upgrade",
            "Größe: 10 GiB, naïve café 名前 😀",
            "tab-free",
        ] {
            assert!(validate_description(good).is_ok(), "{good:?}");
        }
        for bad in [
            "two\nlines",
            "cr\r",
            "tab\t",
            "nul\0",
            "\u{1b}[2J",
            "rlo\u{202e}",
            "\u{9b}",
        ] {
            assert!(validate_description(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn terminal_safe_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(terminal_safe("plain ü 名"), Cow::Borrowed(_)));
        assert_eq!(terminal_safe("a\nPhase: Succeeded"), "a\\nPhase: Succeeded");
        assert_eq!(terminal_safe("\u{1b}[31m"), "\\u{1b}[31m");
        assert_eq!(terminal_safe("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(terminal_safe_multiline("a\nb\rc"), "a\nb\\rc");
    }

    #[test]
    fn excerpts_are_bounded_with_a_marker() {
        assert_eq!(excerpt("short"), "short");
        let long = "y".repeat(10_000);
        let shown = excerpt(&long);
        assert!(shown.starts_with(&"y".repeat(EXCERPT_CHARS)));
        assert!(shown.ends_with("...[9936 more characters]"), "{shown}");
        // Cut on a character boundary, never inside a multi-byte character.
        assert!(excerpt(&"ü".repeat(100)).starts_with(&"ü".repeat(EXCERPT_CHARS)));
        // The bound holds after escaping: 64 escapes would otherwise be 640 characters.
        let escapes = excerpt(&"\u{10ffff}\0".repeat(100));
        assert!(escapes.chars().count() < EXCERPT_CHARS + 40, "{escapes}");
        assert!(!escapes.chars().any(is_unsafe_char));
    }
}
