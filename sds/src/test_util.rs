//! Helpers shared by the unit tests.

use std::path::PathBuf;

/// A sparse scratch file, removed on drop.
pub(crate) struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str, size: u64) -> Scratch {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("mb-sds-{name}-{}-{n}", std::process::id()));
        let f = std::fs::File::create(&p).expect("create scratch file");
        f.set_len(size).expect("size scratch file");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Append a fault-scenario summary line to `$MESHBLOCK_FAULT_SUMMARY` (printed by `./test`).
pub fn fault_summary(line: &str) {
    use std::io::Write as _;
    eprintln!("{line}");
    if let Ok(p) = std::env::var("MESHBLOCK_FAULT_SUMMARY") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
