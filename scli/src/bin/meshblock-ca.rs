//! `meshblock-ca`: the cluster certificate authority's command line, over [`proto::ca`].
//!
//! On a real cluster each host makes its own key and a signing request (`csr`); only the
//! request travels to the CA host (`sign`), and only the certificate travels back: keys never
//! leave the host they belong to. `issue` makes the key beside the CA, for labs and tests.
//! This file owns argument parsing and messages only; every certificate operation is in
//! `proto::ca`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use proto::ca::{self, CsrOutcome};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "meshblock-ca",
    version,
    about = "Meshblock cluster CA: create it, make host keys and requests, sign them",
    after_help = "A host joins the cluster with:\n  \
        meshblock-ca csr --name sds:sds1 --dir /etc/meshblock/certs          (on the host)\n  \
        meshblock-ca sign --ca-dir CA --csr node.csr --out DIR               (on the CA host)\n  \
        then copy DIR/node.pem and DIR/ca.pem to the host's /etc/meshblock/certs.\n\
        Certificate names: mdm (or mdm:NAME), admin (or admin:NAME), sds:NAME, sdc:NAME."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA (ca.pem, and ca.key with mode 0600) in a directory; refuses to
    /// overwrite one.
    Init {
        /// Directory to create the CA in.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Name of the cluster, in the CA's common name.
        #[arg(long, default_value = "meshblock", value_name = "NAME")]
        cluster_name: String,
    },
    /// Make this host's key (DIR/node.key, mode 0600) and a signing request (DIR/node.csr).
    /// An existing key is kept and the request made for it.
    Csr {
        /// Who the certificate is for: mdm, admin, sds:NAME or sdc:NAME.
        #[arg(long, value_name = "CN")]
        name: String,
        /// The host's certificate directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Sign a request with the CA: writes OUT/node.pem and OUT/ca.pem. Refuses a request
    /// whose signature does not check out or whose name gives no role.
    Sign {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The request (node.csr from `meshblock-ca csr`).
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// Directory to write node.pem and ca.pem into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Make a key and its certificate beside the CA (node.key, node.pem, ca.pem in OUT): for
    /// labs and tests, where one machine holds every key anyway.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Who the certificate is for: mdm, admin, sds:NAME or sdc:NAME.
        #[arg(long, value_name = "CN")]
        name: String,
        /// Directory to write node.pem, node.key and ca.pem into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    proto::daemon::exit_with(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init { dir, cluster_name } => {
            ca::init_ca(&dir, &cluster_name).context("create the cluster CA")?;
            println!("Created the cluster CA in {}", dir.display());
        }
        Cmd::Csr { name, dir } => {
            let outcome = ca::make_csr(&name, &dir).context("make a signing request")?;
            let req = dir.join(ca::NODE_CSR_FILE);
            match outcome {
                CsrOutcome::NewKey => {
                    println!("Created a key and a request for {name}: {}", req.display())
                }
                CsrOutcome::KeptKey => println!(
                    "Kept the existing key; wrote a request for {name}: {}",
                    req.display()
                ),
                CsrOutcome::Unchanged => println!(
                    "Unchanged: the key and a request for {name} exist in {}",
                    dir.display()
                ),
            }
        }
        Cmd::Sign { ca_dir, csr, out } => {
            let name = ca::sign_csr(&ca_dir, &csr, &out)
                .with_context(|| format!("sign {}", csr.display()))?;
            println!("Signed a certificate for {name} in {}", out.display());
        }
        Cmd::Issue { ca_dir, name, out } => {
            ca::check_common_name(&name)?;
            ca::issue(&ca_dir, &name, &out).context("issue a certificate")?;
            println!("Issued a certificate for {name} in {}", out.display());
        }
    }
    Ok(())
}
