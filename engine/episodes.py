"""Few-shot episodes: sample episodes per user from a preference dataset, render and tokenize them.

An episode (FSPO, arXiv 2502.19312) is N of one user's preference pairs shown as examples, then a held-out
question of the same user with a chosen and a rejected response. Three steps, each a plain function:

    dataset  = load_dataset(dir)                                   # engine/dataset.py: every record checked
    episodes = sample_episodes(dataset, "train", shots=8, seed=0, epoch=0)
    tokens   = tokenize_episodes(episodes, tokenizer, max_tokens=8192)

Sampling is a pure function of (seed, epoch, user id): the same arguments give the same episodes on any
machine and in any process (numpy's SeedSequence, never Python's salted `hash`). Within an epoch each of a
user's preferences is the target once (or `episodes_per_user` of them, drawn without replacement), and its
shots are drawn from that user's other preferences, so a target is never among its own shots.

`official_windows` builds instead the episodes of the released FSPO loader (`data.episode_sampling =
official_windows`): windows of N shots + 1 target over each user's shuffled preferences, with the released
loader's random draws, so that a dataset imported from the released files gives its very episodes.

Rendering follows the official FSPO code's text format (DESIGN.md "Episode rendering"); texts are stripped
as the official code strips them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The dataset's reader and types are part of this module's API too (`__all__`): one reads a dataset to sample it.
from fspo_engine.engine.dataset import DATASET_FORMAT, Dataset, Preference, User, load_dataset
from fspo_engine.engine.errors import FspoError

ShotsSpec = int | tuple[int, int]  # a fixed count, or an inclusive range sampled per episode


# ----------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: `shots` (oldest first, rendered as Example 1..n) then the `target` pair."""

    episode_id: str  # f"{user_id}/e{epoch}/{k}": k is the target's index among the user's preferences
    user_id: str
    shots: tuple[Preference, ...]
    target: Preference
    shots_requested: int  # what --shots asked for; more than len(shots) when the user has too few prefs
    description: str = ""  # the user's description, for the user-description target

    @property
    def n_shots(self) -> int:
        return len(self.shots)


def parse_shots(text: str | int) -> ShotsSpec:
    """'8' -> 8; '1-8' -> (1, 8) (inclusive, sampled per episode). Raises FspoError on anything else."""
    if isinstance(text, int):
        spec: ShotsSpec = text
    else:
        parts = [p.strip() for p in str(text).strip().split("-")]
        if not all(p.isascii() and p.isdigit() for p in parts):  # int() would also take "1_0", "+2", " 8 "
            raise FspoError(f"--shots: expected N or LO-HI (e.g. 8 or 1-8), got {text!r}")
        nums = [int(p) for p in parts]
        if len(nums) == 1:
            spec = nums[0]
        elif len(nums) == 2 and nums[0] <= nums[1]:
            spec = (nums[0], nums[1])
        else:
            raise FspoError(f"--shots: expected N or LO-HI with LO <= HI, got {text!r}")
    lo = spec if isinstance(spec, int) else spec[0]
    if lo < 0:
        raise FspoError(f"--shots: must be >= 0, got {text!r}")
    return spec


def _user_key(user_id: str) -> int:
    """A stable 64-bit integer for a user id (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "little")


def sample_episodes(
    dataset: Dataset,
    split: str | None,
    shots: ShotsSpec,
    seed: int,
    epoch: int = 0,
    episodes_per_user: int | None = None,
    shuffle: bool = False,
) -> list[Episode]:
    """Episodes for one epoch: for each user of `split`, each preference is the target once (or
    `episodes_per_user` targets drawn without replacement), with shots drawn from the user's other
    preferences. `shots` is a count or an inclusive (lo, hi) range drawn per episode; a user with fewer
    other preferences gets fewer shots (`Episode.shots_requested` keeps what was asked).

    Deterministic in (seed, epoch, user id): adding or removing other users changes no user's draws.
    Episodes come grouped by user in users.jsonl order, targets in prefs.jsonl order, unless `shuffle`.
    """
    shots = parse_shots(shots) if isinstance(shots, str) else shots
    lo, hi = (shots, shots) if isinstance(shots, int) else shots
    if lo < 0 or hi < lo:
        raise FspoError(f"shots: need 0 <= lo <= hi, got {shots!r}")
    if episodes_per_user is not None and episodes_per_user < 1:
        raise FspoError(f"episodes_per_user must be >= 1, got {episodes_per_user}")
    episodes: list[Episode] = []
    for user in dataset.users_in(split):
        prefs = dataset.prefs.get(user.user_id, [])
        n = len(prefs)
        if n == 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _user_key(user.user_id)]))
        if episodes_per_user is None or episodes_per_user >= n:
            targets = list(range(n))
        else:
            targets = sorted(rng.choice(n, size=episodes_per_user, replace=False).tolist())
        for k in targets:
            want = int(rng.integers(lo, hi + 1)) if hi > lo else lo
            take = min(want, n - 1)
            # Draw from the n-1 other preferences: indices >= k shift up by one to skip the target.
            drawn = rng.choice(n - 1, size=take, replace=False) if take else np.zeros(0, dtype=np.int64)
            picked = (drawn + (drawn >= k)).tolist()
            episodes.append(
                Episode(
                    episode_id=f"{user.user_id}/e{epoch}/{k}",
                    user_id=user.user_id,
                    shots=tuple(prefs[i] for i in picked),
                    target=prefs[k],
                    shots_requested=want,
                    description=user.description,
                )
            )
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(episodes))
        episodes = [episodes[i] for i in order]
    return episodes


OFFICIAL_EPOCH_SEEDS = 1_000_000  # the released loader draws this many per-epoch shuffle seeds before anything


def official_windows(
    dataset: Dataset,
    split: str | None,
    shots: int,
    seed: int = 0,
    passes: int | None = None,
) -> list[Episode]:
    """The episode set of the released FSPO loader (`get_roleplay` / `get_review` / `get_elix`), in its order.

    With numpy's legacy RandomState seeded as the released `get_batch_iterator` seeds it (`seed`, and its
    1e6 per-epoch seeds drawn first), the loader makes `passes` passes (2(N+1) for training, its default;
    the released roleplay test split makes 1). In each pass it takes the users in users.jsonl order (the
    importer writes them in the loader's `groupby` order: sorted levels), shuffles each user's preferences
    (a permutation, as pandas' `sample(frac=1)` draws it) and cuts windows of N + 2: the first N are the
    shots, the next one the target, and the last one is left out (the released code's `end = start +
    (num_shots + 2)`); a remainder shorter than a window is left out too. A user with fewer than N + 2
    preferences gives no episode.

    Unlike `sample_episodes`, the draws run through users in order: adding a user moves later users' draws,
    as in the released loader. Every epoch trains on this same set; `official_epoch_order` orders it.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise FspoError(f"official windows take one shot count N >= 0, got {shots!r}")
    passes = 2 * (shots + 1) if passes is None else passes
    rng = np.random.RandomState(seed)
    rng.randint(0, 2**32, size=OFFICIAL_EPOCH_SEEDS)  # the epoch seeds come first: the draws below follow them
    width = shots + 2
    episodes: list[Episode] = []
    for p in range(passes):
        for user in dataset.users_in(split):
            prefs = dataset.prefs.get(user.user_id, [])
            if not prefs:
                continue  # no group in the released loader's groupby: no draw
            order = rng.permutation(len(prefs))
            for w in range(len(prefs) // width):
                rows = [prefs[i] for i in order[w * width : (w + 1) * width]]
                episodes.append(
                    Episode(
                        episode_id=f"{user.user_id}/w{p}.{w}",
                        user_id=user.user_id,
                        shots=tuple(rows[:shots]),
                        target=rows[shots],
                        shots_requested=shots,
                        description=user.description,
                    )
                )
    return episodes


def official_epoch_order(episodes: Sequence[Episode], seed: int, epoch: int, user_description: bool = False):
    """`official_windows`' episodes in the order the released `get_batch_iterator` trains them in `epoch`.

    The released loader keys its data by prompt text: episodes whose rendered prompts are equal are one
    entry, their pairs kept together in creation order. Each epoch shuffles the entries in place with
    Python's `random` seeded by that epoch's seed, so epoch e's order is e + 1 shuffles of the creation order.
    """
    seeds = np.random.RandomState(seed).randint(0, 2**32, size=epoch + 1)  # the first epoch + 1 of its 1e6
    entries: dict[str, list[Episode]] = {}
    for ep in episodes:
        entries.setdefault(render_prompt(ep.shots, ep.target.question, user_description), []).append(ep)
    flat = list(entries.values())
    for e in range(epoch + 1):
        random.Random(int(seeds[e])).shuffle(flat)
    return [ep for entry in flat for ep in entry]


# ----------------------------------------------------------------------------------------------------------
# Rendering (DESIGN.md "Episode rendering": the official FSPO text format, spaces and all)

TASK_PREFERRED = "Given the examples above, generate a preferred response to the following question."
TASK_DESCRIPTION = (
    "Generate a user description based on the examples above. Then, generate a preferred "
    "response to the following question."
)
TASK_ZERO_SHOT = "Generate a response to the following question."


# The fixed pieces of the format: a tokenizer trained for a from-scratch model keeps each as one token.
FORMAT_PIECES = ("# Example ", "## Question \n", "## Preferred Response \n", "## Dispreferred Response \n",
                 "# Task\n", "## User Description\n", TASK_PREFERRED + "\n", TASK_DESCRIPTION + "\n",
                 TASK_ZERO_SHOT + "\n")


def render_prompt(shots: Sequence[Preference], question: str, user_description: bool = False) -> str:
    """The episode context: one block per shot, then the task line and the target question."""
    parts = []
    for i, p in enumerate(shots, start=1):
        parts.append(
            f"# Example {i}\n"
            f"## Question \n{p.question.strip()}\n"
            f"## Preferred Response \n{p.chosen.strip()}\n"
            f"## Dispreferred Response \n{p.rejected.strip()}\n"
            "\n"
        )
    # As in the official code, zero shots always uses the plain task line (no examples to describe from).
    task = TASK_ZERO_SHOT if not shots else TASK_DESCRIPTION if user_description else TASK_PREFERRED
    parts.append(f"# Task\n{task}\n## Question \n{question.strip()}\n")
    return "".join(parts)


def render_response(text: str, description: str | None = None) -> str:
    """A target response; with the user-description option the description comes first."""
    head = f"## User Description\n{description.strip()}\n" if description is not None else ""
    return f"{head}## Preferred Response \n{text.strip()}\n"


# ----------------------------------------------------------------------------------------------------------
# Tokenizing with the truncation policy


TRUNCATE = ("drop_oldest_shots", "keep_start")
REJECTED_DESCRIPTION = ("shared", "rejected_persona")


@dataclass(frozen=True)
class RenderOptions:
    """How episodes become token ids (a run's `[data]` keys of the same names: `DataSection.render_options()`)."""

    user_description: bool = False  # targets start with "## User Description" (the task line says so too)
    bos: bool = True  # the prompt starts with the tokenizer's bos (the released loader adds no special tokens)
    truncate: str = "drop_oldest_shots"  # over the budget: drop_oldest_shots, or keep_start (cut the prompt's end)
    rejected_description: str = "shared"  # with user_description, the rejected branch's: shared or rejected_persona

    def __post_init__(self):
        if self.truncate not in TRUNCATE:
            raise FspoError(f"truncate must be {' or '.join(TRUNCATE)}, got {self.truncate!r}")
        if self.rejected_description not in REJECTED_DESCRIPTION:
            raise FspoError(f"rejected_description must be {' or '.join(REJECTED_DESCRIPTION)}, got "
                            f"{self.rejected_description!r}")  # fmt: skip


@dataclass
class TokenizedEpisode:
    """Token ids of one episode: prompt = [bos] + tok(prompt) (tok(prompt) with bos=False); each response =
    tok(response) + [eos]."""

    episode_id: str
    user_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    n_shots: int  # shots kept after truncation
    shots_requested: int
    shots_available: int  # shots sampled before truncation (< requested when the user has too few prefs)
    prompt_tokens_cut: int = 0  # tokens cut from the prompt's end (truncate = keep_start)

    @property
    def responses(self) -> list[list[int]]:
        """The branches of the packed block, in branch order (1 = chosen, 2 = rejected)."""
        return [self.chosen_ids, self.rejected_ids]

    @property
    def num_tokens(self) -> int:
        """Length of the packed block [context | chosen | rejected]."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def target_texts(episode: Episode, user_description: bool = False,
                 rejected_description: str = "shared") -> tuple[str, str]:
    """The chosen and rejected target texts. With the user-description option both start with a description:
    the user's on both branches ("shared": it cancels in an IPO/DPO margin), or on the rejected branch the
    description of the persona the rejected response was written for ("rejected_persona", the released
    code's `persona_rejected`: the margin then also scores the user's description against that one)."""
    if rejected_description not in REJECTED_DESCRIPTION:
        raise FspoError(f"rejected_description must be {' or '.join(REJECTED_DESCRIPTION)}, got {rejected_description!r}")
    target = episode.target
    if not user_description:
        return render_response(target.chosen), render_response(target.rejected)
    rejected_desc = episode.description
    if rejected_description == "rejected_persona":
        if target.rejected_description is None:
            raise FspoError(f"preference {target.pref_id} (episode {episode.episode_id}) has no rejected_description: "
                            "data.rejected_description = rejected_persona needs one on every preference "
                            "(`fspo-engine gen-data --import` writes it for review and elix)")  # fmt: skip
        rejected_desc = target.rejected_description
    return render_response(target.chosen, episode.description), render_response(target.rejected, rejected_desc)


def _keep_start(episode: Episode, prompt: list[int], chosen: list[int], rejected: list[int],
                max_tokens: int) -> tuple[list[int], int]:
    """keep_start: the prompt's first tokens that leave room for both responses, and how many were cut."""
    keep = max_tokens - len(chosen) - len(rejected)
    if keep < 1:
        raise FspoError(f"episode {episode.episode_id}: its responses alone need {len(chosen) + len(rejected)} "
                        f"tokens (chosen {len(chosen)}, rejected {len(rejected)}) with a prompt of at least 1, "
                        f"more than the budget of {max_tokens}")  # fmt: skip
    return prompt[:keep], len(prompt) - keep


def tokenize_episode(episode: Episode, tokenizer, max_tokens: int | None = None,
                     options: RenderOptions = RenderOptions()) -> TokenizedEpisode:
    """Render and tokenize one episode so that its packed block (prompt + chosen + rejected) fits in
    `max_tokens`. The responses are never cut. `options.truncate`:
    - "drop_oldest_shots" (DESIGN.md): drop whole shots, oldest first; the target question is never cut, and
      an episode that does not fit even with zero shots is an FspoError naming it.
    - "keep_start" (the released code's truncation mode): keep the prompt's first tokens, cutting its end
      (the target question first, then the newest shots), as the released `keep_start` keeps a prompt's first
      `max_prompt_length` tokens; here as many as leave room for both responses.
    `options.bos`: the prompt starts with the tokenizer's bos (the released loader adds no special tokens)."""
    user_description = options.user_description
    chosen_text, rejected_text = target_texts(episode, user_description, options.rejected_description)
    chosen = tokenizer.encode(chosen_text) + [tokenizer.eos_id]
    rejected = tokenizer.encode(rejected_text) + [tokenizer.eos_id]
    head = [tokenizer.bos_id] if options.bos else []
    shots = list(episode.shots)
    cut = 0
    while True:
        prompt = head + tokenizer.encode(render_prompt(shots, episode.target.question, user_description))
        total = len(prompt) + len(chosen) + len(rejected)
        if max_tokens is None or total <= max_tokens:
            break
        if options.truncate == "keep_start":
            prompt, cut = _keep_start(episode, prompt, chosen, rejected, max_tokens)
            break
        if not shots:
            raise FspoError(
                f"episode {episode.episode_id}: needs {total} tokens with zero shots "
                f"(prompt {len(prompt)}, chosen {len(chosen)}, rejected {len(rejected)}), "
                f"more than the budget of {max_tokens}"
            )
        shots.pop(0)  # oldest first: the shots nearest the target question are kept
    return TokenizedEpisode(
        episode_id=episode.episode_id,
        user_id=episode.user_id,
        prompt_ids=prompt,
        chosen_ids=chosen,
        rejected_ids=rejected,
        n_shots=len(shots),
        shots_requested=episode.shots_requested,
        shots_available=episode.n_shots,
        prompt_tokens_cut=cut,
    )


def tokenize_episodes(episodes: Sequence[Episode], tokenizer, max_tokens: int | None = None,
                      options: RenderOptions = RenderOptions()) -> list[TokenizedEpisode]:
    """`tokenize_episode` for each episode; every episode that cannot fit is reported in one FspoError.

    All texts are first encoded in one batch (fast tokenizers run it in parallel); only episodes over the
    budget go through `tokenize_episode`.
    """
    targets = [target_texts(ep, options.user_description, options.rejected_description) for ep in episodes]
    texts = [render_prompt(ep.shots, ep.target.question, options.user_description) for ep in episodes]
    texts += [c for c, _ in targets] + [r for _, r in targets]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
    head = [tokenizer.bos_id] if options.bos else []
    n = len(episodes)
    out, errors = [], []
    for i, ep in enumerate(episodes):
        prompt = head + list(ids[i])
        chosen = list(ids[n + i]) + [tokenizer.eos_id]
        rejected = list(ids[2 * n + i]) + [tokenizer.eos_id]
        if max_tokens is None or len(prompt) + len(chosen) + len(rejected) <= max_tokens:
            out.append(
                TokenizedEpisode(
                    ep.episode_id,
                    ep.user_id,
                    prompt,
                    chosen,
                    rejected,
                    n_shots=ep.n_shots,
                    shots_requested=ep.shots_requested,
                    shots_available=ep.n_shots,
                )
            )
            continue
        try:
            out.append(tokenize_episode(ep, tokenizer, max_tokens, options))
        except FspoError as exc:
            errors.append(str(exc))
    if errors:  # one line: the episodes fail for one reason (the budget), the first names it
        more = f" (and {len(errors) - 1} more episodes that do not fit)" if len(errors) > 1 else ""
        raise FspoError(errors[0] + more)
    return out


def episode_stats(episodes: Sequence[TokenizedEpisode]) -> dict:
    """Counts a run should log: how many episodes got fewer shots than asked, and why."""
    n = len(episodes)
    short = sum(e.shots_available < e.shots_requested for e in episodes)
    truncated = sum(e.n_shots < e.shots_available for e in episodes)
    tokens = [e.num_tokens for e in episodes]
    return {
        "episodes": n,
        "users": len({e.user_id for e in episodes}),
        "mean_shots": float(np.mean([e.n_shots for e in episodes])) if n else 0.0,
        "episodes_short_of_prefs": short,  # the user had too few other preferences
        "episodes_truncated": truncated,  # shots dropped to fit the token budget
        "shots_dropped_by_truncation": sum(e.shots_available - e.n_shots for e in episodes),
        "episodes_prompt_cut": sum(e.prompt_tokens_cut > 0 for e in episodes),  # truncate = keep_start
        "mean_tokens": float(np.mean(tokens)) if n else 0.0,
        "max_tokens": max(tokens) if n else 0,
    }


__all__ = [
    "DATASET_FORMAT",
    "Dataset",
    "Episode",
    "Preference",
    "ShotsSpec",
    "TokenizedEpisode",
    "User",
    "episode_stats",
    "load_dataset",
    "official_epoch_order",
    "official_windows",
    "parse_shots",
    "render_prompt",
    "render_response",
    "sample_episodes",
    "tokenize_episode",
    "target_texts",
    "tokenize_episodes",
]
