//! `clusterapp-kubelet enter`: the last step before a container's program.
//!
//! The kubelet starts every container as
//! `ip netns exec <pod netns> unshare --mount --uts --propagation private
//!  clusterapp-kubelet enter --spec <file> -- <argv>`, so this runs single
//! threaded in the Pod's network namespace with a private mount and UTS
//! namespace of its own. It sets the hostname, bind-mounts the Pod's volumes,
//! `/etc/hosts` and `/etc/hostname` at their container paths, drops to
//! `runAsUser` when asked, and execs the program (same PID, so the kubelet's
//! signals and probes reach it).
//!
//! Mount points that do not exist on the host are never created on the host
//! file system: the nearest existing directory is covered by a tmpfs whose
//! entries are bind mounts of the original ones, and the new directory or
//! file is made on that tmpfs (see `cover_with_tmpfs`). For a mount point
//! directly under / (`/data`), the program gets a tmpfs root made the same
//! way and is chrooted into it (see `switch_root`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// What the kubelet hands to `enter` (written as JSON next to the Pod's files).
#[derive(Debug, Serialize, Deserialize)]
pub struct EnterSpec {
    pub hostname: String,
    /// Bind mounts, applied in order (parents before children).
    pub mounts: Vec<BindMount>,
    /// Where original directories are bind-mounted before a tmpfs covers them
    /// (a folder in the Pod's state directory).
    pub stash_dir: PathBuf,
    /// The Pod's state directory: a writable bind mount from inside it may
    /// get new entries (they land in our state directory, not on the host).
    pub pod_dir: PathBuf,
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    /// fsGroup and supplementalGroups (with runAsUser).
    #[serde(default)]
    pub supplemental_groups: Vec<u32>,
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Runs the steps and execs `argv`; returns only on failure.
pub fn enter(spec_file: &Path, argv: &[String]) -> anyhow::Result<()> {
    let text = fs::read_to_string(spec_file).map_err(|e| anyhow::anyhow!("reading {}: {e}", spec_file.display()))?;
    let spec: EnterSpec = serde_json::from_str(&text)?;
    let Some((program, args)) = argv.split_first() else {
        anyhow::bail!("no command given to run");
    };

    set_hostname(&spec.hostname)?;
    let mut mounter = Mounter {
        stash_dir: spec.stash_dir.clone(),
        pod_dir: spec.pod_dir.clone(),
        stash_count: 0,
        writable_roots: Vec::new(),
        root: None,
    };
    fs::create_dir_all(&spec.stash_dir)?;
    for mount in &spec.mounts {
        mounter
            .bind(mount)
            .map_err(|e| anyhow::anyhow!("mounting {} at {}: {e}", mount.source.display(), mount.target.display()))?;
    }

    if let Some(root) = &mounter.root {
        let root = c_path(root)?;
        // SAFETY: a NUL-terminated path; chdir keeps the cwd inside the new root.
        if unsafe { libc::chroot(root.as_ptr()) } != 0 {
            anyhow::bail!("chroot into the Pod's root: {}", io::Error::last_os_error());
        }
        std::env::set_current_dir("/")?;
    }

    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    // Switch identity here, not with Command::uid/gid: those drop every
    // supplementary group when started as root, and fsGroup must stay.
    if let Some(uid) = spec.run_as_user {
        set_groups(&spec.supplemental_groups)?;
        // Without runAsGroup the image's group applies; ours is root's (0).
        set_ids(spec.run_as_group.unwrap_or(0), uid)?;
    } else if let Some(gid) = spec.run_as_group {
        set_ids(gid, 0)?;
    }
    let error = command.exec();
    anyhow::bail!("executing {program}: {error}")
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live byte slice.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn set_ids(gid: u32, uid: u32) -> io::Result<()> {
    // SAFETY: plain syscalls; group first, while we may still change it.
    if unsafe { libc::setgid(gid) } != 0 || unsafe { libc::setuid(uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_groups(groups: &[u32]) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = groups.iter().map(|g| *g as libc::gid_t).collect();
    // SAFETY: pointer and length describe a live slice of gid_t.
    let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn mount_raw(
    source: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = c_path(source)?;
    let target = c_path(target)?;
    let fstype = fstype.map(|f| CString::new(f).map_err(|_| io::Error::other("fstype"))).transpose()?;
    let data = data.map(|d| CString::new(d).map_err(|_| io::Error::other("data"))).transpose()?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

struct Mounter {
    stash_dir: PathBuf,
    pod_dir: PathBuf,
    stash_count: usize,
    /// Directories in which we may create entries: tmpfs covers we made and
    /// writable bind mounts from the Pod's state directory.
    writable_roots: Vec<PathBuf>,
    /// Set once a mount point directly under / was needed: a tmpfs root
    /// whose entries are bind mounts of /'s, which the program is chrooted into.
    root: Option<PathBuf>,
}

impl Mounter {
    /// Where a container path is in this mount namespace right now.
    fn real(&self, path: &Path) -> PathBuf {
        match &self.root {
            Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }

    /// Resolves symlinks; an absolute link target lands inside our root.
    fn canonical(&self, real: &Path) -> io::Result<PathBuf> {
        let c = fs::canonicalize(real)?;
        Ok(match &self.root {
            Some(root) if !c.starts_with(root) => root.join(c.strip_prefix("/").unwrap_or(&c)),
            _ => c,
        })
    }

    fn bind(&mut self, mount: &BindMount) -> io::Result<()> {
        let source_is_dir = fs::metadata(&mount.source)?.is_dir();
        let target = self.ensure_exists(&mount.target, source_is_dir)?;
        mount_raw(&mount.source, &target, None, libc::MS_BIND | libc::MS_REC, None)?;
        if mount.read_only {
            mount_raw(
                Path::new("none"),
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                None,
            )?;
        } else if source_is_dir && mount.source.starts_with(&self.pod_dir) {
            self.writable_roots.push(self.canonical(&target)?);
        }
        Ok(())
    }

    /// Makes the container path exist as a directory or file without writing
    /// to the host; returns where it is in this mount namespace.
    fn ensure_exists(&mut self, path: &Path, as_dir: bool) -> io::Result<PathBuf> {
        let real = self.real(path);
        if fs::symlink_metadata(&real).is_ok() {
            return Ok(real);
        }
        let parent = path.parent().ok_or_else(|| io::Error::other("mount target has no parent"))?;
        let name = path.file_name().ok_or_else(|| io::Error::other("mount target has no file name"))?;
        let parent_real = self.ensure_exists(parent, true)?;
        let mut parent_real = self.canonical(&parent_real)?;
        if fs::symlink_metadata(parent_real.join(name)).is_ok() {
            return Ok(parent_real.join(name));
        }
        if !self.writable_roots.iter().any(|root| parent_real.starts_with(root)) {
            if parent_real == Path::new("/") {
                parent_real = self.switch_root()?;
            } else {
                self.cover_with_tmpfs(&parent_real)?;
            }
        }
        let target = parent_real.join(name);
        if as_dir {
            fs::create_dir(&target)?
        } else {
            fs::File::create(&target).map(drop)?
        }
        Ok(target)
    }

    /// A new root for the program: tmpfs with every entry of / bind-mounted
    /// (recursively, so mounts made so far come along). Returns it.
    fn switch_root(&mut self) -> io::Result<PathBuf> {
        let root = self.stash_dir.join("root");
        fs::create_dir_all(&root)?;
        mount_raw(Path::new("tmpfs"), &root, Some("tmpfs"), 0, Some("mode=755"))?;
        replicate_entries(Path::new("/"), &root)?;
        self.writable_roots.push(root.clone());
        self.root = Some(root.clone());
        Ok(root)
    }

    /// Puts a tmpfs over `dir` that shows the same entries (each a bind mount
    /// of the original, kept reachable through a stash bind mount), so new
    /// mount points can be created in it. Only this mount namespace sees it.
    fn cover_with_tmpfs(&mut self, dir: &Path) -> io::Result<()> {
        self.stash_count += 1;
        let stash = self.stash_dir.join(self.stash_count.to_string());
        fs::create_dir_all(&stash)?;
        mount_raw(dir, &stash, None, libc::MS_BIND | libc::MS_REC, None)?;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
        mount_raw(Path::new("tmpfs"), dir, Some("tmpfs"), 0, Some(&format!("mode={mode:o}")))?;
        replicate_entries(&stash, dir)?;
        self.writable_roots.push(dir.to_path_buf());
        Ok(())
    }
}

/// Recreates the entries of `from` in `to`: symlinks copied, directories and
/// files bind-mounted (directories recursively).
fn replicate_entries(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let original = entry.path();
        let copy = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&original)?, &copy)?;
        } else if kind.is_dir() {
            fs::create_dir(&copy)?;
            mount_raw(&original, &copy, None, libc::MS_BIND | libc::MS_REC, None)?;
        } else {
            fs::File::create(&copy)?;
            mount_raw(&original, &copy, None, libc::MS_BIND, None)?;
        }
    }
    Ok(())
}
