"""Python imports this at start-up when this folder is on PYTHONPATH (tests/unit/test_gpu_check.py
puts it there for the GPU check and every process the check starts): from then on, importing a
module whose distributions are all missing from the GPU machine's image (the list in
$SSLGRID_IMAGE_LIST, bench/gpu-image-packages.txt) raises ModuleNotFoundError, as it would there;
so do the modules named in $SSLGRID_BLOCK (bench/gpu_image.py's MISSING) whatever their metadata.
Each blocked import is appended to $SSLGRID_BLOCK_LOG when it is set."""
import importlib.abc
import importlib.metadata
import os
import re
import sys


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


with open(os.environ["SSLGRID_IMAGE_LIST"]) as _f:
    _IMAGE = {_norm(line.split("#", 1)[0].strip()) for line in _f if line.split("#", 1)[0].strip()}
_IMAGE.add("sslgrid")  # the project itself travels with the check
_ALWAYS = set(filter(None, os.environ.get("SSLGRID_BLOCK", "").split(",")))
_DISTS = importlib.metadata.packages_distributions()


class _NotOnTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = _DISTS.get(top, [])
        if top in _ALWAYS or (dists and not any(_norm(d) in _IMAGE for d in dists)):
            if os.environ.get("SSLGRID_BLOCK_LOG"):
                with open(os.environ["SSLGRID_BLOCK_LOG"], "a") as log:
                    log.write(f"{name}\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine's image)", name=name)
        return None


sys.meta_path.insert(0, _NotOnTheImage())
