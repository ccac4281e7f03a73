//! Warm interpreters that fork one sandboxed child per program.
//!
//! Starting a Python interpreter costs several milliseconds of CPU, most of a
//! HumanEval check. A fork server is an interpreter started once (in its own
//! session) that waits for requests on a `SOCK_SEQPACKET` socket. For each
//! program it forks a child that takes exactly the steps a freshly spawned
//! sandbox takes (new user namespace when unprivileged, new network, IPC and
//! mount namespaces, read-only root, private tmpfs working directory, resource
//! limits, its own uid, no new privileges, a death signal, a PID namespace
//! with its own `/proc`, the Landlock ruleset distill built for the run; unprivileged
//! children also drop the capabilities the user namespace gave them, which a
//! spawned sandbox loses when it executes the interpreter) and then runs the
//! same harness bootstrap on the same descriptors. The child confirms on a sync
//! pipe that every step succeeded, so a run never has weaker isolation than
//! [`Isolation`](super::Isolation) reports; a server whose children cannot set
//! up is abandoned for the spawn-per-program path.
//!
//! The server is the children's parent: it kills what is left of a child's
//! process group before reaping it, sweeps the run's uid, and reports the wait
//! status and CPU time. It exits when distill's end of the socket closes.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::confine::ReadSet;
use super::sandbox::{
    cstring, io_pollfds, kill_net_ns, net_ns_inode, pipe, poll_and_pump, prepare_workdir,
    remove_workdir, Feed, Plan, RunOutcome, RunRequest, SandboxConfig, Stream,
};
use super::{CodeCheckError, Isolation};

const SERVER: &str = include_str!("forkserver.py");

/// Why a fork-server run did not produce an outcome.
pub(crate) enum ForkError {
    /// The server could not be started or its children cannot set up the
    /// sandbox: use the spawn-per-program path instead.
    Unusable(String),
    /// This run failed.
    Run(CodeCheckError),
}

/// A running server and distill's end of its socket.
struct Server {
    child: Child,
    ctl: OwnedFd,
    /// Runs completed; a server that has never completed one is not yet
    /// known to work.
    runs: u64,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type PoolKey = (PathBuf, Plan);
static POOL: OnceLock<Mutex<HashMap<PoolKey, Vec<Server>>>> = OnceLock::new();
static UNUSABLE: OnceLock<Mutex<HashMap<PoolKey, String>>> = OnceLock::new();

fn pool() -> &'static Mutex<HashMap<PoolKey, Vec<Server>>> {
    POOL.get_or_init(|| Mutex::new(HashMap::new()))
}

fn unusable() -> &'static Mutex<HashMap<PoolKey, String>> {
    UNUSABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether fork servers were found not to work for this interpreter and plan.
pub(crate) fn known_unusable(python: &Path, plan: Plan) -> bool {
    unusable()
        .lock()
        .map(|m| m.contains_key(&(python.to_path_buf(), plan)))
        .unwrap_or(false)
}

/// The failure that made fork servers unusable for this interpreter and plan.
pub(crate) fn unusable_reason(python: &Path, plan: Plan) -> Option<String> {
    unusable()
        .lock()
        .ok()
        .and_then(|m| m.get(&(python.to_path_buf(), plan)).cloned())
}

fn mark_unusable(python: &Path, plan: Plan, why: &str) {
    tracing::warn!(
        reason = why,
        "code sandbox: fork server unusable, spawning one interpreter per program"
    );
    if let Ok(mut m) = unusable().lock() {
        m.insert((python.to_path_buf(), plan), why.to_string());
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid two-element array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Server {
    fn spawn(python: &Path, bootstrap: &str) -> io::Result<Server> {
        let (ours, theirs) = seqpacket_pair()?;
        let sock = theirs.as_raw_fd();
        let mut cmd = Command::new(python);
        cmd.args(super::runner::INTERPRETER_FLAGS)
            .args(["-c", SERVER, "distill-forkserver"])
            .arg(libc::SYS_mount_setattr.to_string())
            .arg(bootstrap)
            .arg(libc::SYS_landlock_add_rule.to_string())
            .arg(libc::SYS_landlock_restrict_self.to_string())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/")
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("OMP_NUM_THREADS", "1")
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe system calls on data prepared before
        // the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::dup2(sock, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(cmd);
        drop(theirs);
        Ok(Server {
            child,
            ctl: ours,
            runs: 0,
        })
    }

    fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; every pointer set below outlives the
        // sendmsg call, and the control buffer is 8-byte aligned and large
        // enough for one SCM_RIGHTS message with `fds`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !fds.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
            if libc::sendmsg(self.ctl.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Receive one message, waiting at most `timeout`. `Ok(None)` on timeout;
    /// an empty message means the server is gone.
    fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.ctl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; 256];
        // SAFETY: reading into a stack buffer of the given length.
        let r = unsafe {
            libc::recv(
                self.ctl.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(buf[..r as usize].to_vec()))
    }
}

fn checkout(python: &Path, plan: Plan, bootstrap: &str) -> io::Result<Server> {
    let key = (python.to_path_buf(), plan);
    if let Some(server) = pool()
        .lock()
        .ok()
        .and_then(|mut m| m.get_mut(&key).and_then(Vec::pop))
    {
        return Ok(server);
    }
    Server::spawn(python, bootstrap)
}

fn checkin(python: &Path, plan: Plan, server: Server) {
    if let Ok(mut m) = pool().lock() {
        m.entry((python.to_path_buf(), plan))
            .or_default()
            .push(server);
    }
}

/// Parse `exit <status> <user us> <system us>`.
fn parse_exit(msg: &[u8]) -> Option<(i32, Duration)> {
    let text = std::str::from_utf8(msg).ok()?;
    let mut parts = text.strip_prefix("exit ")?.split(' ');
    let status: i32 = parts.next()?.parse().ok()?;
    let user: u64 = parts.next()?.parse().ok()?;
    let system: u64 = parts.next()?.parse().ok()?;
    Some((status, Duration::from_micros(user + system)))
}

/// Run one harness program in a child of a warm fork server.
pub(crate) fn run(
    config: &SandboxConfig,
    python: &Path,
    plan: Plan,
    read: &ReadSet,
    req: &RunRequest<'_>,
) -> Result<RunOutcome, ForkError> {
    use super::runner::{marshal_spec, SpecValue, BOOTSTRAP};
    let run_err =
        |what: &str, e: io::Error| ForkError::Run(CodeCheckError::Sandbox(format!("{what}: {e}")));
    let mut work = prepare_workdir(config, plan, read).map_err(ForkError::Run)?;
    let ruleset = work.ruleset.take();
    let (stdin_r, stdin_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (stdout_r, stdout_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (stderr_r, stderr_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (spec_r, spec_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (nonce_r, nonce_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (result_r, result_w) = pipe().map_err(|e| run_err("pipe", e))?;
    let (sync_r, sync_w) = pipe().map_err(|e| run_err("pipe", e))?;

    let flags = plan.unshare_flags();
    // SAFETY: trivial libc getters.
    let (outer_uid, outer_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let bit = |b: bool| if b { "1" } else { "0" }.to_string();
    // The child's own Landlock rules, as `access NUL path NUL ...`.
    let rules = work
        .child_rules
        .iter()
        .flat_map(|r| [r.access.to_string(), r.path.to_string_lossy().into_owned()])
        .collect::<Vec<_>>()
        .join("\0");
    let workdir = String::from_utf8_lossy(work.dir.path().as_os_str().as_bytes()).into_owned();
    cstring(workdir.as_bytes()).map_err(ForkError::Run)?;
    let fields = [
        ("workdir", workdir),
        ("tmpfs_opts", work.tmpfs_opts.clone()),
        ("unshare", flags.to_string()),
        ("mount", bit(plan.mount_ns)),
        ("drop_uid", bit(plan.drop_uid)),
        ("user_ns", bit(plan.user_ns)),
        ("pid_ns", bit(plan.pid_ns)),
        ("landlock", bit(plan.landlock)),
        ("rules", rules),
        ("uid_map", format!("{outer_uid} {outer_uid} 1")),
        ("gid_map", format!("{outer_gid} {outer_gid} 1")),
        ("uid", work.uid.to_string()),
        ("gid", work.gid.to_string()),
        (
            "cpu",
            (config.cpu_time_limit.as_secs_f64().ceil() as u64)
                .max(1)
                .to_string(),
        ),
        ("memory", config.memory_limit_bytes.to_string()),
        ("fsize", config.max_file_size_bytes.to_string()),
        ("nofile", config.max_open_files.to_string()),
        ("nproc", config.max_processes.to_string()),
    ];
    let fields: Vec<(&str, SpecValue<'_>)> = fields
        .iter()
        .map(|(k, v)| (*k, SpecValue::Str(v.as_str())))
        .collect();
    let msg = marshal_spec(&fields);

    let server = checkout(python, plan, BOOTSTRAP)
        .map_err(|e| ForkError::Unusable(format!("starting the fork server: {e}")))?;
    let first = server.runs == 0;
    let start = Instant::now();
    let mut child_fds = vec![
        stdin_r.as_raw_fd(),
        stdout_w.as_raw_fd(),
        stderr_w.as_raw_fd(),
        spec_r.as_raw_fd(),
        nonce_r.as_raw_fd(),
        result_w.as_raw_fd(),
        sync_w.as_raw_fd(),
    ];
    child_fds.extend(ruleset.as_ref().map(|fd| fd.as_raw_fd()));
    let lost = |what: String| {
        if first {
            ForkError::Unusable(what)
        } else {
            ForkError::Run(CodeCheckError::Sandbox(what))
        }
    };
    if let Err(e) = server.send(&msg, &child_fds) {
        remove_workdir(work.dir);
        return Err(lost(format!("sending a job to the fork server: {e}")));
    }
    drop((
        stdin_r, stdout_w, stderr_w, spec_r, nonce_r, result_w, sync_w, ruleset,
    ));

    let reply = server.recv(Duration::from_secs(30));
    let pid: libc::pid_t = match &reply {
        Ok(Some(m)) => match std::str::from_utf8(m)
            .ok()
            .and_then(|t| t.strip_prefix("pid "))
            .and_then(|p| p.parse().ok())
        {
            Some(pid) => pid,
            None => {
                remove_workdir(work.dir);
                return Err(lost(format!(
                    "fork server answered {:?}",
                    String::from_utf8_lossy(m)
                )));
            }
        },
        other => {
            remove_workdir(work.dir);
            return Err(lost(format!("fork server did not answer: {other:?}")));
        }
    };

    // Wait for the child's confirmation that every isolation step succeeded.
    let mut sync = Stream::new(sync_r, 4096);
    let setup_deadline = start + Duration::from_secs(30);
    while sync.is_open() && Instant::now() < setup_deadline {
        sync.wait_readable(Duration::from_millis(100));
        sync.pump();
    }
    if sync.buf != b"ok" {
        let why = if sync.buf.is_empty() {
            "the sandboxed child ended before confirming its set-up".to_string()
        } else {
            format!(
                "sandboxed child set-up failed: {}",
                String::from_utf8_lossy(&sync.buf)
            )
        };
        // Collect the exit report so the server is ready for the next job.
        let _ = server.send(b"kill", &[]);
        let healthy =
            matches!(server.recv(Duration::from_secs(30)), Ok(Some(m)) if parse_exit(&m).is_some());
        remove_workdir(work.dir);
        if first {
            return Err(ForkError::Unusable(why));
        }
        if healthy {
            checkin(python, plan, server);
        }
        return Err(ForkError::Run(CodeCheckError::Sandbox(why)));
    }
    let net_ns = if plan.net_ns && !plan.drop_uid {
        let own = net_ns_inode(std::process::id() as libc::pid_t);
        net_ns_inode(pid).filter(|ns| Some(*ns) != own)
    } else {
        None
    };

    let mut stdin = Feed::new(stdin_w, req.stdin);
    let mut spec = Feed::new(spec_w, req.spec);
    let mut nonce = Feed::new(nonce_w, req.nonce);
    let mut out = Stream::new(stdout_r, req.stdout_cap);
    let mut err = Stream::new(stderr_r, config.max_output_bytes);
    let mut res = Stream::new(result_r, 1 << 20);

    let deadline = start + config.wall_timeout;
    let mut outcome = RunOutcome {
        isolation: Isolation {
            fork_server: true,
            ..plan.isolation()
        },
        ..RunOutcome::default()
    };
    let mut exited_at: Option<Instant> = None;
    let mut broken = None;
    loop {
        let now = Instant::now();
        match exited_at {
            Some(t) => {
                let open = out.is_open() || err.is_open() || res.is_open();
                if !open || now.duration_since(t) > Duration::from_millis(200) {
                    break;
                }
            }
            None if now >= deadline && !outcome.timed_out => {
                outcome.timed_out = true;
                if let Err(e) = server.send(b"kill", &[]) {
                    broken = Some(format!("asking the fork server to kill a job: {e}"));
                    break;
                }
                if let Some(ns) = net_ns {
                    kill_net_ns(ns);
                }
            }
            None => {}
        }

        let mut fds = io_pollfds(&[&out, &err, &res], &[&stdin, &spec, &nonce]);
        let timeout_ms = if exited_at.is_none() {
            fds.push(libc::pollfd {
                fd: server.ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            let left = deadline.saturating_duration_since(now);
            (left.as_millis() as i32).clamp(1, 1000)
        } else {
            20
        };
        poll_and_pump(
            &mut fds,
            timeout_ms,
            [&mut out, &mut err, &mut res],
            [&mut stdin, &mut spec, &mut nonce],
        );
        if exited_at.is_none() {
            match server.recv(Duration::ZERO) {
                Ok(None) => {}
                Ok(Some(m)) => match parse_exit(&m) {
                    Some((status, cpu)) => {
                        outcome.duration = start.elapsed();
                        if libc::WIFEXITED(status) {
                            outcome.exit_code = Some(libc::WEXITSTATUS(status));
                        } else if libc::WIFSIGNALED(status) {
                            outcome.signal = Some(libc::WTERMSIG(status));
                        }
                        outcome.cpu_time = cpu;
                        if let Some(ns) = net_ns {
                            kill_net_ns(ns);
                        }
                        exited_at = Some(Instant::now());
                    }
                    None => {
                        broken = Some(format!(
                            "fork server sent {:?}",
                            String::from_utf8_lossy(&m)
                        ));
                        break;
                    }
                },
                Err(e) => {
                    broken = Some(format!("fork server connection: {e}"));
                    break;
                }
            }
        }
    }
    if let Some(why) = broken {
        // Dropping the server closes its socket: it kills the child and exits.
        drop(server);
        if let Some(ns) = net_ns {
            kill_net_ns(ns);
        }
        remove_workdir(work.dir);
        return Err(ForkError::Run(CodeCheckError::Sandbox(why)));
    }
    let mut server = server;
    server.runs += 1;
    checkin(python, plan, server);
    outcome.stdout = out.buf;
    outcome.stdout_truncated = out.truncated;
    outcome.stderr = err.buf;
    outcome.result = res.buf;
    remove_workdir(work.dir);
    Ok(outcome)
}

/// Record that the fork server cannot be used for this interpreter and plan.
pub(crate) fn give_up(python: &Path, plan: Plan, why: &str) {
    mark_unusable(python, plan, why);
    if let Ok(mut m) = pool().lock() {
        m.remove(&(python.to_path_buf(), plan));
    }
}
