//! Process isolation and resource limits for running untrusted Python.
//!
//! Every program runs in a fresh child process that is placed in its own session
//! (so the whole process group can be killed), given hard resource limits
//! (`setrlimit`), and, where the kernel and our privileges allow it, moved into new
//! network / IPC / mount namespaces with a read-only view of the file system, a
//! private size-limited `tmpfs` working directory, and an unprivileged uid of its own
//! (so `RLIMIT_NPROC` is enforced and every leftover process can be killed by uid). The
//! program runs as the first process of its own PID namespace, with its own `/proc`, and
//! under a Landlock ruleset that lets it read only the interpreter's files, a few devices
//! and its working directory (see `confine.rs`).
//!
//! Which of these mechanisms can be used is decided once per interpreter by a
//! *probe*: candidate plans, strongest first, are tried by starting the interpreter
//! under them; the first that works is used for every run, and the mechanisms that
//! were in force are reported in [`Isolation`] with every result. A step that was
//! planned but fails in a later run makes that run fail (it never silently runs with
//! weaker isolation than reported).

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::confine::{self, ReadSet};
use super::CodeCheckError;

/// Limits and knobs for the sandboxed child processes.
///
/// The defaults suit benchmark-style programs (HumanEval, MBPP, APPS): a few seconds
/// of CPU, 2 GiB of address space, a handful of processes. Tests of hostile programs
/// use much smaller values so they finish quickly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxConfig {
    /// Python interpreter to run. `None` picks `/usr/bin/python3` when present
    /// (a system interpreter is readable by an unprivileged sandbox uid, unlike one
    /// installed under a private home directory), else `python3` from `PATH`.
    /// Launcher shims are resolved to the real executable once.
    pub python: Option<PathBuf>,
    /// Wall-clock limit for one process: the whole program for function-style
    /// tests, each case for stdin/stdout tests. The whole process group is killed
    /// when it expires.
    pub wall_timeout: Duration,
    /// CPU-time limit per process (`RLIMIT_CPU`, rounded up to whole seconds).
    pub cpu_time_limit: Duration,
    /// Address-space limit per process in bytes (`RLIMIT_AS`).
    pub memory_limit_bytes: u64,
    /// Maximum number of processes/threads (`RLIMIT_NPROC`); only enforced by the
    /// kernel for a non-root uid, see [`Isolation::nproc_enforced`].
    pub max_processes: u64,
    /// Largest file the program may write (`RLIMIT_FSIZE`).
    pub max_file_size_bytes: u64,
    /// Maximum number of open file descriptors (`RLIMIT_NOFILE`).
    pub max_open_files: u64,
    /// Size of the private `tmpfs` working directory when a mount namespace is
    /// available (bounds the total disk the program can fill).
    pub workdir_size_bytes: u64,
    /// At most this many bytes of stdout and of stderr are kept; the rest is read
    /// and discarded so a chatty program can neither block nor exhaust memory.
    /// Stdin/stdout tests raise the stdout cap to fit the expected output.
    pub max_output_bytes: usize,
    /// Number of parallel workers for batches; 0 means twice the available
    /// cores (a worker spends much of its time waiting for its interpreter to
    /// start and its namespaces to be set up and torn down).
    pub workers: usize,
    /// Directory in which per-run working directories are created; `None` means
    /// the system temporary directory.
    pub temp_root: Option<PathBuf>,
    /// Refuse to run (verdict `sandbox_error`) unless the network namespace is in
    /// force, for deployments where network access must be impossible.
    pub require_network_isolation: bool,
    /// First uid of the range from which each run gets its own unprivileged uid
    /// (only when running as root). The range spans 2^24 ids.
    pub sandbox_uid_base: u32,
    /// Fork each program from a warm interpreter (one per worker) instead of
    /// starting a new interpreter: the same isolation steps, without the
    /// interpreter's start-up cost. Falls back to one interpreter per program
    /// when the server's children cannot set up the sandbox.
    pub fork_server: bool,
    /// Extra files or directories a program may read (and list) besides the
    /// interpreter's own files and its working directory, for tests that open
    /// data files. Nothing else outside the working directory is readable where
    /// Landlock is available (see [`Isolation::read_confined`]).
    pub allow_read: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            python: None,
            wall_timeout: Duration::from_secs(10),
            cpu_time_limit: Duration::from_secs(10),
            memory_limit_bytes: 2 << 30,
            max_processes: 64,
            max_file_size_bytes: 16 << 20,
            max_open_files: 256,
            workdir_size_bytes: 64 << 20,
            max_output_bytes: 64 << 10,
            workers: 0,
            temp_root: None,
            require_network_isolation: false,
            sandbox_uid_base: 1_600_000_000,
            fork_server: true,
            allow_read: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// Worker count for batches after resolving 0 to twice the available
    /// parallelism.
    pub fn effective_workers(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                * 2
        }
    }
}

/// The isolation mechanisms that were actually in force for a run.
///
/// Recorded with every result so that a verdict obtained under weaker isolation
/// (for example on a kernel without unprivileged user namespaces) is visible
/// downstream instead of being silently trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The child ran in its own session/process group, killed as a whole.
    pub process_group: bool,
    /// CPU, address-space, file-size, open-file and core-dump limits were set.
    pub rlimits: bool,
    /// `RLIMIT_NPROC` was effective (the child ran under a non-root uid).
    pub nproc_enforced: bool,
    /// The child ran in a new network namespace (only a down loopback device).
    pub net_namespace: bool,
    /// The child ran in a new user namespace (unprivileged sandboxing).
    pub user_namespace: bool,
    /// The child ran in a new IPC namespace.
    pub ipc_namespace: bool,
    /// The child ran in a new mount namespace.
    pub mount_namespace: bool,
    /// Every mount was read-only for the child, except its working directory.
    pub read_only_root: bool,
    /// The working directory was a private, size-limited tmpfs.
    pub private_tmpfs_workdir: bool,
    /// The child ran under a dedicated unprivileged uid/gid (root only).
    pub dropped_uid: bool,
    /// `PR_SET_NO_NEW_PRIVS` was set, so set-uid binaries cannot regain privileges.
    pub no_new_privs: bool,
    /// The program ran in a child forked from a warm interpreter (see
    /// [`SandboxConfig::fork_server`]) rather than a freshly started one; the
    /// steps above were taken in that child all the same.
    #[serde(default)]
    pub fork_server: bool,
    /// Landlock confined the program: it could read and list only the
    /// interpreter's own files, a few devices and its working directory (see
    /// `confine.rs`), and could open no TCP connection.
    #[serde(default)]
    pub read_confined: bool,
    /// The program ran in its own PID namespace with its own `/proc`: it saw
    /// only its own processes and could signal no other.
    #[serde(default)]
    pub pid_namespace: bool,
}

/// One candidate combination of isolation steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Plan {
    pub user_ns: bool,
    pub net_ns: bool,
    pub ipc_ns: bool,
    pub mount_ns: bool,
    pub drop_uid: bool,
    /// A PID namespace with a fresh `/proc` (needs `mount_ns`).
    pub pid_ns: bool,
    /// Landlock read confinement.
    pub landlock: bool,
}

impl Plan {
    const NONE: Plan = Plan {
        user_ns: false,
        net_ns: false,
        ipc_ns: false,
        mount_ns: false,
        drop_uid: false,
        pid_ns: false,
        landlock: false,
    };

    /// Plans to try, strongest first: each namespace and uid combination with
    /// read confinement and a PID namespace, then with either, then with
    /// neither.
    fn candidates(is_root: bool) -> Vec<Plan> {
        Self::base_candidates(is_root)
            .into_iter()
            .flat_map(|base| {
                [(true, true), (false, true), (true, false), (false, false)]
                    .into_iter()
                    .filter(move |&(pid_ns, _)| !pid_ns || base.mount_ns)
                    .map(move |(pid_ns, landlock)| Plan {
                        pid_ns,
                        landlock,
                        ..base
                    })
            })
            .collect()
    }

    fn base_candidates(is_root: bool) -> Vec<Plan> {
        let p = |user_ns, net_ns, ipc_ns, mount_ns, drop_uid| Plan {
            user_ns,
            net_ns,
            ipc_ns,
            mount_ns,
            drop_uid,
            pid_ns: false,
            landlock: false,
        };
        if is_root {
            vec![
                p(false, true, true, true, true),
                p(false, true, true, false, true),
                p(false, true, true, true, false),
                p(false, true, false, false, false),
                p(false, false, false, false, true),
                Plan::NONE,
            ]
        } else {
            vec![
                p(true, true, true, true, false),
                p(true, true, false, false, false),
                Plan::NONE,
            ]
        }
    }

    /// The `unshare(2)` flags of the namespaces this plan creates.
    pub(crate) fn unshare_flags(&self) -> libc::c_int {
        let flag = |on: bool, f: libc::c_int| if on { f } else { 0 };
        flag(self.net_ns, libc::CLONE_NEWNET)
            | flag(self.ipc_ns, libc::CLONE_NEWIPC)
            | flag(self.mount_ns, libc::CLONE_NEWNS)
            | flag(self.user_ns, libc::CLONE_NEWUSER)
            | flag(self.pid_ns, libc::CLONE_NEWPID)
    }

    pub(crate) fn isolation(&self) -> Isolation {
        let is_root = unsafe { libc::geteuid() } == 0;
        Isolation {
            process_group: true,
            rlimits: true,
            nproc_enforced: self.drop_uid || !is_root,
            net_namespace: self.net_ns,
            user_namespace: self.user_ns,
            ipc_namespace: self.ipc_ns,
            mount_namespace: self.mount_ns,
            read_only_root: self.mount_ns,
            private_tmpfs_workdir: self.mount_ns,
            dropped_uid: self.drop_uid,
            no_new_privs: true,
            fork_server: false,
            read_confined: self.landlock,
            pid_namespace: self.pid_ns,
        }
    }
}

/// A resolved interpreter plus the isolation plan that works for it.
///
/// Creating one probes the kernel (a few interpreter start-ups, cached per
/// interpreter path for the life of the process); afterwards runs are cheap.
#[derive(Debug, Clone)]
pub struct Sandbox {
    config: SandboxConfig,
    python: PathBuf,
    /// `sys.path` of the interpreter with the `site` module enabled.
    site_path: Vec<String>,
    /// What a confined program may read (see `confine.rs`).
    read: Arc<ReadSet>,
    plan: Plan,
}

static PLAN_CACHE: OnceLock<Mutex<HashMap<PathBuf, Plan>>> = OnceLock::new();
type Resolved = (PathBuf, Vec<String>, Arc<ReadSet>);
static PYTHON_CACHE: OnceLock<Mutex<HashMap<Option<PathBuf>, Resolved>>> = OnceLock::new();
static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// Resolve the interpreter and probe which isolation works on this machine.
    ///
    /// Both are cached for the life of the process, so building a sandbox per
    /// job is cheap after the first.
    pub fn new(config: SandboxConfig) -> Result<Self, CodeCheckError> {
        let resolved = PYTHON_CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let known = resolved
            .lock()
            .ok()
            .and_then(|m| m.get(&config.python).cloned());
        let (python, site_path, read) = match known {
            Some(p) => p,
            None => {
                let p = resolve_python(config.python.as_deref())?;
                if let Ok(mut m) = resolved.lock() {
                    m.insert(config.python.clone(), p.clone());
                }
                p
            }
        };
        let cache = PLAN_CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let cached = cache.lock().ok().and_then(|m| m.get(&python).copied());
        let plan = match cached {
            Some(plan) => plan,
            None => {
                let plan = probe_plan(&config, &python, &read)?;
                if let Ok(mut m) = cache.lock() {
                    m.insert(python.clone(), plan);
                }
                plan
            }
        };
        let mut config = config;
        config.allow_read = confine::canonical_allow_read(&config.allow_read)?;
        let sandbox = Self {
            config,
            python,
            site_path,
            read,
            plan,
        };
        if sandbox.config.require_network_isolation && !plan.net_ns {
            return Err(CodeCheckError::IsolationUnavailable(
                "network namespace required but unavailable".into(),
            ));
        }
        Ok(sandbox)
    }

    /// The configuration this sandbox runs with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The interpreter executable actually started.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// `sys.path` the interpreter has when its `site` module runs (the harness
    /// starts it without `site`, which is slow, and restores the path itself).
    pub(crate) fn site_path(&self) -> &[String] {
        &self.site_path
    }

    /// The isolation every run of this sandbox gets.
    pub fn isolation(&self) -> Isolation {
        self.plan.isolation()
    }

    /// Why programs of this sandbox are spawned one interpreter each although
    /// [`SandboxConfig::fork_server`] asked for a fork server: the failure of
    /// the last fresh server tried. `None` while the fork server is in use.
    pub fn fork_server_unusable(&self) -> Option<String> {
        super::forkserver::unusable_reason(&self.python, self.plan)
    }

    /// Run the interpreter once with `args` under the sandbox.
    pub(crate) fn run(&self, req: &RunRequest<'_>) -> Result<RunOutcome, CodeCheckError> {
        use super::forkserver::{self, ForkError};
        if self.config.fork_server && !forkserver::known_unusable(&self.python, self.plan) {
            // A fresh server that fails its first job may have met a passing
            // condition (a loaded machine, a slow first start): one more fresh
            // server gets the job before this interpreter and plan fall back to
            // spawning for the rest of the process.
            for attempt in 1..=FORK_SERVER_STARTS {
                match forkserver::run(&self.config, &self.python, self.plan, &self.read, req) {
                    Ok(out) => return Ok(out),
                    Err(ForkError::Run(e)) => return Err(e),
                    Err(ForkError::Unusable(why)) if attempt < FORK_SERVER_STARTS => {
                        tracing::debug!(reason = %why, "code sandbox: fork server failed its first job, starting another");
                    }
                    Err(ForkError::Unusable(why)) => {
                        forkserver::give_up(&self.python, self.plan, &why)
                    }
                }
            }
        }
        run_with_plan(&self.config, &self.python, self.plan, &self.read, req)
    }
}

/// Input of one sandboxed interpreter run.
pub(crate) struct RunRequest<'a> {
    /// Arguments after the interpreter path.
    pub args: Vec<OsString>,
    /// Bytes fed to the child's stdin (then closed).
    pub stdin: &'a [u8],
    /// Bytes readable on fd 3 (the job description for the harness).
    pub spec: &'a [u8],
    /// Bytes readable on fd 4 (the per-run nonce).
    pub nonce: &'a [u8],
    /// Cap on captured stdout.
    pub stdout_cap: usize,
}

/// How a sandboxed process ended and what it wrote.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cpu_time: Duration,
    pub duration: Duration,
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr: Vec<u8>,
    /// Bytes written to fd 5 (the harness's result channel).
    pub result: Vec<u8>,
    pub isolation: Isolation,
}

/// The interpreter's real executable and its `sys.path` with `site` enabled.
fn resolve_python(configured: Option<&Path>) -> Result<Resolved, CodeCheckError> {
    let candidate: PathBuf = match configured {
        Some(p) => p.to_path_buf(),
        None if Path::new("/usr/bin/python3").exists() => PathBuf::from("/usr/bin/python3"),
        None => PathBuf::from("python3"),
    };
    // Ask the interpreter for its real executable: resolves PATH lookups and
    // launcher shims (pyenv, asdf) that would not work with a cleared environment.
    let out = Command::new(&candidate)
        .args([
            "-I",
            "-c",
            "import sys; sys.stdout.write('\\0'.join([sys.executable] + sys.path))",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CodeCheckError::Python(format!("{}: {e}", candidate.display())))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(CodeCheckError::Python(format!(
            "{} does not report its executable: {}",
            candidate.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut parts = out.stdout.split(|&b| b == 0);
    let executable = PathBuf::from(std::ffi::OsStr::from_bytes(parts.next().unwrap_or(b"")));
    let site_path: Vec<String> = parts
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let read = ReadSet::for_interpreter(&executable, &site_path)?;
    Ok((executable, site_path, Arc::new(read)))
}

fn probe_plan(
    config: &SandboxConfig,
    python: &Path,
    read: &ReadSet,
) -> Result<Plan, CodeCheckError> {
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut probe_cfg = config.clone();
    probe_cfg.wall_timeout = Duration::from_secs(20);
    probe_cfg.cpu_time_limit = Duration::from_secs(20);
    let mut last = String::new();
    for plan in Plan::candidates(is_root) {
        let req = RunRequest {
            args: vec![
                "-I".into(),
                "-B".into(),
                "-c".into(),
                "import os; os.write(5, os.read(4, 64))".into(),
            ],
            stdin: b"",
            spec: b"",
            nonce: b"ok",
            stdout_cap: 4096,
        };
        match run_with_plan(&probe_cfg, python, plan, read, &req) {
            Ok(out) if out.exit_code == Some(0) && out.result == b"ok" => return Ok(plan),
            Ok(out) => {
                last = format!(
                    "exit {:?} signal {:?}: {}",
                    out.exit_code,
                    out.signal,
                    String::from_utf8_lossy(&out.stderr)
                )
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(CodeCheckError::IsolationUnavailable(format!(
        "{} does not start under any sandbox plan (last failure: {last})",
        python.display()
    )))
}

pub(crate) fn cstring(bytes: &[u8]) -> Result<CString, CodeCheckError> {
    CString::new(bytes).map_err(|_| CodeCheckError::Sandbox("path contains a NUL byte".into()))
}

pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Everything the child needs between `fork` and `exec`, prepared in advance
/// because that code may not allocate.
struct ChildSetup {
    plan: Plan,
    workdir: CString,
    tmpfs_opts: CString,
    uid: u32,
    gid: u32,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    cpu_secs: u64,
    memory: u64,
    nproc: u64,
    fsize: u64,
    nofile: u64,
    /// (source, target) descriptor pairs to install as fds 3.. in the child.
    fds: [(RawFd, RawFd); 3],
    /// The run's Landlock ruleset (`-1` when the plan has none).
    ruleset: RawFd,
    /// Rules the child adds to the ruleset after its mounts.
    child_rules: Vec<confine::ChildRule>,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_uint = 0x8000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_file(path: &[u8], data: &[u8]) -> io::Result<()> {
    // `path` is NUL-terminated by the caller.
    // SAFETY: open/write/close are async-signal-safe; pointers are valid.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if n != data.len() as isize {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

fn set_limit(resource: Resource, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid struct; async-signal-safe.
    check(unsafe { libc::setrlimit(resource, &lim) } as libc::c_long)
}

impl ChildSetup {
    /// Runs in the forked child before `exec`: only async-signal-safe calls, no
    /// allocation. Any failure aborts the spawn, so a run never has weaker
    /// isolation than its plan says.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: raw system calls with valid, pre-built arguments.
        unsafe {
            check(libc::setsid() as libc::c_long)?;
            let flags = self.plan.unshare_flags();
            if flags != 0 {
                check(libc::unshare(flags) as libc::c_long)?;
            }
            if self.plan.user_ns {
                write_file(b"/proc/self/setgroups\0", b"deny")?;
                write_file(b"/proc/self/uid_map\0", &self.uid_map)?;
                write_file(b"/proc/self/gid_map\0", &self.gid_map)?;
            }
            if self.plan.pid_ns {
                // Only this process's children enter the new PID namespace.
                enter_pid_namespace()?;
            }
            if self.plan.mount_ns {
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) as libc::c_long)?;
                let attr = MountAttr {
                    attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    c"/".as_ptr(),
                    AT_RECURSIVE,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                ))?;
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    self.workdir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    self.tmpfs_opts.as_ptr().cast(),
                ) as libc::c_long)?;
                if self.plan.pid_ns {
                    mount_own_proc()?;
                }
            }
            check(libc::chdir(self.workdir.as_ptr()) as libc::c_long)?;

            let cpu = self.cpu_secs.max(1);
            // The first process of a PID namespace ignores SIGXCPU (the soft limit's
            // signal), so there the hard limit (SIGKILL) is the limit.
            let hard = if self.plan.pid_ns { cpu } else { cpu + 1 };
            set_limit(libc::RLIMIT_CPU, cpu, hard)?;
            set_limit(libc::RLIMIT_AS, self.memory, self.memory)?;
            set_limit(libc::RLIMIT_FSIZE, self.fsize, self.fsize)?;
            set_limit(libc::RLIMIT_NOFILE, self.nofile, self.nofile)?;
            set_limit(libc::RLIMIT_CORE, 0, 0)?;
            set_limit(libc::RLIMIT_NPROC, self.nproc, self.nproc)?;

            if self.plan.drop_uid {
                check(libc::syscall(
                    libc::SYS_setgroups,
                    0,
                    std::ptr::null::<libc::gid_t>(),
                ))?;
                check(libc::syscall(
                    libc::SYS_setresgid,
                    self.gid,
                    self.gid,
                    self.gid,
                ))?;
                check(libc::syscall(
                    libc::SYS_setresuid,
                    self.uid,
                    self.uid,
                    self.uid,
                ))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            // Set after any uid change, which clears it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long)?;
            if self.plan.landlock {
                for rule in &self.child_rules {
                    confine::add_child_rule(self.ruleset, rule)?;
                }
                confine::restrict_self(self.ruleset)?;
            }

            // Move the channel descriptors out of the way first so that
            // installing one target cannot clobber another source.
            let mut tmp = [-1 as RawFd; 3];
            for (i, (src, _)) in self.fds.iter().enumerate() {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 10);
                check(fd as libc::c_long)?;
                tmp[i] = fd;
            }
            for (i, (_, target)) in self.fds.iter().enumerate() {
                check(libc::dup2(tmp[i], *target) as libc::c_long)?;
            }
        }
        Ok(())
    }
}

/// Forks so that the program runs as the first process of the PID namespace
/// just created by `unshare`; the caller stays outside, waits for it and ends
/// the way it ended (same exit code or same signal), so the process distill
/// waits for reports the program's status and, through `wait4`, its CPU time.
///
/// The waiting process closes every descriptor (its copies of the program's
/// pipes and of the channel that reports a failed `exec` to distill, which
/// would otherwise stay open until the program ends) and dies with distill.
/// When it dies the program (the namespace's init) is killed, and with it
/// every process left in the namespace.
///
/// # Safety
/// Called between `fork` and `exec`: only raw system calls.
unsafe fn enter_pid_namespace() -> io::Result<()> {
    check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long)?;
    // A program killed by a signal that dumps core must not make the waiting
    // process (a copy of distill) dump one when it re-raises that signal.
    set_limit(libc::RLIMIT_CORE, 0, 0)?;
    let pid = libc::fork();
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        return Ok(());
    }
    libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
    let mut status = 0;
    loop {
        let r = libc::waitpid(pid, &mut status, 0);
        if r == pid {
            break;
        }
        if r < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(127);
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig);
    }
    libc::_exit(libc::WEXITSTATUS(status));
}

/// Mounts a `/proc` of the current PID namespace over the host's, read-only,
/// so the program sees only its own processes.
///
/// # Safety
/// Called between `fork` and `exec`: only raw system calls.
unsafe fn mount_own_proc() -> io::Result<()> {
    check(libc::mount(
        c"proc".as_ptr(),
        c"/proc".as_ptr(),
        c"proc".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        std::ptr::null(),
    ) as libc::c_long)
}

/// Fresh fork servers tried, each failing its first job, before a sandbox
/// falls back to spawning one interpreter per program.
const FORK_SERVER_STARTS: usize = 2;

fn next_uid(base: u32) -> u32 {
    // Distinct per concurrent run within this process, and spread across
    // processes by pid, so runs do not share an `RLIMIT_NPROC` budget or kill
    // each other's processes.
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
    let pid = std::process::id() & 0xfff;
    base.wrapping_add((pid << 12) | n)
}

/// `kill(-1, SIGKILL)` passes made by [`kill_uid_all`]; one suffices, the
/// others are a margin.
const KILL_PASSES: usize = 3;

/// Kill every process running under `uid` (a dedicated sandbox uid): a helper
/// child takes that uid and signals everything it may signal, which catches
/// processes that left the process group with `setsid`.
fn kill_uid_all(uid: u32) {
    // SAFETY: after fork the child only makes raw system calls and `_exit`s.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                libc::_exit(1);
            }
            // One pass signals every process of the uid under the kernel's task
            // list lock, and a fork racing with it fails because the forking
            // process then has SIGKILL pending, so nothing of the uid outlives a
            // pass. The result cannot tell when nothing is left (it is 0 as long
            // as any other process exists, even one we may not signal), so a
            // fixed number of passes is made.
            for _ in 0..KILL_PASSES {
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(0);
        } else if pid > 0 {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
}

/// Inode of the network namespace of `pid`, identifying the sandbox's private
/// namespace.
pub(crate) fn net_ns_inode(pid: libc::pid_t) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Kill every process in the network namespace `ns` by scanning `/proc`: without
/// a dedicated uid this is how processes that left the process group with
/// `setsid` are found. Repeats until a pass finds nothing, so processes forked
/// during a pass are caught by the next.
pub(crate) fn kill_net_ns(ns: u64) {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..100 {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut found = false;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let in_ns = std::fs::metadata(entry.path().join("ns/net"))
                .map(|m| m.ino() == ns)
                .unwrap_or(false);
            if in_ns {
                // SAFETY: signalling a process of the sandbox.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                found = true;
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How to find every process a run left behind.
#[derive(Clone, Copy)]
struct Reaper {
    pgid: libc::pid_t,
    /// Dedicated sandbox uid: kill everything running under it.
    uid: Option<u32>,
    /// Private network namespace (when no dedicated uid): kill its members.
    net_ns: Option<u64>,
}

impl Reaper {
    /// Kill the session of a sandboxed child by process group, then every
    /// process of its dedicated uid or, failing that, of its network namespace.
    fn kill_all(&self) {
        // SAFETY: signalling a process group we created.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        self.sweep();
    }

    /// Kill what escaped the process group. Both methods repeat until no
    /// process is left, so children forked meanwhile are caught too.
    fn sweep(&self) {
        if let Some(uid) = self.uid {
            kill_uid_all(uid);
        } else if let Some(ns) = self.net_ns {
            kill_net_ns(ns);
        }
    }
}

pub(crate) struct Stream {
    fd: Option<OwnedFd>,
    pub buf: Vec<u8>,
    cap: usize,
    pub truncated: bool,
}

impl Stream {
    pub fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Block until the stream is readable or `timeout` passes.
    pub fn wait_readable(&self, timeout: Duration) {
        if let Some(fd) = self.raw_fd() {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe {
                libc::poll(&mut pfd, 1, timeout.as_millis().min(60_000) as i32);
            }
        }
    }

    pub fn new(fd: OwnedFd, cap: usize) -> Self {
        set_nonblocking(fd.as_raw_fd());
        Self {
            fd: Some(fd),
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Read what is available; keep up to `cap` bytes and discard the rest.
    pub fn pump(&mut self) {
        let Some(fd) = self.fd.as_ref() else { return };
        let mut chunk = [0u8; 16384];
        loop {
            // SAFETY: reading into a stack buffer of the given length.
            let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            if n > 0 {
                let n = n as usize;
                let room = self.cap.saturating_sub(self.buf.len());
                if room < n {
                    self.truncated = true;
                }
                self.buf.extend_from_slice(&chunk[..n.min(room)]);
            } else if n == 0 {
                self.fd = None;
                return;
            } else {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if err.kind() != io::ErrorKind::WouldBlock {
                    self.fd = None;
                }
                return;
            }
        }
    }
}

/// Poll entries for the still-open output streams (readable) and input feeds (writable) of a
/// sandboxed run, with room for one more (the exit notification).
pub(crate) fn io_pollfds(streams: &[&Stream], feeds: &[&Feed<'_>]) -> Vec<libc::pollfd> {
    let entry = |fd, events| libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let mut fds = Vec::with_capacity(streams.len() + feeds.len() + 1);
    fds.extend(
        streams
            .iter()
            .filter_map(|s| s.raw_fd())
            .map(|fd| entry(fd, libc::POLLIN)),
    );
    fds.extend(
        feeds
            .iter()
            .filter_map(|f| f.raw_fd())
            .map(|fd| entry(fd, libc::POLLOUT)),
    );
    fds
}

/// Waits up to `timeout_ms` for any of `fds` (see [`io_pollfds`]), then reads the output
/// streams and writes the input feeds as far as they are ready.
pub(crate) fn poll_and_pump(
    fds: &mut [libc::pollfd],
    timeout_ms: i32,
    streams: [&mut Stream; 3],
    feeds: [&mut Feed<'_>; 3],
) {
    // SAFETY: fds is a valid array of pollfd.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
    streams.into_iter().for_each(Stream::pump);
    feeds.into_iter().for_each(Feed::pump);
}

pub(crate) struct Feed<'a> {
    fd: Option<OwnedFd>,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Feed<'a> {
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|fd| fd.as_raw_fd())
    }

    pub fn new(fd: OwnedFd, data: &'a [u8]) -> Self {
        set_nonblocking(fd.as_raw_fd());
        let mut feed = Self {
            fd: Some(fd),
            data,
            pos: 0,
        };
        feed.pump();
        feed
    }

    /// Write what the pipe accepts; close when done or when the reader is gone.
    pub fn pump(&mut self) {
        let Some(fd) = self.fd.as_ref() else { return };
        while self.pos < self.data.len() {
            let rest = &self.data[self.pos..];
            // SAFETY: writing from a valid slice.
            let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                self.pos += n as usize;
            } else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => break,
                }
            }
        }
        self.fd = None;
    }
}

/// A run's working directory and the ids it runs under.
pub(crate) struct Workdir {
    pub dir: tempfile::TempDir,
    pub uid: u32,
    pub gid: u32,
    /// Mount options of the private tmpfs mounted over `dir`.
    pub tmpfs_opts: String,
    /// The run's Landlock ruleset, when the plan confines reads.
    pub ruleset: Option<OwnedFd>,
    /// What the child adds to the ruleset after its mounts (see [`confine::ChildRule`]).
    pub child_rules: Vec<confine::ChildRule>,
}

/// Create the working directory of one run and pick its uid.
pub(crate) fn prepare_workdir(
    config: &SandboxConfig,
    plan: Plan,
    read: &ReadSet,
) -> Result<Workdir, CodeCheckError> {
    let sandbox_err = |what: &str, e: io::Error| CodeCheckError::Sandbox(format!("{what}: {e}"));
    let root = config.temp_root.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("distill-code-")
        .tempdir_in(&root)
        .map_err(|e| sandbox_err("creating the working directory", e))?;
    // SAFETY: trivial libc getters.
    let (outer_uid, outer_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let uid = if plan.drop_uid {
        next_uid(config.sandbox_uid_base)
    } else {
        outer_uid
    };
    let gid = if plan.drop_uid { uid } else { outer_gid };
    if plan.drop_uid && !plan.mount_ns {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .map_err(|e| sandbox_err("handing the working directory to the sandbox uid", e))?;
    }
    let tmpfs_opts = format!(
        "size={},mode=0700,uid={uid},gid={gid}",
        config.workdir_size_bytes.max(1 << 20)
    );
    let (ruleset, child_rules) = if plan.landlock {
        (
            Some(confine::ruleset(read)?),
            confine::child_rules(dir.path(), &config.allow_read)?,
        )
    } else {
        (None, Vec::new())
    };
    Ok(Workdir {
        dir,
        uid,
        gid,
        tmpfs_opts,
        ruleset,
        child_rules,
    })
}

fn run_with_plan(
    config: &SandboxConfig,
    python: &Path,
    plan: Plan,
    read: &ReadSet,
    req: &RunRequest<'_>,
) -> Result<RunOutcome, CodeCheckError> {
    let sandbox_err = |what: &str, e: io::Error| CodeCheckError::Sandbox(format!("{what}: {e}"));
    let Workdir {
        dir: workdir,
        uid,
        gid,
        tmpfs_opts,
        ruleset,
        child_rules,
    } = prepare_workdir(config, plan, read)?;
    // SAFETY: trivial libc getters.
    let (outer_uid, outer_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let workdir_c = cstring(workdir.path().as_os_str().as_bytes())?;
    let tmpfs_opts = cstring(tmpfs_opts.as_bytes())?;

    let (stdin_r, stdin_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;
    let (stdout_r, stdout_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;
    let (stderr_r, stderr_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;
    let (spec_r, spec_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;
    let (nonce_r, nonce_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;
    let (result_r, result_w) = pipe().map_err(|e| sandbox_err("pipe", e))?;

    let setup = ChildSetup {
        plan,
        workdir: workdir_c,
        tmpfs_opts,
        uid,
        gid,
        uid_map: format!("{outer_uid} {outer_uid} 1").into_bytes(),
        gid_map: format!("{outer_gid} {outer_gid} 1").into_bytes(),
        cpu_secs: config.cpu_time_limit.as_secs_f64().ceil() as u64,
        memory: config.memory_limit_bytes,
        nproc: config.max_processes,
        fsize: config.max_file_size_bytes,
        nofile: config.max_open_files,
        fds: [
            (spec_r.as_raw_fd(), 3),
            (nonce_r.as_raw_fd(), 4),
            (result_w.as_raw_fd(), 5),
        ],
        ruleset: ruleset.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        child_rules,
    };
    let home = workdir.path().as_os_str().to_owned();
    let mut cmd = Command::new(python);
    cmd.args(&req.args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home)
        .env("TMPDIR", &home)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .stdin(Stdio::from(stdin_r))
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr_w));
    // SAFETY: `ChildSetup::apply` only performs async-signal-safe system calls on
    // data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }
    let start = Instant::now();
    let child = cmd.spawn();
    drop(cmd); // closes the child's ends of stdin/stdout/stderr
    drop((spec_r, nonce_r, result_w, ruleset));
    let child = child.map_err(|e| sandbox_err("starting the sandboxed interpreter", e))?;
    let pid = child.id() as libc::pid_t;
    let own_ns = net_ns_inode(std::process::id() as libc::pid_t);
    let child_ns = net_ns_inode(pid);
    let reaper = Reaper {
        pgid: pid,
        uid: plan.drop_uid.then_some(uid),
        net_ns: child_ns.filter(|ns| plan.net_ns && Some(*ns) != own_ns),
    };

    let mut stdin = Feed::new(stdin_w, req.stdin);
    let mut spec = Feed::new(spec_w, req.spec);
    let mut nonce = Feed::new(nonce_w, req.nonce);
    let mut out = Stream::new(stdout_r, req.stdout_cap);
    let mut err = Stream::new(stderr_r, config.max_output_bytes);
    let mut res = Stream::new(result_r, 1 << 20);

    // SAFETY: pidfd_open on our own child; failure just means we poll on a timer.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });

    let deadline = start + config.wall_timeout;
    let mut outcome = RunOutcome {
        isolation: plan.isolation(),
        ..RunOutcome::default()
    };
    let mut exited_at: Option<Instant> = None;
    loop {
        if exited_at.is_none() {
            // Detect the exit without reaping, so the process group id cannot be
            // reused before the group is killed.
            // SAFETY: siginfo_t is plain data; waitid on our own child.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is valid to read after a successful waitid.
            let exited = r == 0 && unsafe { info.si_pid() } == pid;
            if exited {
                // Whatever the program left running dies with it.
                reaper.kill_all();
                let mut status = 0;
                // SAFETY: rusage is plain data; wait4 on our own, exited child.
                let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
                unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
                outcome.duration = start.elapsed();
                if libc::WIFEXITED(status) {
                    outcome.exit_code = Some(libc::WEXITSTATUS(status));
                } else if libc::WIFSIGNALED(status) {
                    outcome.signal = Some(libc::WTERMSIG(status));
                }
                outcome.cpu_time = Duration::from_secs(usage.ru_utime.tv_sec as u64)
                    + Duration::from_micros(usage.ru_utime.tv_usec as u64)
                    + Duration::from_secs(usage.ru_stime.tv_sec as u64)
                    + Duration::from_micros(usage.ru_stime.tv_usec as u64);
                exited_at = Some(Instant::now());
            } else if r < 0 {
                let e = io::Error::last_os_error();
                reaper.kill_all();
                return Err(sandbox_err("waiting for the sandboxed interpreter", e));
            }
        }
        let now = Instant::now();
        match exited_at {
            Some(t) => {
                let open = out.fd.is_some() || err.fd.is_some() || res.fd.is_some();
                if !open || now.duration_since(t) > Duration::from_millis(200) {
                    break;
                }
            }
            None if now >= deadline && !outcome.timed_out => {
                outcome.timed_out = true;
                reaper.kill_all();
            }
            None => {}
        }

        let mut fds = io_pollfds(&[&out, &err, &res], &[&stdin, &spec, &nonce]);
        let timeout_ms = match (&pidfd, exited_at) {
            (Some(fd), None) => {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                let left = deadline.saturating_duration_since(now);
                (left.as_millis() as i32).clamp(1, 1000)
            }
            (None, None) => 10,
            (_, Some(_)) => 20,
        };
        poll_and_pump(
            &mut fds,
            timeout_ms,
            [&mut out, &mut err, &mut res],
            [&mut stdin, &mut spec, &mut nonce],
        );
    }
    if outcome.duration.is_zero() {
        outcome.duration = start.elapsed();
    }
    drop(child);
    outcome.stdout = out.buf;
    outcome.stdout_truncated = out.truncated;
    outcome.stderr = err.buf;
    outcome.result = res.buf;
    remove_workdir(workdir);
    Ok(outcome)
}

/// Delete the working directory even if the program removed permissions from
/// its own subdirectories.
pub(crate) fn remove_workdir(dir: tempfile::TempDir) {
    let path = dir.path().to_path_buf();
    if dir.close().is_ok() {
        return;
    }
    fn unlock(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    unlock(&e.path());
                }
            }
        }
    }
    unlock(&path);
    let _ = std::fs::remove_dir_all(&path);
}
