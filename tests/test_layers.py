"""Layer selection (SPEC §2): every formula against hand-computed values, and validation of user ids."""

import warnings

import pytest

from spectool.errors import UsageError
from spectool.layers import (
    LayerIdWarning,
    dflash_layer_ids,
    dspark_layer_ids,
    eagle3_layer_ids,
    engine_default_eagle3_ids,
    engine_ids,
    from_engine_ids,
    parse_layer_ids,
    portable_layer_ids,
    validate_layer_ids,
)
from spectool.registry import default_layer_ids, serving

# The table of SPEC §2, written out by hand: (N, method, K) -> ids.
SPEC_TABLE = [
    (36, "eagle3", 3, [1, 17, 32]),
    (28, "eagle3", 3, [1, 13, 24]),
    (32, "eagle3", 3, [1, 15, 28]),
    (36, "dflash", 5, [1, 9, 17, 25, 33]),
    (28, "dflash", 5, [1, 7, 13, 19, 25]),
    (32, "dflash", 5, [1, 8, 15, 22, 29]),
    (36, "dspark", 5, [1, 10, 18, 26, 35]),
    (28, "dspark", 5, [1, 8, 14, 20, 27]),
    (32, "dspark", 5, [1, 8, 16, 24, 31]),
]


@pytest.mark.parametrize(("n", "method", "k", "expected"), SPEC_TABLE)
def test_spec_table(n, method, k, expected):
    assert default_layer_ids(method, n, k) == expected


def test_round_is_ties_to_even():
    # N=36, K=5 for DSpark: 1 + i*34/4 = 1, 9.5, 18, 26.5, 35 -> 9.5 rounds to 10, 26.5 to 26.
    assert dspark_layer_ids(36, 5) == [1, 10, 18, 26, 35]
    # DFlash N=8, K=3: 1 + i*4/2 = 1, 3, 5 (exact); N=9, K=3: 1, 3.5 -> 4, 6.
    assert dflash_layer_ids(8, 3) == [1, 3, 5]
    assert dflash_layer_ids(9, 3) == [1, 4, 6]


def test_single_feature_layer():
    assert dflash_layer_ids(36, 1) == [18]
    assert dflash_layer_ids(7, 1) == [3]
    assert dspark_layer_ids(36, 1) == [35]
    assert dspark_layer_ids(8, 1) == [7]


def test_dspark_ids_are_a_strictly_increasing_set_within_depth():
    for n in range(3, 50):
        for k in range(2, n):
            ids = dspark_layer_ids(n, k)
            assert ids == sorted(set(ids))
            assert ids[0] == 1 and ids[-1] == n - 1
            assert len(ids) <= k


def test_dflash_ids_never_repeat_up_to_n_minus_3():
    for n in range(5, 50):
        for k in range(1, n - 2):
            ids = dflash_layer_ids(n, k)
            assert len(set(ids)) == k and all(0 <= i <= n - 1 for i in ids)


def test_small_targets():
    assert eagle3_layer_ids(8) == [1, 3, 4]
    assert eagle3_layer_ids(7) == [1, 2, 3]
    assert dspark_layer_ids(8, 5) == [1, 2, 4, 6, 7]
    assert dflash_layer_ids(8, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(UsageError, match="at least 7"):
        eagle3_layer_ids(6)


def test_eagle1_uses_the_last_hidden_state():
    assert default_layer_ids("eagle1", 36) == [35]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dflash_layer_ids(36, 0), "between 1 and 33"),
        (lambda: dflash_layer_ids(36, 34), "between 1 and 33"),
        (lambda: dspark_layer_ids(36, 36), "between 1 and 35"),
        (lambda: dspark_layer_ids(0, 1), "at least 1 layer"),
        (lambda: default_layer_ids("eagle3", 36, 4), "exactly 3"),
        (lambda: default_layer_ids("medusa", 36, 4), "unknown method"),
    ],
)
def test_bad_counts(call, message):
    with pytest.raises(UsageError, match=message) as info:
        call()
    assert info.value.exit_code == 2


def test_validate_accepts_good_ids():
    assert validate_layer_ids([1, 9, 17], 36, expected_count=3) == [1, 9, 17]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([], "empty"),
        ([1, 1, 2], "strictly increasing"),
        ([5, 3], "strictly increasing"),
        ([1, 36], r"outside \[-1, 35\]"),
        ([-2, 3], r"outside \[-1, 35\]"),
        ([1.5, 3], "integers"),
        ([True, 3], "integers"),
        ([1, 2], "exactly 3"),
    ],
)
def test_validate_rejects(ids, message):
    with pytest.raises(UsageError, match=message):
        validate_layer_ids(ids, 36, expected_count=3 if message == "exactly 3" else None)


def test_validate_warns_on_ids_vllm_and_sglang_cannot_capture():
    with pytest.warns(LayerIdWarning, match=r"layer id 35 .* and layer id -1 .*--target-layer-ids 0,10,34"):
        validate_layer_ids([-1, 10, 35], 36, method="DSpark")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_layer_ids([0, 10, 34], 36)


def test_parse_layer_ids():
    assert parse_layer_ids("1,9,17") == [1, 9, 17]
    assert parse_layer_ids("[1, 9, 17]") == [1, 9, 17]
    assert parse_layer_ids("-1 5") == [-1, 5]
    with pytest.raises(UsageError, match="comma-separated integers"):
        parse_layer_ids("1,a")


def test_engine_numbering_is_spectool_plus_one():
    assert engine_ids([-1, 0, 17, 34]) == [0, 1, 18, 35]
    assert from_engine_ids(engine_ids([1, 17, 32])) == [1, 17, 32]
    # With no ids in the draft config, SGLang and vLLM capture (2, N//2, N-3): spectool's EAGLE-3 default.
    assert engine_ids(engine_default_eagle3_ids(36)) == [2, 18, 33]
    assert engine_ids(engine_default_eagle3_ids(32)) == [2, 16, 29]


@pytest.mark.parametrize(
    ("ids", "n", "expected"),
    [
        ([1, 10, 18, 26, 35], 36, [1, 10, 18, 26, 34]),
        ([1, 2, 4, 6, 7], 8, [1, 2, 4, 5, 6]),  # the neighbour moves aside
        ([-1, 0, 1], 8, [0, 1, 2]),
        ([7], 8, [6]),
        ([0, 1, 2, 3, 4, 5, 6, 7], 8, None),  # more ids than portable layers
    ],
)
def test_portable_layer_ids(ids, n, expected):
    assert portable_layer_ids(ids, n) == expected


def test_serving_names_who_can_and_cannot():
    dspark = serving("dspark", [1, 10, 18, 26, 35], 36)
    assert dspark.served_by == ("spectool", "DeepSpec") and dspark.not_served_by == ("vLLM", "SGLang")
    assert dspark.unportable == (35,) and dspark.portable_ids == (1, 10, 18, 26, 34)
    dflash = serving("dflash", [1, 9, 17, 25, 35], 36)
    assert dflash.served_by == ("spectool", "the z-lab dflash package")
    assert serving("dflash", [1, 9, 17, 25, 33], 36).not_served_by == ()
    eagle3 = serving("eagle3", [-1, 17, 32], 36)
    assert eagle3.served_by == ("spectool",) and "layer id -1 (the embedding output)" in eagle3.message()
    assert "the embedding output only on some SGLang models" in eagle3.message()
