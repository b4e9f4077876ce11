//! The FUSE descriptor keeper: a tiny process (`sdc fuse-keeper`) that holds a duplicate of the
//! SDC's `/dev/fuse` descriptor so the kernel connection outlives an SDC restart or crash.
//!
//! The kernel aborts a FUSE connection when the last descriptor of its device closes; loop
//! devices over its files then fail every I/O, under whatever filesystem a container has
//! mounted. With the keeper holding one, requests simply queue while no SDC runs; the next SDC
//! asks the keeper for the descriptor ([`fetch`]), serves the queue and has the kernel resend
//! what the dead one had read. The keeper never reads the device. It exits when the connection
//! ends (unmounted or aborted: the descriptor polls as an error) or when told to ([`stop`]).
//!
//! Descriptors travel as `SCM_RIGHTS` over a unix socket in the SDC's state directory.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// Asks for a duplicate of the descriptor.
const CMD_GET: u8 = b'G';
/// Asks the keeper to exit (the SDC unmounted the filesystem itself).
const CMD_QUIT: u8 = b'Q';
/// How long a client or the keeper waits on the other.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `fd` over `sock` with one payload byte.
pub fn send_fd(sock: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes, enough for one cmsg carrying one fd.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(std::io::Error::other("no room for the control message"));
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: a valid socket and a fully initialised msghdr.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`].
pub fn recv_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in send_fd.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: valid socket and buffers; MSG_CMSG_CLOEXEC keeps the fd out of our children.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg; we only read the first header it describes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("the keeper sent no descriptor"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Asks the keeper at `socket` for the FUSE descriptor; `None` when no keeper runs there.
pub fn fetch(socket: &Path) -> Option<OwnedFd> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    s.write_all(&[CMD_GET]).ok()?;
    recv_fd(&s).ok()
}

/// Tells the keeper at `socket` to exit; true if one answered.
pub fn stop(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    if s.write_all(&[CMD_QUIT]).is_err() {
        return false;
    }
    // The keeper closes the connection once it has let go of the descriptor.
    let mut b = [0u8; 1];
    let _ = s.read(&mut b);
    true
}

/// Starts a keeper for `fuse_fd` listening on `socket`, detached from the SDC (its own
/// session, so it survives the SDC). `sdc_exe` is the SDC binary (it has the keeper mode).
pub fn spawn(sdc_exe: &Path, socket: &Path, fuse_fd: RawFd) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(socket);
    let mut cmd = std::process::Command::new(sdc_exe);
    cmd.arg("fuse-keeper")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // dup2 onto itself would keep close-on-exec set: clear it instead.
            let r = if fuse_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fuse_fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    // Reap it whenever it exits, so it never lingers as a zombie of a long-lived SDC.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    // Wait until it listens, so a crash right after start still leaves a keeper.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while UnixStream::connect(socket).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the FUSE keeper did not start listening",
            ));
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    Ok(pid)
}

/// The keeper's main loop (`sdc fuse-keeper`): the descriptor is fd 3.
pub fn run(socket: &Path) -> std::io::Result<()> {
    // SAFETY: the SDC passed the FUSE descriptor as fd 3 (see spawn); we own it from here.
    let fuse = unsafe { OwnedFd::from_raw_fd(3) };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let pidfile = socket.with_extension("pid");
    let _ = std::fs::write(&pidfile, std::process::id().to_string());
    let result = serve(&listener, &fuse);
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&pidfile);
    result
}

fn serve(listener: &UnixListener, fuse: &OwnedFd) -> std::io::Result<()> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // No events asked: only error and hang-up are reported, and we never read.
            libc::pollfd {
                fd: fuse.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // The connection is gone (unmounted or aborted): nothing left to keep.
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
        let mut cmd = [0u8; 1];
        if s.read_exact(&mut cmd).is_err() {
            continue;
        }
        match cmd[0] {
            CMD_GET => {
                let _ = send_fd(&s, fuse.as_raw_fd());
            }
            CMD_QUIT => return Ok(()),
            _ => {}
        }
    }
}
