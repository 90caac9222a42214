"""FID (and KID, precision/recall, Inception Score) through torch-fidelity: the same command as `onestep fid`.

    python scripts/fid.py runs/quickstart/pipeline onestep:digits -n 1000 --seed 1
    python scripts/fid.py PIPELINE cifar10-train --inception-weights weights-inception-2015-12-05-6726825d.pth
    accelerate launch scripts/fid.py PIPELINE cifar10-train

`python scripts/fid.py --help` lists the inputs, options and protocol (onestep/eval/fid_cli.py and its fid_inputs,
fid_extractors, fid_generation and fid_statistics modules hold the logic).
"""
import sys

from onestep.cli import main

if __name__ == "__main__":
    sys.exit(main(["fid", *sys.argv[1:]]))
