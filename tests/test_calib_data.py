"""Calibration tokens: seeded non-overlapping windows, .npy ids, clean errors; feeds for a model."""

import numpy as np
import pytest

from qcompiler.errors import ConfigError
from qcompiler.runtime.calib_data import (
    calibration_feeds,
    calibration_tokens,
    check_source,
    python_docs_text,
    token_input,
)


def test_windows_from_ids(tmp_path):
    ids = np.arange(1000)
    np.save(tmp_path / "ids.npy", ids)
    a = calibration_tokens(tmp_path / "ids.npy", None, 4, 100, seed=1)
    assert a.shape == (4, 100) and a.dtype == np.int64
    assert np.array_equal(a, calibration_tokens(tmp_path / "ids.npy", None, 4, 100, seed=1))
    assert not np.array_equal(a, calibration_tokens(tmp_path / "ids.npy", None, 4, 100, seed=2))
    starts = a[:, 0]
    assert np.all(np.diff(a, axis=1) == 1)  # contiguous windows
    assert np.all(np.diff(starts) >= 100)  # in order, not overlapping
    np.save(tmp_path / "rows.npy", np.arange(60).reshape(3, 20))
    assert np.array_equal(calibration_tokens(tmp_path / "rows.npy", None, 2, 10), np.arange(60).reshape(3, 20)[:2, :10])


@pytest.mark.parametrize("content, match", [(np.arange(50), "50 tokens"), (np.ones(5000, np.float32), "integer"),
                                            (np.ones((2, 2, 2), np.int64), "1-D or 2-D")])
def test_bad_ids(tmp_path, content, match):
    np.save(tmp_path / "x.npy", content)
    with pytest.raises(ConfigError, match=match):
        calibration_tokens(tmp_path / "x.npy", None, 4, 100)


def test_missing_file_and_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        calibration_tokens(tmp_path / "nope.npy", None, 1, 10)
    with pytest.raises(ConfigError, match="tokenizer"):
        calibration_tokens(None, None, 1, 10)
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        calibration_tokens(None, str(tmp_path), 1, 10)


def test_python_docs_text_with_minilm_tokenizer(minilm_dir):
    assert len(python_docs_text()) > 100_000
    ids = calibration_tokens(None, str(minilm_dir), 8, 128)
    assert ids.shape == (8, 128) and len(np.unique(ids)) > 200


def test_feeds(minilm):
    assert token_input(minilm.model) == "input_ids"
    ids = np.zeros((2, 5), np.int64)
    feeds = calibration_feeds(minilm.model, ids)
    assert set(feeds) == {i.name for i in minilm.model.graph.input}
    assert feeds["attention_mask"].sum() == 10 and not feeds.get("token_type_ids", np.zeros(1)).any()


def test_check_source_names_a_missing_file_before_any_model_loads(tmp_path):
    import pytest

    from qcompiler.errors import ConfigError

    check_source(None)
    check_source("python-docs")
    (tmp_path / "ids.npy").write_bytes(b"")
    check_source(tmp_path / "ids.npy")  # present: its content is read later
    with pytest.raises(ConfigError, match="^calibration file not found"):
        check_source(tmp_path / "none.npy")
    with pytest.raises(ConfigError, match="^calibration text file not found"):
        check_source(tmp_path / "none.txt")
