"""The model card of merges of three or more parents (session 31)."""

from __future__ import annotations

import pytest
from factories import make_batches, make_model

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_the_card_of_a_three_parent_zip_merge_names_every_parent_in_the_fusions(tmp_path):
    """The zip match-quality sentence said "within one parent as well as across A and B" for any parent count."""
    import hf_mudsc
    from hf_mudsc.architectures import spec_for
    from hf_mudsc.testing.permute import permute_model, random_permutations

    model = make_model("vit_cls", 0)
    spec = spec_for(model)
    parents = [model] + [permute_model(model, spec, random_permutations(spec, seed)) for seed in (1, 2)]
    merged = hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2, batch_size=16, seed=3), method="mudsc",
                            matcher="zip", refit="none", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    text = " ".join((tmp_path / "merged" / "README.md").read_text().split())
    assert "within one parent as well as across parents A, B and C" in text, text
    assert "across A and B" not in text
