"""A Python process that imports modules once, then runs scripts in fresh processes forked from it.

A tiny pref run spends most of its ~12 s on 2 cores importing torch, transformers and its plugins' libraries;
tests that start many such processes (tests/test_fault_injection.py kills a run and starts it again, several
times) pay that once here. The server only imports: it runs no pref code, builds no model and draws no random
number, so a script forked from it does what `python SCRIPT ARGS` would do from the same imports: its own pid,
its exit status (-9 when killed with SIGKILL), its atexit handlers, its stdout and stderr in its own file.

`WarmPython(preload)` starts the server (`python warm_python.py MODULE...`), which answers one JSON line per
request line: {"run": SCRIPT, "args": [...], "log": FILE} -> {"pid": PID}, and {"wait": PID, "timeout": S} ->
{"code": EXIT_CODE, "timed_out": BOOL} (a process still running after S seconds is killed). When its input
closes it kills the processes it started that were not waited for, and ends.
"""

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time


class WarmPython:
    """The test's side: `start` a script in a process forked from the server."""

    def __init__(self, preload: list[str], env: dict[str, str] | None = None):
        self.server = subprocess.Popen([sys.executable, __file__, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)

    def ask(self, request: dict) -> dict:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the warm Python server ended (exit status {self.server.wait()}); its error is above")
        return json.loads(answer)

    def start(self, script: str, args: list[str], log: str) -> "Started":
        """A process running `python SCRIPT ARGS`, its stdout and stderr written to the file `log`."""
        return Started(self, self.ask({"run": script, "args": list(args), "log": log})["pid"], log)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


class Started:
    def __init__(self, python: WarmPython, pid: int, log: str):
        self.python, self.pid, self.log = python, pid, log

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the process to end: its exit status (-N: killed by signal N) and its output."""
        answer = self.python.ask({"wait": self.pid, "timeout": timeout})
        with open(self.log, encoding="utf-8", errors="replace") as f:
            output = f.read()
        assert not answer["timed_out"], f"still running after {timeout} s:\n{output[-4000:]}"
        return answer["code"], output


def serve(preload: list[str]) -> None:
    for name in preload:
        importlib.import_module(name)
    running: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            sys.stdout.flush()  # nothing of the server's left in a buffer for the child to write again
            pid = os.fork()
            if pid == 0:
                run_script(request["run"], request["args"], request["log"])  # does not return
            running.add(pid)
            answer = {"pid": pid}
        else:
            pid, deadline = request["wait"], time.monotonic() + request["timeout"]
            done, status = os.waitpid(pid, os.WNOHANG)
            while not done and time.monotonic() < deadline:
                time.sleep(0.05)
                done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
            running.discard(pid)
            answer = {"code": os.waitstatus_to_exitcode(status), "timed_out": not done}
        print(json.dumps(answer), flush=True)
    for pid in running:  # the test ended without waiting for them (it failed): no process is left behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os._exit(0)  # the interpreter's teardown of the preloaded modules (~3 s) has nothing to save


def run_script(script: str, args: list[str], log: str) -> None:
    """In the forked process: run `script` as `__main__`, its output to `log`, and exit as Python would after it."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)  # not the server's answers
    os.dup2(out, 2)
    os.close(out)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)  # an exception or SystemExit leaves as it would leave `python SCRIPT`: a traceback and 1, or its code


if __name__ == "__main__":
    serve(sys.argv[1:])
