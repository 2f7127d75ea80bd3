"""The precision rule: bf16 autocast only where the CPU has native bf16 instructions (on an
AVX2-only CPU bf16 ran over 24x slower than fp32)."""

import pytest

from common import hardware

FLAGS = "flags\t\t: fpu vme sse sse2 avx fma avx2"  # an AVX2-only AMD EPYC's, shortened


@pytest.mark.parametrize(
    "extra, native",
    [
        pytest.param("", False, id="avx2-only"),
        pytest.param(" avx512f avx512bw avx512_vnni", False, id="avx512-without-bf16"),
        pytest.param(" avx512f avx512_bf16", True, id="avx512-bf16"),
        pytest.param(" amx_bf16 amx_tile", True, id="amx"),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\n{FLAGS}{extra}\n")
    assert hardware.cpu_has_native_bf16(cpuinfo) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert hardware.cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("native, precision", [(False, "32-true"), (True, "bf16-mixed")])
def test_the_cpu_gets_bf16_only_where_it_is_native(monkeypatch, native, precision):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.default_precision("cpu") == precision
