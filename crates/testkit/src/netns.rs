//! A network namespace joined to this one by a veth pair: a "remote host" on this machine whose
//! link can be pulled (`ip link set ... down` inside it: no FIN, no RST, the packets just stop)
//! and plugged back in.
//!
//! Needs root and iproute2's `ip`. [`NetNs::new`] returns `None` (a skip, printed) when they are
//! missing, and panics under `CI=true`, where they must be there. Each namespace gets its own
//! /30 out of 10.231.0.0/16, picked from the process id and a counter so that tests in parallel
//! (and test binaries side by side) do not collide; the namespace, and with it the veth pair,
//! is deleted on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth link to the caller's namespace.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    inner_if: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
}

impl NetNs {
    /// Creates the namespace and its link, up. `None` (after printing why) when this machine
    /// cannot make one and `CI` is not `true`.
    pub fn new() -> Option<NetNs> {
        if let Err(why) = prerequisites() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("network namespaces unavailable under CI=true: {why}");
            }
            eprintln!("skipping: network namespaces unavailable: {why}");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 10.231.X.Y/30 with X from the pid and Y from the counter: 64 links per process.
        let slot = (pid % 251) * 64 + (n % 64);
        let (x, y) = ((slot / 64) as u8, ((slot % 64) * 4) as u8);
        let tag = format!("{:x}{n:x}", pid);
        let ns = NetNs {
            name: format!("qmt-{tag}"),
            host_if: format!("qmh{tag}"),
            inner_if: format!("qmn{tag}"),
            host_addr: Ipv4Addr::new(10, 231, x, y + 1),
            addr: Ipv4Addr::new(10, 231, x, y + 2),
        };
        let host = format!("{}/30", ns.host_addr);
        let inner = format!("{}/30", ns.addr);
        let steps: [&[&str]; 8] = [
            &["netns", "add", &ns.name],
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.inner_if,
            ],
            &["link", "set", &ns.inner_if, "netns", &ns.name],
            &["addr", "add", &host, "dev", &ns.host_if],
            &["link", "set", &ns.host_if, "up"],
            &["-n", &ns.name, "addr", "add", &inner, "dev", &ns.inner_if],
            &["-n", &ns.name, "link", "set", &ns.inner_if, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for args in steps {
            if let Err(e) = ip(args) {
                panic!("setting up network namespace {}: {e}", ns.name);
            }
        }
        Some(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace (where a server there listens).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// This side's address on the link.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// `program args...` to run inside the namespace.
    pub fn command(&self, program: &str) -> Vec<String> {
        ["ip", "netns", "exec", &self.name, program]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// The far end of the link goes down: nothing is sent back, not even a reset.
    pub fn link_down(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inner_if, "down"]).expect("link down");
    }

    /// The far end of the link comes back. The neighbour (ARP) entries that failed while it
    /// was down are flushed on both ends, as they would age out on a real network; otherwise
    /// the first connections after the outage fail with "No route to host" for a while.
    pub fn link_up(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inner_if, "up"]).expect("link up");
        let _ = ip(&["neigh", "flush", "dev", &self.host_if]);
        let _ = ip(&["-n", &self.name, "neigh", "flush", "dev", &self.inner_if]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it; the host end too, to be sure.
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.host_if]);
    }
}

fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    ip(&["netns", "list"]).map_err(|e| format!("`ip netns` does not work: {e}"))?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link carries traffic while up and none while down; the namespace goes with the
    /// value.
    #[test]
    fn link_goes_down_and_up() {
        let Some(ns) = NetNs::new() else { return };
        let listener =
            std::net::TcpListener::bind((ns.host_addr(), 0)).expect("bind on the host side");
        let port = listener.local_addr().expect("addr").port();
        let connect = |timeout: &str| {
            let mut cmd = ns.command("timeout");
            cmd.extend([
                timeout.to_owned(),
                "bash".into(),
                "-c".into(),
                format!("exec 3<>/dev/tcp/{}/{port}", ns.host_addr()),
            ]);
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .status()
                .expect("run")
                .success()
        };
        assert!(connect("5"), "no connection over the link while up");
        ns.link_down();
        assert!(!connect("2"), "a connection over the link while down");
        ns.link_up();
        assert!(connect("5"), "no connection after the link came back");
        let name = ns.name().to_owned();
        drop(ns);
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
    }
}
