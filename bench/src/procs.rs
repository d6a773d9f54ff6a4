//! CPU time and memory of a balancer process and its children, from /proc: the balancer alone,
//! not the client or the backends.
use anyhow::Context as _;

/// A process and all its descendants (nginx's master and workers, HAProxy, `lb run`).
#[derive(Debug, Clone, Copy)]
pub struct Tree(pub u32);

/// Memory of a process tree in KiB: resident now and the peak (VmHWM), summed over processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// (pid, ppid, utime + stime in clock ticks) of every process.
fn all() -> Vec<(u32, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
        let ppid = rest.get(1)?.parse().ok()?;
        let ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        Some((pid, ppid, ticks))
    })
    .collect()
}

impl Tree {
    /// The pids of the tree, root first.
    pub fn pids(&self) -> Vec<u32> {
        let procs = all();
        let mut tree = vec![self.0];
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
            i += 1;
        }
        tree
    }

    /// User + system CPU seconds the tree has used so far (children that exited and were
    /// reaped are not counted: the balancers here keep their workers).
    pub fn cpu_secs(&self) -> f64 {
        let pids = self.pids();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        all().iter().filter(|p| pids.contains(&p.0)).map(|p| p.2 as f64).sum::<f64>() / hz
    }

    /// Resident and peak memory of the tree.
    pub fn mem(&self) -> Mem {
        let mut m = Mem::default();
        for pid in self.pids() {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let field = |name: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0)
            };
            m.rss_kib += field("VmRSS:");
            m.hwm_kib += field("VmHWM:");
        }
        m
    }
}

/// The pid of the process whose command line contains `needle` (e.g. an `lb run` config path).
pub fn find(needle: &str) -> anyhow::Result<u32> {
    let dir = std::fs::read_dir("/proc")?;
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (pid != std::process::id() && cmd.contains(needle)).then_some(pid)
    })
    .min()
    .with_context(|| format!("no process with {needle:?} in its command line"))
}

/// The pid written in a pid file (nginx, HAProxy), waiting up to 5 s for it to appear.
pub fn from_pidfile(path: &std::path::Path) -> anyhow::Result<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            return Ok(pid);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The harness's one open-file limit raise; children (the balancers, wrk, nginx) inherit it.
pub use lb_tests::procs::raise_nofile;
