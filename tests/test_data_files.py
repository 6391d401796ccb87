"""Reading calibration / evaluation data files as `datasets` would: TSV, split slices of saved datasets, 16-bit
images, image structs in parquet (an outside QA pass, session 22)."""

from __future__ import annotations

from hf_mudsc.calibrate.datasets import load_calibration_dataset


def test_a_tsv_file_is_read_with_the_tab_separator(tmp_path):
    """`.tsv` went to the csv builder with its default ',' separator: text with commas was split into columns."""
    path = tmp_path / "pairs.tsv"
    path.write_text("text\tlabel\nthe cat sat, on the mat\t0\na good movie, very good\t1\n")
    rows = list(load_calibration_dataset(str(path), streaming=False))
    assert rows == [{"text": "the cat sat, on the mat", "label": 0}, {"text": "a good movie, very good", "label": 1}]
