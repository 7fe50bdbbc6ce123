"""Checks of a run's data before step 1 (training/preflight.py): no run trains for hours and then dies at its
first validation or learns from the wrong kind of shards."""

import json

import pytest

from llada_scale.data.build import build_shards
from llada_scale.data.tokenizer import Tokenizer
from llada_scale.training.config import load_config
from llada_scale.training.engine import TrainError
from llada_scale.training.preflight import check_data


def _cfg(recipe, shards, *extra):
    return load_config(f"configs/{recipe}.yaml", [f"data.train_shards={shards}", "train.micro_batch_size=2",
                                                  "data.seq_len=64", *extra])


def test_preflight(tokenizer_path, pretrain_shards, sft_shards, tmp_path):
    tok = Tokenizer.load(str(tokenizer_path))
    check_data(_cfg("diffusion_pretrain_tiny", pretrain_shards), tok)
    check_data(_cfg("sft_diffusion_tiny", sft_shards), tok)
    with pytest.raises(TrainError, match=r"holds pretrain shards but objective.name=sft trains on sft shards"):
        check_data(_cfg("sft_diffusion_tiny", pretrain_shards), tok)
    with pytest.raises(TrainError, match=r"holds sft shards but objective.name=diffusion trains on pretrain"):
        check_data(_cfg("diffusion_pretrain_tiny", sft_shards), tok)
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(8)) + "\n")
    build_shards([str(src)], str(tokenizer_path), str(tmp_path / "noval"), "pretrain", val_docs=0, progress=False,
                 num_workers=1, log=lambda m: None)
    with pytest.raises(TrainError, match=r"validation every 100 steps needs the val split of .*noval.*val_every=0"):
        check_data(_cfg("diffusion_pretrain_tiny", tmp_path / "noval"), tok)
    check_data(_cfg("diffusion_pretrain_tiny", tmp_path / "noval", "train.val_every=0"), tok)
    index = json.loads((tmp_path / "noval" / "index.json").read_text())
    index["tokenizer"]["sha256"] = "0" * 64
    (tmp_path / "noval" / "index.json").write_text(json.dumps(index))
    with pytest.raises(TrainError, match="built with another tokenizer"):
        check_data(_cfg("diffusion_pretrain_tiny", tmp_path / "noval", "train.val_every=0"), tok)
