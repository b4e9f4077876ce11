//! Passwords: refused on the command line, read from a file, the environment (login only) or
//! the terminal.

use super::Args;
use anyhow::bail;

/// The refusal of a password given on the command line.
const PASSWORD_FLAG_GONE: &str = "--password is no longer accepted: a password on the command \
     line shows in `ps`. Put it in a file only you can read (chmod 600) and pass --password_file \
     FILE; --login also reads MESHBLOCK_PASSWORD; on a terminal scli asks for it";

impl Args {
    /// Refuse what must not be on a command line, before anything else happens.
    pub fn refuse_secrets(&self) -> anyhow::Result<()> {
        if self.refused_password.is_some() {
            bail!(PASSWORD_FLAG_GONE);
        }
        Ok(())
    }

    /// The login password: --password_file, else MESHBLOCK_PASSWORD, else the terminal.
    pub(super) fn login_password(&self, user: &str) -> anyhow::Result<String> {
        if let Some(f) = &self.password_file {
            return Ok(proto::secret::read_file(f)?);
        }
        // The environment only ever supplies the login password, so it cannot leak into
        // another command such as --add_user.
        if let Ok(p) = std::env::var("MESHBLOCK_PASSWORD") {
            if !p.is_empty() {
                return Ok(p);
            }
        }
        if self.can_prompt {
            return Ok(proto::secret::prompt(
                &format!("Password for {user}: "),
                false,
            )?);
        }
        bail!(
            "missing the password: give --password_file FILE, set MESHBLOCK_PASSWORD, or run \
             scli on a terminal to be asked for it"
        )
    }

    /// A new user's password: --password_file, else asked twice on the terminal.
    pub(super) fn new_user_password(&self, user: &str) -> anyhow::Result<String> {
        if let Some(f) = &self.password_file {
            return Ok(proto::secret::read_file(f)?);
        }
        if self.can_prompt {
            return Ok(proto::secret::prompt(
                &format!("Password for the new user {user}: "),
                true,
            )?);
        }
        bail!(
            "missing the new user's password: give --password_file FILE, or run scli on a \
             terminal to be asked for it"
        )
    }
}
