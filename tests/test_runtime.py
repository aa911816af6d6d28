"""`spectool.runtime.target_ref_of`: how a draft finds its target."""

from pathlib import Path

import pytest
import torch

from spectool.checkpoint import DraftMetadata, LoadedDraft
from spectool.errors import UsageError
from spectool.runtime import target_ref_of


def _loaded(path: Path, target: str | None) -> LoadedDraft:
    metadata = DraftMetadata(method="dspark", target=target) if target is not None else None
    return LoadedDraft("dspark", torch.nn.Linear(1, 1), path, {}, metadata)


def test_explicit_target_wins(tmp_path):
    assert target_ref_of(_loaded(tmp_path, "Qwen/Qwen3-8B"), "other/model") == "other/model"


def test_hub_id_is_kept_as_is(tmp_path):
    assert target_ref_of(_loaded(tmp_path, "Qwen/Qwen3-8B"), None) == "Qwen/Qwen3-8B"


def test_relative_reference_resolves_against_the_draft_directory(tmp_path):
    target = tmp_path / "assets" / "tiny"
    draft = tmp_path / "assets" / "drafts" / "dspark"
    target.mkdir(parents=True)
    draft.mkdir(parents=True)
    assert target_ref_of(_loaded(draft, "../../tiny"), None) == str(target.resolve())
    assert target_ref_of(_loaded(tmp_path / "assets", "./tiny"), None) == str(target.resolve())


def test_missing_targets_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no longer exists"):
        target_ref_of(_loaded(tmp_path, "../nowhere-to-be-found"), None)
    with pytest.raises(UsageError, match="does not record its target"):
        target_ref_of(_loaded(tmp_path, None), None)
