"""Ring and Ulysses attention on 2 and 4 CPU processes (gloo) vs the single-process float64 reference.

Spawning is the slow part, so each world size spawns once (cached per test module) and runs its cases of
cp_worker.CASES_BY_WORLD; each case is then its own test here.
"""
import json

import pytest
import torch.multiprocessing as mp

import cp_worker

_spawned = {}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    def run(world):
        if world not in _spawned:
            tmp = tmp_path_factory.mktemp(f"cp{world}")
            # A file:// rendezvous in a fresh directory: no port to collide with other test runs.
            mp.spawn(cp_worker.main, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
            _spawned[world] = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
        return _spawned[world]
    return run


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in cp_worker.CASES_BY_WORLD.items() for c in cases])
def test_matches_single_process_reference(outcomes, world, case):
    for rank, results in enumerate(outcomes(world)):
        assert results.get(case) == "ok", f"world {world}, rank {rank}, case {case}:\n{results.get(case)}"
