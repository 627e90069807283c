"""python -m tools.tiny_models DIFFUSERS_DIR [NAME ...]: build small offline models into a folder."""

import argparse

from . import MODELS, SHIPPED, TEST_MODELS, build_models

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("diffusers_dir", help="e.g. ComfyUI/models/diffusers")
parser.add_argument("names", nargs="*", default=list(TEST_MODELS), help=f"any of {sorted(MODELS) + sorted(SHIPPED)}")
parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
args = parser.parse_args()
for path in build_models(args.diffusers_dir, args.names, args.force):
    print(path)
