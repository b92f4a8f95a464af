"""Two gloo processes with batch b each train exactly like one process with batch 2b (CPU).

This is the test of the global-batch loss (modules/training/loss.py): with the common CLIP4Clip gather the two-process
gradient would be half the single-process one and the weights would drift apart from step 1.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from clip2video.modules.runtime.distributed import DistInfo, init_distributed
from clip2video.modules.training.loop import GlobalBatchSampler, train

STEPS = 10
B = 8  # global batch


def _batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Samples [rank·B/world, (rank+1)·B/world) of a fixed batch of B."""
    from test_training import ColourPairs

    data = ColourPairs(B)
    per = B // world
    items = [data[i] for i in range(rank * per, (rank + 1) * per)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def _grads(model: torch.nn.Module, rank: int, world: int, gather_grad: str = "exact") -> dict[str, torch.Tensor]:
    """Parameter gradients of one step on this rank's share of a fixed batch, through DDP (which averages)
    and the gathered loss."""
    from clip2video.modules.training.loss import global_batch_loss

    batch = _batch(rank, world)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    out = net(batch["input_ids"], batch["attention_mask"], batch["frames"], batch["frame_mask"])
    loss, _ = global_batch_loss(model, out.text, out.video, out.logit_scale, gather_grad)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, variant: str) -> None:
    from test_training import ColourPairs, micro_cfg, micro_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(_grads(micro_model(variant, seed=1), rank, world), Path(out) / f"grads{rank}.pt")
        torch.save(_grads(micro_model(variant, seed=1), rank, world, "local"), Path(out) / f"local{rank}.pt")
        model = micro_model(variant, seed=1)
        res = train(model, ColourPairs(96), micro_cfg(Path(out), batch_size=8, epochs=1, max_steps=STEPS), info=info)
        torch.save({"losses": res.losses, "model": model.state_dict()}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("variant", ["tab_tdb"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, variant):
    from test_training import ColourPairs, micro_cfg, micro_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same reduction order
    try:
        ref_model = micro_model(variant, seed=1)
        ref = train(ref_model, ColourPairs(96), micro_cfg(tmp_path / "one", batch_size=8, epochs=1, max_steps=STEPS))
        g_ref = _grads(micro_model(variant, seed=1), 0, 1)
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), variant), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=False)

    # gradients of one step: exactly the single-process ones (the CLIP4Clip gather would give half)
    g0 = torch.load(tmp_path / "two" / "grads0.pt", weights_only=False)
    g1 = torch.load(tmp_path / "two" / "grads1.pt", weights_only=False)
    for name, g in g_ref.items():
        assert torch.equal(g0[name], g1[name]), name
        scale = float(g.abs().max()) + 1e-12
        assert float((g0[name] - g).abs().max()) <= 1e-5 * max(scale, 1.0), name
    ratio = sum(float((g0[n] * g).sum()) for n, g in g_ref.items()) / sum(float((g * g).sum()) for g in g_ref.values())
    assert abs(ratio - 1.0) < 1e-4, f"two-process gradient is {ratio:.4f} × the single-process one"

    assert len(ref.losses) == len(r0["losses"]) == STEPS
    assert r0["losses"] == r1["losses"]  # the gathered loss is the same number on every rank
    for a, b in zip(ref.losses, r0["losses"], strict=True):
        assert abs(a - b) <= 1e-5, (ref.losses, r0["losses"])
    worst = max(float((ref_model.state_dict()[k] - r0["model"][k]).abs().max()) for k in r0["model"])
    assert worst <= 1e-5, f"weights differ by {worst}"
    for k in r0["model"]:  # DDP keeps the replicas identical
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    # and the run really moved the weights (the comparison is not between two untrained models)
    init = micro_model(variant, seed=1).state_dict()
    assert max(float((init[k] - r0["model"][k]).abs().max()) for k in init) > 1e-3

    # --gather_grad local: each rank's features get the gradient of their own rows of its copy of the loss and
    # DDP averages: the mean over ranks of the gradient through that rank's slice alone, computed here by hand
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = _local_slice_gradient(micro_model(variant, seed=1), world=2)
    finally:
        torch.set_num_threads(threads)
    l0 = torch.load(tmp_path / "two" / "local0.pt", weights_only=False)
    l1 = torch.load(tmp_path / "two" / "local1.pt", weights_only=False)
    for name, g in want.items():
        assert torch.equal(l0[name], l1[name]), name
        assert float((l0[name] - g).abs().max()) <= 1e-5 * max(float(g.abs().max()), 1.0), name
    enc = [n for n in want if n != "clip.logit_scale"]
    ratio = sum(float((l0[n] * g_ref[n]).sum()) for n in enc) / sum(float((g_ref[n] ** 2).sum()) for n in enc)
    assert abs(ratio - 0.5) < 1e-3, f"local gather gives {ratio:.4f} × the exact gradient (1/world expected)"
    assert torch.allclose(l0["clip.logit_scale"], g_ref["clip.logit_scale"], rtol=1e-5)  # not through the gather


def _local_slice_gradient(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The DDP-averaged gradient of CLIP4Clip's gather, by hand in one process: for each rank r, the gradient
    of the global-batch loss through the embedding rows of r's slice only (all other rows detached); then the
    mean over r."""
    from clip2video.modules.network.model import TextEmbedding, VideoEmbedding

    batch = _batch(0, 1)
    out = model(batch["input_ids"], batch["attention_mask"], batch["frames"], batch["frame_mask"])
    per = B // world
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}

    def only(x: torch.Tensor | None, r: int) -> torch.Tensor | None:
        if x is None:
            return None
        keep = torch.zeros(x.shape[0], 1, dtype=torch.bool)
        keep[r * per : (r + 1) * per] = True
        return torch.where(keep, x, x.detach())

    for r in range(world):
        t = TextEmbedding(only(out.text.global_, r), only(out.text.aligned, r))
        v = VideoEmbedding(only(out.video.global_, r), only(out.video.aligned, r))
        loss, _ = model.loss(t, v, out.logit_scale)
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        for (n, _p), g in zip(params.items(), grads, strict=True):
            if g is not None:
                total[n] += g / world
    return total


def test_sampler_shards_each_global_batch_contiguously():
    one = GlobalBatchSampler(40, 8, seed=5)
    two = [GlobalBatchSampler(40, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    for single, a, b in zip(one, two[0], two[1], strict=True):
        assert single == a + b
    one.set_epoch(4)
    assert list(one) != [x for x in GlobalBatchSampler(40, 8, seed=5)]  # order changes with the epoch
    # accumulation: micro-batches of world·micro samples, rank-contiguous inside each
    acc = [GlobalBatchSampler(40, 8, rank=r, world_size=2, accum=2, seed=5) for r in range(2)]
    flat = [i for m0, m1 in zip(acc[0], acc[1], strict=True) for i in m0 + m1]
    assert flat == [i for b in GlobalBatchSampler(40, 8, seed=5) for i in b]
    # resume skips consumed micro-batches
    s = GlobalBatchSampler(40, 8, seed=5)
    s.set_epoch(0, start=3)
    assert list(s) == list(GlobalBatchSampler(40, 8, seed=5))[3:] and len(s) == 2


def test_sampler_rejects_uneven_split():
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(40, 6, world_size=4)


def test_single_process_setup_needs_no_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 0, 1, torch.device("cpu"), "")
    assert info.is_main and not info.is_distributed
    assert not torch.distributed.is_initialized()


def _cli_worker(rank: int, world: int, ports: list[int], argv: list[str], out: str, cut_at: int) -> None:
    """train.py's main in a gloo process group; with ``cut_at`` the run is interrupted when that many steps are
    done (as a kill would, after latest.pt was saved) and then resumed with --resume latest in a new group."""
    from clip2video.cli.train import main
    from clip2video.modules.training import loop

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    rcs = []
    if cut_at:
        real = loop.optimizer_step

        def interrupted(run, epoch):
            if run.state.step == cut_at:
                raise KeyboardInterrupt
            return real(run, epoch)

        loop.optimizer_step = interrupted
        os.environ["MASTER_PORT"] = str(ports[1])
        rcs.append(main(argv))
        loop.optimizer_step = real
        argv = [*argv, "--resume", "latest"]
    os.environ["MASTER_PORT"] = str(ports[0])
    rcs.append(main(argv))
    (Path(out) / f"rc{rank}").write_text(" ".join(map(str, rcs)))


@pytest.mark.slow
def test_train_py_clip4clip_with_two_gloo_processes_and_resume(tmp_path):
    """train.py --recipe clip4clip --gather_grad local under 2 gloo processes (global batch 4 = 2 × 2): a run
    interrupted after step 2 and resumed ends exactly like an uninterrupted one."""
    from test_training import losses_of, make_generic_data, train_argv

    csv, feats = make_generic_data(tmp_path)
    flags = ("--recipe", "clip4clip", "--gather_grad", "local", "--save_every_steps", "1", "--eval_every", "0",
             "--device", "cpu", "--no_export")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for out, cut_at in ((ref, 0), (cut, 2)):
        out.mkdir()
        mp.spawn(_cli_worker, args=(2, [_free_port(), _free_port()], train_argv(csv, feats, out, *flags), str(out),
                                    cut_at), nprocs=2, join=True)
    assert [(ref / f"rc{r}").read_text() for r in (0, 1)] == ["0", "0"]
    assert [(cut / f"rc{r}").read_text() for r in (0, 1)] == ["130 0", "130 0"]
    a = torch.load(ref / "latest.pt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "latest.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["recipe"] == "clip4clip"
    assert a["config"]["args"]["gather_grad"] == "local" and a["config"]["model"]["mask_layout"] == "original"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses_of(ref) == losses_of(cut) and len(losses_of(ref)) == 6
    log = (ref / "log.txt").read_text()
    assert "global batch 4 (2 per process × 2 processes" in log and "recipe clip4clip: BertAdam" in log
