"""A pytest run in a child process that goes on while this process runs other tests, so that two
long child runs share the machine's cores instead of waiting one after the other. Its output goes
to files: a pipe left unread while this process works would fill and stall the child. Shared by
test_simd_paths.py and test_fallback.py. Plain module, as module_twins.py."""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ChildPytest:
    """``python -m pytest -p no:cacheprovider *args`` in the repository's root with ``env``, its
    stdout and stderr in files under ``out_dir``; ``wait()`` waits for it, at most ``timeout``
    seconds from its start (then it is killed and subprocess.TimeoutExpired raised), and returns
    (returncode, stdout, stderr). ``stop()`` kills it if it still runs."""

    def __init__(self, args, env, out_dir, timeout=600):
        self.deadline = time.monotonic() + timeout
        self.out, self.err = open(Path(out_dir) / "stdout", "w"), open(Path(out_dir) / "stderr", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                                     env=env, stdout=self.out, stderr=self.err, text=True, cwd=ROOT)

    def wait(self):
        try:
            self.proc.wait(timeout=max(self.deadline - time.monotonic(), 1))
        finally:
            self.stop()
        out, err = (Path(f.name).read_text() for f in (self.out, self.err))
        return self.proc.returncode, out, err

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()
