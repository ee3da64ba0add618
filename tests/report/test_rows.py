import pytest

from compressor.report.rows import ALL_ROWS, BITSANDBYTES, QUICK_ROWS, REFERENCE, select


def test_every_row_has_a_unique_name_and_the_quick_set_names_real_rows():
    names = [r.name for r in ALL_ROWS]
    assert len(names) == len(set(names))
    assert set(QUICK_ROWS) <= set(names)


def test_the_float32_reference_always_comes_first():
    assert select(("int4",), quick=False)[0] == REFERENCE
    assert select(None, quick=True)[0] == REFERENCE


def test_methods_pick_their_rows_ours_and_bitsandbytes_alike():
    rows = select(("nf4",), quick=False)
    assert {r.name for r in rows} == {"float32", "nf4 b32", "nf4 b64", "nf4 b64 no-dq", "nf4 b128", "bnb nf4"}
    assert any(r.source == BITSANDBYTES for r in rows)


def test_quick_and_methods_combine():
    assert [r.name for r in select(("nf4",), quick=True)] == ["float32", "nf4 b64", "bnb nf4"]


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown method int7"):
        select(("int7",), quick=False)


def test_optimized_rows_need_calibration_text():
    assert [r.name for r in select(("nf4",), quick=True)] == ["float32", "nf4 b64", "bnb nf4"]
    assert [r.name for r in select(("nf4",), quick=True, calibrated=True)] == ["float32", "nf4 b64", "nf4 b64 gptq", "bnb nf4"]
    assert {"nf4 b64 scales", "nf4 b64 gptq"} <= {r.name for r in select(None, quick=False, calibrated=True)}
