//! vmsnapctl-gen: writes vmsnapctl's man pages and shell completions, generated from its clap
//! definition. Used at install time (install.sh); nothing it writes is committed.
//!
//! ```text
//! vmsnapctl-gen man DIR          # DIR/vmsnapctl.1, DIR/vmsnapctl-snapshot-create.1, ...
//! vmsnapctl-gen completions DIR  # DIR/vmsnapctl.bash, DIR/_vmsnapctl, DIR/vmsnapctl.fish
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};

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

/// One page per command: vmsnapctl.1 and vmsnapctl-<sub>[-<subsub>].1 for every subcommand,
/// each with EXIT STATUS and SEE ALSO sections, and EXAMPLES on vmsnapctl.1.
fn man(dir: &Path) -> Result<(), String> {
    create_dir(dir)?;
    clap_mangen::generate_to(vmsnapctl::command(), dir)
        .map_err(|e| format!("cannot write man pages to {}: {e}", dir.display()))?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !(name.starts_with("vmsnapctl") && name.ends_with(".1")) {
            continue;
        }
        let mut text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        text.push_str(&extra_sections(name == "vmsnapctl.1"));
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The sections clap_mangen does not write, in roff.
fn extra_sections(main_page: bool) -> String {
    let mut roff = String::from(
        r#".SH "EXIT STATUS"
.TP
.B 0
Success. With \fBget\fR, also when there is nothing to list.
.TP
.B 1
An error: vmsnapd refused the request, the operation failed, an object does not exist, a
manifest was refused, vmsnapd or the bus cannot be reached; \fBwait\fR: the timeout passed.
A one\-line message on standard error says why.
.TP
.B 2
A wrong command line (unknown option, missing argument).
.TP
.B 130
A command waiting for vmsnapd was interrupted with Ctrl\-C (vmsnapd carries on).
.TP
.B 141
Standard output is a closed pipe (\fBvmsnapctl get vmsnapshot | head \-1\fR): the output ends
there, quietly.
"#,
    );
    if main_page {
        roff.push_str(
            r#".SH EXAMPLES
Snapshot a VM, list its snapshots, restore it after an accident:
.PP
.RS
.nf
vmsnapctl snapshot create web before\-upgrade \-\-description "kernel 6.12"
vmsnapctl snapshot list web
vmsnapctl restore web before\-upgrade \-\-stop \-\-start
.fi
.RE
.PP
The same through KubeVirt's objects, as with oc:
.PP
.RS
.nf
vmsnapctl apply \-f snapshot.yaml
vmsnapctl wait \-\-for=condition=Ready vmsnapshot/before\-upgrade \-\-timeout=5m
vmsnapctl get vmsnapshot before\-upgrade \-o yaml
vmsnapctl apply \-f restore.yaml
vmsnapctl delete vmrestore my\-restore
.fi
.RE
.PP
Another hypervisor over SSH, and JSON for a script:
.PP
.RS
.nf
vmsnapctl \-H root@hv2 snapshot list \-o json | jq \-r '.[].name'
.fi
.RE
"#,
        );
    }
    roff.push_str(
        r#".SH "SEE ALSO"
.BR vmsnapctl (1),
.BR vmsnapd (8),
.BR vmsnapd.toml (5),
.BR virsh (1),
.BR systemctl (1),
.BR ssh (1)
"#,
    );
    roff
}

/// bash, zsh and fish completions, under the names their vendor directories expect. They are
/// dynamic: the shell asks `COMPLETE=SHELL vmsnapctl -- WORDS...`, so commands, options and the
/// names of VMs and snapshots (asked of vmsnapd) are always current.
fn completions(dir: &Path) -> Result<(), String> {
    create_dir(dir)?;
    let failed = |e: std::io::Error| format!("cannot write completions to {}: {e}", dir.display());
    let shells: [(&dyn EnvCompleter, &str); 3] = [
        (&Bash, "vmsnapctl.bash"),
        (&Zsh, "_vmsnapctl"),
        (&Fish, "vmsnapctl.fish"),
    ];
    let mut written: Vec<PathBuf> = Vec::new();
    for (shell, file) in shells {
        let mut script = Vec::new();
        shell
            .write_registration(
                "COMPLETE",
                "vmsnapctl",
                "vmsnapctl",
                "vmsnapctl",
                &mut script,
            )
            .map_err(failed)?;
        let path = dir.join(file);
        std::fs::write(&path, script).map_err(failed)?;
        written.push(path);
    }
    for path in written {
        if !path.exists() {
            return Err(format!("{} was not written", path.display()));
        }
    }
    Ok(())
}
