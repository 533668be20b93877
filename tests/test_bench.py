"""Fast tests of the benchmark harness and the V4 cost calculator (SPEC §13)."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import v4kernels
import v4kernels._registry as R
from v4kernels.__main__ import main
from v4kernels.bench import kvcalc, layouts, report
from v4kernels.bench import workloads as W
from v4kernels.bench.peak import DevicePeak, lookup_known
from v4kernels.bench.runner import BenchConfig, _compare_to_reference, run_bench
from v4kernels.bench.timer import percentile, time_fn
from v4kernels.bench.workloads import Workload

# ------------------------------------------------------------------------------------------ layouts


def test_layout_bytes():
    assert layouts.MAIN_KV_FP8.nbytes == 448 + 64 * 2 + 7 + 1 == 584
    assert layouts.INDEXER_KEY_FP4.nbytes == 68
    assert layouts.INDEXER_KEY_FP8.nbytes == 132
    assert layouts.MLA_KV_FP8_V32.nbytes == 656
    assert layouts.MAIN_KV_BF16.nbytes == 1024 and layouts.MLA_KV_BF16.nbytes == 1152


def test_layer_schedules():
    f, p = layouts.FLASH, layouts.PRO
    assert (f.n_csa, f.n_hca, f.n_swa, len(f.compress_ratios)) == (21, 20, 2, 43)
    assert (p.n_csa, p.n_hca, p.n_swa, len(p.compress_ratios)) == (30, 31, 0, 61)
    assert f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-1] == 4
    assert p.compress_ratios[:4] == (128, 128, 4, 128) and p.compress_ratios[-1] == 4


def test_packed_kv_matches_layout():
    """The library's packed FP8 row is the layout kvcalc counts."""
    packed = v4kernels.pack_kv_fp8(torch.randn(2, 3, 512, dtype=torch.bfloat16))
    assert packed.shape[-1] == layouts.MAIN_KV_FP8.nbytes
    _, s = v4kernels.fp4_act_quant(torch.randn(1, 128), 32)
    assert 128 // 2 + s.shape[-1] == layouts.INDEXER_KEY_FP4.nbytes


def test_compressor_state_bytes_match_state_object():
    # the state object also holds n_tokens (int64 per sequence), not cache storage
    per = {(r, hd): v4kernels.CompressorState.empty(1, r, hd).nbytes - 8 for r, hd in ((4, 512), (4, 128), (128, 512))}
    f = layouts.FLASH
    assert kvcalc.compressor_state_bytes(f) == f.n_csa * (per[4, 512] + per[4, 128]) + f.n_hca * per[128, 512]


# ------------------------------------------------------------------------------------------ kvcalc vs SPEC §13


def test_kv_bytes_per_token_spec_13_2():
    t = kvcalc.kv_bytes_per_token
    assert t(layouts.FLASH)["total"] == pytest.approx(21 * (146 + 17) + 20 * 4.5625)
    assert round(t(layouts.FLASH)["total"]) == 3514 and round(t(layouts.PRO)["total"]) == 5031
    assert round(t(layouts.FLASH, "fp8", "fp8")["total"]) == 3850 and round(t(layouts.PRO, "fp8", "fp8")["total"]) == 5511
    assert t(layouts.FLASH, "bf16", "bf16")["total"] == 6880 and t(layouts.PRO, "bf16", "bf16")["total"] == 9848
    assert t(layouts.V32)["total"] == 48068 and t(layouts.V32, "bf16")["total"] == 85888
    assert t(layouts.V3, "bf16")["total"] == 70272 and t(layouts.V3, "fp8")["total"] == 40016


@pytest.mark.parametrize("model,expected", [
    ("flash", {"fp8+fp4 idx) / v3.2 (fp8)": 7.3, "fp8+fp8 idx) / v3.2 (fp8)": 8.0, "bf16 / v3.2 bf16": 8.0,
               "fp8+fp4 idx) / v3 bf16": 5.0, "bf16 / v3 bf16": 9.8}),
    ("pro", {"fp8+fp4 idx) / v3.2 (fp8)": 10.5, "fp8+fp8 idx) / v3.2 (fp8)": 11.5, "bf16 / v3.2 bf16": 11.5,
             "fp8+fp4 idx) / v3 bf16": 7.2, "bf16 / v3 bf16": 14.0}),
])
def test_kv_ratios_spec_13_2(model, expected):
    ratios = kvcalc.report(model, 1 << 20)["kv_ratios"]
    for frag, pct in expected.items():
        (val,) = [v for k, v in ratios.items() if k.endswith(frag)]
        assert round(val * 100, 1) == pct, (frag, val)


def test_kv_totals_at_1m_and_exact_counts():
    gib = 2**30
    assert round(kvcalc.kv_bytes_per_token(layouts.FLASH)["total"] * 2**20 / gib, 2) == 3.43
    assert round(kvcalc.kv_bytes_per_token(layouts.PRO)["total"] * 2**20 / gib, 2) == 4.91
    assert round(kvcalc.kv_bytes_total(layouts.V32, 1 << 20)["total"] / gib, 1) == 46.9
    # exact entry counts: 7 tokens close one CSA window (4) and no HCA window (128)
    t = kvcalc.kv_bytes_total(layouts.FLASH, 7)
    assert t["window"] == 43 * 7 * 584
    assert t["csa_main"] == 21 * 1 * 584 and t["csa_indexer"] == 21 * 68 and t["hca_main"] == 0
    t = kvcalc.kv_bytes_total(layouts.PRO, 256, batch=3)
    assert t["hca_main"] == 3 * 31 * 2 * 584 and t["window"] == 3 * 61 * 128 * 584


def test_decode_flops_spec_13_3():
    g = lambda m: {k: v / 1e9 for k, v in kvcalc.decode_flops(m, 1 << 20).items()}  # noqa: E731
    f, p, v = g(layouts.FLASH), g(layouts.PRO), g(layouts.V32)
    assert round(v["indexer"], 1) == 1048.0 and round(v["sparse_mla"], 1) == 34.8 and round(v["total"], 1) == 1156.8
    assert round(f["indexer"], 1) == 90.2 and round(f["csa_attn"], 1) == 1.8 and round(f["hca_attn"], 1) == 21.8
    assert round(f["swa_attn"], 2) == 0.03 and round(f["total"], 1) == 139.8
    assert round(p["indexer"], 1) == 128.8 and round(p["csa_attn"], 1) == 9.1 and round(p["hca_attn"], 1) == 67.6
    assert p["swa_attn"] == 0 and round(p["total"], 1) == 303.5
    assert round(f["total"] / v["total"] * 100, 1) == 12.1 and round(p["total"] / v["total"] * 100, 1) == 26.2


def test_decode_flops_short_context_limits():
    # at 100 tokens: 25 CSA entries (< top-k), 0 HCA entries, window 100 (< 128)
    per_entry = 64 * 2 * 1024
    t = kvcalc.decode_flops(layouts.FLASH, 100)
    assert t["csa_attn"] == 21 * per_entry * (25 + 100)
    assert t["hca_attn"] == 20 * per_entry * 100
    assert t["indexer"] == 21 * 2 * 64 * 128 * 25


def test_claims_verdicts():
    f, p = kvcalc.claims(layouts.FLASH), kvcalc.claims(layouts.PRO)
    assert f["kv_vs_v32"]["reproduced"] and p["kv_vs_v32"]["reproduced"] and p["flops_vs_v32"]["reproduced"]
    assert not f["flops_vs_v32"]["reproduced"]  # SPEC §15 #13: 12.1 % vs published 10 %
    assert "§15 #13" in f["flops_vs_v32"]["why"]


def test_kvcalc_cli(capsys):
    assert main(["kvcalc", "--model", "pro", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "10.5%" in out and "26.2%" in out and "reproduced" in out
    assert main(["kvcalc", "--model", "flash", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "7.3%" in out and "12.1%" in out and "NOT reproduced" in out and "why:" in out


def test_kvcalc_bad_input():
    with pytest.raises(ValueError, match="V4 model"):
        kvcalc.report("v3.2", 10)
    with pytest.raises(ValueError, match="context"):
        kvcalc.kv_bytes_total(layouts.FLASH, -1)


# ------------------------------------------------------------------------------------------ workloads


def test_registry_covers_every_op():
    declared = set(v4kernels.op_names())
    covered = W.ops_covered()
    assert declared - covered == set(), f"ops without a benchmark workload: {sorted(declared - covered)}"
    assert covered - declared == set(), f"workloads for undeclared ops: {sorted(covered - declared)}"
    quick_ops = {w.op for w in W.select(quick=True)}
    assert quick_ops == covered, f"ops missing from --quick: {sorted(covered - quick_ops)}"


def test_registry_metadata():
    ws = W.all_workloads()
    assert len({w.name for w in ws}) == len(ws)
    for w in ws:
        assert w.name.startswith(w.op + "/")
        assert w.flops >= 0 and w.bytes > 0 and w.mem_bytes > 0, w.name
        assert w.phase in ("prefill", "decode"), w.name
    # the tables the issue names are present
    assert len(W.select(["sparse_attn"], tags=["challenge"])) == 10
    assert len(W.select(["hc_split_sinkhorn"], tags=["challenge"])) == 6
    assert W.select(["sparse_attn"], tags=["flashmla", "pro", "prefill"])
    for h in (8, 16, 32, 64, 128):
        assert W.select(["sparse_attn"], tags=[f"h{h}", "decode"]), h
    assert W.select(["indexer_topk"], tags=["ctx1m"]) and W.select(["sparse_attn"], tags=["ctx1m", "hca"])


def test_flop_formulas_agree_with_kvcalc():
    """One CSA/HCA layer's workload FLOPs equal the per-layer SPEC §13.3 terms at 1M tokens."""
    L = 1 << 20
    f = kvcalc.decode_flops(layouts.FLASH, L)
    fl, _ = W.sparse_attn_counts(1, 1, 64, 0, 512 + 128, False, torch.bfloat16)
    assert fl == f["csa_attn"] / 21
    fl, _ = W.sparse_attn_counts(1, 1, 64, 0, L // 128 + 128, False, torch.bfloat16)
    assert fl == f["hca_attn"] / 20
    fl, _ = W.indexer_counts(1, 1, L // 4, "fp4", 512, start=L - 1)
    assert fl == f["indexer"] / 21 + 2 * 64 * (L // 4)  # plus the ReLU-weighted head sum


def test_indexer_visible_entries_causal_limit():
    # t = 0..7 see (t+1)//4 = 0,0,0,1,1,1,1,2 entries
    assert W.visible_entries(0, 8, 10) == 6
    assert W.visible_entries(0, 8, 1) == 5  # capped by N
    assert W.visible_entries(7, 1, 100) == 2


def test_byte_formulas():
    _, nb = W.sparse_attn_counts(1, 1, 8, 1000, 100, True, torch.bfloat16)
    assert nb == 2 * 8 * 512 * 2 + 100 * 4 + 8 * 4 + 100 * 584
    _, nb = W.sparse_attn_counts(1, 64, 8, 50, 100, False, torch.bfloat16)  # rows reused across queries
    assert nb == 2 * 64 * 8 * 512 * 2 + 64 * 100 * 4 + 8 * 4 + 50 * 1024
    _, nb = W.indexer_counts(1, 1, 1000, "fp4", None)
    assert nb == 64 * 129 * 2 + 1000 * 68 + 8 + 1000 * 4


def test_quick_inputs_accepted_by_ops():
    """Every quick workload's factory builds inputs its public op accepts (tiny ones only here)."""
    for w in W.select(quick=True, tags=["tiny"]):
        out = w.run(w.make(torch.device("cpu")))
        assert out is not None, w.name


# ------------------------------------------------------------------------------------------ runner, timer, peak


def _cfg(**kw):
    return BenchConfig(min_time=0.0, min_reps=3, max_reps=3, progress=False, **kw)


def test_runner_rows_and_derived_columns():
    ws = [W.get_workload("window_indices/decode-b64-ctx64k"), W.get_workload("fp8_gemm/tiny-m64-n256-k512")]
    peak = DevicePeak("cpu", "t", {"fp32": 50.0}, 10.0, "measured")
    rows = run_bench(ws, ["reference"], _cfg(refcheck=True), peak)
    assert [r.status for r in rows] == ["ok", "ok"]
    r = rows[1]
    assert r.reps == 3 and r.p20_us <= r.p50_us <= r.p80_us
    assert r.gflops == pytest.approx(r.flops / (r.p50_us * 1e-6) / 1e9)
    assert r.gbs == pytest.approx(r.bytes / (r.p50_us * 1e-6) / 1e9)
    assert r.frac_roofline == pytest.approx(r.gflops / min(50.0, r.intensity * 10.0))
    assert r.refcheck == "self" and r.peak_gflops == 50.0
    assert rows[0].flops == 0 and rows[0].frac_roofline == pytest.approx(rows[0].gbs / 10.0)


def test_runner_skips_and_errors_without_crashing():
    def bad_make(dev):
        raise RuntimeError("boom")

    ws = [
        Workload("nope/x", "not_an_op", {}, torch.float32, lambda d: {}, 1, 1, "", "", frozenset({"decode"}), 1),
        Workload("act_quant/bad", "act_quant", {}, torch.float32, bad_make, 1, 1, "", "", frozenset({"decode"}), 1),
        W.get_workload("act_quant/flash-decode-t64"),
    ]
    rows = run_bench(ws, ["reference", "cuda"], _cfg())
    st = {(r.workload, r.backend): (r.status, r.reason) for r in rows}
    assert st["nope/x", "reference"][0] == "skip" and "not in this build" in st["nope/x", "reference"][1]
    assert st["act_quant/bad", "reference"] == ("error", "input factory failed: RuntimeError: boom")
    assert st["act_quant/flash-decode-t64", "reference"][0] == "ok"
    assert st["act_quant/flash-decode-t64", "cuda"][0] == "skip" and st["act_quant/flash-decode-t64", "cuda"][1]


def test_runner_guard_skips_oversized():
    w = W.get_workload("sparse_attn/challenge-prefill-b64-s1024-kv1024-k128")
    rows = run_bench([w], ["reference"], _cfg(max_call_s=0.01), DevicePeak("cpu", "t", {"fp32": 50.0}, 10.0, "measured"))
    assert rows[0].status == "skip" and "max-call-s" in rows[0].reason


def test_refcheck_detects_wrong_output():
    w = W.get_workload("act_quant/flash-decode-t64")
    x = torch.randn(4, 256)
    ref = v4kernels.act_quant(x)
    assert _compare_to_reference(w, "triton", ref, ref)[0] == "pass"
    bad = (ref[0], ref[1] * 2)
    assert _compare_to_reference(w, "triton", bad, ref)[0] == "fail"
    wt = W.get_workload("indexer_topk/tiny-prefill-s128-n32")
    idx = torch.arange(32, dtype=torch.int32).view(1, 2, 16)
    assert _compare_to_reference(wt, "cpu", idx.flip(-1), idx)[0] == "pass"  # order-free
    assert _compare_to_reference(wt, "cpu", idx + 100, idx)[0] == "fail"


def test_percentiles_and_timer():
    assert percentile([5, 1, 2, 3, 4], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    assert percentile([1, 2, 3, 4, 5], 80) == pytest.approx(4.2)
    t = time_fn(lambda: None, "cpu", warmup=0, min_time=0.0, min_reps=4, max_reps=4)
    assert t.reps == 4
    with pytest.raises(ValueError):
        time_fn(lambda: None, "cpu", min_reps=5, max_reps=2)


def test_known_device_table():
    assert lookup_known("NVIDIA H200").hbm_tbs == 4.8
    assert lookup_known("NVIDIA H100 PCIe").name.endswith("PCIe")
    assert lookup_known("NVIDIA H100 80GB HBM3").hbm_tbs == 3.35
    assert lookup_known("NVIDIA A100-SXM4-80GB").fp8_tflops is None
    assert lookup_known("Ascend910B3").name == "Huawei Ascend 910B"
    assert lookup_known("AMD EPYC") is None
    p = DevicePeak("cpu", "x", {"fp32": 40.0}, 10.0, "measured")
    assert p.compute_gflops("fp8") == 40.0 and p.ridge("fp32") == 4.0


# ------------------------------------------------------------------------------------------ CSV, compare, CLI


def _write(path, p50s):
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["workload", "backend", "device", "status", "p50_us"])
        wr.writeheader()
        for i, (v, status) in enumerate(p50s):
            wr.writerow({"workload": f"w{i}", "backend": "reference", "device": "cpu", "status": status, "p50_us": v})


def test_compare_threshold_exit_codes(tmp_path, capsys):
    old, same, slow, lost = (str(tmp_path / n) for n in ("old.csv", "same.csv", "slow.csv", "lost.csv"))
    _write(old, [(100, "ok"), (200, "ok")])
    _write(same, [(109, "ok"), (150, "ok")])
    _write(slow, [(100, "ok"), (260, "ok")])
    _write(lost, [(100, "ok"), ("", "error")])
    assert main(["bench", "--compare", old, "--against", same, "--threshold", "0.1"]) == 0
    assert main(["bench", "--compare", old, "--against", slow, "--threshold", "0.1"]) == 1
    assert "SLOWER" in capsys.readouterr().out
    assert main(["bench", "--compare", old, "--against", slow, "--threshold", "0.35"]) == 0
    assert main(["bench", "--compare", old, "--against", lost]) == 1
    c = report.compare_rows(report.read_csv(old), report.read_csv(same), 0.1)
    assert len(c.improvements) == 1 and len(c.unchanged) == 1 and not c.failed


def test_bench_cli_writes_csv_and_png(tmp_path, capsys):
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    rc = main(["bench", "--quick", "--op", "window_indices,act_quant", "--backends", "reference", "--csv", str(csv_path),
               "--plot", str(png), "--min-time", "0", "--max-reps", "3", "--no-progress", "--refcheck"])
    assert rc == 0
    rows = report.read_csv(str(csv_path))
    assert {r["workload"] for r in rows} == {"window_indices/decode-b64-ctx64k", "act_quant/flash-decode-t64"}
    assert all(r["status"] == "ok" and float(r["p50_us"]) > 0 and float(r["peak_gbs"]) > 0 for r in rows)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # comparing the run with itself passes; a 3x faster baseline makes it fail
    assert main(["bench", "--compare", str(csv_path), "--against", str(csv_path)]) == 0
    fast = tmp_path / "fast.csv"
    with open(csv_path) as f, open(fast, "w", newline="") as g:
        rd = csv.DictReader(f)
        wr = csv.DictWriter(g, fieldnames=rd.fieldnames)
        wr.writeheader()
        for r in rd:
            r["p50_us"] = str(float(r["p50_us"]) / 3)
            wr.writerow(r)
    assert main(["bench", "--compare", str(fast), "--against", str(csv_path)]) == 1


def test_bench_cli_bad_arguments(capsys):
    assert main(["bench", "--op", "no_such_op"]) == 2
    assert main(["bench", "--backends", "nope", "--op", "act_quant", "--quick"]) == 2
    assert main(["bench", "--workload", "zzz-no-match"]) == 2
    assert main(["bench", "--against", "x.csv"]) == 2


def test_every_backend_name_is_known():
    assert set(R.BACKENDS) >= {"reference", "triton", "cpu", "cuda", "ascend", "cambricon"}
    assert not math.isnan(W.get_workload("sparse_attn/tiny-decode-b4-h8-k256").intensity)
