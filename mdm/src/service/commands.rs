//! Commands the leader does more for than propose them: takeovers, snapshots (answered once
//! the change is in force), thick admission, users, MDM membership and cluster mode.

use super::*;

impl Service {
    /// Map `volume` to `sdc`, fencing its mappings to other SDCs that lost their session (or
    /// any, if the volume allows preemption). Answers only once the fence is in force: every
    /// SDS still serving holds a map without the old mappings. An SDS serves only under a
    /// lease shorter than `sds_down_timeout`, renewed only with a map at least as new as the
    /// leader's at renewal, so that long after the commit no SDS serves an older map.
    pub(super) async fn take_over(
        &self,
        volume: &str,
        sdc: &SdcSelector,
        expect: &[Binding],
    ) -> Result<Outcome, WireError> {
        let state = self.raft.shared.read_state();
        state_machine::check_bindings(&state, expect)?;
        let Some(v) = state.volume_by_name(volume) else {
            return fail(ErrorCode::NotFound, format!("Volume {volume} not found"));
        };
        let me = state_machine::sdc_id(&state, sdc)?;
        let term = self.raft.shared.status().term;
        let mut evict = Vec::new();
        for m in state.mappings_of(v.id).filter(|m| m.sdc != me) {
            let silence = self
                .sdc_seen
                .lock()
                .map(|mut x| x.silence(term, m.sdc))
                .unwrap_or_default();
            let name = state
                .sdcs
                .get(&m.sdc)
                .map_or_else(|| m.sdc.to_string(), |x| x.name.clone());
            if !v.preempt && silence < self.sdc_session_timeout {
                let left = self.sdc_session_timeout - silence;
                return fail(
                    ErrorCode::Busy,
                    format!(
                        "Volume {volume} is mapped to SDC {name}, whose session is alive (heard {} ms ago); \
                         it can be taken over once that host has been silent for {} ms more, or create \
                         volumes with preempt to allow taking them from live hosts",
                        silence.as_millis(),
                        left.as_millis()
                    ),
                );
            }
            tracing::warn!(%volume, from = %name, silent_ms = silence.as_millis() as u64, preempt = v.preempt,
                "taking volume over: fencing the old mapping");
            evict.push(m.sdc);
        }
        let out = self
            .propose(Op::TakeOverVolume {
                volume: v.id,
                sdc: me,
                evict: evict.clone(),
            })
            .await?;
        if !evict.is_empty() {
            tokio::time::sleep(self.sds_down_timeout).await;
        }
        Ok(out)
    }

    /// Run `command`. The names in `expect` are checked first (a clear refusal before any
    /// other check), and again where the command is applied: commands proposed as such carry
    /// them into the Raft entry; a takeover checks them on the map it resolves the volume in.
    pub(super) async fn command(
        &self,
        command: Command,
        expect: Vec<Binding>,
    ) -> Result<Outcome, WireError> {
        state_machine::check_bindings(&self.raft.shared.read_state(), &expect)?;
        match command {
            Command::AddUser {
                name,
                role,
                password,
            } => {
                state_machine::validate_name("user", &name)?;
                if password.len() < 6 {
                    return fail(
                        ErrorCode::BadRequest,
                        "The password must have at least 6 characters",
                    );
                }
                let salt = auth::random_hex(16);
                let password_sha256 = auth::hash_password(&salt, &password);
                self.propose(Op::AddUser {
                    user: User {
                        name,
                        role,
                        salt,
                        password_sha256,
                    },
                })
                .await
            }
            Command::AddStandbyMdm { addr, name } => self.add_standby(&addr, name).await,
            Command::RemoveStandbyMdm { name } => self.remove_standby(&name).await,
            Command::RemoveSdc { sdc } => {
                self.check_sdc_silent(&sdc)?;
                self.propose_command(Command::RemoveSdc { sdc }, expect)
                    .await
            }
            Command::SwitchClusterMode { mode } => self.switch_mode(mode).await,
            Command::MapVolumeToSdc {
                volume,
                sdc,
                takeover: true,
                ..
            } => self.take_over(&volume, &sdc, &expect).await,
            Command::RemoveSdsDevice { sds, path } => {
                self.check_device_removal_fits(&sds, &path)?;
                self.propose_command(Command::RemoveSdsDevice { sds, path }, expect)
                    .await
            }
            command @ Command::AbortRemoveSds { .. } => {
                let _in_order = self.sds_removal.lock().await;
                self.propose_command(command, expect).await
            }
            Command::RemoveSds { name } => {
                self.check_removal_fits(&name)?;
                self.propose_command(Command::RemoveSds { name }, expect)
                    .await
            }
            command @ (Command::AddVolume { .. } | Command::ModifyVolumeCapacity { .. }) => {
                // Thick reservations must fit beside the thin data the SDS report storing, one
                // command at a time (apply checks only the pool's raw capacity).
                let _one_at_a_time = self.thick_admission.lock().await;
                let state = self.raft.shared.read_state();
                crate::capacity::check_command(&state, &self.sds_stats(&state), &command)?;
                self.propose_command(command, expect).await
            }
            command
            @ (Command::SnapshotVolumes { .. } | Command::OverwriteVolumeContent { .. }) => {
                // Answer once the new layers are in force, as a takeover does: every SDS still
                // serving then holds the new map, so a write sent after this answer can never
                // land in a layer the snapshot froze.
                let out = self.propose_command(command, expect).await?;
                tokio::time::sleep(self.sds_down_timeout).await;
                Ok(out)
            }
            command => self.propose_command(command, expect).await,
        }
    }

    /// What each SDS of `state` reported in its last hello to this MDM (leader's soft state),
    /// by the SDS's display name: hellos name the SDS by its certificate, which a rename keeps.
    pub fn sds_stats(&self, state: &ClusterState) -> std::collections::BTreeMap<String, SdsStats> {
        let Ok(by_cert) = self.sds_stats.lock() else {
            return Default::default();
        };
        state
            .sds
            .values()
            .filter_map(|x| {
                by_cert
                    .get(x.cert_name())
                    .map(|st| (x.name.clone(), st.clone()))
            })
            .collect()
    }

    async fn add_standby(&self, addr: &str, name: Option<String>) -> Result<Outcome, WireError> {
        let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
            WireError::new(
                ErrorCode::BadRequest,
                format!("Invalid MDM address {addr}: use IP:PORT"),
            )
        })?;
        let client = self
            .endpoint
            .connect(sock)
            .await
            .map_err(|e| WireError::new(ErrorCode::Unavailable, format!("Could not reach the new MDM at {addr}: {e}. Is it running with this cluster's certificates?")))?;
        let resp = call_control(&client, &MdmRequest::Identify).await?;
        client.close();
        let MdmResponse::Identity { id, cluster_id, .. } = resp else {
            return fail(ErrorCode::Internal, "unexpected answer to Identify");
        };
        let state = self.raft.shared.read_state();
        if cluster_id != 0 && cluster_id != state.cluster_id {
            return fail(
                ErrorCode::Conflict,
                format!("The MDM at {addr} belongs to another cluster"),
            );
        }
        if state.mdms.contains_key(&id) || state.mdms.values().any(|m| m.addr == addr) {
            return fail(
                ErrorCode::AlreadyExists,
                format!("The MDM at {addr} is already a member of the cluster"),
            );
        }
        let name = name.unwrap_or_else(|| format!("mdm-{:04x}", id.0 & 0xffff));
        state_machine::validate_name("MDM", &name)?;
        if state.mdms.values().any(|m| m.name == name) {
            return fail(
                ErrorCode::AlreadyExists,
                format!("An MDM named {name} already exists"),
            );
        }
        if let Ok(mut p) = self.peers.lock() {
            p.insert(id.0, addr.to_string());
        }
        let member = MdmMember {
            id,
            name,
            addr: addr.to_string(),
            role: MdmRole::Standby,
        };
        self.membership(ConfChangeType::AddLearnerNode, member)
            .await?;
        Ok(Outcome {
            message: "Successfully added a standby MDM.".into(),
            object_id: Some(id.0),
        })
    }

    /// Refuse to forget an SDC this leader heard from within the session timeout: it is
    /// connected (a new leader counts from its own start, so it waits that long first).
    fn check_sdc_silent(&self, sdc: &SdcSelector) -> Result<(), WireError> {
        let state = self.raft.shared.read_state();
        let id = state_machine::sdc_id(&state, sdc)?;
        let name = state
            .sdcs
            .get(&id)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let term = self.raft.shared.status().term;
        let silence = self
            .sdc_seen
            .lock()
            .map(|mut x| x.silence(term, id))
            .unwrap_or_default();
        if silence < self.sdc_session_timeout {
            return fail(
                ErrorCode::Busy,
                format!(
                    "Cannot remove SDC {name}: it is connected (heard {} ms ago); stop its SDC \
                     first, then remove it once it has been silent for {} ms. Nothing was changed",
                    silence.as_millis(),
                    self.sdc_session_timeout.as_millis()
                ),
            );
        }
        Ok(())
    }

    /// Remove a standby MDM (a Raft learner): refused for managers, which vote.
    async fn remove_standby(&self, name: &str) -> Result<Outcome, WireError> {
        let state = self.raft.shared.read_state();
        let Some(member) = state.mdms.values().find(|m| m.name == name).cloned() else {
            return fail(
                ErrorCode::NotFound,
                format!("Could not find the MDM {name}"),
            );
        };
        let learners = self.raft.shared.status().learners;
        if member.role != MdmRole::Standby || !learners.contains(&member.id.0) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "Cannot remove MDM {name}: it is a manager (a Raft voter), not a standby; \
                     switch the cluster mode down first (--switch_cluster_mode) to make it a \
                     standby. Nothing was changed"
                ),
            );
        }
        self.membership(ConfChangeType::RemoveNode, member.clone())
            .await?;
        if let Ok(mut p) = self.peers.lock() {
            p.remove(&member.id.0);
        }
        Ok(Outcome {
            message: format!("Successfully removed standby MDM {name}."),
            object_id: Some(member.id.0),
        })
    }

    async fn membership(&self, t: ConfChangeType, member: MdmMember) -> Result<Outcome, WireError> {
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, self.raft.conf_change(t, member)).await {
            Ok(r) => r.map_err(|e| self.redirect(e)),
            Err(_) => fail(
                ErrorCode::Unavailable,
                "the membership change did not commit in time; check --query_cluster",
            ),
        }
    }

    async fn switch_mode(&self, mode: ClusterMode) -> Result<Outcome, WireError> {
        let state = self.raft.shared.read_state();
        let status = self.raft.shared.status();
        let want = mode.voters();
        let managers: Vec<MdmMember> = state
            .mdms
            .values()
            .filter(|m| m.role == MdmRole::Manager)
            .cloned()
            .collect();
        let standbys: Vec<MdmMember> = state
            .mdms
            .values()
            .filter(|m| m.role == MdmRole::Standby)
            .cloned()
            .collect();
        if managers.len() < want {
            let need = want - managers.len();
            if standbys.len() < need {
                return fail(ErrorCode::Conflict, format!(
                    "Switching to {mode} needs {want} managers: there are {} managers and {} standby MDMs. Add standby MDMs with --add_standby_mdm first",
                    managers.len(), standbys.len()));
            }
            for m in standbys.into_iter().take(need) {
                self.membership(ConfChangeType::AddNode, m).await?;
            }
        } else if managers.len() > want {
            let extra: Vec<MdmMember> = managers
                .into_iter()
                .filter(|m| m.id.0 != status.id)
                .take(state.mdms.len())
                .collect();
            let drop = state
                .mdms
                .values()
                .filter(|m| m.role == MdmRole::Manager)
                .count()
                - want;
            for m in extra.into_iter().take(drop) {
                self.membership(ConfChangeType::RemoveNode, m.clone())
                    .await?;
                self.membership(
                    ConfChangeType::AddLearnerNode,
                    MdmMember {
                        role: MdmRole::Standby,
                        ..m
                    },
                )
                .await?;
            }
        }
        self.propose(Op::SetMode { mode }).await
    }

    /// The leader's snapshot policy runner: every second, each policy whose cadence came round
    /// (by the map's last run, so a new leader carries on) gets its next run committed. Runs
    /// for the life of the process; idle on followers.
    pub async fn run_snapshot_policies(self: Arc<Self>) {
        let mut tick = leader_interval(Duration::from_secs(1));
        loop {
            self.leader_tick(&mut tick).await;
            let now = proto::clock::now_unix();
            let state = self.raft.shared.read_state();
            for p in state.snapshot_policies.values() {
                if p.paused
                    || p.volumes.is_empty()
                    || now < p.last_run_unix.saturating_add(p.cadence_secs)
                {
                    continue;
                }
                let op = Op::RunSnapshotPolicy {
                    name: p.name.clone(),
                    run: p.runs + 1,
                    unix: now,
                };
                match self.propose(op).await {
                    Ok(out) => {
                        self.metrics.snapshot_policy_runs.inc();
                        tracing::info!(policy = %p.name, "{}", out.message)
                    }
                    Err(e) => {
                        self.metrics.snapshot_policy_failures.inc();
                        tracing::warn!(policy = %p.name, "snapshot policy run failed: {e}")
                    }
                }
            }
        }
    }
}
