"""The compiled CPU search (vqfast/ops/search_cpu.cpp), both kernels (D <= 8, and the GEMM-shaped
one above): the float64 argmin wherever float64 has a clear winner, ties to the lowest index
across micro-tiles and cache blocks, NaN as torch.argmin, the same answer on any number of
threads and at either vector width (8 lanes on AVX2, 16 on AVX-512: both built and run here),
and the GEMM path with one warning where it cannot be built."""

import ctypes
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


#: Small D's kernel (1..8) and the GEMM-shaped one: a partial micro-tile of dimensions (9), the
#: real codebooks' 64 and 256 (several 192 KiB blocks of codes and 256 KiB panels of rows at 256
#: with K = 301 and N = 1000), an odd D, and a D whose block of codes is a single micro-tile.
DIMS = [*range(1, 9), 9, 64, 100, 256, 4100]


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("offset", [0.0, 20.0, 300.0])
def test_float64_argmin_where_it_is_clear(D, offset):
    g = torch.Generator().manual_seed(D)
    # K = 301 and N = 1000: a partial group of codes and a partial micro-tile of rows
    book = offset + torch.randn(301, D, generator=g) * (0.1 if offset == 300 else 1.0)
    z = offset + torch.randn(1000, D, generator=g) * (0.1 if offset == 300 else 1.0)
    if D > 1000:  # random rows at this D are all about equally far from every code: rows near codes
        z = book[torch.randint(0, 301, (1000,), generator=g)] + (z - offset) * 0.5
    assert search_cpu.applies(z.device, torch.float32, D)
    clear_rows_agree(z, book, vf.nearest_code(z, book))


@pytest.mark.parametrize("D", [4, 7, 8, 64, 256])  # one chain of FMAs, two (odd and even D), the GEMM shape
def test_ties_go_to_the_lowest_index_and_nan_as_torch_argmin(D):
    g = torch.Generator().manual_seed(0)
    book = torch.randn(400, D, generator=g)
    # duplicates of codes 5 and 200 in the same micro-tile, a later one, a later block of codes
    # (192 KiB of codes: 192 at D = 256) and the partial group at the end: the lower index wins
    for copy in (7, 37, 250, 399):
        book[copy] = book[5]
    book[390] = book[200]
    z = torch.cat([book[5:6] + 1e-3, book[200:201] - 1e-3, torch.randn(30, D, generator=g)])
    z[3, 1] = float("nan")
    got = vf.nearest_code(z, book)
    assert got[0] == 5 and got[1] == 200 and got[3] == 0
    book[20, 2] = float("nan")  # a NaN code: every centred code is NaN, every row gets 0
    assert vf.nearest_code(z, book).tolist() == [0] * len(z)


@pytest.mark.parametrize("D", [4, 64])
def test_any_thread_count_gives_the_same_indices(D):
    g = torch.Generator().manual_seed(1)
    book, z = torch.randn(1000, D, generator=g), torch.randn(5000, D, generator=g)
    mu, centred, norms = reference.centred_codebook(book, torch.float32)
    before = torch.get_num_threads()
    try:
        answers = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            answers.append(search_cpu.nearest(z, mu, centred, norms))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, answers[0]) for a in answers)


@pytest.mark.parametrize("D", [9, 64, 256])
def test_either_vector_width_gives_the_same_indices(D):
    """The 16-lane build that AVX-512 machines compile (here also on AVX2: the compiler splits its
    vectors) against the 8-lane one: every score takes the same operations in the same order,
    so the indices are the same, not merely close."""
    g = torch.Generator().manual_seed(3)
    book, z = torch.randn(500, D, generator=g), torch.randn(777, D, generator=g)
    mu, centred, norms = reference.centred_codebook(book, torch.float32)
    answers = []
    for lanes in (8, 16):
        lib = search_cpu.declare(ctypes.CDLL(str(search_cpu.build((f"VQFAST_LANES={lanes}",)))))
        answers.append(search_cpu.nearest(z, mu, centred, norms, lib=lib))
    assert torch.equal(answers[0], answers[1])
    clear_rows_agree(z, book, answers[0])


@pytest.mark.parametrize("D", [4, 64])
def test_rows_are_read_where_they_lie(D):
    """NCHW latents (pixels at stride 1, channels at stride H W), channels_last, a sliced image
    whose pixels do not merge into one stride, transposed rows, half precision: the indices of
    the same rows made contiguous, and no copy of z where its strides allow (NCHW)."""
    g = torch.Generator().manual_seed(4)
    book = torch.randn(300, D, generator=g)
    z = torch.randn(3, D, 9, 7, generator=g)
    mu, centred, norms = reference.centred_codebook(book, torch.float32)
    want = search_cpu.nearest(z.permute(0, 2, 3, 1).contiguous(), mu, centred, norms)
    assert torch.equal(vf.nearest_code(z, book), want.view(3, 9, 7))
    assert torch.equal(vf.nearest_code(z.contiguous(memory_format=torch.channels_last), book), want.view(3, 9, 7))
    sliced = z[:, :, ::2, 1:]
    assert torch.equal(vf.nearest_code(sliced, book), want.view(3, 9, 7)[:, ::2, 1:])
    rows = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.equal(vf.nearest_code(rows.t().contiguous().t(), book), want)
    half = z.half()
    assert torch.equal(vf.nearest_code(half, book), search_cpu.nearest(half.float().permute(0, 2, 3, 1), mu, centred, norms).view(3, 9, 7))
    nchw = z.movedim(1, -1)
    assert search_cpu._batches(nchw).data_ptr() == z.data_ptr()  # a view: no copy of the latents


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
