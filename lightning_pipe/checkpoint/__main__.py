"""``python -m lightning_pipe.checkpoint consolidate DIR OUT.ckpt`` | ``shard FILE DIR``: see :mod:`.convert`."""

from __future__ import annotations

import argparse
import sys
import warnings

from torch.distributed.checkpoint.api import CheckpointException

from lightning_pipe.checkpoint.convert import consolidate, shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_pipe.checkpoint",
                                     description="Convert PipelineStrategy checkpoints between the sharded and the "
                                                 "full format.")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("consolidate", help="a sharded checkpoint folder -> one standard Lightning file "
                                                  "(YourModule.load_from_checkpoint opens it on one device)")
    one.add_argument("folder", help="the sharded checkpoint folder a fit wrote")
    one.add_argument("output", help="the file to write")
    many = commands.add_parser("shard", help="a full checkpoint file -> a sharded checkpoint folder")
    many.add_argument("file", help="a full pipeline checkpoint file, or one device's without optimizer states (a "
                                   "pipeline resumes one device's file with them directly)")
    many.add_argument("folder", help="the folder to write (one there is replaced)")
    arguments = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # torch's note that it reads or writes in one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            if arguments.command == "consolidate":
                tensors, step = consolidate(arguments.folder, arguments.output)
                print(f"wrote {arguments.output}: one standard Lightning checkpoint, {tensors} tensors, step {step}; "
                      f"YourModule.load_from_checkpoint({str(arguments.output)!r}) opens it on one device")
            else:
                tensors, step = shard(arguments.file, arguments.folder)
                print(f"wrote {arguments.folder}: a sharded checkpoint folder, {tensors} tensors, step {step}; "
                      f"Trainer(strategy=PipelineStrategy(...)).fit(model, ckpt_path={str(arguments.folder)!r}) "
                      f"resumes from it on any layout")
    except (OSError, ValueError, CheckpointException) as error:  # (DCP's is a BaseException: a full disk)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
