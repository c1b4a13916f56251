//! vmsnapctl-gen: writes vmsnapctl's man pages and shell completions, generated from its clap
//! definition. Used at install time (install.sh); nothing it writes is committed.
//!
//! ```text
//! vmsnapctl-gen man DIR          # DIR/vmsnapctl.1, DIR/vmsnapctl-snapshot-create.1, ...
//! vmsnapctl-gen completions DIR  # DIR/vmsnapctl.bash, DIR/_vmsnapctl, DIR/vmsnapctl.fish
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::aot::{generate_to, Bash, Fish, Zsh};

const USAGE: &str = "usage: vmsnapctl-gen man DIR | vmsnapctl-gen completions DIR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [what, dir] if what == "man" => man(Path::new(dir)),
        [what, dir] if what == "completions" => completions(Path::new(dir)),
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vmsnapctl-gen: {message}");
            ExitCode::FAILURE
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// One page per command: vmsnapctl.1 and vmsnapctl-<sub>[-<subsub>].1 for every subcommand.
fn man(dir: &Path) -> Result<(), String> {
    create_dir(dir)?;
    clap_mangen::generate_to(vmsnapctl::command(), dir)
        .map_err(|e| format!("cannot write man pages to {}: {e}", dir.display()))
}

/// bash, zsh and fish completions, under the names their vendor directories expect.
fn completions(dir: &Path) -> Result<(), String> {
    create_dir(dir)?;
    let mut command = vmsnapctl::command();
    let failed = |e: std::io::Error| format!("cannot write completions to {}: {e}", dir.display());
    let written: Vec<PathBuf> = vec![
        generate_to(Bash, &mut command, "vmsnapctl", dir).map_err(failed)?,
        generate_to(Zsh, &mut command, "vmsnapctl", dir).map_err(failed)?,
        generate_to(Fish, &mut command, "vmsnapctl", dir).map_err(failed)?,
    ];
    for path in written {
        if !path.exists() {
            return Err(format!("{} was not written", path.display()));
        }
    }
    Ok(())
}
