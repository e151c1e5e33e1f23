"""The pipeline reuses prepared data only when it was prepared the way the config asks."""

from __future__ import annotations

from storymm.pipeline import _needs_prepare

from small import small_config, small_dataset


def test_prepared_data_is_reused_only_for_the_same_preparation(tmp_path):
    config = small_config("data.tokenizer=train", "data.tokenizer_vocab_size=300")
    data = small_dataset(str(tmp_path), 12, seed=1, frames=(6, 8), config=config)
    assert not _needs_prepare(data, config)
    assert not _needs_prepare(
        data, small_config("data.tokenizer=train", "data.tokenizer_vocab_size=300", "data.batch_size=3")
    )  # training keys do not matter
    assert _needs_prepare(data, small_config("data.tokenizer=train", "data.tokenizer_vocab_size=500"))
    assert _needs_prepare(
        data, small_config("data.tokenizer=train", "data.tokenizer_vocab_size=300", "data.image_height=40")
    )
    assert _needs_prepare(str(tmp_path / "nothing-here"), config)
