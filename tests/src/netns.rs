//! Several hosts on one machine: a network namespace per host, each with its own address on one bridge
//! (in a namespace of its own), and partitions made by dropping a host's traffic with iptables. The test
//! process itself reaches the hosts through one more veth into the bridge, with the subnet's last address
//! (`.254`): the only interface and route a topology adds to the machine's own network, both removed on
//! drop. Each topology takes a free `10.77.K.0/24`, so tests can run side by side. Needs root
//! (CAP_NET_ADMIN), `ip` (iproute2) and `iptables`; panics with the fix when any is missing, never skips.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `hosts` namespaces on one bridge; host `i` has address `10.77.K.(i+1)`. Removed on drop.
pub struct Topology {
    switch: String,
    hosts: Vec<String>,
    /// `10.77.K`
    subnet: String,
    /// The test process's interface into the bridge.
    uplink: String,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} cannot run ({e}): run scripts/setup.sh --for-tests (Debian packages iproute2, iptables)",
                args[0]
            )
        });
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        if is_root() {
            ""
        } else {
            " (network namespaces need root: run the tests as root)"
        }
    );
}

fn is_root() -> bool {
    // /proc/self/status's Uid line: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Topology {
    pub fn create(hosts: usize) -> Self {
        assert!(
            is_root(),
            "multi-host tests build network namespaces and need root (CAP_NET_ADMIN); run them as root"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("cf{}x{n}", std::process::id());
        let switch = format!("{id}-sw");
        // Allocating a subnet and adding its route is one step under a lock shared by every test process.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/cellfleet-netns.lock")
            .expect("the subnet lock file");
        // SAFETY: flock on an open descriptor; released when `lock` closes.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0
        );
        let routes = Command::new("ip")
            .args(["-4", "route", "show"])
            .output()
            .expect("ip runs: run scripts/setup.sh --for-tests (Debian package iproute2)");
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        let k = (1..250)
            .find(|k| !routes.contains(&format!("10.77.{k}.0/24")))
            .expect("a free 10.77.K.0/24");
        let topology = Self {
            hosts: (0..hosts).map(|i| format!("{id}-h{i}")).collect(),
            switch,
            subnet: format!("10.77.{k}"),
            uplink: format!("cfu{}x{n}", std::process::id() % 100_000),
        };
        let sw = topology.switch.as_str();
        run(&["ip", "netns", "add", sw]);
        run(&["ip", "-n", sw, "link", "set", "lo", "up"]);
        run(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", sw, "link", "set", "br0", "up"]);
        for (i, host) in topology.hosts.iter().enumerate() {
            let port = format!("p{i}");
            run(&["ip", "netns", "add", host]);
            run(&[
                "ip", "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", host,
            ]);
            run(&["ip", "-n", sw, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("{}/24", topology.address(i));
            run(&["ip", "-n", host, "addr", "add", &address, "dev", "eth0"]);
            run(&["ip", "-n", host, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", host, "link", "set", "lo", "up"]);
        }
        let uplink = topology.uplink.as_str();
        run(&[
            "ip", "link", "add", uplink, "type", "veth", "peer", "name", "up0", "netns", sw,
        ]);
        run(&["ip", "-n", sw, "link", "set", "up0", "master", "br0", "up"]);
        let address = format!("{}.254/24", topology.subnet);
        run(&["ip", "addr", "add", &address, "dev", uplink]);
        run(&["ip", "link", "set", uplink, "up"]);
        drop(lock);
        topology
    }

    pub fn address(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, host + 1)
    }

    pub fn namespace(&self, host: usize) -> &str {
        &self.hosts[host]
    }

    /// `program` to be run on `host` (`ip netns exec`, which execs it: the child's pid is the program's).
    pub fn command(&self, host: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.hosts[host], program]);
        command
    }

    /// Cuts `host` off: every packet in or out of its network interface is dropped (no reset, no
    /// unreachable: what a failed switch port or a silent partition looks like).
    pub fn partition(&self, host: usize) {
        let ns = self.namespace(host);
        run(&[
            "ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP",
        ]);
        run(&[
            "ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP",
        ]);
    }

    /// Ends `host`'s partition.
    pub fn heal(&self, host: usize) {
        run(&[
            "ip",
            "netns",
            "exec",
            self.namespace(host),
            "iptables",
            "-F",
        ]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink])
            .status();
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
