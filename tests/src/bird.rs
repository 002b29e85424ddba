//! A real BIRD 2 on loopback for the BGP tests: static routes with AS
//! paths, and TABLE_DUMP_V2 RIB dumps of them (`birdc mrt dump table`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::eventually;

/// A BIRD 2 daemon in the foreground, killed on drop.
#[derive(Debug)]
pub struct Bird {
    child: Child,
    socket: PathBuf,
    config: PathBuf,
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bird_bin(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// A BIRD config with static routes `(prefix, origin ASN)`.
pub fn bird_config(routes: &[(&str, u32)]) -> String {
    let mut v4 = String::new();
    let mut v6 = String::new();
    for (prefix, asn) in routes {
        let line = format!("  route {prefix} unreachable {{ bgp_path.prepend({asn}); }};\n");
        if prefix.contains(':') {
            v6.push_str(&line);
        } else {
            v4.push_str(&line);
        }
    }
    format!(
        "router id 127.0.0.1;\nprotocol device {{}}\n\
         protocol static s4 {{\n  ipv4;\n{v4}}}\nprotocol static s6 {{\n  ipv6;\n{v6}}}\n"
    )
}

impl Bird {
    pub fn start(dir: &Path, routes: &[(&str, u32)]) -> Result<Self> {
        let config = dir.join("bird.conf");
        std::fs::write(&config, bird_config(routes))?;
        let socket = dir.join("bird.ctl");
        let child = Command::new(bird_bin("bird"))
            .arg("-f")
            .arg("-c")
            .arg(&config)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start bird (install bird2: scripts/setup-test-deps)")?;
        let bird = Self {
            child,
            socket,
            config,
        };
        eventually(Duration::from_secs(10), "bird to answer", || {
            bird.birdc(&["show", "status"]).ok()
        })?;
        Ok(bird)
    }

    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bird_bin("birdc"))
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("cannot run birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "birdc {args:?}: {text}");
        Ok(text)
    }

    /// New routes, read by `birdc configure` (no restart).
    pub fn reconfigure(&self, routes: &[(&str, u32)]) -> Result<()> {
        std::fs::write(&self.config, bird_config(routes))?;
        let out = self.birdc(&["configure"])?;
        ensure!(out.contains("Reconfigur"), "birdc configure: {out}");
        Ok(())
    }

    /// Dumps every table (TABLE_DUMP_V2) to `file` and waits until the file
    /// holds `routes` routes as BIRD shows them.
    pub fn dump(&self, file: &Path, routes: usize) -> Result<Vec<u8>> {
        eventually(Duration::from_secs(10), "bird to hold the routes", || {
            let shown = self.birdc(&["show", "route", "count"]).ok()?;
            shown
                .contains(&format!("{routes} of {routes} routes"))
                .then_some(())
        })?;
        let _ = std::fs::remove_file(file);
        let target = file.to_string_lossy();
        self.birdc(&[
            "mrt",
            "dump",
            "table",
            "\"master*\"",
            "to",
            &format!("\"{target}\""),
        ])?;
        // BIRD writes the dump in the background: wait until it stops growing.
        let mut last = 0;
        eventually(Duration::from_secs(10), "the dump to be written", || {
            let len = std::fs::metadata(file).ok()?.len();
            let done = len > 0 && len == last;
            last = len;
            std::thread::sleep(Duration::from_millis(100));
            done.then_some(())
        })?;
        Ok(std::fs::read(file)?)
    }
}
