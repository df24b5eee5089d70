"""`koala train`: the flags come from TrainConfig's and AdvConfig's fields (koala.args.option)."""
from __future__ import annotations

import json
import sys

from koala.adversarial import AdvConfig
from koala.args import add_dataclass_args, add_target_args, dataclass_kwargs
from koala.build import target_from_args
from koala.kinds import KINDS
from koala.train.config import TrainConfig
from koala.train.data import source_from_paths
from koala.train.loop import train


def config_from_args(args) -> TrainConfig:
    return TrainConfig(head=args.head, adv=AdvConfig(**dataclass_kwargs(AdvConfig, args, "adv-")),
                       **dataclass_kwargs(TrainConfig, args))


def _run(args) -> int:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    device = str(accelerator.device) if accelerator.num_processes > 1 else args.device
    target = target_from_args(args, verifies=False)
    source = source_from_paths(target, args.data, args.max_seq_len)
    held_out = source_from_paths(target, args.eval_data, args.max_seq_len) if args.eval_data else None
    manifest = train(target, source, args.out, config_from_args(args), resume=args.resume, device=device,
                     command=" ".join(sys.argv), accelerator=accelerator, eval_source=held_out)
    if "head_dir" in manifest:
        print(json.dumps({k: manifest[k] for k in ("head_dir", "head_bytes", "steps", "train_seconds",
                                                   "final_eval", "skipped_steps")}, indent=1))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("train", help="train a draft head (K layers), optionally with KOALA's adversarial term")
    p.add_argument("--head", choices=sorted(KINDS), required=True, help="the head kind")
    p.add_argument("--data", required=True, nargs="+",
                   help="cache directories (`koala distill` / `koala cache`), or one distilled JSONL (online mode)")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out cache(s) for acc@k, e.g. the target's answers to benchmark-style prompts "
                        "(default: a fixed split of --data)")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, metrics, head/, manifest.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    add_dataclass_args(p, TrainConfig, skip=("adversarial",))
    g = p.add_argument_group("KOALA adversarial learning (docs/adversarial.md)")
    add_dataclass_args(g, TrainConfig, only=("adversarial",))
    add_dataclass_args(g, AdvConfig, "adv-")
    add_target_args(p)
    p.set_defaults(func=_run)
