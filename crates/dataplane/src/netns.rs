//! Network namespaces: open, create, delete and enter them without ever moving a tokio worker.
//!
//! A network namespace is a per-thread attribute (`setns`/`unshare` act on the calling thread) and a
//! socket stays in the namespace of the thread that created it. So every operation that has to be
//! *inside* a namespace runs on a fresh, dedicated OS thread that exits afterwards; no thread is
//! ever returned to a pool while it sits in a foreign namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::error::{DataplaneError, Result};

/// Where named namespaces live, as with `ip netns` (`/var/run` is a symlink to `/run`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open handle on a network namespace: the fd keeps the namespace alive and identifies it even
/// if the name is removed; the path is kept for messages and for tools that take a path.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: PathBuf,
}

impl NetNs {
    /// Opens an existing namespace by path (`/run/netns/NAME`, `/proc/PID/ns/net`), refusing
    /// anything that is not a network namespace so a wrong path fails here, not at first use.
    pub fn open(path: &Path) -> Result<NetNs> {
        let file = File::open(path).map_err(|source| DataplaneError::Namespace {
            op: "open netns",
            path: path.to_path_buf(),
            source,
        })?;
        let fd = OwnedFd::from(file);
        check_is_netns(&fd, path)?;
        Ok(NetNs {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens `/run/netns/NAME`: the named-namespace convention shared with `ip netns`.
    pub fn open_named(name: &str) -> Result<NetNs> {
        validate_name(name)?;
        NetNs::open(&named_path(name))
    }

    /// The calling thread's namespace (usually the daemon's own, the "root" one it was started in).
    /// Its path is `/proc/PID/task/TID/ns/net`, informative only: the handle stays valid after the
    /// thread is gone.
    pub fn current() -> Result<NetNs> {
        let tid = nix::unistd::gettid();
        let pid = std::process::id();
        let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net"));
        NetNs::open(&path)
    }

    /// Creates a new, empty named namespace at `/run/netns/NAME` like `ip netns add` (without its
    /// `fork`): `unshare` on a fresh thread, bind-mount that thread's namespace file onto the name,
    /// and bring `lo` up inside so loopback works like on a real host. All-or-nothing.
    pub fn create(name: &str) -> Result<NetNs> {
        validate_name(name)?;
        let path = named_path(name);
        let err = |op: &'static str| {
            let path = path.clone();
            move |source: io::Error| DataplaneError::Namespace { op, path, source }
        };
        prepare_run_dir().map_err(err("prepare netns directory for"))?;
        // The mount point: an empty file, created exclusively so two creators cannot share a name.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(err("create netns"))?;

        let target = path.clone();
        let made = spawn_join(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            bring_lo_up()
        })
        .and_then(|r| r);
        if let Err(source) = made {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&path);
            return Err(err("create netns")(source));
        }
        NetNs::open(&path).inspect_err(|_| {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&path);
        })
    }

    /// Deletes the named namespace `/run/netns/NAME` like `ip netns del`: lazy unmount, then unlink.
    /// The kernel frees the namespace (and its links) once no process or fd holds it any more.
    /// Fails with a not-found error (`is_not_found()`) if there is no such name.
    pub fn delete(name: &str) -> Result<()> {
        validate_name(name)?;
        let path = named_path(name);
        let err = |op: &'static str, source: io::Error| DataplaneError::Namespace {
            op,
            path: path.clone(),
            source,
        };
        fs::symlink_metadata(&path).map_err(|e| err("delete netns", e))?;
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (a half-created name); still remove the file.
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(e) => return Err(err("unmount netns", e.into())),
        }
        fs::remove_file(&path).map_err(|e| err("delete netns", e))
    }

    /// The path this namespace was opened from (for messages and for `nsenter --net=PATH`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(device, inode)` of the namespace file: equal pairs mean the same namespace, whatever path
    /// each handle was opened from.
    pub fn inode(&self) -> Result<(u64, u64)> {
        let meta = File::from(self.fd.try_clone().map_err(|e| self.ns_err("stat netns", e))?)
            .metadata()
            .map_err(|e| self.ns_err("stat netns", e))?;
        Ok((meta.dev(), meta.ino()))
    }

    /// A second handle on the same namespace (dup of the fd), for owners that outlive this one.
    pub fn try_clone(&self) -> Result<NetNs> {
        Ok(NetNs {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| self.ns_err("duplicate fd of netns", e))?,
            path: self.path.clone(),
        })
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace, and returns its result.
    /// Sockets and fds `f` creates belong to this namespace and stay there. Blocks the caller until
    /// `f` is done: from async code use [`NetNs::run_async`]. A panic in `f` is resumed here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| self.ns_err("duplicate fd of netns", e))?;
        let entered = spawn_join(move || -> io::Result<T> {
            setns(&fd, CloneFlags::CLONE_NEWNET)?;
            drop(fd);
            Ok(f())
        });
        entered.and_then(|r| r).map_err(|e| self.ns_err("enter netns", e))
    }

    /// Like [`NetNs::run`], but awaits the thread instead of blocking a tokio worker.
    pub async fn run_async<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| self.ns_err("duplicate fd of netns", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("nsm-netns".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    drop(fd);
                    Ok::<T, io::Error>(f())
                }));
                let _ = tx.send(r);
            })
            .map_err(|e| self.ns_err("spawn thread for netns", e))?;
        match rx.await {
            Ok(Ok(r)) => r.map_err(|e| self.ns_err("enter netns", e)),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(self.ns_err("enter netns", io::Error::other("namespace thread vanished"))),
        }
    }

    fn ns_err(&self, op: &'static str, source: io::Error) -> DataplaneError {
        DataplaneError::Namespace {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// `(device, inode)` of the namespace file at `path` without opening it (as
/// [`NetNs::inode`] gives for an open handle), or None if nothing is there: equal pairs mean the
/// same namespace, and a path whose pair changed names another one now.
pub fn identity(path: impl AsRef<Path>) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `/run/netns/NAME`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(DataplaneError::InvalidArgument {
            op: "netns name",
            reason: format!("{name:?} is not a valid namespace name"),
        });
    }
    Ok(())
}

/// Checks by the fd, not the path: a network-namespace file is an nsfs inode that `setns` accepts
/// with `CLONE_NEWNET` (tried on a throwaway thread; the kernel says `EINVAL` for any other type).
fn check_is_netns(fd: &OwnedFd, path: &Path) -> Result<()> {
    let not_netns = |found: String| DataplaneError::NotANetns {
        path: path.to_path_buf(),
        found,
    };
    let is_nsfs = nix::sys::statfs::fstatfs(fd)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false);
    if !is_nsfs {
        return Err(not_netns("not an nsfs file".to_string()));
    }
    let probe = fd.try_clone().map_err(|source| DataplaneError::Namespace {
        op: "inspect netns",
        path: path.to_path_buf(),
        source,
    })?;
    match spawn_join(move || setns(&probe, CloneFlags::CLONE_NEWNET)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Errno::EINVAL)) => {
            // Opened through /proc/PID/ns/TYPE the link text names the type (`mnt:[…]`).
            let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            match link.split_once(":[") {
                Some((kind, _)) if !kind.contains('/') => Err(not_netns(format!("a {kind} namespace"))),
                _ => Err(not_netns("a namespace of another type".to_string())),
            }
        }
        Ok(Err(e)) => Err(DataplaneError::Namespace {
            op: "inspect netns",
            path: path.to_path_buf(),
            source: e.into(),
        }),
        Err(source) => Err(DataplaneError::Namespace {
            op: "inspect netns",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes `/run/netns` exist and be a shared mount point, as `ip netns add` does, so the namespace
/// mounts propagate to other mount namespaces (containers, `ip netns exec`). Done once per process.
fn prepare_run_dir() -> io::Result<()> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    fs::create_dir_all(NETNS_RUN_DIR)?;
    let share = || {
        mount(
            Some("none"),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => {}
        // Not a mount point yet: bind it onto itself, then share it.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            share()?;
        }
        Err(e) => return Err(e.into()),
    }
    *done = true;
    Ok(())
}

/// Runs `f` on a new OS thread and waits for it; a panic in `f` is resumed on the caller.
fn spawn_join<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let handle = std::thread::Builder::new().name("nsm-netns".into()).spawn(f)?;
    match handle.join() {
        Ok(v) => Ok(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Brings `lo` up in the calling thread's namespace, with a netlink socket opened right here and a
/// throwaway single-threaded runtime (this runs on a dedicated namespace thread, never a worker).
fn bring_lo_up() -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let driver = tokio::spawn(conn);
        let msg = rtnetlink::LinkUnspec::new_with_name("lo").up().build();
        let r = handle.link().set(msg).execute().await.map_err(crate::error::netlink_io);
        driver.abort();
        r
    })
}
