//! Read confinement for sandboxed programs, with Landlock.
//!
//! The mount namespace makes the file system read-only for a program, but a read-only file
//! system is still a readable one: without more, a program could read any world-readable file on
//! the machine (a user's projects and configuration on systems with world-readable home
//! directories) and list any directory, and whatever it prints lands in the evidence that
//! `rejected.jsonl`, the check cache and the audit report carry, artifacts users publish.
//!
//! Landlock (Linux 5.13+, no privileges needed) restricts a process and its descendants to the
//! paths of a ruleset. The ruleset allows, read-only, exactly what the interpreter needs: its
//! executable, its standard library and extension modules, the `sys.path` of its `site` module
//! (the packages tests import), the directories of the shared libraries it maps, the dynamic
//! loader's cache and time-zone data; read-write, the run's own working directory and
//! `/dev/null`-like devices. Everything else is neither readable nor listable. TCP is denied as
//! well (on top of the network namespace), and where the kernel supports scoping (ABI 6), so
//! are signals to processes and abstract sockets outside the sandbox.
//!
//! A ruleset is built in distill for every run (it names the run's working directory) and only
//! enforced in the sandboxed child, with one system call that is safe between `fork` and
//! `exec` (or passed to the fork server's child as a descriptor).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, ABI,
};

use super::CodeCheckError;

/// The newest Landlock ABI whose rights the rulesets ask for; older kernels get what they
/// support (best effort), and a kernel without Landlock gets no confinement, which the probe
/// then reports as `read_confined: false`.
const ABI_WANTED: ABI = ABI::V6;

/// Devices a program may open for reading and writing.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// System files outside the interpreter's prefix that it (or the C library) reads: the dynamic
/// loader's cache, time-zone data, the locale archive. None of them holds user data.
const SYSTEM_READ: [&str; 4] = [
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/usr/lib/locale",
];

/// Asks the interpreter where its pieces are: the real executable, the standard library and
/// `site` directories, `pyvenv.cfg`, and the directories of every shared object mapped after
/// importing the extension modules that link system libraries.
const PATHS_SCRIPT: &str = r#"
import os, sys, sysconfig
files, dirs = {os.path.realpath(sys.executable)}, set()
for key in ("stdlib", "platstdlib", "purelib", "platlib"):
    p = sysconfig.get_path(key)
    if p:
        dirs.add(p)
for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
    files.add(os.path.join(prefix, "pyvenv.cfg"))
for name in ("ssl", "hashlib", "ctypes", "zlib", "bz2", "lzma", "sqlite3", "decimal", "_json",
             "readline", "uuid", "unicodedata", "array", "math", "_datetime", "select"):
    try:
        __import__(name)
    except Exception:
        pass
exe = os.path.realpath(sys.executable)
with open("/proc/self/maps") as fh:
    for line in fh:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            path = os.path.realpath(parts[5].strip())
            if path != exe:
                dirs.add(os.path.dirname(path))
sys.stdout.write("\0".join(["F" + f for f in files] + ["D" + d for d in dirs]))
"#;

/// What a sandboxed program may read besides its working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReadSet {
    /// Directories readable with everything beneath them.
    pub dirs: Vec<PathBuf>,
    /// Single files readable (and executable: the interpreter itself).
    pub files: Vec<PathBuf>,
}

impl ReadSet {
    /// The read set of `python`, whose `site`-enabled `sys.path` is `site_path`.
    pub(crate) fn for_interpreter(
        python: &Path,
        site_path: &[String],
    ) -> Result<Self, CodeCheckError> {
        let out = Command::new(python)
            .args(["-I", "-B", "-c", PATHS_SCRIPT])
            .env_clear()
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| CodeCheckError::Python(format!("{}: {e}", python.display())))?;
        if !out.status.success() {
            return Err(CodeCheckError::Python(format!(
                "{} does not report its paths: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut dirs = BTreeSet::new();
        let mut files = BTreeSet::new();
        for entry in text.split('\0') {
            if let Some(f) = entry.strip_prefix('F') {
                files.insert(PathBuf::from(f));
            } else if let Some(d) = entry.strip_prefix('D') {
                dirs.insert(PathBuf::from(d));
            }
        }
        dirs.extend(site_path.iter().map(PathBuf::from));
        files.insert(python.to_path_buf());
        for p in SYSTEM_READ {
            dirs.insert(PathBuf::from(p));
        }
        Ok(Self::from_candidates(dirs, files))
    }

    /// Keeps absolute paths that exist, sorting directories from files (a `sys.path` entry may
    /// be a zip archive), and never the root itself.
    fn from_candidates(dirs: BTreeSet<PathBuf>, files: BTreeSet<PathBuf>) -> Self {
        let mut set = ReadSet::default();
        for p in dirs.into_iter().chain(files) {
            if !p.is_absolute() || p.parent().is_none() {
                continue;
            }
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => set.dirs.push(p),
                Ok(_) => set.files.push(p),
                Err(_) => {}
            }
        }
        set.dirs.sort();
        set.dirs.dedup();
        set.files.sort();
        set.files.dedup();
        set
    }
}

/// Checks the paths a user allows programs to read (`--allow-read`) and makes them absolute:
/// each must exist, and the root is refused.
pub(crate) fn canonical_allow_read(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CodeCheckError> {
    paths
        .iter()
        .map(|p| {
            let abs = std::fs::canonicalize(p).map_err(|e| {
                CodeCheckError::Sandbox(format!("allowed read path {}: {e}", p.display()))
            })?;
            if abs.parent().is_none() {
                return Err(CodeCheckError::Sandbox(format!(
                    "allowed read path {}: allowing the root would undo read confinement",
                    p.display()
                )));
            }
            Ok(abs)
        })
        .collect()
}

/// Builds the ruleset of one run: the interpreter's files read-only, devices read-write.
///
/// The working directory and the paths a user allows are added by the child itself (see
/// [`ChildRule`]). Fails when the kernel has no Landlock, so a plan that asks for read
/// confinement never runs without it.
pub(crate) fn ruleset(read: &ReadSet) -> Result<OwnedFd, CodeCheckError> {
    let err = |e: landlock::RulesetError| CodeCheckError::Sandbox(format!("landlock: {e}"));
    let abi = ABI_WANTED;
    let read_access = AccessFs::from_read(abi);
    let device_access = AccessFs::ReadFile | AccessFs::WriteFile;
    let created = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(&read.dirs, read_access))
        .map_err(err)?
        .add_rules(path_beneath_rules(&read.files, read_access))
        .map_err(err)?
        .add_rules(path_beneath_rules(DEVICES, device_access))
        .map_err(err)?;
    let fd: Option<OwnedFd> = created.into();
    fd.ok_or_else(|| {
        CodeCheckError::IsolationUnavailable("the kernel does not support Landlock".into())
    })
}

/// Execute, read a file, list a directory (`LANDLOCK_ACCESS_FS_*`).
const READ_ACCESS: u64 = 1 | (1 << 2) | (1 << 3);
/// The rights that apply to a regular file (the rest only to directories).
const FILE_ACCESS: u64 = 1 | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15);

/// The file-system rights the kernel's Landlock handles (all of them are handled).
fn handled_fs_access() -> u64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    match abi {
        i64::MIN..=0 => 0,
        1 => (1 << 13) - 1,
        2 => (1 << 14) - 1,
        3 | 4 => (1 << 15) - 1,
        _ => (1 << 16) - 1,
    }
}

/// A rule the sandboxed child adds to its ruleset itself, after its mounts: the private tmpfs
/// working directory and a PID namespace's own `/proc` are mounted over the directories that
/// distill sees, and a Landlock rule binds to the directory it was opened on.
pub(crate) struct ChildRule {
    /// The path, opened by the child.
    pub path: std::ffi::CString,
    /// `LANDLOCK_ACCESS_FS_*` rights granted beneath it.
    pub access: u64,
}

/// The child's rules: `workdir` with every right, each allowed path read-only.
pub(crate) fn child_rules(
    workdir: &Path,
    allow_read: &[PathBuf],
) -> Result<Vec<ChildRule>, CodeCheckError> {
    use std::os::unix::ffi::OsStrExt;
    let handled = handled_fs_access();
    let rule = |path: &Path, access: u64| -> Result<ChildRule, CodeCheckError> {
        let path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| CodeCheckError::Sandbox("path contains a NUL byte".into()))?;
        Ok(ChildRule { path, access })
    };
    let mut rules = vec![rule(workdir, handled)?];
    for p in allow_read {
        let is_dir = std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false);
        let access = if is_dir {
            READ_ACCESS
        } else {
            READ_ACCESS & FILE_ACCESS
        };
        rules.push(rule(p, access & handled)?);
    }
    Ok(rules)
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's ABI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Adds `rule` to `ruleset`, opening its path now.
///
/// # Safety
/// Called between `fork` and `exec`: only raw system calls on prepared data.
pub(crate) unsafe fn add_child_rule(ruleset: RawFd, rule: &ChildRule) -> io::Result<()> {
    let fd = libc::open(rule.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let attr = PathBeneathAttr {
        allowed_access: rule.access,
        parent_fd: fd,
    };
    // LANDLOCK_RULE_PATH_BENEATH = 1.
    let r = libc::syscall(
        libc::SYS_landlock_add_rule,
        ruleset,
        1u32,
        &attr as *const PathBeneathAttr,
        0u32,
    );
    let err = io::Error::last_os_error();
    libc::close(fd);
    if r < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

/// Enforces a ruleset on the calling process; `no_new_privs` must already be set.
///
/// Only a system call, so it may run between `fork` and `exec`.
pub(crate) fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: landlock_restrict_self takes a descriptor and flags; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_keep_existing_absolute_paths_and_never_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("lib.zip");
        std::fs::write(&file, b"x").expect("write");
        let dirs: BTreeSet<PathBuf> = [
            PathBuf::from("/"),
            PathBuf::from("relative/dir"),
            tmp.path().to_path_buf(),
            file.clone(),
            tmp.path().join("missing"),
        ]
        .into_iter()
        .collect();
        let set = ReadSet::from_candidates(dirs, BTreeSet::new());
        assert_eq!(set.dirs, vec![tmp.path().to_path_buf()]);
        assert_eq!(set.files, vec![file]);
    }
}
