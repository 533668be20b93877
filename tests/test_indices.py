"""KV-buffer index generators (SPEC §8): exact lists at the window/HCA edges, chunk/decode layouts
resolving to the same absolute positions as prefill, bad inputs."""
from __future__ import annotations

import doctest

import pytest
import torch

import v4kernels as v4k
import v4kernels.ops.indices as indices_mod
from v4kernels.testing.cases.indices import naive_compressed_indices, naive_window_indices

W = 128
EDGE_T = [0, 126, 127, 128, 255, 256]


def _row(t: list[int]) -> list[int]:
    return [int(v) for v in t]




@pytest.fixture(autouse=True)
def _reference_backend(reference_backend_for):
    with reference_backend_for(("window_indices", "compressed_indices")):
        yield

# --------------------------------------------------------------------- hand-derived lists, SPEC §8.2
def _decode_window_expected(t: int) -> list[int]:
    # SPEC §8.2: t >= 127 -> [(t+1) mod 128, …, 127, 0, …, t mod 128]; else [0, …, t, −1 × (127 − t)]
    if t >= W - 1:
        start = (t + 1) % W
        return list(range(start, W)) + list(range(0, start))
    return list(range(t + 1)) + [-1] * (W - 1 - t)


def test_decode_window_edges_exact():
    out = v4k.window_indices(EDGE_T, 1, W, "decode")
    assert out.shape == (len(EDGE_T), 1, W) and out.dtype == torch.int32
    expected = {
        0: [0] + [-1] * 127,
        126: list(range(127)) + [-1],
        127: list(range(128)),
        128: list(range(1, 128)) + [0],
        255: list(range(128)),
        256: list(range(1, 128)) + [0],
    }
    for b, t in enumerate(EDGE_T):
        assert _row(out[b, 0]) == expected[t] == _decode_window_expected(t), t


def test_prefill_window_edges_exact():
    s = 300
    out = v4k.window_indices(0, s, W, "prefill")
    assert out.shape == (1, s, W)
    expected = {
        0: [0] + [-1] * 127,
        126: list(range(127)) + [-1],
        127: list(range(128)),
        128: list(range(1, 129)),
        255: list(range(128, 256)),
        256: list(range(129, 257)),
    }
    for i in EDGE_T:
        assert _row(out[0, i]) == expected[i], i
    # the first entry of every row is valid and the row always contains the token itself (SPEC §8.3)
    assert bool((out[0, :, 0] >= 0).all())
    assert bool((out[0] == torch.arange(s, dtype=torch.int32)[:, None]).any(-1).all())


def test_prefill_short_sequence_width():
    out = v4k.window_indices([0, 0], 5, W, "prefill")
    assert out.shape == (2, 5, 5)  # width min(S, window)
    assert _row(out[1, 2]) == [0, 1, 2, -1, -1]
    assert _row(out[0, 4]) == [0, 1, 2, 3, 4]


def test_hca_decode_edges_exact():
    out = v4k.compressed_indices(EDGE_T, 1, 128, 128, "decode")
    assert out.shape == (len(EDGE_T), 1, 2)  # max (t + 1) // 128 over the batch = 257 // 128
    expected = {0: [-1, -1], 126: [-1, -1], 127: [128, -1], 128: [128, -1], 255: [128, 129], 256: [128, 129]}
    for b, t in enumerate(EDGE_T):
        assert _row(out[b, 0]) == expected[t], t
    # a single sequence at t gets width (t+1)//128: the list grows by one every 128 tokens
    for t, width in [(0, 0), (126, 0), (127, 1), (255, 2), (256, 2)]:
        assert v4k.compressed_indices(t, 1, 128, 128, "decode").shape == (1, 1, width)


def test_hca_prefill_edges_exact():
    s = 300
    out = v4k.compressed_indices(0, s, 128, s, "prefill")
    assert out.shape == (1, s, 2)
    expected = {0: [-1, -1], 126: [-1, -1], 127: [300, -1], 128: [300, -1], 255: [300, 301], 256: [300, 301]}
    for i in EDGE_T:
        assert _row(out[0, i]) == expected[i], i


def test_csa_causal_limit_small_ratio():
    out = v4k.compressed_indices(0, 10, 4, 0, "prefill")
    counts = (out[0] >= 0).sum(-1).tolist()
    assert counts == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # (t + 1) // 4: t = 3 sees entry 0, t = 2 none


# --------------------------------------------------------------------- layouts resolve to positions
def _positions_from_slots(slots: list[int], start_pos: int, seq_len: int, t: int, mode: str) -> list[int]:
    """Map KV-buffer rows back to absolute positions for the query at ``t``."""
    out = []
    for s in slots:
        if s < 0:
            continue
        if mode == "prefill":
            out.append(s)
        elif mode == "decode" or s < W:
            # ring slot: the one position p in (t − W, t] with p % W == s (decode) or in
            # [start_pos − W, start_pos) (chunk)
            hi = t if mode == "decode" else start_pos - 1
            p = hi - ((hi - s) % W)
            out.append(p)
        else:
            out.append(start_pos + s - W)
    return out


def test_chunk_and_decode_resolve_to_prefill_positions():
    total = 400
    ref = v4k.window_indices(0, total, W, "prefill")[0]
    ref_c = v4k.compressed_indices(0, total, 4, total, "prefill")[0]
    bounds = [0, 1, 50, 177, 178, 305, 400]
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = b - a
        win = v4k.window_indices(a, s, W, "chunk")[0]
        comp = v4k.compressed_indices(a, s, 4, W + s, "chunk")[0]
        for i in range(s):
            t = a + i
            assert _positions_from_slots(_row(win[i]), a, s, t, "chunk") == _positions_from_slots(_row(ref[t]), 0, total, t, "prefill"), t
            got_c = [v - (W + s) for v in _row(comp[i]) if v >= 0]
            exp_c = [v - total for v in _row(ref_c[t]) if v >= 0]
            assert got_c == exp_c, t
    for t in [0, 5, 126, 127, 128, 200, 255, 256, 399]:
        dec = v4k.window_indices(t, 1, W, "decode")[0, 0]
        assert _positions_from_slots(_row(dec), t, 1, t, "decode") == _positions_from_slots(_row(ref[t]), 0, total, t, "prefill")


def test_chunk_layout_slots():
    out = v4k.window_indices([130, 5], 3, 4, "chunk")
    # positions 127..130 for t = 130: ring slots 3, 0, 1 then chunk row 0 at window + 0
    assert _row(out[0, 0]) == [3, 0, 1, 4]
    assert _row(out[0, 2]) == [1, 4, 5, 6]
    assert _row(out[1, 0]) == [2, 3, 0, 4]


def test_batch_with_different_positions():
    sp = [3, 700, 128]
    out = v4k.compressed_indices(sp, 1, 128, 128, "decode")
    assert out.shape == (3, 1, 701 // 128)
    assert torch.equal(out, naive_compressed_indices(sp, 1, 128, 128, "decode"))
    assert torch.equal(v4k.window_indices(sp, 1, W, "decode"), naive_window_indices(sp, 1, W, "decode"))


@pytest.mark.parametrize("mode,sp,s", [("prefill", [0, 0], 37), ("decode", [0, 9, 131], 1), ("chunk", [0, 9, 131], 20)])
@pytest.mark.parametrize("window", [1, 8, 128])
def test_against_naive(mode, sp, s, window):
    assert torch.equal(v4k.window_indices(sp, s, window, mode), naive_window_indices(sp, s, window, mode))
    for ratio in (1, 4, 7, 128):
        assert torch.equal(v4k.compressed_indices(sp, s, ratio, 3, mode), naive_compressed_indices(sp, s, ratio, 3, mode))


# --------------------------------------------------------------------- empty, device, torch.library
def test_empty():
    assert v4k.window_indices([0, 0], 0, W, "prefill").shape == (2, 0, 0)
    assert v4k.window_indices([], 4, W, "chunk").shape == (0, 4, W)
    assert v4k.compressed_indices([5], 0, 4, 0, "chunk").shape == (1, 0, 1)
    assert v4k.compressed_indices([0], 3, 4, 0, "prefill").shape == (1, 3, 0)


def test_device_argument():
    out = v4k.window_indices(3, 1, 4, "decode", device="meta")
    assert out.device.type == "meta" and out.shape == (1, 1, 4)
    assert v4k.compressed_indices(7, 1, 4, 4, "decode", device=torch.device("cpu")).device.type == "cpu"


def test_opcheck():
    torch.library.opcheck(torch.ops.v4k.window_indices.default, ([0, 3], 4, 2, "chunk"))
    torch.library.opcheck(torch.ops.v4k.compressed_indices.default, ([0, 9], 6, 4, 10, "chunk"))


def test_doctests():
    assert doctest.testmod(indices_mod).failed == 0


# --------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: v4k.window_indices(0, 4, W, "bogus"), ValueError, "window_indices: mode"),
        (lambda: v4k.window_indices([0, 3], 4, W, "prefill"), ValueError, "window_indices: mode='prefill' requires"),
        (lambda: v4k.window_indices(5, 2, W, "decode"), ValueError, "window_indices: mode='decode' requires seq_len == 1, got 2"),
        (lambda: v4k.window_indices(-1, 1, W, "decode"), ValueError, "window_indices: start_pos must be >= 0"),
        (lambda: v4k.window_indices([0, -2], 1, W, "chunk"), ValueError, r"start_pos\[1\] must be >= 0, got -2"),
        (lambda: v4k.window_indices(True, 1, W, "decode"), TypeError, "window_indices: start_pos must be an int"),
        (lambda: v4k.window_indices(torch.tensor([0]), 1, W, "decode"), TypeError, "window_indices: start_pos"),
        (lambda: v4k.window_indices([0.5], 1, W, "chunk"), TypeError, r"start_pos\[0\] must be an int"),
        (lambda: v4k.window_indices(0, -1, W, "prefill"), ValueError, "window_indices: seq_len must be >= 0"),
        (lambda: v4k.window_indices(0, 2.0, W, "prefill"), TypeError, "window_indices: seq_len must be an int"),
        (lambda: v4k.window_indices(0, 4, 0, "prefill"), ValueError, "window_indices: window must be >= 1"),
        (lambda: v4k.window_indices(2**31, 1, W, "decode"), ValueError, "window_indices: start_pos \\+ seq_len"),
        (lambda: v4k.compressed_indices(0, 4, 0, 0, "prefill"), ValueError, "compressed_indices: ratio must be >= 1"),
        (lambda: v4k.compressed_indices(0, 4, 4, -1, "prefill"), ValueError, "compressed_indices: offset must be >= 0"),
        (lambda: v4k.compressed_indices([1], 4, 4, 0, "prefill"), ValueError, "compressed_indices: mode='prefill' requires"),
        (lambda: v4k.compressed_indices(3, 3, 4, 0, "decode"), ValueError, "compressed_indices: mode='decode' requires"),
        (lambda: v4k.compressed_indices(3, 1, 4, 0, None), ValueError, "compressed_indices: mode"),
        (lambda: v4k.compressed_indices(0, 8, 4, 2**31 - 1, "prefill"), ValueError, "compressed_indices: offset \\+ width"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
