"""The ascend backend on a fake ``npu`` device (v4kernels.testing.fake_device) with emulated
vendor ops (tests/vendor/ascend_ops.py): routing, refusal reasons, and adapter + emulated op
parity against the reference. Proves the bridging, not the hardware kernels."""
import os
import textwrap

import pytest

from v4kernels.testing.fake_device import run_in_subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(code, soc="A3", install_kw="", timeout=900):
    setup = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from vendor import ascend_ops
        ascend_ops.install({soc!r}{', ' + install_kw if install_kw else ''})
        import v4kernels
        from v4kernels import _registry as R
    """)
    p = run_in_subprocess(textwrap.dedent(code), device="npu", setup=setup, timeout=timeout,
                          env={"V4K_CHECKS": "full"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


PARITY = """
    from v4kernels.testing import run_parity
    # NaN/inf inputs: the vendor ops' contracts do not define them (docs/numerics.md, "Vendor ops")
    res = [r for r in run_parity(["ascend"], device="npu") if "/nonfinite_" not in r.case]
    bad = [(r.case, r.status, r.detail) for r in res if r.status in ("fail", "error")]
    assert not bad, bad
    passed = sorted(r.case for r in res if r.status == "pass")
    print("PASSED", len(passed), " ".join(passed))
"""


def test_parity_on_a3():
    out = _run(PARITY, soc="A3")
    passed = out.split("PASSED", 1)[1].split()
    assert int(passed[0]) >= 30, out
    names = set(passed[1:])
    for op in ("sparse_attn", "indexer_topk", "hc_pre", "hc_post", "moe_gate", "moe_experts", "rms_norm", "apply_rope"):
        assert any(n.startswith(op + "/") for n in names), (op, names)


def test_parity_on_950():
    out = _run(PARITY, soc="950")
    names = set(out.split("PASSED", 1)[1].split()[1:])
    for op in ("fp8_gemm", "sparse_attn"):
        assert any(n.startswith(op + "/") for n in names), (op, names)


def test_routing_and_reasons():
    _run("""
        import torch
        from v4kernels.testing.cases import all_cases, make_inputs
        cases = {c.name: c for c in all_cases()}

        def routed(name):
            c = cases[name]
            with v4kernels.track_usage() as usage:
                c.run(**make_inputs(c, "npu"))
            return {b for (op, b) in usage if op == c.op}

        # limits met and vendor op present: the ascend adapter runs
        for name in ("rms_norm/odd_77", "apply_rope/kv_far_positions", "hc_post/flash_decode_b4",
                     "moe_gate/flash_t8", "moe_experts/bf16_e8_k6_t16", "indexer_topk/flash_decode_b2_n1024_bf16",
                     "sparse_attn/flash_csa_decode_b2_h64_k640", "sparse_attn/odd_h3_k70"):
            assert routed(name) == {"ascend"}, (name, routed(name))
        # a limit not met: the next backend (no Triton-Ascend here: the reference), and the reason names it
        for name, why in (("hc_pre/small_b2s3_d40", "D in {4096, 7168}"),
                          ("sparse_attn/hca_decode_b2_h64_k192_fp8kv", "584-byte"),
                          ("moe_experts/fp8_e8_k6_t12", "quantised expert weights"),
                          ("indexer_topk/chunk_h16_s32_topk100_fp8", "no compression ratio"),
                          ("fp8_gemm/m3_n64_k200", "950 only")):
            assert routed(name) == {"reference"}, (name, routed(name))
            c = cases[name]
            inp = make_inputs(c, "npu")
            b = R.get_backend("ascend")
            try:
                with v4kernels.use_backend("ascend", ops=[c.op]):
                    c.run(**inp)
                raise AssertionError(f"{name}: forced ascend did not refuse")
            except R.BackendUnavailableError as e:
                assert why in str(e), (name, str(e))
        # the Triton backend explains why it is not used on npu here
        tr = R.available_backends("rms_norm", "npu")["triton"]
        assert tr and "does not target npu" in tr[0], tr
        # ops without an Ascend fused op say so
        assert "Hadamard" in R.available_backends("hadamard_transform", "npu")["ascend"][0]
        print("OK")
    """)


def test_missing_vendor_ops_are_reasons():
    out = _run("""
        import torch
        from v4kernels.testing.cases import all_cases, make_inputs
        b = R.get_backend("ascend")
        r = R.available_backends(device="npu")
        assert any("_C_ascend.npu_hc_pre_v2 is not registered" in x for x in r["hc_pre"]["ascend"]), r["hc_pre"]
        assert any("torch_npu 2.13.0+emulated has no npu_rms_norm" in x for x in r["rms_norm"]["ascend"])
        c = {c.name: c for c in all_cases()}["sparse_attn/odd_h3_k70"]
        try:
            with v4kernels.use_backend("ascend", ops=["sparse_attn"]):
                c.run(**make_inputs(c, "npu"))
            raise AssertionError("not refused")
        except R.BackendUnavailableError as e:
            assert "lacks argument(s) sinks" in str(e), str(e)
        with v4kernels.track_usage() as usage:
            c.run(**make_inputs(c, "npu"))
        assert ("sparse_attn", "reference") in usage, usage
        print("OK")
    """, install_kw="torch_npu_ops=('npu_sparse_flash_attention',), c_ascend=False, sfa_sinks=False")
    assert "OK" in out


def test_cli_parity_and_info_on_npu():
    out = _run("""
        from v4kernels.__main__ import main
        rc = main(["parity", "--device", "npu", "--backend", "ascend", "--op", "rms_norm", "--op", "hc_post"])
        assert rc == 0, rc
        main(["info", "--device", "npu", "-v"])
    """)
    assert "0 failed" in out and "ascend" in out
    assert "npu_hc_pre_v2 supports" not in out  # argument-level limits are per call, not op-level
    assert "CANN has no Hadamard op" in out


def test_bad_input_errors_match_cpu():
    _run("""
        import torch
        def err(fn):
            try:
                fn()
            except (TypeError, ValueError) as e:
                return str(e)
            raise AssertionError("no error")
        for dev in ("cpu", "npu"):
            pass
        a = err(lambda: v4kernels.rms_norm(torch.ones(2, 8, dtype=torch.int32)))
        b = err(lambda: v4kernels.rms_norm(torch.ones(2, 8, dtype=torch.int32, device="npu")))
        assert a == b, (a, b)
        x = torch.randn(1, 2, 4, 512, dtype=torch.bfloat16)
        idx = torch.full((1, 2, 8), 7, dtype=torch.int32)
        kv = torch.randn(1, 4, 512, dtype=torch.bfloat16)
        sink = torch.zeros(4)
        a = err(lambda: v4kernels.sparse_attn(x, kv, sink, idx, 0.04))
        b = err(lambda: v4kernels.sparse_attn(x.to("npu"), kv.to("npu"), sink.to("npu"), idx.to("npu"), 0.04))
        assert a.replace("cpu", "DEV") == b.replace("npu:0", "DEV").replace("npu", "DEV"), (a, b)
        print("OK")
    """)


def test_emulated_vendor_limits():
    """The emulations enforce the documented limits (so an adapter calling outside them fails)."""
    _run("""
        import torch
        from vendor.ascend_ops import VendorLimitError
        q = torch.zeros(1, 1, 32, 512, dtype=torch.bfloat16, device="npu")
        meta = torch.ops._C_ascend.npu_sparse_attn_sharedkv_metadata(32, 1, 512, batch_size=1, max_seqlen_q=1)
        for call in (
            lambda: torch.ops._C_ascend.npu_sparse_attn_sharedkv(q, metadata=meta, seqused_kv=torch.ones(1, dtype=torch.int32, device="npu")),
            lambda: torch.ops._C_ascend.npu_hc_pre_v2(torch.zeros(2, 4, 64, dtype=torch.bfloat16, device="npu"),
                                                      torch.zeros(24, 256, device="npu"), torch.ones(3, device="npu"),
                                                      torch.zeros(24, device="npu"), 4, 20, 1e-6, 1e-6),
        ):
            try:
                call()
                raise AssertionError("limit not enforced")
            except (VendorLimitError, RuntimeError) as e:
                assert "N1 must be 64" in str(e) or "D in {4096, 7168}" in str(e), str(e)
        import torch_npu
        x = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16, device="npu")
        try:
            torch_npu.npu_interleave_rope(x, torch.ones(2, 4, 1, 64, dtype=torch.bfloat16, device="npu"), x)
            raise AssertionError("cos N != 1 accepted")
        except VendorLimitError:
            pass
        print("OK")
    """)
