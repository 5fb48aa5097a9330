"""Helpers the training tests share."""

import json
import os
import signal
import subprocess
import time


def kill_after_first_checkpoint(command: list[str], out, timeout: float = 120.0) -> int:
    """Start ``command`` (a ``gblr train`` writing to ``out``), kill -9 it once its first checkpoint exists,
    and return the step that checkpoint holds."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoint.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return json.loads((out / "checkpoint.json").read_text())["step"]
