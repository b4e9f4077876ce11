//! Network namespaces for partition tests: each process gets its own namespace and address
//! (`10.213.S.N/24`) on a bridge the test creates (the test process reaches every node through
//! the bridge's `.254` address), and links between two nodes are cut with blackhole routes on
//! both sides. Everything is removed on drop; `./test` also sweeps leftovers (`mbt*`).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

/// One node: a namespace and its address.
#[derive(Clone, Debug)]
pub struct Node {
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct Net {
    subnet: u8,
    bridge: String,
    nodes: Mutex<Vec<Node>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
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

impl Net {
    /// A bridge and subnet of its own; `Err` when namespaces cannot be made here.
    pub fn new() -> Result<Net, String> {
        // Tests of one binary run side by side: each Net of a process gets its own subnet (and
        // bridge), four per process, chosen by pid across processes.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
        let subnet = ((std::process::id() % 50) * 4 + k) as u8 + 20;
        let bridge = format!("mbtbr{subnet}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Net {
            subnet,
            bridge: bridge.clone(),
            nodes: Mutex::new(Vec::new()),
        };
        ip(&[
            "addr",
            "add",
            &format!("10.213.{subnet}.254/24"),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(net)
    }

    /// A new namespace named after `name`, wired to the bridge.
    pub fn node(&self, name: &str) -> Node {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let n = nodes.len() as u8 + 1;
        assert!(n < 100, "too many nodes");
        let ns = format!("mbt{}{name}", self.subnet);
        let veth = format!("mbt{}v{n}", self.subnet);
        let node = Node {
            ns: ns.clone(),
            ip: Ipv4Addr::new(10, 213, self.subnet, n),
        };
        let _ = ip(&["netns", "del", &ns]);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.clone()],
            vec![
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "link".into(),
                "add".into(),
                veth.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                "eth0".into(),
                "netns".into(),
                ns.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                veth.clone(),
                "master".into(),
                self.bridge.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/24", node.ip),
                "dev".into(),
                "eth0".into(),
            ],
            vec![
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                "eth0".into(),
                "up".into(),
            ],
        ];
        nodes.push(node.clone());
        for s in steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                panic!("set up namespace {ns}: {e}");
            }
        }
        node
    }

    /// The bridge's interface name (for a firewall rule of the test's own).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The command prefix that runs a program in `node`'s namespace.
    pub fn exec_prefix(node: &Node) -> Vec<String> {
        vec!["netns".into(), "exec".into(), node.ns.clone()]
    }

    fn route(&self, on: &Node, op: &str, dst: &str) {
        if let Err(e) = ip(&["-n", &on.ns, "route", op, "blackhole", dst]) {
            panic!("{e}");
        }
    }

    /// Cut the link between `a` and `b` (both directions); the rest of the network stays.
    pub fn cut(&self, a: &Node, b: &Node) {
        self.route(a, "add", &format!("{}/32", b.ip));
        self.route(b, "add", &format!("{}/32", a.ip));
    }

    /// Undo [`cut`](Self::cut).
    pub fn heal(&self, a: &Node, b: &Node) {
        self.route(a, "del", &format!("{}/32", b.ip));
        self.route(b, "del", &format!("{}/32", a.ip));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for n in nodes.iter() {
            let _ = ip(&["netns", "del", &n.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
