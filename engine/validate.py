"""Held-out evaluation during training (run.eval_every): the stage's loss and FSPO's preference accuracy on
validation users (`gen-data --val-fraction`), who are never trained on. What is watched while training is
tuning, so it stays off the test users; a dataset without val users falls back to test users, with a warning
that says so in the log and `eval/split` in every record."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from fspo_engine.engine.config import TrainConfig
from fspo_engine.engine.dataset import Dataset
from fspo_engine.engine.distributed import all_gather_objects, rank_rows, world
from fspo_engine.engine.episodes import parse_shots, sample_episodes, tokenize_episodes
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.losses import preference_inputs, reward_metrics, stage_loss
from fspo_engine.engine.packing import pack_batches
from fspo_engine.engine.scoring import EpisodeLogprobs, episode_logprobs, logprob_dtype
from fspo_engine.engine.tokenizer import check_ids_fit


class Validator:
    """The held-out episodes of a run and the policy's metrics on them. `autocast`: the trainer's autocast
    context (the held-out forwards run at the training precision)."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, tokenizer, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], log=print):
        self.cfg, self.dataset, self.tokenizer, self.device, self.autocast = cfg, dataset, tokenizer, device, autocast
        self.rank, _, self.world = world()
        self.log = log
        self._episodes = None
        self.split = "val" if any(dataset.prefs.get(u.user_id) for u in dataset.users_in("val")) else "test"

    def episodes(self, model) -> list:
        """The held-out episodes: val users (else test users) at the training shot counts, a fixed sample (its
        own seed: the training draws do not move), the same for every stage; checked against `model`'s vocab."""
        if self._episodes is None:
            d = self.cfg.data
            split = self.split
            if split == "test":
                self.log(f"warning: {self.dataset.root} has no val users; run.eval_every scores test users, so "
                         "do not tune on these numbers (gen-data --val-fraction F makes a val split)")
            eps = sample_episodes(self.dataset, split, parse_shots(d.shots), seed=d.seed * 7919 + 104729,
                                  shuffle=True)  # fmt: skip
            if not eps:
                raise FspoError(f"{self.dataset.root}: run.eval_every needs val or test users with preferences")
            self._episodes = tokenize_episodes(eps[: self.cfg.run.eval_episodes], self.tokenizer,
                                               max_tokens=d.max_tokens, options=d.render_options())
            users = len({t.user_id for t in self._episodes})
            self.log(f"held-out: {len(self._episodes)} episodes of {users} {split} users (run.eval_episodes = "
                     f"{self.cfg.run.eval_episodes}, {len(eps)} available)"
                     + ("; scored after each user's true description (oracle: `fspo-engine eval` infers it "
                        "from the shots)" if d.user_description else ""))
        check_ids_fit(self.tokenizer, model.config.vocab_size, self.cfg.model.name,
                      (t.prompt_ids + t.chosen_ids + t.rejected_ids for t in self._episodes))  # fmt: skip
        return self._episodes

    def evaluate(self, stage: str, model, episodes: list, ref: EpisodeLogprobs | None) -> dict:
        """Held-out metrics of the policy now: `eval/loss` (the stage's loss: Pref-FT's as pref_ft.targets and
        pref_ft.reduction say, IPO/DPO against the reference), `eval/nll_per_token` (the chosen responses') and,
        for IPO/DPO, the implicit rewards (`eval/rewards/accuracy`: FSPO's held-out preference accuracy). Every
        rank scores its share (padded like a training step: FSDP2's collectives must line up); no RNG is drawn."""
        cfg, dev = self.cfg, self.device
        share, rows = rank_rows(episodes, lambda eps: pack_batches(eps, cfg.data.max_tokens), self.rank, self.world)
        parts = []
        model.eval()
        with torch.no_grad():
            for row, real in rows:
                with self.autocast():
                    out = episode_logprobs(model, row.to(dev), impl=cfg.model.logprob_impl)
                if real:  # share[i] is episodes[i * world + rank]
                    idx = torch.tensor(row.episodes, dtype=torch.long) * self.world + self.rank
                    parts.append((idx, out.chosen.cpu(), out.rejected.cpu(),
                                  out.chosen_tokens.cpu(), out.rejected_tokens.cpu()))  # fmt: skip
        model.train()
        E = len(episodes)
        dtype = logprob_dtype(model)
        pc, pr = torch.zeros(E, dtype=dtype), torch.zeros(E, dtype=dtype)
        ct, rt = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
        for rank_parts in all_gather_objects(parts):
            for idx, c, r, cn, rn in rank_parts:
                pc[idx], pr[idx], ct[idx], rt[idx] = c, r, cn, rn
        nll = -(pc.double().sum() / ct.sum().clamp(min=1)).item()
        # A description run's held-out episodes carry the users' true descriptions: say so in every record.
        rec = {"eval/nll_per_token": nll, "eval/episodes": E, "eval/split": self.split,
               **({"eval/description": "oracle"} if cfg.data.user_description else {})}
        if stage == "pref-ft":  # in fp64: E episodes' sums
            policy = EpisodeLogprobs(pc.double(), pr.double(), ct, rt, list(range(E)))
            return {"eval/loss": stage_loss(stage, cfg, policy).item(), **rec}
        policy = EpisodeLogprobs(pc, pr, ct, rt, list(range(E)))
        rewards = reward_metrics(*preference_inputs(policy, ref, cfg.pref.length_normalize), cfg.pref.beta)
        return {"eval/loss": stage_loss(stage, cfg, policy, ref).item(), **rec,
                **{f"eval/{k}": v.item() for k, v in rewards.items()}}
