"""Reference log-probs, computed once per planned epoch and cached on disk.

IPO/DPO need log π_ref(response | context) for every episode they train on. Episodes are sampled
deterministically from (seed, epoch), so the whole plan is known before the stage starts: the reference
model scores each planned epoch once, in inference mode and packed rows, and no reference forward runs
inside the training step. The cache file is keyed by the reference weights, the data and the plan, so a
changed input can never be served a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fspo_engine.data_gen.atomic import atomic_path
from fspo_engine.engine.checkpoint import sha256_file
from fspo_engine.engine.distributed import all_gather_objects
from fspo_engine.engine.scoring import score_share


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the named files' contents (sorted by name), for cache keys."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.as_posix()):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    return fingerprint_files([p for p in Path(model_dir).glob("*") if p.is_file() and
                              (p.suffix in (".safetensors", ".json", ".model"))])


def cache_key(ref_fingerprint: str, data_fingerprint: str, plan: dict) -> str:
    blob = json.dumps({"ref": ref_fingerprint, "data": data_fingerprint, "plan": plan}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ReferenceCache:
    """episode_id -> (chosen, rejected) reference log-probs, one file per planned epoch."""

    def __init__(self, cache_dir: Path, ref_fingerprint: str, data_fingerprint: str):
        self.dir = Path(cache_dir)
        self.ref_fp = ref_fingerprint
        self.data_fp = data_fingerprint
        self._mem: dict[str, dict[str, tuple[float, float]]] = {}

    def path(self, plan: dict) -> Path:
        return self.dir / f"ref-{cache_key(self.ref_fp, self.data_fp, plan)}.pt"

    def get_epoch(self, plan: dict, episodes, model, max_tokens: int, impl: str, device, log=print,
                  on_row=None, rank: int = 0, world: int = 1) -> dict[str, tuple[float, float]]:
        """Reference log-probs of one planned epoch's tokenized episodes (computed and saved on a miss).

        Under torchrun every rank calls this with the model sharded over the ranks: each scores every
        world-th episode (`score_share`), the parts are gathered, and rank 0 writes the cache file.
        """
        path = self.path(plan)
        key = path.name
        if key in self._mem:
            return self._mem[key]
        table = None
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob["episode_ids"] == [ep.episode_id for ep in episodes]:
                    table = dict(zip(blob["episode_ids"], zip(blob["chosen"].tolist(), blob["rejected"].tolist())))
            except Exception as exc:  # a corrupt cache file is recomputed, never trusted
                log(f"{path}: ignoring unreadable reference cache ({exc})")
        if world > 1 and not all(all_gather_objects(table is not None)):
            table = None  # scoring is collective (sharded model): all ranks score unless every rank has the file
        if table is None:
            was_training = model.training
            model.eval()
            out = score_share(model, episodes, max_tokens, rank, world, impl=impl, device=device, on_row=on_row)
            model.train(was_training)
            chosen, rejected = out.chosen, out.rejected
            if world > 1:
                chosen, rejected = (torch.empty(len(episodes), dtype=out.chosen.dtype) for _ in range(2))
                for r, (c, rj) in enumerate(all_gather_objects((out.chosen, out.rejected))):
                    chosen[r::world], rejected[r::world] = c, rj
            ids = [ep.episode_id for ep in episodes]
            if rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save({"episode_ids": ids, "chosen": chosen, "rejected": rejected,
                                "plan": json.dumps(plan)}, tmp)
            table = dict(zip(ids, zip(chosen.tolist(), rejected.tolist())))
        self._mem = {key: table}  # one epoch in memory at a time
        return table
