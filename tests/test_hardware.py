"""Device and precision choices: `--device` checks, the training target's dtype (bf16 where the hardware multiplies
bf16 natively, fp32 elsewhere, asked-for wins) and the draft's autocast."""

from __future__ import annotations

import pytest
import torch

from spectool import hardware
from spectool.errors import UsageError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("amx", [True, False])
def test_target_dtype_rules(amx, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_multiplies_bf16", lambda: amx)
    assert hardware.target_dtype(CPU, "auto") == ("bfloat16" if amx else "float32")
    assert hardware.target_dtype(CPU, None) == hardware.target_dtype(CPU, "auto")
    assert hardware.target_dtype(CUDA, "auto") == "bfloat16"
    for asked in ("float32", "bfloat16", "float16"):
        assert hardware.target_dtype(CPU, asked) == asked
        assert hardware.target_dtype(CUDA, asked) == asked
    # The trainable draft runs under autocast on CUDA only, unless bf16 is asked for.
    assert hardware.draft_autocast_dtype(CPU, "auto") is None
    assert hardware.draft_autocast_dtype(CUDA, "auto") == torch.bfloat16
    assert hardware.draft_autocast_dtype(CPU, "bfloat16") == torch.bfloat16
    assert hardware.draft_autocast_dtype(CUDA, "float32") is None


def test_cpu_probe_answers_a_bool():
    assert isinstance(hardware.cpu_multiplies_bf16(), bool)


def test_check_device_accepts_the_cpu_and_refuses_the_rest_with_the_fix():
    assert hardware.check_device("cpu") == "cpu"
    assert hardware.check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="not a torch device"):
        hardware.check_device("gpu0")
    with pytest.raises(UsageError, match="only cpu and cuda"):
        hardware.check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            hardware.check_device("cuda")
