"""benchmarks/accelerator.py's pure parts: the peak table lookup, the FLOP/s arithmetic, the kernel count."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest


def _load_accelerator():
    """benchmarks/accelerator.py as a module (registered in sys.modules while it runs: its dataclasses need it)."""
    folder = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("accelerator_bench", folder / "accelerator.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


accelerator = _load_accelerator()


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),  # not taken for the SXM part: the PCIe pattern comes first
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100"),
    ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2"),
    ("Tesla T4", "NVIDIA T4"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
])
def test_peak_for_known_chips(kind, name):
    assert accelerator.peak_for(kind).name == name


@pytest.mark.parametrize("kind", ["cpu", "Intel(R) Xeon(R) t4 edition", "NVIDIA RTX 4090", "TPU v7x"])
def test_peak_for_unknown_chips_is_none(kind):
    assert accelerator.peak_for(kind) is None


def test_every_peak_names_its_source_and_a_rate():
    for _, peak in accelerator.PEAKS:
        assert peak.source and (peak.fp32 or peak.tensor)


def test_achieved_flops():
    assert accelerator.achieved_flops(1.5e9, 100, 0.5) == pytest.approx(3e11)
    assert accelerator.achieved_flops(1.5e9, 100, 0.0) == 0.0


def test_count_kernels_reads_the_entry_computation_only():
    text = "\n".join([
        "%fused_computation (p: f32[2]) -> f32[2] {",
        "  %p = f32[2]{0} parameter(0)",
        "  ROOT %n = f32[2]{0} negate(%p)",
        "}",
        "ENTRY %main (a: f32[2], b: f32[2,2]) -> (f32[2], f32[2]) {",
        "  %a = f32[2]{0} parameter(0)",
        "  %b = f32[2,2]{1,0} parameter(1)",
        "  %c = f32[] constant(0)",
        "  %f = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused_computation",
        "  %g = (f32[2]{0}, s8[4]{0}) custom-call(%b, %f), custom_call_target=\"__cublas$gemm\"",
        "  %h = f32[2]{0} get-tuple-element(%g), index=0",
        "  %w = (s32[], f32[2]{0}) while(%t), condition=%cond, body=%body",
        "  %k = f32[2]{0} copy(%h)",
        "  ROOT %r = (f32[2]{0}, f32[2]{0}) tuple(%f, %k)",
        "}",
    ])
    assert accelerator.count_kernels(text) == {"kernels": 3, "fusions": 1, "custom_calls": 1, "loops": 1}


def test_count_kernels_of_a_compiled_function():
    compiled = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(
        jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 3), jnp.float32)).compile()
    counts = accelerator.count_kernels(compiled.as_text())
    assert 1 <= counts["kernels"] <= 5 and counts["loops"] == 0
