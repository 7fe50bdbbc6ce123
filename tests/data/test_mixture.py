"""Weighted data mixtures (issue 19, item 4): rows drawn from the sources by weight, deterministic for a seed,
each source's rows exactly its own loader's; exact resume (loader workers included) and resharding to another
world size per source; sources read through ``pipe:`` commands and fsspec URLs (memory://, file://)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_scale.data.loader import LoaderStateError, PackedDataset, build_dataloader, loader_dataset_states
from llada_scale.data.mixture import MixtureDataset, normalize_sources
from llada_scale.data.shards import ShardIndexNotFoundError, load_index
from tests.data.test_loader_reshard import make_shards

warnings.filterwarnings("ignore", message=".*set_vital.*")
L, B = 32, 4


@pytest.fixture
def two_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return make_shards(tmp_path / "a", seed=1), make_shards(tmp_path / "b", n_shards=6, seed=2)


def mixture(a, b, wa=3.0, wb=1.0, **kw):
    return MixtureDataset([{"path": a, "weight": wa, "name": "a"}, {"path": b, "weight": wb, "name": "b"}],
                          "train", L, B, **kw)


def rows(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same(x, y):
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def check_rows_are_the_sources(batches, refs):
    """Every row from source s is the next row of that source's own single-row loader."""
    for batch in batches:
        for i, s in enumerate(batch["source"].tolist()):
            want = next(refs[s])
            assert all(torch.equal(batch[k][i], want[k][0]) for k in want), (i, s)


def resharded_two_to_one(a, b, local, read: int, then: int):
    """Two ranks read ``read`` rows each of ``mixture(a, b)``; one rank resumes from both states (a new layout) and
    reads ``then`` batches. Returns those batches and, per source, a single-row loader of the ``local`` path resharded
    from the same per-source states: the arguments of :func:`check_rows_are_the_sources`."""
    states = []
    for rank in range(2):
        ds = mixture(a, b, rank=rank, world_size=2)
        rows(ds, read)
        states.append(ds.state_dict())
    new = mixture(a, b)
    assert not new.same_layout(states[0])
    new.load_resharded(states)
    refs = []
    for i, p in enumerate(local):
        ref = PackedDataset(p, "train", L, 1)
        ref.load_resharded([st["sources"][i] for st in states])
        refs.append(iter(ref))
    return rows(new, then), refs


def test_rows_follow_weights_and_come_from_their_source(two_sources):
    a, b = two_sources
    batches = rows(mixture(a, b), 200)
    refs = [iter(PackedDataset(p, "train", L, 1)) for p in (a, b)]
    check_rows_are_the_sources(batches, refs)
    share = torch.cat([x["source"] for x in batches]).eq(0).double().mean().item()
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / (200 * B)) ** 0.5, share  # binomial, 4 sigma
    again = rows(mixture(a, b), 200)
    assert all(same(x, y) for x, y in zip(batches, again))  # deterministic for a seed
    other = rows(mixture(a, b, seed=1), 200)
    assert not all(torch.equal(x["source"], y["source"]) for x, y in zip(batches, other))


def test_resume_exact_with_workers(two_sources):
    a, b = two_sources
    dl = build_dataloader(mixture(a, b, num_workers=2), 2)
    it = iter(dl)
    first = [next(it) for _ in range(6)]
    state = dl.state_dict()
    expected = [next(it) for _ in range(8)]
    resumed = build_dataloader(mixture(a, b, num_workers=2), 2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert all(same(x, next(it)) for x in expected)
    assert first and len(loader_dataset_states(state)) == 2
    changed = build_dataloader(mixture(a, b, wb=2.0, num_workers=2), 2)
    with pytest.raises(LoaderStateError, match="another mixture"):
        changed.load_state_dict(state)
        next(iter(changed))


def test_reshard_two_ranks_to_one_reshards_every_source(two_sources):
    a, b = two_sources
    check_rows_are_the_sources(*resharded_two_to_one(a, b, (a, b), read=7, then=40))


def test_pipe_and_fsspec_sources_read_like_local_ones(two_sources):
    fsspec = pytest.importorskip("fsspec")
    a, b = two_sources
    fs = fsspec.filesystem("memory")
    for f in Path(b).iterdir():
        fs.pipe(f"/mix/b/{f.name}", f.read_bytes())
    try:
        remote = mixture(f"pipe:cat {a}/{{}}", "memory://mix/b")
        local = mixture(a, b)
        assert all(same(x, y) for x, y in zip(rows(remote, 30), rows(local, 30)))
        by_url = PackedDataset(f"file://{a}", "train", L, B)
        assert all(same(x, y) for x, y in zip(rows(by_url, 10), rows(PackedDataset(a, "train", L, B), 10)))
        # resharding reads the tar headers of partly read shards: through the pipe and fsspec too
        check_rows_are_the_sources(*resharded_two_to_one(f"pipe:cat {a}/{{}}", "memory://mix/b", (a, b), read=5,
                                                         then=20))
    finally:
        fs.rm("/mix", recursive=True)


def test_missing_or_unreadable_source_is_one_line(tmp_path, two_sources):
    a, _ = two_sources
    with pytest.raises(ShardIndexNotFoundError, match="cannot read the shard index"):
        load_index(f"pipe:cat {tmp_path}/nope/{{}}")
    with pytest.raises(ShardIndexNotFoundError, match="memory://nowhere/index.json"):
        load_index("memory://nowhere")
    with pytest.raises(OSError, match="source .b'.*nope"):
        mixture(a, str(tmp_path / "nope"))
    (Path(a) / "train-000003.tar").unlink()
    with pytest.raises(ValueError, match="source 'a'.*train-000003.tar.*missing"):
        mixture(a, a)


@pytest.mark.parametrize("value, message", [
    ([], "non-empty list"), ([{"path": "x"}, {"path": "x"}], "same name"), ([{"path": "x", "weight": 0}], "> 0"),
    ([{"path": "x", "wieght": 1}], "keys path, weight"), ([{"path": "x", "weight": True}], "> 0")])
def test_bad_mixture_config(value, message):
    with pytest.raises(ValueError, match=message):
        normalize_sources(value)


def test_default_names():
    srcs = normalize_sources([{"path": "/d/web/"}, {"path": "s3://b/code", "weight": 2},
                              {"path": "pipe:cat /x/math/{}"}])
    assert [s["name"] for s in srcs] == ["web", "code", "math"] and [s["weight"] for s in srcs] == [1.0, 2.0, 1.0]
    assert np.isclose(sum(s["weight"] for s in srcs), 4.0)
