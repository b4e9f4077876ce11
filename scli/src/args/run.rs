//! Running the command line: the session commands (login, logout) and the one request to the
//! MDM, with its answer as text.

use super::values::need;
use super::Args;
use crate::{client, output, session};
use anyhow::{anyhow, bail, Context};
use proto::msg::{Command, MdmRequest, MdmResponse, Query};

/// Run the command line; the returned text goes to stdout.
pub async fn run(a: Args) -> anyhow::Result<String> {
    a.refuse_secrets()?;
    let cmds = a.commands();
    let name = match cmds.as_slice() {
        [one] => *one,
        [] => bail!("no command given; see scli --help"),
        many => bail!("give exactly one command, got {}", many.join(" ")),
    };
    if a.since.is_some() && name != "--query_events" {
        bail!("--since goes with --query_events only");
    }
    if a.wait && !matches!(name, "--remove_sds" | "--remove_sds_device") {
        bail!("--wait goes with --remove_sds and --remove_sds_device only");
    }
    if a.watch && name != "--query_storage_pool" {
        bail!("--watch goes with --query_storage_pool only");
    }
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
    // Validate the arguments before anything else, so a wrong command never reaches the MDM.
    let command = a.command(name)?;
    let query = if command.is_none() {
        a.query(name)?
    } else {
        None
    };
    let s = session::load()?;
    let ips = a.mdm_ip.clone().unwrap_or_else(|| s.mdm_ips.clone());
    let c = client::connect(&ips, a.cert_dir.as_deref())
        .await
        .context("connect to the MDM")?;
    if let Some(command) = command {
        let waited = match (&command, a.wait) {
            (Command::RemoveSds { name }, true) => Some(crate::progress::Waited::Sds(name.clone())),
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
