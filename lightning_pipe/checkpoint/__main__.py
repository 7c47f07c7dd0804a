"""``python -m lightning_pipe.checkpoint consolidate DIR OUT.ckpt`` | ``shard FILE DIR``: see :mod:`.convert`."""

from __future__ import annotations

import argparse
import sys

from lightning_pipe.checkpoint.convert import consolidate, shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_pipe.checkpoint",
                                     description="Convert PipelineStrategy checkpoints between the sharded and the "
                                                 "full format.")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("consolidate", help="a sharded checkpoint folder -> one standard Lightning file "
                                                  "(YourModule.load_from_checkpoint opens it on one device)")
    one.add_argument("folder")
    one.add_argument("output")
    many = commands.add_parser("shard", help="a full checkpoint file -> a sharded checkpoint folder")
    many.add_argument("file")
    many.add_argument("folder")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "consolidate":
            consolidate(arguments.folder, arguments.output)
        else:
            shard(arguments.file, arguments.folder)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
