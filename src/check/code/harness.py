import sys, os, json, types, ast, traceback, linecache, builtins


def _distill_harness():
    # Bind everything the harness needs before any untrusted code runs, so that
    # a program monkeypatching modules cannot change how results are reported.
    _read, _write, _close, _exit, _getpid = os.read, os.write, os.close, os._exit, os.getpid
    _dumps, _loads = json.dumps, json.loads
    _format_exc = traceback.format_exception
    _isinstance, _str, _len = isinstance, str, len
    _pid = _getpid()
    _state = {"done": False}

    def read_all(fd):
        chunks = []
        while True:
            b = _read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        _close(fd)
        return b"".join(chunks)

    def flush_std():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass

    def report(status, **fields):
        # Forked children that fall back into the harness must not report.
        if _getpid() != _pid or _state["done"]:
            _exit(1)
        _state["done"] = True
        flush_std()
        # The nonce is read only now, after the tests have returned.
        nonce = read_all(4).decode("ascii", "replace")
        fields["status"] = status
        fields["nonce"] = nonce
        data = (_dumps(fields) + "\n").encode()
        while data:
            data = data[_write(5, data):]
        _close(5)

    def describe(exc):
        text = "".join(_format_exc(type(exc), exc, exc.__traceback__))
        return {
            "exc_type": type(exc).__name__,
            "message": _str(exc)[:1000],
            "traceback": text[-4000:],
        }

    def classify(exc, in_tests):
        if _isinstance(exc, MemoryError):
            return "memory_error"
        if in_tests and _isinstance(exc, AssertionError):
            return "wrong_answer"
        return "runtime_error"

    def register_source(name, src):
        linecache.cache[name] = (_len(src), None, src.splitlines(True), name)

    def compile_program(src, name):
        try:
            code = compile(src, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            fields = describe(exc)
            fields["traceback"] = fields["traceback"][-2000:]
            report("syntax_error", **fields)
            _exit(0)
        register_source(name, src)
        return code

    def defines(src, name):
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            return False
        return any(
            _isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
            for n in tree.body
        )

    def assemble(prompt, completion, entry_point):
        if not prompt.strip():
            return completion
        if entry_point and defines(completion, entry_point):
            # The completion restates the whole function: keep the prompt's
            # imports and helpers when the prompt compiles on its own, and let the
            # completion's definition replace the prompt's stub.
            try:
                compile(prompt, "<prompt>", "exec", dont_inherit=True)
                return prompt.rstrip() + "\n\n" + completion
            except (SyntaxError, ValueError):
                return completion
        return prompt + completion

    spec = _loads(read_all(3))
    mode = spec["mode"]

    if mode == "function":
        program = assemble(spec.get("prompt") or "", spec["completion"], spec.get("entry_point"))
        code = compile_program(program, "<solution>")
        tests = []
        if spec.get("setup"):
            tests.append(("setup", spec["setup"]))
        if spec.get("test_code"):
            tests.append(("test", spec["test_code"]))
        for i, a in enumerate(spec.get("asserts") or []):
            tests.append(("assert", a))
        compiled_tests = []
        for i, (kind, src) in enumerate(tests):
            name = "<test_%d>" % i
            try:
                compiled_tests.append((kind, compile(src, name, "exec", dont_inherit=True)))
            except (SyntaxError, ValueError) as exc:
                report("harness_error", test_index=i, **describe(exc))
                _exit(0)
            register_source(name, src)
        module = types.ModuleType("solution")
        module.__dict__["__builtins__"] = builtins
        sys.modules["solution"] = module
        namespace = module.__dict__
        try:
            exec(code, namespace)
        except SystemExit as exc:
            report("early_exit", phase="program", code=repr(exc.code)[:200])
            _exit(0)
        except BaseException as exc:
            report(classify(exc, False), phase="program", **describe(exc))
            _exit(0)
        test_index = None
        phase = "tests"
        unit = -1
        try:
            for kind, compiled in compiled_tests:
                if kind == "setup":
                    phase, test_index = "setup", None
                else:
                    unit += 1
                    phase, test_index = "tests", unit
                exec(compiled, namespace)
                if kind == "test" and spec.get("entry_point"):
                    entry = spec["entry_point"]
                    if entry not in namespace:
                        raise NameError("entry point %r is not defined" % entry)
                    namespace["check"](namespace[entry])
        except SystemExit as exc:
            report("early_exit", phase=phase, test_index=test_index, code=repr(exc.code)[:200])
            _exit(0)
        except BaseException as exc:
            report(classify(exc, phase == "tests"), phase=phase, test_index=test_index, **describe(exc))
            _exit(0)
        report("pass", tests_run=unit + 1)
        _exit(0)

    elif mode == "stdio":
        code = compile_program(spec["completion"], "<solution>")
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        try:
            exec(code, module.__dict__)
        except SystemExit as exc:
            c = exc.code
            if c is None:
                status = 0
            elif _isinstance(c, int):
                status = c & 0xFF
            else:
                try:
                    sys.stderr.write(_str(c) + "\n")
                except BaseException:
                    pass
                status = 1
            report("exit", code=status)
            _exit(status)
        except BaseException as exc:
            fields = describe(exc)
            try:
                sys.stderr.write(fields["traceback"])
            except BaseException:
                pass
            report(classify(exc, False), **fields)
            _exit(1)
        # Programs often run their solution in a thread (to get a bigger stack);
        # wait for those like a normal interpreter exit would.
        import threading
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        report("exit", code=0)
        _exit(0)
    else:
        report("harness_error", message="unknown mode %r" % (mode,))
        _exit(0)


_distill_harness()
