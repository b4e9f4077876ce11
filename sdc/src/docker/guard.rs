//! What Docker may do to a volume: the rules that keep Docker from destroying what it did not
//! create. Pure decisions over facts the driver gathers (the volume's labels, its mappings,
//! this host's container mounts, attachments and NBD connections, and what Docker's own Mount
//! acquired here); the driver acts on the answer. No I/O.
//!
//! **Invariant**: Docker removes, mounts and lists only volumes its Create made (the reserved
//! `created-by=docker` label, set at the MDM so every host agrees), and it never removes,
//! detaches or unmaps a volume that something outside Docker uses: a mapping to another host, a
//! mapping to this host that Docker's Mount did not make (scli), an attachment made by hand
//! (`sdc attach`), or NBD clients connected to the volume's export on this host. It releases
//! (detaches, unmaps) only what its own Mount acquired, recorded in [`super::refs::Held`].

use super::refs::Held;

/// Why Docker refuses to touch a volume. Each message says why and what an operator can do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "volume {volume} was not created by Docker (it lacks the label created-by=docker; made \
         with scli?): the meshblock Docker driver mounts and removes only volumes that `docker \
         volume create` made; manage this one with scli (scli --remove_volume) or sdc attach"
    )]
    NotDockers { volume: String },
    #[error(
        "volume {volume} is in use by {mounts} container mount(s) on this host; stop them first"
    )]
    ContainerMounts { volume: String, mounts: usize },
    #[error(
        "volume {volume} is mapped to other host(s) ({hosts}); stop its containers there, or \
         unmap it there with scli --unmap_volume_from_sdc if something else uses it"
    )]
    MappedElsewhere { volume: String, hosts: String },
    #[error(
        "volume {volume} is mapped to this host outside Docker (scli --map_volume_to_sdc, not a \
         container's mount): Docker does not unmap what it did not map; unmap it with scli \
         --unmap_volume_from_sdc when nothing uses it, then retry"
    )]
    MappedHereOutsideDocker { volume: String },
    #[error(
        "volume {volume} is attached on this host outside Docker (sdc attach, device {device}); \
         stop using it and run `sdc detach {volume}` first"
    )]
    AttachedOutsideDocker { volume: String, device: String },
    #[error(
        "volume {volume} has {clients} NBD client connection(s) on this host (qemu, nbdcopy, \
         nbd-client...); disconnect them first"
    )]
    NbdClients { volume: String, clients: usize },
}

/// What this host knows about one volume when Docker is asked to remove, mount or release it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub volume: String,
    /// The volume carries `created-by=docker`.
    pub created_by_docker: bool,
    /// Container mounts Docker holds on this host.
    pub container_mounts: usize,
    /// Names of other hosts the volume is mapped to.
    pub mapped_elsewhere: Vec<String>,
    /// Mapped to this host.
    pub mapped_here: bool,
    /// Its device on this host, if attached.
    pub attached_device: Option<String>,
    /// NBD connections to its export on this host.
    pub nbd_clients: usize,
    /// What Docker's own Mount acquired here and has not released.
    pub held: Held,
}

/// What to undo on this host: only what Docker's Mount acquired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Release {
    pub detach: bool,
    pub unmap: bool,
}

impl Facts {
    fn attached_outside_docker(&self) -> Option<Refusal> {
        let device = self.attached_device.as_ref()?;
        (!self.held.attached).then(|| Refusal::AttachedOutsideDocker {
            volume: self.volume.clone(),
            device: device.clone(),
        })
    }

    fn nbd_in_use(&self) -> Option<Refusal> {
        (self.nbd_clients > 0).then(|| Refusal::NbdClients {
            volume: self.volume.clone(),
            clients: self.nbd_clients,
        })
    }

    fn not_dockers(&self) -> Option<Refusal> {
        (!self.created_by_docker).then(|| Refusal::NotDockers {
            volume: self.volume.clone(),
        })
    }
}

/// May Docker remove the volume from the cluster? If so, what it must release here first.
pub fn removal(f: &Facts) -> Result<Release, Refusal> {
    if let Some(r) = f.not_dockers() {
        return Err(r);
    }
    if f.container_mounts > 0 {
        return Err(Refusal::ContainerMounts {
            volume: f.volume.clone(),
            mounts: f.container_mounts,
        });
    }
    if !f.mapped_elsewhere.is_empty() {
        return Err(Refusal::MappedElsewhere {
            volume: f.volume.clone(),
            hosts: f.mapped_elsewhere.join(", "),
        });
    }
    if f.mapped_here && !f.held.mapped {
        return Err(Refusal::MappedHereOutsideDocker {
            volume: f.volume.clone(),
        });
    }
    if let Some(r) = f.attached_outside_docker() {
        return Err(r);
    }
    if let Some(r) = f.nbd_in_use() {
        return Err(r);
    }
    Ok(Release {
        detach: f.attached_device.is_some(),
        unmap: f.mapped_here,
    })
}

/// May Docker mount the volume on this host? Refused for volumes Docker did not create, and
/// while something outside Docker uses it here (a filesystem mounted under a raw writer is
/// corrupted). Another host's mapping is the MDM's to judge (takeover rules).
pub fn mounting(f: &Facts) -> Result<(), Refusal> {
    if let Some(r) = f.not_dockers() {
        return Err(r);
    }
    if let Some(r) = f.attached_outside_docker() {
        return Err(r);
    }
    if let Some(r) = f.nbd_in_use() {
        return Err(r);
    }
    Ok(())
}

/// What the last container's Unmount (or a failed Mount, or start-up reconciliation) releases:
/// Docker's own attachment, and Docker's own mapping unless something outside Docker still
/// uses the volume here (then the mapping stays, still Docker's, for a later Remove). Never
/// refused: the container is gone either way. The reason a mapping is kept, if it is.
pub fn release(f: &Facts) -> (Release, Option<Refusal>) {
    let detach = f.held.attached && f.attached_device.is_some();
    let kept = if !f.held.mapped || !f.mapped_here {
        None
    } else if let Some(r) = f.attached_outside_docker() {
        Some(r)
    } else {
        f.nbd_in_use()
    };
    let unmap = f.held.mapped && f.mapped_here && kept.is_none();
    (Release { detach, unmap }, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(mapped: bool, attached: bool) -> Held {
        Held {
            volume: None,
            mapped,
            attached,
        }
    }

    /// A Docker volume mapped and attached here by Docker's Mount, now unused.
    fn dockers_own() -> Facts {
        Facts {
            volume: "v".into(),
            created_by_docker: true,
            mapped_here: true,
            attached_device: Some("/dev/loop3".into()),
            held: held(true, true),
            ..Facts::default()
        }
    }

    #[test]
    fn docker_removes_and_releases_what_it_made() {
        let f = dockers_own();
        let all = Release {
            detach: true,
            unmap: true,
        };
        assert_eq!(removal(&f), Ok(all));
        assert_eq!(release(&f), (all, None));
        assert_eq!(mounting(&f), Ok(()));
        let unmapped = Facts {
            mapped_here: false,
            attached_device: None,
            held: Held::default(),
            ..dockers_own()
        };
        assert_eq!(removal(&unmapped), Ok(Release::default()));
        assert_eq!(release(&unmapped), (Release::default(), None));
    }

    #[test]
    fn never_a_volume_docker_did_not_create() {
        // Even unmapped and unused: scli's volumes are not Docker's to remove or mount.
        let f = Facts {
            volume: "vol1".into(),
            ..Facts::default()
        };
        let e = removal(&f).expect_err("refused");
        assert!(matches!(e, Refusal::NotDockers { .. }));
        assert!(e.to_string().contains("not created by Docker"), "{e}");
        assert!(mounting(&f).is_err());
        // Mapped, attached and exported here by hand: the label check comes first.
        let f = Facts {
            created_by_docker: false,
            held: Held::default(),
            nbd_clients: 1,
            ..dockers_own()
        };
        assert!(matches!(removal(&f), Err(Refusal::NotDockers { .. })));
    }

    #[test]
    fn refused_while_anything_outside_docker_uses_it() {
        /// Is this the refusal the case expects?
        type Expected = fn(&Refusal) -> bool;
        let cases: [(Facts, Expected); 5] = [
            (
                Facts {
                    container_mounts: 2,
                    ..dockers_own()
                },
                |r| matches!(r, Refusal::ContainerMounts { mounts: 2, .. }),
            ),
            (
                Facts {
                    mapped_elsewhere: vec!["h2".into()],
                    mapped_here: false,
                    attached_device: None,
                    ..dockers_own()
                },
                |r| matches!(r, Refusal::MappedElsewhere { hosts, .. } if hosts == "h2"),
            ),
            (
                Facts {
                    held: held(false, true),
                    ..dockers_own()
                },
                |r| matches!(r, Refusal::MappedHereOutsideDocker { .. }),
            ),
            (
                Facts {
                    held: held(true, false),
                    ..dockers_own()
                },
                |r| matches!(r, Refusal::AttachedOutsideDocker { device, .. } if device == "/dev/loop3"),
            ),
            (
                Facts {
                    nbd_clients: 3,
                    ..dockers_own()
                },
                |r| matches!(r, Refusal::NbdClients { clients: 3, .. }),
            ),
        ];
        for (f, want) in cases {
            let e = removal(&f).expect_err("must be refused");
            assert!(want(&e), "{f:?}: {e}");
        }
    }

    #[test]
    fn release_keeps_a_mapping_something_else_uses() {
        // NBD clients on Docker's own mapping: detach Docker's device, keep the mapping.
        let f = Facts {
            nbd_clients: 1,
            ..dockers_own()
        };
        let (r, kept) = release(&f);
        assert_eq!(
            r,
            Release {
                detach: true,
                unmap: false
            }
        );
        assert!(matches!(kept, Some(Refusal::NbdClients { .. })));
        // Attached by hand, mapped by Docker: neither detached nor unmapped.
        let f = Facts {
            held: held(true, false),
            ..dockers_own()
        };
        let (r, kept) = release(&f);
        assert_eq!(r, Release::default());
        assert!(matches!(kept, Some(Refusal::AttachedOutsideDocker { .. })));
        // Mapped by scli: Docker's device goes, the mapping stays, nothing to report.
        let f = Facts {
            held: held(false, true),
            ..dockers_own()
        };
        assert_eq!(
            release(&f),
            (
                Release {
                    detach: true,
                    unmap: false
                },
                None
            )
        );
        assert!(mounting(&Facts {
            nbd_clients: 1,
            ..dockers_own()
        })
        .is_err());
    }
}
