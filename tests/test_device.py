"""Device and precision choices: `--device` checks, the training target's dtype (bf16 where the hardware multiplies
bf16 natively, fp32 elsewhere, asked-for wins) and the draft's autocast."""

from __future__ import annotations

import pytest
import torch

from spectool import device
from spectool.errors import UsageError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("amx", [True, False])
def test_target_dtype_rules(amx, monkeypatch):
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: amx)
    assert device.target_dtype(CPU, "auto") == ("bfloat16" if amx else "float32")
    assert device.target_dtype(CPU, None) == device.target_dtype(CPU, "auto")
    assert device.target_dtype(CUDA, "auto") == "bfloat16"
    for asked in ("float32", "bfloat16", "float16"):
        assert device.target_dtype(CPU, asked) == asked
        assert device.target_dtype(CUDA, asked) == asked
    # The trainable draft runs under autocast on CUDA only, unless bf16 is asked for.
    assert device.draft_autocast_dtype(CPU, "auto") is None
    assert device.draft_autocast_dtype(CUDA, "auto") == torch.bfloat16
    assert device.draft_autocast_dtype(CPU, "bfloat16") == torch.bfloat16
    assert device.draft_autocast_dtype(CUDA, "float32") is None


def test_cpu_probe_answers_a_bool():
    assert isinstance(device.cpu_multiplies_bf16(), bool)


def test_check_device_accepts_the_cpu_and_refuses_the_rest_with_the_fix():
    assert device.check_device("cpu") == "cpu"
    assert device.check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="not a torch device"):
        device.check_device("gpu0")
    with pytest.raises(UsageError, match="only cpu and cuda"):
        device.check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            device.check_device("cuda")
