//! What a process holds and may hold, from /proc and getrlimit: the open-file limit (raised
//! for tests and tools that hold thousands of connections), RSS and open descriptors.

/// Raises this process's soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The soft open-file limit of process `pid` (from /proc/PID/limits).
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What a process holds at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kb: u64,
    pub fds: u64,
}

/// RSS (VmRSS) and open file descriptors of `pid`.
pub fn sample(pid: u32) -> Sample {
    let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Sample { rss_kb, fds }
}

/// CPU time `pid` has used so far, all its threads, in ns: the run time of each thread from
/// /proc/PID/task/*/schedstat (utime + stime of /proc/PID/stat count the same time, but in
/// 10 ms ticks, too coarse for what a kernel relay costs).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
