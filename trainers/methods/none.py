"""Random init: the floor every method must clear. Trains nothing and needs no data; its identity
is the backbone and the seed alone, so every random-init cell of a grid shares one stage."""
from __future__ import annotations

from trainers.methods.base import Method

METHOD = Method(name="none", title="Random init", source="-", cost_units=0, identity_common=("method", "seed"))
