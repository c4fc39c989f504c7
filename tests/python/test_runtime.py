"""Threads, the released GIL, zero-copy inputs and the kernel timer."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import altgrad
from altgrad import _core


def test_set_and_get_num_threads():
    before = altgrad.get_num_threads()
    try:
        altgrad.set_num_threads(1)
        assert altgrad.get_num_threads() == 1
        q = torch.randn(1, 64, 2, 8, dtype=torch.float64)
        one = altgrad.attention(q, q, q, method="poly")
        altgrad.set_num_threads(3)
        assert altgrad.get_num_threads() == 3
        torch.testing.assert_close(altgrad.attention(q, q, q, method="poly"), one, rtol=0, atol=0)
    finally:
        altgrad.set_num_threads(before)
    assert altgrad.get_num_threads() == before


def test_gil_is_released_during_the_kernel():
    # While one thread runs a long exact attention (~35 GFLOP: 0.1–0.3 s on 2 cores), a
    # pure-Python loop in this thread must advance.
    q = torch.randn(1, 8192, 4, 32)
    done = threading.Event()
    elapsed = []

    def work():
        t0 = time.perf_counter()
        altgrad.attention(q, q, q)
        elapsed.append(time.perf_counter() - t0)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    ticks = 0
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    th.join()
    # With the GIL held, no tick could run during the call; released, roughly one per ms.
    assert elapsed[0] > 0.02 and ticks >= 0.2 * elapsed[0] / 0.001, (ticks, elapsed)


def test_inputs_are_read_in_place():
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    arr = q.detach().numpy()
    assert arr.__array_interface__["data"][0] == q.data_ptr()  # the view _core reads


def test_kernel_seconds_are_recorded():
    q = torch.randn(2, 512, 4, 16, requires_grad=True)
    t0 = _core.kernel_seconds_total()
    o = altgrad.attention(q, q, q, method="poly", causal=True)
    fwd = _core.last_kernel_seconds()
    o.sum().backward()
    bwd = _core.last_kernel_seconds()
    assert fwd > 0 and bwd > 0
    assert abs(_core.kernel_seconds_total() - t0 - fwd - bwd) < 1e-9


@pytest.mark.parametrize("value,warned", [("bogus", True), ("AVX2", True), ("avx2", False), ("generic", False)])
def test_an_unknown_simd_level_is_named_on_stderr(value, warned):
    # ALTGRAD_SIMD caps the instruction set; a value it does not know is ignored, but not silently
    code = "import torch, altgrad; q = torch.randn(1, 3, 1, 4); altgrad.attention(q, q, q)"
    env = dict(os.environ, ALTGRAD_SIMD=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (f'ALTGRAD_SIMD="{value}" is not avx512, avx2 or generic: ignored' in out.stderr) == warned, out.stderr


def test_a_simd_level_that_is_not_utf8_is_named_too():
    # a value that is not UTF-8 was ignored silently (read with env::var); now named, its bytes escaped
    code = "import torch, altgrad; q = torch.randn(1, 3, 1, 4); altgrad.attention(q, q, q)"
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env[b"ALTGRAD_SIMD"] = b"avx\xff"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'ALTGRAD_SIMD="avx\\xFF" is not avx512, avx2 or generic: ignored' in out.stderr, out.stderr
