//! External commands (lvm, qemu-img) as vmsnapd runs them: a [`Command`] built by the caller (no
//! shell, arguments as they are), stdin closed, standard output and error read on two threads
//! while it runs (a command printing a lot cannot block on a full pipe), and a timeout: a command
//! still running then is killed (`SIGKILL`) and reaped, and the call says so.
//!
//! Only the command itself is killed, not a process it started and left running. Should such a
//! process keep the output pipes open after the command has exited, the output read until the
//! timeout is used and the exit status decides.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A command that ran to its end (successfully or not).
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a command did not run to its end.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started (or waited for).
    Spawn(std::io::Error),
    /// It was still running at the timeout and was killed.
    TimedOut,
}

/// Runs `command` (its stdin closed, its output captured) and waits at most `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Result<Finished, RunError> {
    let deadline = Instant::now().checked_add(timeout);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RunError::Spawn)?;
    let drains =
        Drain::start(&mut child.stdout).and_then(|out| Ok((out, Drain::start(&mut child.stderr)?)));
    let (stdout, stderr) = match drains {
        Ok(drains) => drains,
        Err(e) => {
            stop(&mut child);
            return Err(RunError::Spawn(e));
        }
    };
    let status = match poll_until(deadline, || child.try_wait()) {
        Ok(Some(status)) => status,
        Ok(None) => {
            stop(&mut child);
            return Err(RunError::TimedOut);
        }
        Err(e) => {
            stop(&mut child);
            return Err(RunError::Spawn(e));
        }
    };
    // The pipes close when the command exits, unless a process it left running still holds them.
    let _ = poll_until(deadline, || {
        Ok((stdout.is_done() && stderr.is_done()).then_some(()))
    });
    Ok(Finished {
        status,
        stdout: stdout.take(),
        stderr: stderr.take(),
    })
}

/// Calls `check` until it returns something or `deadline` (`None`: never) passes, sleeping
/// between calls (1 ms at first, doubling up to 5 ms). `Ok(None)`: the deadline passed.
fn poll_until<T>(
    deadline: Option<Instant>,
    mut check: impl FnMut() -> std::io::Result<Option<T>>,
) -> std::io::Result<Option<T>> {
    // A command's exit is noticed within 5 ms: commands on the operation path (an `rbd` call,
    // ~35 ms) otherwise waited up to 50 ms more; a check costs one non-blocking waitpid.
    const MAX_PAUSE: Duration = Duration::from_millis(5);
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(done) = check()? {
            return Ok(Some(done));
        }
        let left = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => MAX_PAUSE,
        };
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Kills `child` (`SIGKILL`) and reaps it.
fn stop(child: &mut Child) {
    // Fails only if it has already exited, which is as good.
    let _ = child.kill();
    let _ = child.wait();
}

/// A pipe read to its end on a thread of its own, into a buffer the caller can take at any time.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drain {
    /// Takes `pipe` (none: an empty drain) and starts reading it.
    fn start(pipe: &mut Option<impl Read + Send + 'static>) -> std::io::Result<Drain> {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let Some(mut pipe) = pipe.take() else {
            return Ok(Drain { buf, thread: None });
        };
        let shared = Arc::clone(&buf);
        let thread = std::thread::Builder::new()
            .name("command-output".into())
            .spawn(move || {
                let mut chunk = vec![0; 64 * 1024];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })?;
        Ok(Drain {
            buf,
            thread: Some(thread),
        })
    }

    /// Whether the pipe has been read to its end.
    fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// What has been read so far. A thread still reading is left to finish on its own.
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn output_and_status_are_captured_even_when_large() {
        // More than a pipe holds: read while it runs, or the command would block forever.
        let done = run_bounded(
            &mut sh("head -c 1000000 /dev/zero; echo oops >&2; exit 3"),
            Duration::from_secs(60),
        )
        .expect("ran");
        assert_eq!(done.stdout.len(), 1_000_000);
        assert_eq!(done.stderr, b"oops\n");
        assert_eq!(done.status.code(), Some(3));
    }

    #[test]
    fn a_command_still_running_at_the_timeout_is_killed_and_reaped() {
        let started = Instant::now();
        let result = run_bounded(
            &mut sh("echo $$; exec sleep 30"),
            Duration::from_millis(300),
        );
        assert!(matches!(result, Err(RunError::TimedOut)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let result = run_bounded(
            &mut Command::new("/nonexistent/program"),
            Duration::from_secs(5),
        );
        assert!(matches!(result, Err(RunError::Spawn(_))), "{result:?}");
    }
}
