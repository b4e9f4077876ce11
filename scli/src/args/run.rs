//! Running the command line: the session commands (login, logout) and the one request to the
//! MDM, with its answer as text.

use super::values::need;
use super::{Args, DESTRUCTIVE};
use crate::{client, output, session};
use anyhow::{anyhow, bail, Context};
use proto::msg::{Command, MdmRequest, MdmResponse, Query};

/// Run the command line; the returned text goes to stdout.
pub async fn run(mut a: Args) -> anyhow::Result<String> {
    a.refuse_secrets()?;
    let cmds = a.commands();
    // clap lets exactly one command through; this guards callers that build `Args` by hand.
    let name = match cmds.as_slice() {
        [one] => *one,
        [] => bail!("no command given; see scli --help"),
        many => bail!("give exactly one command, got {}", many.join(" ")),
    };
    refuse_unconfirmed(&a, name)?;
    if name == "--logout" {
        session::remove()?;
        return Ok("Logged out.".into());
    }
    if name == "--login" {
        let user = need(&a.username, "--username")?.to_string();
        let password = a.login_password(&user)?;
        let ips = match &a.mdm_ip {
            Some(ips) => ips.clone(),
            None => session::load()
                .map(|s| s.mdm_ips)
                .map_err(|_| anyhow!("missing --mdm_ip"))?,
        };
        let c = client::connect(&ips, a.cert_dir.as_deref()).await?;
        let r = client::request(
            &c,
            &MdmRequest::Login {
                username: user.clone(),
                password,
            },
        )
        .await?;
        let MdmResponse::Session {
            token,
            role,
            expires_unix,
        } = r
        else {
            bail!("unexpected answer from the MDM")
        };
        // Remember every MDM of the cluster, not only the ones given, so a later failover of
        // the one we logged in through does not strand this session.
        let mut all: Vec<String> = ips
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Ok(MdmResponse::View { state, .. }) = client::request(
            &c,
            &MdmRequest::Query {
                token: token.clone(),
                query: Query::Cluster,
            },
        )
        .await
        {
            for m in state.mdms.values() {
                if !all.contains(&m.addr) {
                    all.push(m.addr.clone());
                }
            }
        }
        let ips = all.join(",");
        session::save(&session::Session {
            username: user.clone(),
            role: role.to_string(),
            token,
            expires_unix,
            mdm_ips: ips,
        })?;
        return Ok(format!("Logged in. User role is {role}. System ID is not shown; session valid until {} (unix time).", expires_unix));
    }
    // Validate the arguments before anything else, so a wrong command never reaches the MDM;
    // objects given by id need the map first.
    let built = if a.has_ids() {
        None
    } else {
        Some(build(&a, name)?)
    };
    let s = session::load()?;
    let ips = a.mdm_ip.clone().unwrap_or_else(|| s.mdm_ips.clone());
    let c = client::connect(&ips, a.cert_dir.as_deref())
        .await
        .context("connect to the MDM")?;
    if a.has_ids() {
        let r = client::request(
            &c,
            &MdmRequest::Query {
                token: s.token.clone(),
                query: Query::Cluster,
            },
        )
        .await
        .context("read the map to find the objects given by id")?;
        let MdmResponse::View { state, .. } = r else {
            bail!("unexpected answer from the MDM")
        };
        a.resolve_ids(&state)?;
    }
    let (command, query) = match built {
        Some(b) => b,
        None => build(&a, name)?,
    };
    if let Some(command) = command {
        let waited = match (&command, a.wait) {
            (Command::RemoveSds { name }, true) => Some(crate::progress::Waited::Sds(name.clone())),
            (Command::AddSds { name, .. }, true) => {
                Some(crate::progress::Waited::Added(name.clone()))
            }
            (Command::RemoveSdsDevice { sds, path }, true) => {
                Some(crate::progress::Waited::Device {
                    sds: sds.clone(),
                    path: path.clone(),
                })
            }
            _ => None,
        };
        let r = client::request(
            &c,
            &MdmRequest::Command {
                token: s.token.clone(),
                command,
                expect: a.bindings.clone(),
            },
        )
        .await?;
        let done = match r {
            MdmResponse::Done { message, object_id } => match object_id {
                Some(id) => format!("{message} Object ID {id}"),
                None => message,
            },
            _ => bail!("unexpected answer from the MDM"),
        };
        return match waited {
            Some(w) => {
                println!("{done}");
                crate::progress::wait(&c, &s.token, w).await
            }
            None => Ok(done),
        };
    }
    let Some(query) = query else {
        bail!("unknown command {name}")
    };
    if a.watch {
        return crate::progress::watch(&c, &s.token, |status, state| {
            a.check_bindings(state)?;
            output::render(&query, &a, status, state)
        })
        .await;
    }
    let r = client::request(
        &c,
        &MdmRequest::Query {
            token: s.token,
            query: query.clone(),
        },
    )
    .await?;
    let MdmResponse::View { status, state } = r else {
        bail!("unexpected answer from the MDM")
    };
    remember_mdms(&state);
    a.check_bindings(&state)?;
    output::render(&query, &a, &status, &state)
}

/// Add MDMs the cluster knows to the session, so later failovers find them.
fn remember_mdms(state: &proto::model::ClusterState) {
    let Ok(mut s) = session::load() else { return };
    let mut ips: Vec<String> = s
        .mdm_ips
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    let before = ips.len();
    for m in state.mdms.values() {
        if !ips.contains(&m.addr) {
            ips.push(m.addr.clone());
        }
    }
    if ips.len() != before {
        s.mdm_ips = ips.join(",");
        let _ = session::save(&s);
    }
}

/// Refuse a command in [`DESTRUCTIVE`] without `--i_am_sure`, before anything is sent.
pub(super) fn refuse_unconfirmed(a: &Args, name: &str) -> anyhow::Result<()> {
    if DESTRUCTIVE.contains(&name) && !a.i_am_sure {
        bail!(
            "{name} removes or overwrites something for good: add --i_am_sure to confirm. \
             Nothing was sent"
        );
    }
    Ok(())
}

/// The command or query `name` sends (at most once: `--add_user` may ask for a password).
fn build(a: &Args, name: &str) -> anyhow::Result<(Option<Command>, Option<Query>)> {
    let command = a.command(name)?;
    let query = if command.is_none() {
        a.query(name)?
    } else {
        None
    };
    Ok((command, query))
}
