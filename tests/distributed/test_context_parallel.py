"""Ring and Ulysses attention on 2 and 4 CPU processes (gloo) vs the single-process float64 reference.

Spawning is the slow part, so each world size spawns once (module-scoped fixture) and runs every case
of cp_worker.CASES; each case is then its own test here.
"""
import json

import pytest
import torch.multiprocessing as mp

import cp_worker


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def outcomes(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"cp{world}")
    # A file:// rendezvous in a fresh directory: no port to collide with other test runs.
    mp.spawn(cp_worker.main, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", sorted(cp_worker.CASES))
def test_matches_single_process_reference(outcomes, case):
    for rank, results in enumerate(outcomes):
        assert results.get(case) == "ok", f"rank {rank}, case {case}:\n{results.get(case)}"
