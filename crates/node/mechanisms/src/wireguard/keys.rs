//! The node's WireGuard key pair on disk, and which backend runs its tunnels.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime};

use nsm_dataplane::{NetNs, Netlink};

use super::KEY_FILE;
use crate::{MechanismError, WireGuardBackend};

/// The node's key pair.
pub(super) struct Keys {
    pub(super) private: [u8; 32],
    /// The public key as `wg` prints it.
    pub(super) public: String,
}

impl Keys {
    pub(super) fn new(private: [u8; 32]) -> Keys {
        Keys {
            public: nsm_wireguard::encode_key(&nsm_wireguard::public_key(&private)),
            private,
        }
    }
}

/// Which backend a node uses: `Auto` asks the kernel (by creating a `wireguard` link in the host
/// namespace and deleting it). Fails only when `Kernel` was asked for and the kernel has none.
pub async fn choose_backend(asked: WireGuardBackend, host: &NetNs) -> crate::Result<WireGuardBackend> {
    if asked == WireGuardBackend::Userspace {
        return Ok(asked);
    }
    let probe = async { Netlink::connect(host).await?.wireguard_supported().await }.await;
    match (asked, probe) {
        (_, Ok(true)) => Ok(WireGuardBackend::Kernel),
        (WireGuardBackend::Kernel, Ok(false)) => Err(MechanismError::WireGuard(
            "--wireguard-backend kernel: this kernel has no WireGuard (it refuses links of kind wireguard)".into(),
        )),
        (WireGuardBackend::Kernel, Err(e)) => {
            Err(MechanismError::WireGuard(format!("--wireguard-backend kernel: {e}")))
        }
        (_, Ok(false)) => {
            tracing::info!("the kernel has no WireGuard: WIREGUARD vWires use the userspace tunnel");
            Ok(WireGuardBackend::Userspace)
        }
        (_, Err(e)) => {
            tracing::warn!(error = %e, "could not ask the kernel for WireGuard: WIREGUARD vWires use the userspace tunnel");
            Ok(WireGuardBackend::Userspace)
        }
    }
}

/// Reads the node's private key from `dir`, or makes one and keeps it there (mode 0600).
pub fn load_or_create_key(dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            nsm_wireguard::decode_key(&text)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = nsm_wireguard::generate_private_key();
            write_key(dir, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// Replaces the key file atomically: the new key is written to a temporary file (mode 0600 from the
/// start), flushed, and renamed over the old one, and the rename is flushed too. A crash at any
/// point leaves the old key or the new one, never a partial file.
pub(super) fn write_key(dir: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A temporary file left by an older process may have other bits.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{}", nsm_wireguard::encode_key(key))?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(KEY_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// How old the key file is (since it was last written).
pub(super) fn key_age(dir: &Path) -> Duration {
    std::fs::metadata(dir.join(KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}
