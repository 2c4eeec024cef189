"""``model.dtype: auto``: bf16 where the hardware runs it natively, fp32 elsewhere, with the reason."""

import logging

import torch

from expertpool.model.dtype import CpuFeatures, cpu_features, log_choice, resolve_dtype

AVX512_BF16 = CpuFeatures("AMD EPYC 9654", frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}))
AMX = CpuFeatures("Intel Xeon Platinum 8480+", frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}))
AVX2_ONLY = CpuFeatures("Intel Xeon E5-2690 v4", frozenset({"sse4_2", "avx", "avx2", "fma"}))


def test_auto_picks_bf16_only_with_native_bf16_on_the_cpu():
    for features, want, why in ((AVX512_BF16, "bfloat16", "avx512_bf16"), (AMX, "bfloat16", "amx_bf16"),
                                (AVX2_ONLY, "float32", "neither avx512_bf16 nor amx_bf16")):
        choice = resolve_dtype("auto", "cpu", features=features)
        assert choice.dtype == want and why in choice.reason, (features, choice)
        assert choice.torch_dtype == getattr(torch, want)


def test_auto_on_cuda_follows_the_capability():
    assert resolve_dtype("auto", "cuda", capability=(9, 0)).dtype == "bfloat16"   # H100 / H200
    assert resolve_dtype("auto", "cuda", capability=(8, 0)).dtype == "bfloat16"   # A100
    old = resolve_dtype("auto", "cuda", capability=(7, 0))                         # V100
    assert old.dtype == "float32" and "7.0" in old.reason


def test_an_explicit_dtype_is_kept():
    for name in ("float32", "bfloat16"):
        for features in (AVX2_ONLY, AMX):
            choice = resolve_dtype(name, "cpu", features=features)
            assert choice.dtype == name and choice.reason == "set explicitly"


def test_cpu_features_parse_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n")
    f = cpu_features(str(info))
    assert f.model_name == "AMD EPYC 9654" and {"avx2", "avx512_bf16"} <= f.flags
    assert cpu_features(str(tmp_path / "missing")) == CpuFeatures("", frozenset())


def test_the_choice_is_logged_once_with_its_reason(caplog):
    choice = resolve_dtype("auto", "cpu", features=AVX2_ONLY)
    log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="expertpool.model.dtype"):
        log_choice("auto", choice, "cpu")
        log_choice("auto", choice, "cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "float32" in lines[0] and "avx512_bf16" in lines[0]


def test_a_onednn_isa_cap_below_bf16_makes_auto_pick_fp32():
    for cap in ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI"):
        capped = CpuFeatures(AVX512_BF16.model_name, AVX512_BF16.flags, cap)
        choice = resolve_dtype("auto", "cpu", features=capped)
        assert choice.dtype == "float32" and f"ONEDNN_MAX_CPU_ISA={cap}" in choice.reason, choice
    for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", ""):
        assert resolve_dtype("auto", "cpu", features=CpuFeatures("", AMX.flags, cap)).dtype == "bfloat16", cap
    assert resolve_dtype("bfloat16", "cpu", features=CpuFeatures("", AMX.flags, "AVX2")).dtype == "bfloat16"


def test_cpu_features_read_the_onednn_cap_from_the_environment(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert cpu_features(str(info)).onednn_isa_cap == "AVX2"
