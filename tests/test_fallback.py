"""Without a compiled extension the package still works, warns once, and says which backend ran.
With RNNREC_FAST_REQUIRE_EXT=1 (make test, CI) a missing extension is a failure, never a skip."""
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import rnnrec_fast
from rnnrec_fast import backends
from rnnrec_fast._checks import env_flag

from childrun import ChildPytest
from conftest import RUN_SEED

BLOCK_EXTENSION = """
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("rnnrec_fast._C", "rnnrec_fast._C_cuda"{extra}):
            raise {exc}(f"{{name}} blocked for this test")
sys.meta_path.insert(0, Block())
warnings.simplefilter("always")
import torch, rnnrec_fast
import rnnrec_fast.recsys, rnnrec_fast.serving.fastpath, rnnrec_fast.serving.recommender  # (their own _C imports)
torch.manual_seed({seed})  # (this run's seed: fresh weights and inputs each run)
ref = torch.nn.GRU(4, 6, num_layers=2, batch_first=True)
ours = rnnrec_fast.from_torch(ref)
x = torch.randn(3, 5, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        y, h = ours(x)
mine = [w for w in caught if "rnnrec_fast" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in mine]
assert mine[0].filename == "<string>", mine[0].filename  # points at the caller's line, not at torch's
msgs = [str(mine[0].message)]
print(msgs[0])
torch.testing.assert_close(y, ref(x)[0], rtol=1e-5, atol=1e-6)
print("backend", rnnrec_fast.last_backend(), ours.active_backend())
# gradients through the op's Python autograd registration (the C++ one comes with the extension)
assert "RecurrenceFn" not in type(y.grad_fn).__name__ + y.grad_fn.name(), y.grad_fn.name()
# without hx and with it (h0's gradient), with h_n in the loss and without (its gradient reaches
# the op's backward as None: zeros, as torch.nn)
hx = torch.randn(2, 3, 6)
for h, use_h_n in ((None, True), (hx, True), (hx, False)):
    grads = []
    for m in (ours, ref):
        inputs = [x.clone().requires_grad_()] + ([] if h is None else [h.clone().requires_grad_()])
        out, hn = m(*inputs)
        loss = out.square().sum() + (hn.sum() if use_h_n else 0)
        grads.append(torch.autograd.grad(loss, inputs + list(m.parameters())))
    names = ["x"] + ([] if h is None else ["hx"]) + [n for n, _ in ours.named_parameters()]
    for name, g, want in zip(names, *grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"hx {{h is not None}}, h_n {{use_h_n}}: grad {{name}}: {{m}}")
second = []  # double backward (the Python registration's differentiable backward) against torch.nn's
for m in (ours, ref):
    xg = x.clone().requires_grad_()
    gx, = torch.autograd.grad(m(xg)[0].square().sum(), xg, create_graph=True)
    second.append(torch.autograd.grad(gx.square().sum(), [xg] + list(m.parameters())))
for g, want in zip(*second):
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
print("gradients ok")
# a None for a tensor either op requires: a TypeError naming it, through the Python autograd
# registrations and kernels (an AttributeError from the kernels' checks before)
xt, wi, wh = x.transpose(0, 1), ours.weight_ih_l0, ours.weight_hh_l0
y0, hn0, ws0 = torch.ops.rnnrec_fast.recurrence(xt, None, wi, wh, None, None, None, None, "gru", True, "auto")
fwd = dict(x=xt, w_ih=wi, w_hh=wh)
bwd = dict(grad_output=torch.ones_like(y0), grad_h_n=torch.zeros_like(hn0), **fwd, output=y0, workspace=ws0)
for op, given, names in ((torch.ops.rnnrec_fast.recurrence, fwd, ("x", "w_ih", "w_hh")),
                         (torch.ops.rnnrec_fast.recurrence_backward, bwd, tuple(bwd))):
    for name in names:
        a = {{**given, name: None}}
        args = ((a["x"], None, a["w_ih"], a["w_hh"], None, None, None, None) if op is torch.ops.rnnrec_fast.recurrence
                else (a["grad_output"], a["grad_h_n"], a["x"], None, a["w_ih"], a["w_hh"], None, None, None, None,
                      a["output"], a["workspace"]))
        try:
            op(*args, "gru", True, "auto")
        except TypeError as e:
            assert f"rnnrec_fast.recurrence: {{name}} must be a tensor, got None" == str(e), e
        else:
            raise AssertionError(f"{{op}}: {{name}} None passed")
print("None refused")
"""


# (an extension failing to load with another error than ImportError falls back the same way)
@pytest.mark.parametrize("block_numba,expected,exc", [(False, "numba", "ImportError"), (True, "reference", "ImportError"),
                                                      (False, "numba", "RuntimeError")])
def test_works_without_extension(block_numba, expected, exc):
    code = BLOCK_EXTENSION.format(extra=', "numba"' if block_numba else "", exc=exc, seed=RUN_SEED)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'cpp' backend is not available" in out.stdout
    assert f"backend {expected} {expected}" in out.stdout
    assert "gradients ok" in out.stdout
    assert "None refused" in out.stdout
    # numba missing: the warning says why the slower reference backend runs (it did not; a review)
    assert ("'numba' not available: " in out.stdout) == block_numba, out.stdout


def test_a_numba_that_fails_to_import_is_not_called_missing():
    """numba installed, its import failing (NUMBA_NUM_THREADS=0: numba's ValueError): the numba
    backend's reason says its import failed, not 'needs the numba package (pip install numba)'."""
    env = dict(os.environ, NUMBA_NUM_THREADS="0")
    out = subprocess.run([sys.executable, "-c", "from rnnrec_fast import backends; "
                          "print(backends.unavailable_reason('numba'))"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "importing numba failed: ValueError(" in out.stdout and "pip install numba" not in out.stdout, out.stdout


# the extension blocked before anything imports it (a script's start, or a sitecustomize.py)
_SITE_BLOCKER = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("rnnrec_fast._C", "rnnrec_fast._C_cuda"):
            raise ModuleNotFoundError(f"{name} blocked for this test", name=name)
sys.meta_path.insert(0, _Block())
"""

NUMBA_INTERPRETED = _SITE_BLOCKER + """
import warnings
import torch, rnnrec_fast
torch.manual_seed(SEED)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for dtype in (torch.float32, torch.float64):
        ref = torch.nn.GRU(4, 3, dtype=dtype)
        x = torch.randn(3, 2, 4, dtype=dtype)
        for backend in ("auto", "numba"):
            m = rnnrec_fast.from_torch(ref, backend=backend)
            xs = [x.clone().requires_grad_() for _ in range(2)]
            outs = [mod(xi)[0] for mod, xi in zip((m, ref), xs)]
            print(dtype, backend, rnnrec_fast.last_backend())
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(outs[0], outs[1], **tol)
            g = [torch.autograd.grad(o.square().sum(), [xi] + list(mod.parameters()))
                 for o, xi, mod in zip(outs, xs, (m, ref))]
            for a, b in zip(*g):
                torch.testing.assert_close(a, b, **tol)
mine = [str(w.message) for w in caught if "rnnrec_fast" in str(w.message)]
assert len(mine) == 1 and "'numba' passed over: NUMBA_DISABLE_JIT=1" in mine[0], mine
print("ok")
"""


def test_numba_with_its_jit_disabled():
    """NUMBA_DISABLE_JIT=1 (numba installed, its kernels run as Python): "auto" takes the reference
    backend, saying why in its one warning (the kernels run hundreds of times slower interpreted), and
    a forced "numba" gives torch.nn's results in both dtypes: float64 ones were wrong by up to ~5
    there (an int32 sum that compiled code widens overflowed in NumPy; from a review)."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", NUMBA_INTERPRETED.replace("SEED", str(RUN_SEED))], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.float64 auto reference" in out.stdout and "torch.float64 numba numba" in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("ok")


def test_extension_is_built_when_required():
    if not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("set RNNREC_FAST_REQUIRE_EXT=1 to require the compiled extension")
    assert backends.available("cpp"), backends.unavailable_reason("cpp")
    assert rnnrec_fast.resolve_backend("auto", "cpu", __import__("torch").float32) == "cpp"


def test_a_dtype_the_fast_backend_lacks_warns_once_and_says_so(monkeypatch):
    """float16 on the CPU: the C++ kernels do float32/float64 only, so another backend runs; the
    warning says that (not that the extension is missing), once, and last_backend() names it."""
    from rnnrec_fast import ops
    import torch
    import warnings

    if not backends.available("cpp"):
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(ops, "_resolved", {})
    monkeypatch.setattr(ops, "_warned", set())
    module = rnnrec_fast.GRU(3, 4, dtype=torch.float16)
    x = torch.randn(5, 2, 3, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            module(x)
    msgs = [str(w.message) for w in caught if "rnnrec_fast" in str(w.message)]
    assert len(msgs) == 1 and "does not support torch.float16" in msgs[0], msgs
    assert rnnrec_fast.last_backend() in ("numba", "reference")
    assert rnnrec_fast.last_backend() in msgs[0]


def test_numba_backend_without_a_writable_cache(tmp_path):
    """A read-only install with no writable user cache directory: numba refuses cache=True there
    (it raised while numba_cpu was imported, so the backend was lost with an 'unknown' reason, and
    the recommender's optimiser failed at its first step); the kernels are then compiled per process
    and the backend and training work, with one warning that says so and how to cache them."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(rnnrec_fast.__file__)))
    shutil.copytree(os.path.join(root, "rnnrec_fast"), tmp_path / "rnnrec_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    for d in [tmp_path / "rnnrec_fast"] + [p for p in (tmp_path / "rnnrec_fast").rglob("*") if p.is_dir()]:
        (d / "__pycache__").write_text("")  # no in-tree cache anywhere in the package
    home = tmp_path / "home"
    home.write_text("")  # no user cache either
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "x"), PYTHONPATH=str(tmp_path))
    code = ("import torch, rnnrec_fast\n"
            "from rnnrec_fast import backends\n"
            "assert rnnrec_fast.__file__.startswith(%r), rnnrec_fast.__file__\n"
            "assert backends.available('numba'), backends.unavailable_reason('numba')\n"
            "x, h0 = torch.randn(3, 2, 4), torch.randn(2, 5)\n"
            "w = [torch.randn(15, 4), torch.randn(15, 5), torch.randn(15), torch.randn(15)]\n"
            "y = rnnrec_fast.recurrence(x, h0, *w, backend='numba')[0]\n"
            "torch.testing.assert_close(y, rnnrec_fast.recurrence(x, h0, *w, backend='reference')[0])\n"
            "from rnnrec_fast import recsys\n"  # the recommender's numba optimiser too
            "ds = recsys.SessionDataset.from_log(recsys.synthetic_clicks(60, 20, seed=0))\n"
            "recsys.train(ds, recsys.TrainConfig(layers=[8], epochs=1, n_sample=4, batch_size=4), progress=False)\n"
            "print('numba ok')\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "numba ok" in out.stdout
    assert out.stderr.count("numba cannot cache its compiled kernels here") == 1, out.stderr
    assert "NUMBA_CACHE_DIR" in out.stderr
    # the fallback warning (the extension missing) then does not promise a cache (a review: it said
    # "once: they are cached on disk" right after numba's own warning said they are not); an
    # unwritable NUMBA_CACHE_DIR is named as the problem
    code = _SITE_BLOCKER + "import torch, rnnrec_fast\nrnnrec_fast.GRU(3, 4)(torch.randn(2, 1, 3))\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(env, NUMBA_CACHE_DIR=str(home / "x")), cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "in every process: numba cannot cache them here" in out.stderr and "cached on disk" not in out.stderr
    assert f"NUMBA_CACHE_DIR={str(home / 'x')!r} is not a writable directory" in out.stderr, out.stderr[-3000:]


def test_a_backend_failing_to_import_is_unavailable_with_its_reason(monkeypatch, tmp_path):
    """Any error while a backend module is imported (not only ImportError) makes the backend
    unavailable with the reason in backend_info; forcing it raises that reason."""
    (tmp_path / "broken_backend_mod.py").write_text("raise RuntimeError('cannot set up: no locator')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._MODULES, "broken", "broken_backend_mod")
    monkeypatch.setattr(backends, "_errors", {})
    assert not backends.available("broken")
    assert backends.unavailable_reason("broken") == "RuntimeError: cannot set up: no locator"
    with pytest.raises(RuntimeError, match="backend 'broken' is not available .*no locator"):
        backends.load("broken")


def test_numba_on_cuda_needs_a_usable_numba_cuda(monkeypatch):
    """CUDA tensors without the CUDA extension: "auto" took the numba backend whenever numba
    imported, though numba.cuda also needs a driver, NVVM and libdevice (a machine with a GPU can
    lack the toolkit), and then failed at the first launch. Now the backend says why it cannot run
    on CUDA here: "auto" falls back to the next one, a forced "numba" raises with the reason."""
    import torch
    from rnnrec_fast import ops
    from rnnrec_fast.backends import numba_backend

    if not backends.available("numba"):
        pytest.skip("numba backend unavailable")
    if not torch.cuda.is_available():  # the real probe on a machine without a GPU
        assert "no usable CUDA driver" in numba_backend.device_unavailable("cuda")
    assert numba_backend.device_unavailable("cpu") is None

    real = backends.available  # (the others as they are: without the extension, cpp is not)
    monkeypatch.setattr(backends, "available", lambda name: name != "cuda" and real(name))
    for why, auto in (("numba.cuda cannot load NVVM", "reference"), (None, "numba")):
        monkeypatch.setattr(numba_backend, "_cuda_probe", [why])
        monkeypatch.setattr(ops, "_resolved", {})
        monkeypatch.setattr(ops, "_warned", set())
        with pytest.warns(RuntimeWarning, match="'cuda' backend is not available") as rec:
            assert ops.resolve_backend("auto", "cuda", torch.float32) == auto
        assert ("'numba'" in str(rec[0].message)) == (why is None)  # the fallbacks it names
        assert ops.resolve_backend("auto", "cpu", torch.float32) in ("cpp", "numba")
        if why is None:
            assert ops.resolve_backend("numba", "cuda", torch.float32) == "numba"
        else:
            with pytest.raises(RuntimeError, match="backend 'numba' cannot run on 'cuda' tensors here: "
                                                   "numba.cuda cannot load NVVM"):
                ops.resolve_backend("numba", "cuda", torch.float32)
            assert ops.resolve_backend("numba", "cpu", torch.float32) == "numba"
    # on a machine with a GPU, backend_info says why numba does not run there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(numba_backend, "_cuda_probe", ["numba.cuda cannot load NVVM"])
    assert ops.backend_info()["numba"] == "available, but not on CUDA tensors: numba.cuda cannot load NVVM"
    assert ops.backend_info()["reference"] == "available"


def test_the_missing_extension_warning_comes_once_per_device(monkeypatch):
    """With the C++ backend unavailable, float32 then float64 CPU calls warn once in all. (This and
    the next are from a mutation review: each failed on a mutant the suite let through.)"""
    from rnnrec_fast import ops

    monkeypatch.setattr(ops, "_resolved", {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.delitem(backends._loaded, "cpp", raising=False)
    monkeypatch.setitem(backends._errors, "cpp", "ImportError: blocked for this test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float64, torch.float32):
            assert ops.resolve_backend("auto", "cpu", dtype) != "cpp"
    msgs = [str(w.message) for w in caught if "rnnrec_fast" in str(w.message)]
    assert len(msgs) == 1 and "'cpp' backend is not available" in msgs[0], msgs


def test_each_dtype_the_fast_backend_lacks_warns_once(monkeypatch):
    """float16 then bfloat16 on the CPU: one
    warning for each dtype, none repeated."""
    from rnnrec_fast import ops

    if not backends.available("cpp"):
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(ops, "_resolved", {})
    monkeypatch.setattr(ops, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float16, torch.bfloat16, torch.float16, torch.bfloat16):
            ops.resolve_backend("auto", "cpu", dtype)
    msgs = [str(w.message) for w in caught if "rnnrec_fast" in str(w.message)]
    assert len(msgs) == 2 and "torch.float16" in msgs[0] and "torch.bfloat16" in msgs[1], msgs


# the selection of the child run below: the op's reference, gradcheck, padding and opcheck tests, the
# modules' parity tests and the serving fast path's
_REGISTRATION_SELECT = ("matches_reference or gradcheck or padding_past or opcheck or parity_with_torch or test_cells "
                        "or bias_changed_in_place or forward_mode_ad or forward_ad_is_never or documented_migration "
                        "or reverse_mode_func or fast_path_follows or fast_path_applies_to_multilayer or double_backward "
                        "or another_default_device_is_set")


@pytest.fixture(scope="module", autouse=True)
def registration_run(request, tmp_path_factory):
    """test_op_and_module_tests_pass_through_the_python_registrations' child run, started at this
    module's first test where that test is selected, so that it runs (~40 s on 2 cores) beside this
    module's other child processes instead of after them; with OMP_WAIT_POLICY=PASSIVE, so that its
    torch thread pool does not spin against theirs. Stopped at the module's end if still running."""
    if not any(getattr(item, "originalname", None) == "test_op_and_module_tests_pass_through_the_python_registrations"
               for item in request.session.items):
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "RNNREC_FAST_REQUIRE_EXT"}
    env.update(RNNREC_FAST_TEST_BLOCK_EXT="1", RNNREC_FAST_TEST_SEED=str(RUN_SEED),  # (this run's inputs)
               OMP_WAIT_POLICY="PASSIVE")
    run = ChildPytest(["-q", "-rs", "-W", "ignore::RuntimeWarning", "tests/test_op.py", "tests/test_modules.py",
                       "tests/test_serving.py", "-k", _REGISTRATION_SELECT], env, tmp_path_factory.mktemp("registration"))
    yield run
    run.stop()


def test_op_and_module_tests_pass_through_the_python_registrations(registration_run):
    """Without the extension the op's autograd is the Python registration (ops._backward,
    _setup_context: what CUDA tensors and installs without _C use), which the in-process tests
    never reach on a CPU machine (the C++ AutogradCPU kernel takes CPU calls). The op's reference,
    gradcheck, padding and opcheck tests, the modules' parity tests and the serving fast path's
    (whose steps then run numba's kernels directly) run here with _C blocked
    (conftest: RNNREC_FAST_TEST_BLOCK_EXT=1), in the child process registration_run started. (From a
    review: the Python backward dropping resets passed the whole suite; from a mutation review: the
    fast path's numba steps made their output on a default device set elsewhere, and only this run
    reaches them.)"""
    returncode, out, err = registration_run.wait()
    assert returncode == 0, out[-3000:] + err[-3000:]
    assert "backend cpp unavailable: ImportError: cannot import name '_C'" in out  # (its skips, as a missing build's)
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 800, out[-3000:]


@pytest.mark.parametrize("how", ["compiled first call", "python -m CLI"])
def test_the_fallback_warning_points_at_the_callers_line(tmp_path, how):
    """The one warning names the user's line also where the first call is a torch.compile'd one
    (it named the code torch.compile generated, in its cache folder) and, for this package's
    command line run with python -m, the CLI's entry (it named <frozen runpy>); from a review."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SITE_BLOCKER)  # (the blocker before any import)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    if how == "python -m CLI":
        data = tmp_path / "clicks.tsv"
        data.write_text("SessionId\tItemId\tTime\n1\t5\t1\n1\t6\t2\n1\t7\t3\n2\t5\t4\n2\t7\t5\n3\t6\t6\n3\t5\t7\n")
        cmd = [sys.executable, "-m", "rnnrec_fast.recsys", "train", "--train", str(data), "--epochs", "1",
               "--layers", "4", "--n-sample", "2", "--batch-size", "2", "--quiet"]
        where = os.path.join("rnnrec_fast", "recsys", "__main__.py")
    else:
        cmd = [sys.executable, "-c", "import torch, rnnrec_fast\n"
               "m = rnnrec_fast.GRU(8, 6, batch_first=True)\n"
               "torch.compile(m, fullgraph=True)(torch.randn(4, 5, 8))\n"]
        where = "<string>:3"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if "RuntimeWarning: rnnrec_fast: the 'cpp' backend" in ln]
    assert len(lines) == 1 and where in lines[0].split(": RuntimeWarning")[0], out.stderr[-3000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_a_backend_loads_waits_for_it(tmp_path, monkeypatch):
    """A fork while another thread loads a backend (numba's import takes seconds; a DataLoader
    worker forked then): the fork waits for the load, and the child's first call of that backend
    returns (it waited forever on the backends' lock and on Python's lock of the module being
    imported, held by a thread the child does not have)."""
    import threading
    import time

    (tmp_path / "rnnrec_slow_backend_for_test.py").write_text("import time\ntime.sleep(0.6)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._MODULES, "slow", "rnnrec_slow_backend_for_test")
    loader = threading.Thread(target=backends.load, args=("slow",))
    loader.start()
    time.sleep(0.2)  # (the load under way: its import sleeping)
    pid = os.fork()
    if pid == 0:  # (the child: the load, then out; a watchdog ends a wait that would last forever)
        threading.Timer(20, lambda: os._exit(3)).start()
        backends.load("slow")
        os._exit(0)
    loader.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    monkeypatch.delitem(sys.modules, "rnnrec_slow_backend_for_test", raising=False)
    backends._loaded.pop("slow", None)


def test_a_missing_numba_is_called_missing():
    """numba not installed (importing it a ModuleNotFoundError for numba itself): the numba
    backend's reason says to install it; a package numba needs missing (llvmlite) is numba failing
    to import, not numba missing (mutation check: neither message was pinned; the first clause
    could go, and every missing numba read 'cannot run: importing numba failed')."""
    for blocked, want, not_want in [("numba", "needs the numba package (pip install numba)", "importing numba failed"),
                                    ("llvmlite", "importing numba failed: ModuleNotFoundError(", "pip install numba")]:
        code = (f"import sys; sys.modules[{blocked!r}] = None\n"
                "from rnnrec_fast import backends\n"
                "print(backends.unavailable_reason('numba'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert want in out.stdout and not_want not in out.stdout, (blocked, out.stdout)


def test_the_numba_cuda_probe_names_what_is_missing(monkeypatch):
    """The numba backend's CUDA probe, driver by driver: a driver that sees a GPU without NVVM says
    NVVM is missing; with NVVM but no libdevice it says numba.cuda is not usable, with libdevice's
    error; with all three nothing is missing (mutation review: dropping the NVVM or the libdevice
    check passed the suite, which runs the probe only on a machine without a driver)."""
    from rnnrec_fast.backends import numba_backend

    if not backends.available("numba"):
        pytest.skip("numba backend unavailable")
    try:
        numba_backend._cuda()
        from numba import cuda
        from numba.cuda.cudadrv import nvvm
    except ImportError as exc:
        pytest.skip(f"numba.cuda cannot be imported here: {exc}")
    if numba_backend._cuda().SIMULATOR:
        pytest.skip("the probe finds nothing missing under the CUDA simulator")

    def no_libdevice():
        raise RuntimeError("libdevice not found for this test")

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvvm, "is_available", lambda: False)
    assert numba_backend._probe_cuda() == ("numba.cuda cannot load NVVM (libnvvm, from a CUDA toolkit) to "
                                           "compile its kernels")
    monkeypatch.setattr(nvvm, "is_available", lambda: True)
    monkeypatch.setattr(nvvm, "get_libdevice", no_libdevice)
    assert numba_backend._probe_cuda() == "numba.cuda is not usable: libdevice not found for this test"
    monkeypatch.setattr(nvvm, "get_libdevice", lambda: b"")
    assert numba_backend._probe_cuda() is None
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert numba_backend._probe_cuda() == "numba.cuda finds no usable CUDA driver and GPU"


def test_an_unknown_backend_name_is_not_available():
    """available() answers False for a name the registry does not know (load() raises a ValueError
    for it), and unavailable_reason() says 'unknown'; from a mutation review: the ValueError
    escaped available() unnoticed."""
    assert backends.available("fortran") is False
    assert backends.unavailable_reason("fortran") == "unknown"
    with pytest.raises(ValueError, match=r"unknown backend 'fortran'; choose one of \('auto', 'cuda', 'cpp', "
                                         r"'numba', 'reference'\)"):
        backends.load("fortran")


_FORK_IN_LOAD = """
import os, sys, threading
sys.path.insert(0, {tmp!r})
threading.Timer(30, lambda: os._exit(3)).start()  # (a wait that would last forever ends the run)
from rnnrec_fast import backends
backends._MODULES.update(forks="rnnrec_forking_backend_for_test", other="rnnrec_other_backend_for_test")
backends.load("forks")  # its import forks, under the registry's lock held by this thread
print("load that forks ok", flush=True)
pid = os.fork()
if pid == 0:  # a forked child's other threads load too (the parent's lock, held over the fork, is not theirs)
    t = threading.Thread(target=backends.load, args=("other",))
    t.start()
    t.join(10)
    os._exit(4 if t.is_alive() else 0 if "other" in backends._loaded else 5)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
os._exit(0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_inside_a_load_and_a_forked_childs_threads_do_not_wait_forever(tmp_path):
    """A backend whose import forks (the fork, in the thread that holds the registry's lock, must not
    wait on itself: the lock is reentrant), and, in a forked child, a load from another thread than
    the forking one (the child has a lock of its own, not the parent's held over the fork). From a
    mutation review: a plain Lock, or the child keeping the parent's lock, hung here and passed the
    suite."""
    (tmp_path / "rnnrec_forking_backend_for_test.py").write_text(
        "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n")
    (tmp_path / "rnnrec_other_backend_for_test.py").write_text("")
    out = subprocess.run([sys.executable, "-c", _FORK_IN_LOAD.format(tmp=str(tmp_path))], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    assert out.stdout.split() == ["load", "that", "forks", "ok", "child", "0"], out.stdout


def test_a_backend_cannot_run_on_a_device_type_it_does_not_list():
    """device_unavailable() says a backend does not run on a device type missing from its DEVICES,
    and supports() then refuses it, before any probe of the backend's own (from a mutation review:
    the check could go, and no caller noticed: each tests DEVICES itself first)."""
    if not backends.available("cpp"):
        pytest.skip("the C++ extension is not built")
    assert backends.device_unavailable("cpp", "cuda") == "backend 'cpp' does not run on 'cuda' tensors"
    assert backends.device_unavailable("reference", "meta") == "backend 'reference' does not run on 'meta' tensors"
    assert backends.device_unavailable("cpp", "cpu") is None and backends.device_unavailable("reference", "cuda") is None
    assert not backends.supports("cpp", "cuda", torch.float32) and backends.supports("cpp", "cpu", torch.float32)


def test_the_cuda_backend_says_why_it_is_missing():
    """Without the CUDA extension the cuda backend's reason says which of the two causes it is: a
    CPU-only torch (nothing to build against), or an extension not built / not loadable, with how
    to build it (from a mutation review: the two could swap and nothing noticed)."""
    if backends.available("cuda"):
        pytest.skip("the CUDA extension is built here")
    reason = backends.unavailable_reason("cuda")
    if torch.version.cuda is None:
        assert reason.startswith(f"ImportError: torch {torch.__version__} is a CPU-only build: "), reason
        assert "pip install" not in reason, reason
    else:
        assert reason.startswith("ImportError: the extension rnnrec_fast._C_cuda is not built or cannot be "
                                 "loaded (build it with nvcc on PATH"), reason
