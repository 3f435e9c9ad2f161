"""``eellm-train --config cfg.yaml``, or ``torchrun --nproc-per-node N -m eellm_hf.trainer --config cfg.yaml``.

Run outside torchrun, ``eellm-train`` starts the config's ``tp * pp * dp`` processes itself (torchrun,
standalone, on this machine). The YAML is validated (:func:`eellm_hf.trainer.config.load_config`, against
``WORLD_SIZE``) before any process-group work, so a bad config fails at once on every rank with a clear message.
Any error later, e.g. a collective timing out because a peer died, ends this rank at once with a clear message
(``fail_fast``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eellm-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config_path", nargs="?", help="the trainer YAML (or use --config)")
    parser.add_argument("--config", dest="config_flag", help="the trainer YAML")
    args = parser.parse_args(argv)
    args.config = args.config_flag or args.config_path
    if not args.config:
        parser.error("a config file is required: --config cfg.yaml")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.launch import exec_torchrun, launched_by_torchrun

    launched = launched_by_torchrun()
    try:
        cfg = load_config(args.config, world_size=int(os.environ["WORLD_SIZE"]) if launched else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eellm-train: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    if not launched and cfg.parallelism.world_size > 1:
        exec_torchrun(args.config, cfg.parallelism.world_size)

    from eellm_hf.trainer.rank_exit import destroy_process_groups, fail_fast
    from eellm_hf.trainer.training_run import run

    with fail_fast():
        run(cfg)
        destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
