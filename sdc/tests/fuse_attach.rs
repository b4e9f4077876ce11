//! The attach layer's FUSE server with an in-memory backend, through a real FUSE mount and a
//! real loop device: file I/O, fsync reaching the backend as a flush, discard, short reads at
//! the end, names, removal, and a clean end on unmount. Needs root and /dev/fuse (skipped with
//! a message otherwise).

mod nbd_support;

use nbd_support::mem::MemBackend;
use sdc::attach::fuse::FuseFs;
use sdc::attach::system;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

const SIZE: u64 = 8 << 20;

struct Mounted {
    dir: PathBuf,
    server: Option<std::thread::JoinHandle<Result<(), sdc::attach::fuse::FuseError>>>,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = system::unmount(&self.dir, true);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap_or(&self.dir));
    }
}

fn mount(fs: Arc<FuseFs<MemBackend>>) -> Option<Mounted> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return None;
    }
    let base = std::env::temp_dir().join(format!(
        "sdc-fuse-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let dir = base.join("fuse");
    let fd = system::mount_fuse(&dir).expect("mount FUSE");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let handle = rt.handle().clone();
    let dev = Arc::new(File::from(fd));
    let server = std::thread::spawn(move || fs.serve(dev, handle, false));
    Some(Mounted {
        dir,
        server: Some(server),
        _rt: rt,
    })
}

#[test]
fn files_are_block_backends() {
    let fs = Arc::new(FuseFs::default());
    let disk = Arc::new(MemBackend::new(SIZE));
    fs.add(7, "disk", disk.clone());
    let Some(mut m) = mount(fs.clone()) else {
        return;
    };
    let names: Vec<String> = std::fs::read_dir(&m.dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["disk"]);
    let path = m.dir.join("disk");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), SIZE);
    assert!(File::open(m.dir.join("nope")).is_err());

    let f = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    f.write_all_at(&data, 4096 + 17).expect("write");
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 4096 + 17).expect("read");
    assert!(back == data, "read back what was written");
    assert_eq!(&disk.contents()[4096 + 17..4096 + 17 + 64], &data[..64]);

    // fsync is a real flush of the backend.
    let before = disk.flushes();
    f.sync_all().expect("fsync");
    assert!(disk.flushes() > before, "fsync did not flush the backend");

    // Reads past the end are short; writes past it fail.
    let mut tail = vec![0u8; 8192];
    let n = f.read_at(&mut tail, SIZE - 4096).expect("read at the end");
    assert_eq!(n, 4096);
    assert!(f.write_at(&[1u8; 8192], SIZE - 4096).is_err());

    // Discard: the range reads as zeroes.
    // SAFETY: fallocate on an open file descriptor with valid arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            1 << 20,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut hole = vec![1u8; 1 << 20];
    f.read_exact_at(&mut hole, 1 << 20).expect("read the hole");
    assert!(hole.iter().all(|b| *b == 0));

    // A loop device over the file works (direct I/O included).
    let dev = system::loop_attach(&path).expect("losetup");
    let devices = system::loop_devices();
    assert!(
        devices.iter().any(|l| l.device == dev && l.backing == path),
        "{devices:?}"
    );
    let lf = File::options()
        .read(true)
        .write(true)
        .open(&dev)
        .expect("open loop");
    lf.write_all_at(&[0x5a; 4096], 0).expect("write loop");
    lf.sync_all().expect("fsync loop");
    assert_eq!(&disk.contents()[..4096], &[0x5a; 4096][..]);
    drop(lf);
    system::loop_detach(&dev).expect("detach");
    drop(f);

    // A removed file is gone for new opens.
    fs.remove(7);
    assert!(File::open(&path).is_err());

    // Unmounting ends the server cleanly.
    system::unmount(&m.dir, false).expect("unmount");
    let server = m.server.take().expect("server");
    server
        .join()
        .expect("server thread")
        .expect("server ended cleanly");
}
