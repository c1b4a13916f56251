//! vmsnapctl: the command-line client of vmsnapd (the client itself is the vmsnapctl library).

fn main() -> std::process::ExitCode {
    vmsnapctl::main()
}
