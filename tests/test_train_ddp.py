"""Two CPU processes (gloo) training one head data-parallel end with identical weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from conftest import tiny_target
    from koala.adversarial import AdvConfig
    from koala.hidden_cache import OnlineSource
    from koala.train import TrainConfig, train

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world
    target = tiny_target("llama")
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(12):
        ids = torch.randint(2, 120, (10 + i,), generator=g).tolist()
        seqs.append((ids, [j >= 4 for j in range(len(ids))]))
    cfg = TrainConfig(head="medusa", layers=2, num_heads=2, max_steps=4, batch_size=4, lr=1e-2, warmup=1,
                      eval_sequences=2, eval_every=100, save_every=100, adversarial=True,
                      adv=AdvConfig(start=0, warmup=1, contexts=8))
    res = train(target, OnlineSource(target, seqs), os.path.join(tmp, "run"), cfg, progress=False, accelerator=acc)
    weights = {f"h.{n}": v.contiguous() for n, v in res["head"].state_dict().items()}
    weights.update({f"d.{n}": v.contiguous() for n, v in res["discriminator"].state_dict().items()})
    save_file(weights, os.path.join(tmp, f"rank{rank}.safetensors"))
    acc.wait_for_everyone()


@pytest.mark.slow  # two spawned processes: ~30 s on a loaded 2-core machine
def test_two_processes_end_identical(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("d.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = torch.zeros(())
    assert any(not torch.equal(v, start.expand_as(v)) for k, v in a.items() if "linear.weight" in k)  # it trained
