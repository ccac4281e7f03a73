import ctypes, fcntl, marshal, os, resource, signal, socket, select, sys


def _distill_forkserver():
    # A warm interpreter that forks one sandboxed child per program, so a check
    # does not pay for interpreter start-up. Each child applies the same steps
    # as a freshly spawned sandbox (own session, namespaces, read-only root,
    # private tmpfs working directory, resource limits, own uid, no new
    # privileges, death signal) before it runs the bootstrap code, and reports
    # on its sync descriptor whether every step succeeded.
    #
    # Protocol on fd 3 (a SOCK_SEQPACKET socket to distill):
    #   request: marshal dict (strings) + 7 descriptors
    #            (stdin, stdout, stderr, spec, nonce, result, sync),
    #            and an 8th, the Landlock ruleset, when the plan confines reads
    #   reply:   b"pid <pid>" right after the fork, then
    #            b"exit <wait status> <user us> <system us>" once it is reaped
    #   b"kill" from distill while a child runs kills its process group.
    #   End of file on fd 3 (distill is gone) kills the child and ends the server.
    mount_setattr_nr = int(sys.argv[2])
    bootstrap = compile(sys.argv[3], "<string>", "exec", dont_inherit=True)
    landlock_add_rule_nr, landlock_restrict_self_nr = int(sys.argv[4]), int(sys.argv[5])

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    child_argv = ["-c", "distill-sandbox"]
    ctl = socket.socket(fileno=3)
    libc = ctypes.CDLL(None, use_errno=True)
    server_pid = os.getpid()

    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x40000
    MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
    AT_FDCWD, AT_RECURSIVE = -100, 0x8000
    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

    def check(ret, what):
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))

    def setup_child(req, fds):
        os.setsid()
        flags = int(req["unshare"])
        if flags:
            check(libc.unshare(flags), "unshare")
        if req["user_ns"] == "1":
            # Unprivileged: the new user namespace maps only our own uid and gid,
            # as for a freshly spawned sandbox.
            for name, data in (("setgroups", "deny"), ("uid_map", req["uid_map"]), ("gid_map", req["gid_map"])):
                with open("/proc/self/" + name, "w") as fh:
                    fh.write(data)
        if os.getppid() != server_pid:
            raise OSError("the fork server is gone")
        if req["pid_ns"] == "1":
            # Only children enter the new PID namespace: the program runs in
            # one, as its first process, and this process waits for it.
            enter_pid_namespace(fds)
        workdir = req["workdir"].encode()
        if req["mount"] == "1":
            check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
            attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
            check(
                libc.syscall(mount_setattr_nr, AT_FDCWD, b"/", AT_RECURSIVE, attr, ctypes.sizeof(attr)),
                "making / read-only",
            )
            check(
                libc.mount(b"tmpfs", workdir, b"tmpfs", MS_NOSUID | MS_NODEV, req["tmpfs_opts"].encode()),
                "mounting the tmpfs working directory",
            )
            if req["pid_ns"] == "1":
                check(
                    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None),
                    "mounting the namespace's own /proc",
                )
        os.chdir(workdir)
        cpu = int(req["cpu"])
        # The first process of a PID namespace ignores SIGXCPU (the soft limit's
        # signal), so there the hard limit (SIGKILL) is the limit.
        cpu_hard = cpu if req["pid_ns"] == "1" else cpu + 1
        for res, soft, hard in (
            (resource.RLIMIT_CPU, cpu, cpu_hard),
            (resource.RLIMIT_AS, int(req["memory"]), int(req["memory"])),
            (resource.RLIMIT_FSIZE, int(req["fsize"]), int(req["fsize"])),
            (resource.RLIMIT_NOFILE, int(req["nofile"]), int(req["nofile"])),
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NPROC, int(req["nproc"]), int(req["nproc"])),
        ):
            resource.setrlimit(res, (soft, hard))
        if req["drop_uid"] == "1":
            uid, gid = int(req["uid"]), int(req["gid"])
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        if req["user_ns"] == "1":
            # A spawned sandbox loses the capabilities the new user namespace
            # gave it when it executes the interpreter; a forked child does
            # not execute anything, so it drops them itself.
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)()
            check(libc.capset(header, data), "dropping capabilities")
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "death signal")
        if req["landlock"] == "1":
            # The working directory (a tmpfs mounted above) and allowed paths are
            # added here, after the mounts they may lie under.
            rules = req["rules"].split("\0") if req["rules"] else []
            for access, path in zip(rules[0::2], rules[1::2]):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                attr = PathBeneath(int(access), fd)
                check(libc.syscall(landlock_add_rule_nr, fds[7], 1, ctypes.byref(attr), 0), "adding a Landlock rule")
                os.close(fd)
            check(libc.syscall(landlock_restrict_self_nr, fds[7], 0), "enforcing the Landlock ruleset")
        # Install stdin, stdout, stderr, spec, nonce, result as fds 0..5 and the
        # sync pipe as fd 6; moving them above 16 first keeps one target from
        # clobbering another source. The ruleset, if any, is closed.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 17) for fd in fds[:7]]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        os.closerange(7, 1 << 16)
        os.environ["HOME"] = req["workdir"]
        os.environ["TMPDIR"] = req["workdir"]
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    def enter_pid_namespace(fds):
        # The waiting process: dies with the server, closes every descriptor
        # (the program's pipes stay open only as long as the program), and
        # ends the way the program ended, so the server's wait4 reports the
        # program's status and CPU time. When it dies, the program (the
        # namespace's init) is killed with every process left in it.
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "death signal")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        pid = os.fork()
        if pid == 0:
            return
        try:
            os.closerange(0, 1 << 16)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                if sig not in (signal.SIGKILL, signal.SIGSTOP):
                    signal.signal(sig, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
                os.kill(os.getpid(), sig)
                os._exit(128 + sig)
            os._exit(os.waitstatus_to_exitcode(status))
        finally:
            os._exit(127)

    def run_child(req, fds):
        try:
            setup_child(req, fds)
        except BaseException as exc:
            try:
                os.write(fds[6], ("error: %s" % (exc,)).encode()[:1000])
            except BaseException:
                pass
            os._exit(127)
        os.write(6, b"ok")
        os.close(6)
        sys.argv[:] = child_argv
        try:
            exec(bootstrap, {"__name__": "__distill__"})
        finally:
            os._exit(1)

    def sweep_uid(uid):
        # Kill everything left under the run's own uid, including processes that
        # left the process group with setsid: a helper takes that uid and
        # signals all it may signal.
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                for _ in range(3):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except OSError:
                        pass
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def kill_group(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 8)
        except OSError:
            break
        if not msg:
            break
        req = marshal.loads(msg)
        expected = 8 if req.get("landlock") == "1" else 7
        if len(fds) != expected:
            for fd in fds:
                os.close(fd)
            ctl.send(b"error: expected %d descriptors" % expected)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            run_child(req, fds)
        for fd in fds:
            os.close(fd)
        ctl.send(b"pid %d" % pid)
        pidfd = os.pidfd_open(pid)
        gone = False
        while True:
            ready, _, _ = select.select([ctl, pidfd], [], [])
            if ctl in ready:
                m = ctl.recv(64)
                if not m:
                    gone = True
                    kill_group(pid)
                elif m == b"kill":
                    kill_group(pid)
            if pidfd in ready:
                break
        # Kill what is left of the group before reaping, so that its id cannot
        # be reused in between.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        kill_group(pid)
        _, status, usage = os.wait4(pid, 0)
        os.close(pidfd)
        if req["drop_uid"] == "1":
            sweep_uid(int(req["uid"]))
        if gone:
            break
        ctl.send(b"exit %d %d %d" % (status, int(usage.ru_utime * 1e6), int(usage.ru_stime * 1e6)))


_distill_forkserver()
