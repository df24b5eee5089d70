"""Round 12: tokens/s of the `koala cache` pass (final states + three aux layers) in fp32 and bf16, on koala's C
kernels and on torch's own (the model as transformers runs it), for one batch of random token ids.

    .venv/bin/python docs/results/round12/cache_speed.py 512 8     # sequence length, rows
"""
import sys
import time
from types import SimpleNamespace

import torch

from koala.hidden_cache import target_hidden
from koala.target import load_target


def main(length: int, rows: int) -> None:
    torch.set_num_threads(2)
    fp32 = load_target("smollm2", "cpu", torch.float32, exact_attention=False)  # what `koala cache` loads
    ids = torch.randint(0, fp32.config.vocab_size, (rows, length))
    valid = torch.ones(rows, length, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16):
        target = fp32.with_dtype(dtype)
        stock = SimpleNamespace(body=target.stock_model().get_decoder())
        for name, t in (("koala kernels", target), ("torch kernels", stock)):
            with torch.inference_mode():
                target_hidden(t, ids[:1, :64], valid[:1, :64], (2, 15, 27))  # warm-up
                start = time.perf_counter()
                target_hidden(t, ids, valid, (2, 15, 27))
                seconds = time.perf_counter() - start
            print(f"{str(dtype)[6:]:9s} {name}: {rows * length / seconds:5.0f} tok/s ({rows} x {length})", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
