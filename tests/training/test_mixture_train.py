"""Training on a weighted data mixture (issue 19, item 4) with 2 processes: tokens per source in the metrics,
resume equal to an uninterrupted run, one source read through a ``pipe:`` command, and a missing source
reported in one line before step 1."""

import pytest

from llada_scale.testing import train_metrics
from tests.training.test_train import train


def mixture(local, piped, missing=None) -> str:
    srcs = [f"{{path: '{local}', weight: 3, name: web}}", f"{{path: 'pipe:cat {piped}/{{}}', weight: 1, name: code}}"]
    if missing:
        srcs.append(f"{{path: '{missing}', weight: 1}}")
    return "data.train_shards=[" + ", ".join(srcs) + "]"


@pytest.mark.distributed
def test_mixture_trains_logs_tokens_per_source_and_resumes_exactly(tmp_path, pretrain_shards):
    common = [mixture(pretrain_shards, pretrain_shards), "train.max_steps=4", "train.micro_batch_size=2",
              "train.global_batch_size=8", "train.save_every=0", "train.init_from=", "data.num_workers=1"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, pretrain_shards, *common, world=2)
    train(split, pretrain_shards, *common, "train.stop_at_step=2", world=2)
    train(split, pretrain_shards, *common, world=2)
    a, b = train_metrics(full), train_metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["train/loss"] == b[step]["train/loss"] and a[step]["data/checksum"] == b[step]["data/checksum"]
        assert a[step]["data/tokens/web"] == b[step]["data/tokens/web"]
    # 4 steps x 8 rows x 64 tokens, every row from one source; cumulative counts carried over the resume
    last = a[4]
    assert last["data/tokens/web"] + last["data/tokens/code"] == 4 * 8 * 64
    assert last["data/tokens/web"] > last["data/tokens/code"] > 0  # weights 3 : 1


def test_missing_source_is_one_line_before_step_1(tmp_path, pretrain_shards):
    r = train(tmp_path / "run", pretrain_shards, mixture(pretrain_shards, pretrain_shards, tmp_path / "nope"),
              "train.max_steps=1", "train.init_from=", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "data.train_shards[nope]" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "step 1" not in r.stderr + r.stdout
