import sys, builtins, marshal, posix


def _distill_harness(spec_bytes):
    # Bind everything the harness needs before any untrusted code runs, so that
    # a program monkeypatching modules cannot change how results are reported.
    # Only built-in modules are imported up front (interpreter start-up dominates
    # the cost of a check); modules needed to describe a failure are imported
    # when a failure is reported.
    _read, _write, _close, _exit, _getpid = posix.read, posix.write, posix.close, posix._exit, posix.getpid
    _marshal_loads = marshal.loads
    _isinstance, _str, _len, _int, _repr, _type = isinstance, str, len, int, repr, type
    _module_type = type(sys)
    _pid = _getpid()
    _state = {"done": False}
    _sources = {}
    _escapes = {i: "\\u%04x" % i for i in range(32)}
    _escapes[ord('"')] = '\\"'
    _escapes[ord("\\")] = "\\\\"

    def encode_value(v):
        if v is None:
            return "null"
        if v is True or v is False:
            return "true" if v else "false"
        if _isinstance(v, _int):
            return _int.__repr__(v)
        # Lone surrogates cannot be encoded as UTF-8; replace them.
        text = _str.encode(_str(v), "utf-8", "replace").decode("utf-8")
        return '"' + text.translate(_escapes) + '"'

    def encode_report(fields):
        return "{" + ",".join(encode_value(k) + ":" + encode_value(v) for k, v in fields.items()) + "}"

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
        data = (encode_report(fields) + "\n").encode()
        while data:
            data = data[_write(5, data):]
        _close(5)

    def describe(exc):
        try:
            message = _str(exc)[:1000]
        except BaseException:
            message = "<unprintable exception>"
        try:
            import linecache, traceback

            for name, src in _sources.items():
                linecache.cache[name] = (_len(src), None, src.splitlines(True), name)
            text = "".join(traceback.format_exception(_type(exc), exc, exc.__traceback__))
        except BaseException:
            text = "%s: %s\n" % (_type(exc).__name__, message)
        return {
            "exc_type": _type(exc).__name__,
            "message": message,
            "traceback": text[-4000:],
        }

    def classify(exc, in_tests):
        if _isinstance(exc, MemoryError):
            return "memory_error"
        if in_tests and _isinstance(exc, AssertionError):
            return "wrong_answer"
        return "runtime_error"

    def register_source(name, src):
        # Put into linecache when a traceback is formatted.
        _sources[name] = src

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
        # A top-level definition needs a line starting with one of these keywords
        # and the name in the source; skip parsing (and importing ast) otherwise.
        if src.isascii() and not (
            name in src
            and any(line.lstrip().startswith(("def", "async", "class")) for line in src.splitlines())
        ):
            return False
        import ast

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

    spec = _marshal_loads(spec_bytes)
    mode = spec["mode"]

    # The interpreter runs without the site module: restore the module search
    # path it would have set up and the exit()/quit() builtins it would define.
    if spec.get("sys_path"):
        sys.path[:] = spec["sys_path"]
    if not hasattr(builtins, "exit"):

        class Quitter:
            def __init__(self, name):
                self.name = name

            def __repr__(self):
                return "Use %s() or Ctrl-D (i.e. EOF) to exit" % self.name

            def __call__(self, code=None):
                try:
                    sys.stdin.close()
                except BaseException:
                    pass
                raise SystemExit(code)

        builtins.exit = Quitter("exit")
        builtins.quit = Quitter("quit")

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
        module = _module_type("solution")
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
        module = _module_type("__main__")
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
        threading = sys.modules.get("threading")
        if threading is not None:
            for t in threading.enumerate():
                if t is not threading.main_thread() and not t.daemon:
                    t.join()
        report("exit", code=0)
        _exit(0)
    else:
        report("harness_error", message="unknown mode %r" % (mode,))
        _exit(0)


_distill_harness(_distill_spec)
