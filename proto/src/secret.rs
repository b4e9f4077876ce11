//! Passwords from a file or a terminal prompt, never from a command line (which `ps` shows to
//! every user of the host). Used by `mdm bootstrap` and scli. This module does no logging and
//! keeps nothing: the caller owns the secret.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// A password that could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("read the password file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {0} is empty; write the password on its first line")]
    Empty(PathBuf),
    #[error("read the password from the terminal")]
    Prompt(#[source] std::io::Error),
    #[error("the two passwords typed differ; nothing changed")]
    Mismatch,
}

/// The password in `path`: its first line, without the line end.
pub fn read_file(path: &Path) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(SecretError::Empty(path.to_path_buf()));
    }
    Ok(line.to_string())
}

/// True when a person can be asked: standard input is a terminal.
pub fn can_prompt() -> bool {
    std::io::stdin().is_terminal()
}

/// Ask for a password on the controlling terminal, without echo. With `confirm`, ask twice
/// and refuse two different answers (for passwords being set).
pub fn prompt(question: &str, confirm: bool) -> Result<String, SecretError> {
    let first = prompt_once(question).map_err(SecretError::Prompt)?;
    if confirm {
        let again = prompt_once("Again: ").map_err(SecretError::Prompt)?;
        if again != first {
            return Err(SecretError::Mismatch);
        }
    }
    Ok(first)
}

fn prompt_once(question: &str) -> std::io::Result<String> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let _echo_off = EchoOff::new(&tty)?;
    (&tty).write_all(question.as_bytes())?;
    (&tty).flush()?;
    let mut line = String::new();
    std::io::BufReader::new(&tty).read_line(&mut line)?;
    // The newline typed was not echoed.
    (&tty).write_all(b"\n")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// A terminal with echo turned off until dropped.
struct EchoOff<'a> {
    tty: &'a std::fs::File,
    saved: libc::termios,
}

impl<'a> EchoOff<'a> {
    fn new(tty: &'a std::fs::File) -> std::io::Result<EchoOff<'a>> {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open for the life of `tty`; `saved` is a valid termios.
        if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above; `quiet` is a copy of the terminal's own settings.
        if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSAFLUSH, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EchoOff { tty, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: restores the settings read in `new` on the same open descriptor.
        unsafe { libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSAFLUSH, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_gives_its_first_line() {
        let p = std::env::temp_dir().join(format!(
            "mb-secret-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&p, "s3cret pass\r\nignored\n").expect("write");
        assert_eq!(read_file(&p).expect("read"), "s3cret pass");
        std::fs::write(&p, "\n").expect("write");
        assert!(matches!(read_file(&p), Err(SecretError::Empty(_))));
        std::fs::remove_file(&p).expect("remove");
        assert!(matches!(read_file(&p), Err(SecretError::Read { .. })));
    }
}
