"""Runs `onestep ARGS...` in a subprocess with test hooks, so tests can SIGKILL it at chosen moments.

    python tests/crash_worker.py [--hang-at-save STEP] [--step-delay S] [--write-delay S] [--marker FILE] -- ARGS...

--hang-at-save STEP  while checkpoint STEP is being saved (its files written to the temporary folder, not yet renamed
                     into place), touch --marker and hang: the test kills the process *during* the save.
--step-delay S       sleep S seconds after every checkpoint save (gives the test time to kill between steps).
--write-delay S      sleep S seconds before every PNG that `onestep sample` writes to a folder.
Nothing here changes what is computed: the hooks only wait.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-at-save", type=int)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--write-delay", type=float, default=0.0)
    parser.add_argument("--marker")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args

    if opts.hang_at_save is not None:
        from onestep.training import checkpoint

        fsync, tag = checkpoint._fsync, f".tmp_step_{opts.hang_at_save:07d}_"

        def hanging_fsync(path):
            fsync(path)
            if tag in str(path):
                Path(opts.marker).write_text(str(path))
                time.sleep(600)

        checkpoint._fsync = hanging_fsync
    if opts.step_delay:
        from onestep.training.trainer import Trainer

        save = Trainer.save_checkpoint

        def slow_save(self, step):
            save(self, step)
            time.sleep(opts.step_delay)

        Trainer.save_checkpoint = slow_save
    if opts.write_delay:
        from onestep.sampling import bulk

        write = bulk.write_png

        def slow_write(path, pixels):
            time.sleep(opts.write_delay)
            write(path, pixels)

        bulk.write_png = slow_write

    from onestep.cli import main as onestep_main

    return onestep_main(args)


if __name__ == "__main__":
    sys.exit(main())
