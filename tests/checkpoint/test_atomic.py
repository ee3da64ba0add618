import pytest

from compressor.checkpoint.atomic import atomic_folder


def test_folder_appears_only_when_the_block_succeeds(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out/done.txt").exists()
