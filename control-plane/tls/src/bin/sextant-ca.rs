//! `sextant-ca`: a small CA for a Sextant cluster's mutual TLS.
//!
//! ```text
//! sextant-ca init DIR
//! sextant-ca issue DIR --kind replica --id cp-1 [--dns-name N]... [--ip A]... [--days N] [--out PREFIX]
//! ```
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sextant_tls::ca::{self, IssueRequest};
use sextant_tls::{Identity, Kind};

#[derive(Debug, Parser)]
#[command(name = "sextant-ca", about = "A small CA for Sextant's mutual TLS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a new CA: DIR/ca.crt and DIR/ca.key (mode 0600). Refuses to
    /// overwrite an existing one.
    Init {
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Sextant CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for spiffe://sextant/<kind>/<id>, signed by the CA
    /// in DIR: writes PREFIX.crt and PREFIX.key (mode 0600).
    Issue {
        dir: PathBuf,
        /// edge, dns, probe, operator or replica.
        #[arg(long)]
        kind: Kind,
        /// 1 to 128 characters of A-Z a-z 0-9 . _ -
        #[arg(long)]
        id: String,
        /// A DNS name SAN (repeatable). A replica gets localhost by default.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// An IP address SAN (repeatable). A replica gets 127.0.0.1 and ::1 by default.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Output path without extension; default DIR/<kind>-<id>.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sextant-ca: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, name, days } => {
            ca::init(&dir, &name, days)?;
            println!("{}", dir.join(ca::CA_CERT_FILE).display());
            println!("{}", dir.join(ca::CA_KEY_FILE).display());
        }
        Command::Issue {
            dir,
            kind,
            id,
            dns_names,
            ips,
            days,
            out,
        } => {
            let identity = Identity::new(kind, id)?;
            let mut req = IssueRequest::new(identity.clone());
            if !dns_names.is_empty() || !ips.is_empty() {
                // Names given replace the replica defaults.
                req.dns_names = dns_names;
                req.ips = ips;
            }
            req.days = days;
            let prefix = out.unwrap_or_else(|| dir.join(format!("{}-{}", kind, identity.id)));
            let (cert, key) = ca::issue_to_files(&dir, &req, &prefix)?;
            println!("{}", cert.display());
            println!("{}", key.display());
        }
    }
    Ok(())
}
