"""The compiled CPU search for D <= 8 (vqfast/ops/search_cpu.cpp): the float64 argmin wherever
float64 has a clear winner, ties to the lowest index, NaN as torch.argmin, the same answer on any
number of threads, and the GEMM path with one warning where it cannot be built."""

import warnings

import pytest
import torch

import vqfast
from vqfast import functional as vf
from vqfast.ops import reference, search_cpu

pytestmark = pytest.mark.skipif(search_cpu.library() is None, reason="no C++ compiler here to build the CPU search")


@pytest.fixture(autouse=True)
def eager():
    vqfast.set_backend("eager")
    yield
    vqfast.set_backend(None)


def clear_rows_agree(z, book, got):
    """Rows whose float64 top-2 gap exceeds the fp32 ranking's error bound (8 D eps times the
    centred squared norms: the search centres on the codebook's mean) get float64's argmin."""
    d = torch.cdist(z.double(), book.double()).square()
    top2 = d.topk(2, dim=1, largest=False).values
    mu = book.double().mean(0)
    scale = (z.double() - mu).square().sum(1) + (book.double() - mu).square().sum(1).max()
    clear = (top2[:, 1] - top2[:, 0]) > 8 * z.shape[1] * torch.finfo(torch.float32).eps * scale
    assert clear.float().mean() > 0.5  # the test has teeth: most rows have a clear winner
    assert torch.equal(got[clear], d.argmin(1)[clear])


@pytest.mark.parametrize("D", range(1, 9))
@pytest.mark.parametrize("offset", [0.0, 20.0, 300.0])
def test_float64_argmin_where_it_is_clear(D, offset):
    g = torch.Generator().manual_seed(D)
    book = offset + torch.randn(300, D, generator=g) * (0.1 if offset == 300 else 1.0)
    z = offset + torch.randn(1000, D, generator=g) * (0.1 if offset == 300 else 1.0)
    assert search_cpu.applies(z.device, torch.float32, D)
    clear_rows_agree(z, book, vf.nearest_code(z, book))


def test_ties_go_to_the_lowest_index_and_nan_as_torch_argmin():
    g = torch.Generator().manual_seed(0)
    book = torch.randn(50, 4, generator=g)
    book[37] = book[5]  # a duplicate code: equal scores, the lower index wins
    z = torch.cat([book[5:6] + 1e-3, torch.randn(9, 4, generator=g)])
    z[3, 1] = float("nan")
    got = vf.nearest_code(z, book)
    assert got[0] == 5 and got[3] == 0
    book[20, 2] = float("nan")  # a NaN code: every centred code is NaN, every row gets 0
    assert vf.nearest_code(z, book).tolist() == [0] * 10


def test_any_thread_count_gives_the_same_indices():
    g = torch.Generator().manual_seed(1)
    book, z = torch.randn(1000, 4, generator=g), torch.randn(5000, 4, generator=g)
    mu, centred, norms = reference.centred_codebook(book, torch.float32)
    before = torch.get_num_threads()
    try:
        answers = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            answers.append(search_cpu.nearest(z - mu, centred, norms))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, answers[0]) for a in answers)


def test_without_a_compiler_the_gemm_path_answers_after_one_warning(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(2)
    book, z = torch.randn(256, 4, generator=g), torch.randn(500, 4, generator=g)
    fast = vf.nearest_code(z, book)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("VQFAST_CACHE", str(tmp_path))
    search_cpu.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU codebook search is unavailable .*no-such-compiler"):
            slow = vf.nearest_code(z, book)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            assert torch.equal(vf.nearest_code(z, book), slow)
    finally:
        search_cpu.library.cache_clear()
    clear_rows_agree(z, book, slow)
    clear_rows_agree(z, book, fast)
