"""A pretraining run with each combination of document_masking and reset_position_ids: the batches it trains and
evaluates on are the ones the switches ask for, and it learns (the model side: tests/data/test_document_masking.py)."""

import pytest
import torch

from apertus_hf.data import PackedBatchCollator
from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from tests.pretraining.conftest import tiny_run


@pytest.mark.parametrize(
    ("document_masking", "reset_position_ids"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["masked-reset", "masked-not-reset", "unmasked-reset", "unmasked-not-reset"],
)
def test_pretraining_trains_with_each_combination(
    tmp_path, small_corpus, monkeypatch, document_masking, reset_position_ids
):
    batches = []
    collate = PackedBatchCollator.__call__

    def recording_collate(self, rows):
        batches.append(collate(self, rows))
        return batches[-1]

    monkeypatch.setattr(PackedBatchCollator, "__call__", recording_collate)
    options = tiny_run(
        tmp_path / "run",
        small_corpus,
        document_masking=document_masking,
        reset_position_ids=reset_position_ids,
        max_steps=8,
        logging_steps=1,
        eval_steps=0,
        checkpoint_steps=0,
    )
    result = pretrain(PretrainConfig(**options))

    # The training and the evaluation batches alike: some rows hold several documents, which only masking tells
    # apart and only position resets restart at.
    assert any(batch["seq_idx"].max() > 0 for batch in batches) == document_masking
    along_rows = [
        torch.equal(batch["position_ids"], torch.arange(64).expand_as(batch["position_ids"])) for batch in batches
    ]
    assert all(along_rows) != reset_position_ids
    losses = [record["train/loss"] for record in read_metrics(result.output_dir / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    assert result.final_eval_loss is not None
