"""The REPL driver that runs *inside* the sandbox (``session.py`` is the host side).

Standard library only, and nothing newer than Python 3.8: it runs on whatever interpreter the
sandbox exposes, passed as ``python -I -S -X utf8 -c <this file> MAX_OUTPUT_CHARS REAP``.

Protocol: messages are a 4-byte big-endian length, then that many bytes.
- driver -> host, once at start: ``{"ready": true, "python": "3.11.2"}`` (JSON)
- host -> driver: a cell's source (UTF-8); driver -> host: ``{"output", "dropped_bytes",
  "error", "value"}`` (JSON). Every cell is exec'd in one persistent namespace; stdout and
  stderr (Python-level and fd-level, so subprocess output too) go to one pipe read by a thread
  that keeps at most 4 * MAX_OUTPUT_CHARS bytes and counts the rest; tracebacks and the repr of
  a final expression are capped at MAX_OUTPUT_CHARS characters.
- REAP == "reap" (bubblewrap mode, where this process sits in its own PID namespace): after each
  cell every other process of the namespace is killed, so nothing a cell starts outlives it.
"""

# Start-up time is paid by every fresh sandbox, so only modules that cost nothing to import:
# ``_thread`` and ``_ast`` instead of ``threading`` and ``ast``, a small JSON writer instead of
# ``json`` (which pulls in ``re``, ``enum``, ``collections``); ``traceback`` loads at the first error.
import _ast
import _thread
import builtins
import io
import os
import sys
import time

DRIVER_FILENAME = "<string>"  # the filename CPython gives code passed with -c
SYNC_TIMEOUT_S = 2.0
SIGKILL = 9
CELL_SOURCES = {}  # filename -> source, for tracebacks


def read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_cell(fd):
    header = read_exact(fd, 4)
    if header is None:
        return None
    body = read_exact(fd, int.from_bytes(header, "big"))
    return None if body is None else body.decode("utf-8", "surrogatepass")


JSON_ESCAPES = {i: f"\\u{i:04x}" for i in range(32)}
JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 10: "\\n", 9: "\\t", 13: "\\r"})


def to_json(value):
    """JSON for the reply's values: str, int, bool, None, and flat dicts of them."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return '"' + value.translate(JSON_ESCAPES) + '"'
    return "{" + ",".join(to_json(str(k)) + ":" + to_json(v) for k, v in value.items()) + "}"


def write_message(fd, message):
    # lone surrogates (from odd bytes a cell printed) become literal \udcXX escapes: valid JSON
    body = to_json(message).encode("utf-8", "backslashreplace")
    view = memoryview(len(body).to_bytes(4, "big") + body)
    while view:
        view = view[os.write(fd, view) :]


def cap_head(text, max_chars):
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... {len(text) - max_chars} more characters truncated]"


def cap_tail(text, max_chars):
    """Keep the end of a traceback: its last line says what went wrong."""
    if len(text) <= max_chars:
        return text
    return f"[... {len(text) - max_chars} earlier characters truncated]\n{text[-max_chars:]}"


class OutputCapture:
    """Drains the cell-output pipe on a thread so a writer never blocks; keeps a bounded head.

    ``sync`` writes a random marker through the pipe and waits until the reader has seen it,
    so everything written before the cell ended is accounted to that cell.
    """

    def __init__(self, read_fd, marker_fd, limit_bytes):
        self.read_fd = read_fd
        self.marker_fd = marker_fd
        self.limit_bytes = limit_bytes
        self.kept = bytearray()
        self.total = 0
        self.pending = b""
        self.marker = None
        self.lock = _thread.allocate_lock()
        self.synced = _thread.allocate_lock()  # held until the reader sees the marker
        self.synced.acquire()

    def run(self):
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            try:
                with self.lock:
                    self.pending += chunk
                    self._scan()
            except MemoryError:
                continue

    def _scan(self):
        marker = self.marker
        if marker is not None:
            at = self.pending.find(marker)
            if at >= 0:
                self._keep(self.pending[:at])
                self.pending = self.pending[at + len(marker) :]
                self.marker = None
                self.synced.release()
                return
        hold = 31  # a marker is 32 bytes: hold back a possible prefix of one
        if len(self.pending) > hold:
            cut = len(self.pending) - hold
            self._keep(self.pending[:cut])
            self.pending = self.pending[cut:]

    def _keep(self, data):
        self.total += len(data)
        room = self.limit_bytes - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def sync(self):
        marker = b"\x00EPRL-END-" + os.urandom(11).hex().encode("ascii")
        with self.lock:
            self.marker = marker
        arrived = False
        try:
            os.write(self.marker_fd, marker)
            arrived = self.synced.acquire(timeout=SYNC_TIMEOUT_S)
        except OSError:
            pass
        with self.lock:
            if self.marker is not None:  # it never arrived (the cell closed the pipe)
                self.marker = None
                self._keep(self.pending)
                self.pending = b""
            elif not arrived:  # it arrived just after the timeout: hold the lock again
                self.synced.acquire()

    def take(self):
        with self.lock:
            data, dropped = bytes(self.kept), self.total - len(self.kept)
            self.kept = bytearray()
            self.total = 0
        return data, dropped


def format_exception(exc):
    import linecache
    import traceback

    for filename, source in CELL_SOURCES.items():
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == DRIVER_FILENAME:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def reap_zombies():
    """Collect exited children: zombies would count against RLIMIT_NPROC."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def reap_other_processes():
    """Kill every process of this PID namespace except its init and this driver, then reap."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            os.kill(-1, SIGKILL)
        except OSError:  # ESRCH: nothing left to signal
            return
        reap_zombies()
        time.sleep(0.001)


class Driver:
    def __init__(self, max_output_chars, reap):
        self.max_output_chars = max_output_chars
        self.reap = reap
        self.pid = os.getpid()
        self.protocol_in = os.dup(0)
        self.protocol_out = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        read_fd, self.output_fd = os.pipe()
        self.capture = OutputCapture(read_fd, self.output_fd, 4 * max_output_chars)
        _thread.start_new_thread(self.capture.run, ())
        self.stdout = self._stream(1)
        self.stderr = self._stream(2)
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.cell_count = 0

    @staticmethod
    def _stream(fd):
        raw = io.FileIO(fd, "w", closefd=False)
        return io.TextIOWrapper(
            raw,
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
            write_through=True,
        )

    def _redirect(self):
        # Restored before every cell: a previous cell may have closed or replaced them.
        os.dup2(self.output_fd, 1)
        os.dup2(self.output_fd, 2)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        sys.stdin = io.StringIO()

    def _flush(self):
        for stream in {
            id(s): s for s in (sys.stdout, sys.stderr, self.stdout, self.stderr)
        }.values():
            try:  # noqa: SIM105 (contextlib would cost an import at start-up)
                stream.flush()
            except BaseException:  # a cell may have set anything as sys.stdout
                pass

    def run_cell(self, code):
        self.cell_count += 1
        filename = f"<cell {self.cell_count}>"
        CELL_SOURCES[filename] = code
        self._redirect()
        error = value = None
        try:
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                expression = _ast.Expression(last.value)
                result = eval(compile(expression, filename, "eval"), self.namespace)
                if result is not None:
                    value = cap_head(repr(result), self.max_output_chars)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt end the cell, not the REPL
            try:
                error = cap_tail(format_exception(exc), self.max_output_chars)
            except BaseException as format_error:
                error = f"{type(exc).__name__} (formatting its traceback failed: {format_error!r})"
        finally:
            if os.getpid() != self.pid:  # a process forked by the cell unwound back to here
                self._flush()
                os._exit(0)
        self._flush()
        return error, value

    def serve(self):
        write_message(self.protocol_out, {"ready": True, "python": sys.version.split()[0]})
        while True:
            code = read_cell(self.protocol_in)
            if code is None:
                return
            error, value = self.run_cell(code)
            if self.reap:
                reap_other_processes()
            else:
                reap_zombies()
            self.capture.sync()
            data, dropped = self.capture.take()
            output = data.decode("utf-8", "replace")
            if len(output) > self.max_output_chars:
                dropped += len(output[self.max_output_chars :].encode("utf-8"))
                output = output[: self.max_output_chars]
            try:
                reply = {"output": output, "dropped_bytes": dropped, "error": error, "value": value}
                write_message(self.protocol_out, reply)
            except MemoryError:
                write_message(
                    self.protocol_out,
                    {"output": "", "dropped_bytes": 0, "error": "MemoryError", "value": None},
                )


if __name__ == "__main__":
    Driver(int(sys.argv[1]), sys.argv[2] == "reap").serve()
    os._exit(0)
