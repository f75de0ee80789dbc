"""Makes a test process report bf16 units present or absent, whatever its CPU: with SSIW_TEST_BF16=1 (or 0) set,
torch.cpu.get_capabilities reports avx512_bf16 and amx_bf16 as present (absent). tests/conftest.py puts this folder
on PYTHONPATH when the variable is set, so every Python process the tests start (evaluate.py, torchrun workers)
loads it as its sitecustomize; the suite then runs the bf16 and the fp32 side of `auto` on any machine."""
import os


def report_bf16(present):
    """Patch torch.cpu.get_capabilities to report bf16 units `present` (the other capabilities as they are)."""
    import torch
    real = getattr(torch.cpu, "get_capabilities", None)
    real = getattr(real, "real", real)

    def capabilities():
        caps = dict(real()) if real else {}
        caps.update(avx512_bf16=present, amx_bf16=present)
        return caps
    capabilities.real = real
    torch.cpu.get_capabilities = capabilities


if os.environ.get("SSIW_TEST_BF16") in ("0", "1"):
    report_bf16(os.environ["SSIW_TEST_BF16"] == "1")
