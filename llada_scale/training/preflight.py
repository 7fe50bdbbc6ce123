"""Checks of a run's data before step 1, so that a run never trains for hours and then dies at its first
validation: both shard splits readable and big enough, built with the recipe's tokenizer, and of the kind the
objective trains on. (The recipe itself is checked by :func:`llada_scale.training.config.load_config`.)
"""

from __future__ import annotations

from llada_scale.training.engine import TrainError


def check_data(cfg, tokenizer) -> None:
    """Check the shards of ``cfg.data`` against the recipe (collective-free, reads index files only).

    * ``data.train_shards`` is set, and every shard directory used (train; val when ``train.val_every`` > 0) was
      built with the recipe's tokenizer (same ``tokenizer.json`` hash);
    * ``objective.name=sft`` trains on ``--kind sft`` shards and ``ar``/``diffusion`` on ``--kind pretrain``;
    * the val split exists and holds at least one validation batch (``PackedDataset`` on one stream).

    Raises:
        TrainError: naming the directory, what is wrong and how to fix it.
    """
    from llada_scale.data.loader import PackedDataset
    from llada_scale.data.shards import load_index, shard_paths

    d, t = cfg.data, cfg.train
    if not d.train_shards:
        raise TrainError("data.train_shards is not set; build shards with tools/build_shards.py first")
    mixture = not isinstance(d.train_shards, str)
    if mixture and t.val_every and not d.val_shards:
        raise TrainError("data.train_shards is a mixture of sources: set data.val_shards to the shard location "
                         "to validate on, or train.val_every=0")
    used = [(f"data.train_shards[{s['name']}]", s["path"]) for s in d.train_shards] if mixture else \
        [("data.train_shards", d.train_shards)]
    if t.val_every and d.val_shards != d.train_shards:  # the default: one directory, one index to check
        used.append(("data.val_shards", d.val_shards))
    want = "sft" if cfg.objective.name == "sft" else "pretrain"
    mine = tokenizer.identity()
    for key, shard_dir in used:
        try:  # a missing or unreadable location (local, pipe:, URL): one line before step 1
            index = load_index(shard_dir)
            if mixture and key != "data.val_shards":
                shard_paths(shard_dir, "train", index)
        except (ValueError, OSError) as e:  # ShardError, ShardIndexNotFoundError
            raise TrainError(f"{key}: {e}") from None
        ident = index.get("tokenizer", {})
        if ident.get("sha256") and ident.get("sha256") != mine.get("sha256"):
            raise TrainError(f"shards in {shard_dir} were built with another tokenizer ({ident.get('path')}) than "
                             f"the recipe's {cfg.tokenizer}; rebuild the shards or fix `tokenizer:`")
        if index.get("kind") != want:
            raise TrainError(f"{key}={shard_dir} holds {index.get('kind')} shards but objective.name="
                             f"{cfg.objective.name} trains on {want} shards; build them with tools/build_shards.py "
                             f"--kind {want} or use the matching recipe")
    if t.val_every:
        try:
            PackedDataset(d.val_shards, "val", d.seq_len, t.micro_batch_size, rank=0, world_size=1, seed=cfg.seed,
                          eos_token_id=tokenizer.eos_token_id, num_workers=0)
        except ValueError as e:
            raise TrainError(f"validation every {t.val_every} steps needs the val split of {d.val_shards}: {e}; "
                             "rebuild the shards with a val split (--val_docs N), point data.val_shards at shards "
                             "that have one, or set train.val_every=0") from None
