//! The Docker volume plugin, inside the SDC daemon: a legacy (socket) plugin at
//! `/run/docker/plugins/meshblock.sock` by default, so `docker volume create --driver meshblock`
//! works with no `docker plugin install`.
//!
//! Modules: [`api`] (the protocol's JSON), [`server`] (HTTP on the unix socket), [`driver`]
//! (what each call does), [`guard`] (what Docker may remove, mount or release; pure),
//! [`options`] (create options, pure), [`names`] (which cluster volume holds a Docker name,
//! pure), [`refs`] (mount references and what Docker holds, on
//! disk), [`cluster`] (MDM session and commands), [`fs`] (mkfs, mount), [`managed`] (the settings of the managed plugin, `sdc plugin`). The plugin reaches the
//! MDM lazily: its socket listens before the SDC has registered, and calls that need the cluster
//! wait for it.

pub mod api;
pub mod cluster;
pub mod driver;
pub mod fs;
pub mod guard;
pub mod managed;
pub mod names;
pub mod options;
pub mod refs;
pub mod server;
