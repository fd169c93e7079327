"""How long the embedded default model takes to build from its seed, into an empty cache.

    python bench/default_model_build.py [--repeats N] [--pause SECONDS]

Each repeat is a fresh process (as a user's first `pref run` is): it imports torch and
transformers (every run pays that), then times `default_model_path()` into a new temporary
cache, and prints the load average it saw, the import time and the build time (on one thread,
`BUILD_THREADS`, whatever the cores). `--pause` waits between repeats so that one build's load
does not slow the next one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from machine import machine  # bench/machine.py (bench/ is on sys.path when a script runs)

ONE_BUILD = """
import os, tempfile, time
start = time.perf_counter()
import torch, transformers
from transformers import LlamaForCausalLM
from pref.plugins import default_model
imported = time.perf_counter()
load, threads = os.getloadavg()[0], default_model.BUILD_THREADS
with tempfile.TemporaryDirectory() as cache:
    begin = time.perf_counter()
    default_model.default_model_path(cache)
    built = time.perf_counter()
print(f"load average {load:.2f}, {threads} training thread(s): imports {imported - start:.1f} s, build {built - begin:.1f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=60.0, help="seconds between builds (default 60)")
    args = parser.parse_args()
    print(machine())
    for repeat in range(args.repeats):
        if repeat:
            time.sleep(args.pause)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", ONE_BUILD], capture_output=True, text=True, check=True)
        print(f"{done.stdout.strip()}; the whole process {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
