"""Expert parallelism on DeepSpeed's expert-parallel groups (gloo all-to-all, 2 CPU processes): EP=2 gives the
same loss and the same (fp32) gradients as EP=1 for every parameter, expert slices included."""

import pytest
import torch

from llada_scale.testing import run_ranks


@pytest.mark.distributed
def test_ep2_equals_ep1_loss_and_gradients(tmp_path):
    run_ranks(["tests/training/ep_worker.py", str(tmp_path), "2"], 2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["sharded"] == [1, 2]
        assert r["ep"]["loss"] == pytest.approx(r["ep1"]["loss"], rel=1e-6)
        lo, hi = r["expert_slice"]
        assert (lo, hi) == ((0, 4) if rank == 0 else (4, 8))
        ref, got = r["ep1"]["grads"], r["ep"]["grads"]
        assert set(ref) == set(got)
        for name, g in got.items():
            want = ref[name][lo:hi] if ".mlp.experts." in name else ref[name]
            assert g.shape == want.shape, name
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=name)
        assert any(".mlp.experts." in n and got[n].abs().sum() > 0 for n in got)
