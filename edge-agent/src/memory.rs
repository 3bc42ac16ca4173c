//! Giving back the pages of the agent's own code that only start-up needed.
//!
//! Most of a running agent's resident memory is not its heap (under 2 MiB) but clean pages of its
//! binary: loading and compiling the model, parsing configuration, TLS and the first connection
//! run code that the steady state never runs again, and the kernel maps 64 KiB around every code
//! page touched. Those pages stay mapped until memory runs short. Once start-up is over, the agent
//! asks the kernel to reclaim them now (`MADV_PAGEOUT`, Linux 5.4+, the call Android uses to
//! compact cached apps) and drops its binary from the page cache (`POSIX_FADV_DONTNEED`). Code the
//! steady state needs comes back from disk on its first use, page by page (`MADV_RANDOM`: no
//! read-ahead around it).
//!
//! Only the binary's read-only mappings are touched: its data and heap are never paged out. On
//! other systems, and where the kernel refuses, nothing happens.

use std::io;

/// An address range `[start, end)` of a mapping of the agent's own binary.
pub type Range = (usize, usize);

/// The read-only mappings (code, constants, relocated read-only data) of the file `exe` in the
/// text of `/proc/self/maps`.
pub fn own_code_ranges(maps: &str, exe: &str) -> Vec<Range> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // offset, device, inode, then the path (which has no spaces for our binary).
            let path = fields.nth(3)?;
            let replaced = fields.next().is_some(); // "(deleted)": not the file at that path now
            if path != exe || replaced || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

/// Resident memory before and after [`release_startup_code`], KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// `VmRSS` before.
    pub rss_before_kib: u64,
    /// `VmRSS` after.
    pub rss_after_kib: u64,
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`, …), KiB.
pub fn status_kib(field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no {field} in /proc/self/status"),
            )
        })
}

/// Asks the kernel to reclaim the resident pages of this binary's read-only mappings and to drop
/// the binary from the page cache. See the module documentation.
// The two calls below have no safe wrapper in std; they are the only unsafe code in the agent.
#[allow(unsafe_code)]
#[cfg(target_os = "linux")]
pub fn release_startup_code() -> io::Result<Released> {
    use std::os::fd::AsRawFd;

    let rss_before_kib = status_kib("VmRSS")?;
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut refused = None;
    for (start, end) in own_code_ranges(&maps, &exe.to_string_lossy()) {
        // MADV_RANDOM first: what the steady state runs is scattered through the binary, so
        // reading ahead around each page it faults in would only fill memory again.
        for advice in [libc::MADV_RANDOM, libc::MADV_PAGEOUT] {
            // SAFETY: the range is a whole read-only mapping of this process; both advices only
            // change how its pages are read in and when they are reclaimed (pages written by
            // relocation go to swap or stay), never what the program reads there.
            let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
            if rc != 0 {
                // Best effort: go on with the other ranges (MADV_PAGEOUT needs Linux 5.4).
                refused.get_or_insert_with(io::Error::last_os_error);
            }
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    let binary = std::fs::File::open(&exe)?;
    // SAFETY: a plain advisory call on a file descriptor we own for its duration.
    let rc = unsafe { libc::posix_fadvise(binary.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Released {
        rss_before_kib,
        rss_after_kib: status_kib("VmRSS")?,
    })
}

/// Not available outside Linux.
#[cfg(not(target_os = "linux"))]
pub fn release_startup_code() -> io::Result<Released> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "releasing start-up code pages needs Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55a283b81000-55a2840f9000 r--p 00000000 fe:00 5483086                    /opt/cascade/edge-agent
55a2840f9000-55a285cfd000 r-xp 00577000 fe:00 5483086                    /opt/cascade/edge-agent
55a285cfd000-55a285da5000 r--p 0217a000 fe:00 5483086                    /opt/cascade/edge-agent
55a285da5000-55a285daa000 rw-p 02221000 fe:00 5483086                    /opt/cascade/edge-agent
55a2b640f000-55a2b6453000 rw-p 00000000 00:00 0                          [heap]
7fb37b5a0000-7fb37b6f6000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7fb37c000000-7fb37c001000 r-xp 00000000 fe:00 5483086                    /opt/cascade/edge-agent (deleted)
";

    #[test]
    fn only_the_binarys_read_only_mappings_are_chosen() {
        assert_eq!(
            own_code_ranges(MAPS, "/opt/cascade/edge-agent"),
            vec![
                (0x55a283b81000, 0x55a2840f9000),
                (0x55a2840f9000, 0x55a285cfd000),
                (0x55a285cfd000, 0x55a285da5000),
            ],
            "not its writable data, the heap, libraries, or a replaced binary's mapping"
        );
        assert!(own_code_ranges(MAPS, "/usr/bin/other").is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_drops_resident_code_and_the_program_runs_on() {
        fn resident_code_kib() -> u64 {
            let exe = std::fs::read_link("/proc/self/exe").unwrap();
            let exe = exe.to_string_lossy();
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut ours = false;
            let mut kib = 0;
            for line in smaps.lines() {
                let first = line.split_ascii_whitespace().next().unwrap_or("");
                if !first.ends_with(':') {
                    // A mapping's header line (address range, perms, offset, dev, inode, path).
                    ours = !own_code_ranges(line, &exe).is_empty();
                } else if ours && let Some(v) = line.strip_prefix("Rss:") {
                    kib += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            }
            kib
        }
        let before = resident_code_kib();
        assert!(
            before > 0,
            "the test binary's code is resident while it runs"
        );
        let released = release_startup_code().unwrap();
        let after = resident_code_kib();
        // Other tests run in parallel threads and fault some code back in, but far from all.
        assert!(
            after < before,
            "resident code {before} KiB -> {after} KiB ({released:?})"
        );
    }
}
