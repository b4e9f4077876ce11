//! PID 1 of the managed Docker plugin: runs the SDC as its child and starts it again when it
//! dies, so the FUSE keeper (the SDC's child, reparented here) outlives an SDC crash and the
//! new SDC takes the attached devices over, as systemd's `Restart=` does for the SDC daemon.
//! Without it the plugin's PID 1 would be the SDC itself, and its death would end every process
//! of the plugin, keeper included, failing the I/O of every container using a volume.
//!
//! Forwards SIGTERM/SIGINT to the SDC and exits when it has; reaps every child (it is init).
//! Owns no state.

use std::process::Command;
use std::time::{Duration, Instant};

/// Least time between two starts of the SDC.
const RESTART_DELAY: Duration = Duration::from_secs(1);

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Runs `program args` as a supervised child until a SIGTERM or SIGINT ends it; returns the
/// exit code to end with.
pub fn run(program: &std::path::Path, args: &[&str]) -> std::io::Result<i32> {
    let set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD]);
    // SAFETY: blocking signals of this (single-threaded) process, to take them with sigwait.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let start = || -> std::io::Result<libc::pid_t> {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let none = signal_set(&[]);
                if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(child.id() as libc::pid_t)
    };
    let mut child = start()?;
    let mut started = Instant::now();
    let mut stopping = false;
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set and out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            stopping = true;
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child, libc::SIGTERM) };
            continue;
        }
        // SIGCHLD: reap every child that ended (orphans of the SDC's included).
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid != child {
                continue;
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            if stopping {
                return Ok(code);
            }
            eprintln!("sdc plugin supervisor: the SDC ended (status {code}); starting it again");
            let wait = RESTART_DELAY.saturating_sub(started.elapsed());
            std::thread::sleep(wait);
            child = start()?;
            started = Instant::now();
        }
    }
}
