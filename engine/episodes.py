"""Few-shot episodes: read a preference dataset, sample episodes per user, render and tokenize them.

An episode (FSPO, arXiv 2502.19312) is N of one user's preference pairs shown as examples, then a held-out
question of the same user with a chosen and a rejected response. Three steps, each a plain function:

    dataset  = load_dataset(dir)                                   # validates every record first
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

import codecs
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fspo_engine.engine.errors import FspoError

DATASET_FORMAT = "fspo-prefs/1"
SPLITS = ("train", "test")
MAX_REPORTED_ERRORS = 20

ShotsSpec = int | tuple[int, int]  # a fixed count, or an inclusive range sampled per episode


# ----------------------------------------------------------------------------------------------------------
# Dataset directory (DESIGN.md "Preference dataset directory")


@dataclass(frozen=True)
class Preference:
    pref_id: str
    user_id: str
    question: str
    chosen: str
    rejected: str
    # prefs.jsonl's optional `rejected_description`: the description of the persona the rejected response
    # was written for (the released code's `persona_rejected`); data.rejected_description = rejected_persona
    rejected_description: str | None = None


@dataclass(frozen=True)
class User:
    user_id: str
    domain: str
    split: str  # "train" | "test"
    description: str  # the oracle user description (target of the user-description option)
    traits: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Dataset:
    root: Path
    manifest: dict
    users: dict[str, User]  # user_id -> User, in users.jsonl order
    prefs: dict[str, list[Preference]]  # user_id -> that user's preferences, in prefs.jsonl order

    def users_in(self, split: str | None) -> list[User]:
        """Users of one split ("train", "test"), or all users for None."""
        if split is not None and split not in SPLITS:
            raise FspoError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [u for u in self.users.values() if split is None or u.split == split]

    @property
    def num_prefs(self) -> int:
        return sum(len(p) for p in self.prefs.values())


class _Errors:
    """Collects `path:line: reason` lines so that one run reports every bad record, not just the first."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, where: str, reason: str):
        self.lines.append(f"{where}: {reason}")

    def raise_if_any(self):
        if not self.lines:
            return
        shown = self.lines[:MAX_REPORTED_ERRORS]
        more = len(self.lines) - len(shown)
        if more:
            shown.append(f"... and {more} more error(s) ({len(self.lines)} in all)")
        raise FspoError("\n".join(shown))


def _type_name(value) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes without a leading UTF-8 BOM (utf-8-sig semantics: Windows editors and pandas'
    `encoding="utf-8-sig"` exports write one). The BOM sits inside line 1, so line numbers are unchanged;
    a BOM anywhere else is still malformed JSON."""
    raw = path.read_bytes()
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def _is_unicode(value) -> bool:
    """False if a string inside `value` (str, or list/dict of them, keys included) holds a lone surrogate.
    JSON's "\\ud800" escape is valid JSON but not valid Unicode: it would pass the reader and then crash
    the tokenizer (or any UTF-8 writer) with a traceback, far from the record that caused it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_unicode(k) and _is_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_unicode(v) for v in value)
    return True


_NOT_UNICODE = "is not valid Unicode (lone surrogate)"


def _read_jsonl(path: Path, errors: _Errors) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line of a JSON Lines file; problems go to `errors`
    (a generator, so the caller's checks of each record land in `errors` in line order)."""
    if not path.is_file():
        errors.add(str(path), "missing (a dataset directory has manifest.json, users.jsonl and prefs.jsonl)")
        return
    n_records = n_errors = 0
    raw = _read_bytes(path)
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(where, f"invalid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})")
            n_errors += 1
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.add(where, f"malformed JSON ({exc.msg} at column {exc.colno})")
            n_errors += 1
            continue
        if not isinstance(obj, dict):
            errors.add(where, f"expected a JSON object, got {_type_name(obj)}")
            n_errors += 1
            continue
        n_records += 1
        yield lineno, obj
    if not n_records and not n_errors:
        errors.add(str(path), "empty file (expected one JSON object per line)")


def _check_fields(obj: dict, spec: dict[str, type], where: str, errors: _Errors) -> bool:
    ok = True
    for name, kind in spec.items():
        if name not in obj:
            errors.add(where, f"missing field {name!r}")
            ok = False
        elif not isinstance(obj[name], kind) or isinstance(obj[name], bool) and kind is not bool:
            errors.add(where, f"field {name!r} must be {_type_name(kind())}, got {_type_name(obj[name])}")
            ok = False
        elif kind is str and name.endswith("_id") and not obj[name]:
            errors.add(where, f"field {name!r} must not be empty")
            ok = False
        elif not _is_unicode(obj[name]):
            errors.add(where, f"field {name!r} {_NOT_UNICODE}")
            ok = False
    return ok


_USER_FIELDS = {"user_id": str, "domain": str, "split": str, "description": str, "traits": dict}
_PREF_FIELDS = {"pref_id": str, "user_id": str, "question": str, "chosen": str, "rejected": str}


def _read_manifest(path: Path, errors: _Errors) -> dict:
    if not path.is_file():
        why = "(a dataset directory has manifest.json, users.jsonl and prefs.jsonl)"
        if (path.parent / ".gen-state").is_dir():
            # gen-data writes the manifest last (and removes an old one just before it swaps files in), so
            # no manifest beside its state directory means a run stopped part-way.
            why = "(gen-data has not finished here: re-run the same gen-data command)"
        errors.add(str(path), f"missing {why}")
        return {}
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        errors.add(f"{path}:{line}", "invalid UTF-8")
        return {}
    if not text.strip():
        errors.add(str(path), "empty file (expected a JSON object)")
        return {}
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        errors.add(f"{path}:{exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno})")
        return {}
    if not isinstance(manifest, dict):
        errors.add(str(path), f"expected a JSON object, got {_type_name(manifest)}")
        return {}
    bad = [name for name, value in manifest.items() if not (_is_unicode(name) and _is_unicode(value))]
    if bad:
        errors.add(str(path), f"field {bad[0]!r} {_NOT_UNICODE}")
        return {}  # it would crash whatever copies the manifest into a run directory
    if manifest.get("format") != DATASET_FORMAT:
        errors.add(str(path), f"format must be {DATASET_FORMAT!r}, got {manifest.get('format')!r}")
    for name, kind in (("domains", list), ("seed", int), ("generator", dict), ("counts", dict)):
        if name in manifest and (not isinstance(manifest[name], kind) or isinstance(manifest[name], bool)):
            errors.add(
                str(path), f"field {name!r} must be {_type_name(kind())}, got {_type_name(manifest[name])}"
            )
    return manifest


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read and validate a dataset directory. Every malformed record is reported (`path:line: reason`)
    in one FspoError before anything is returned: nothing downstream ever sees a half-valid dataset."""
    root = Path(path)
    if not root.is_dir():
        raise FspoError(f"{root}: not a dataset directory")
    errors = _Errors()
    manifest_path = root / "manifest.json"
    manifest_id = _file_identity(manifest_path)
    manifest = _read_manifest(manifest_path, errors)

    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    users_path = root / "users.jsonl"
    errors_before_users = len(errors.lines)
    for lineno, obj in _read_jsonl(users_path, errors):
        where = f"{users_path}:{lineno}"
        if not _check_fields(obj, _USER_FIELDS, where, errors):
            continue
        if obj["split"] not in SPLITS:
            errors.add(where, f"field 'split' must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
            continue
        bad_traits = [k for k, v in obj["traits"].items() if not isinstance(v, str)]
        if bad_traits:
            errors.add(where, f"traits must map strings to strings; {bad_traits[0]!r} is not a string")
            continue
        uid = obj["user_id"]
        if uid in users:
            errors.add(where, f"duplicate user_id {uid!r} (first on line {first_line[uid]})")
            continue
        first_line[uid] = lineno
        users[uid] = User(uid, obj["domain"], obj["split"], obj["description"], dict(obj["traits"]))

    # Any bad or missing users.jsonl makes `users` incomplete: checking prefs against it would bury the one
    # real error under an "unknown user_id" line per preference of every user it lost (or of all users).
    users_complete = len(errors.lines) == errors_before_users
    prefs: dict[str, list[Preference]] = {uid: [] for uid in users}
    pref_line: dict[str, int] = {}
    prefs_path = root / "prefs.jsonl"
    for lineno, obj in _read_jsonl(prefs_path, errors):
        where = f"{prefs_path}:{lineno}"
        if not _check_fields(obj, _PREF_FIELDS, where, errors):
            continue
        pid, uid = obj["pref_id"], obj["user_id"]
        if pid in pref_line:
            errors.add(where, f"duplicate pref_id {pid!r} (first on line {pref_line[pid]})")
            continue
        pref_line[pid] = lineno
        if uid not in users:
            if users_complete:
                errors.add(where, f"unknown user_id {uid!r} (not in {users_path.name})")
            continue
        rejected_description = obj.get("rejected_description")
        if rejected_description is not None and not _check_fields(obj, {"rejected_description": str}, where, errors):
            continue
        prefs[uid].append(Preference(pid, uid, obj["question"], obj["chosen"], obj["rejected"], rejected_description))

    # gen-data and the importer swap a dataset in by removing the manifest, renaming the two files and
    # renaming a new manifest (a new inode) into place; if that overlapped this read, the files read may
    # be half old, half new. The one true error is then this, not whatever the mix looks like.
    if manifest_id is not None and _file_identity(manifest_path) != manifest_id:
        raise FspoError(f"{root}: was replaced while being read (by gen-data?); run again")
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    for key, actual, fname in (
        ("users", len(users), "users.jsonl"),
        ("prefs", len(pref_line), "prefs.jsonl"),
    ):
        expected = counts.get(key)
        if isinstance(expected, int) and not errors.lines and expected != actual:
            errors.add(
                str(root / "manifest.json"), f"counts.{key} is {expected} but {fname} has {actual} records"
            )
    errors.raise_if_any()
    return Dataset(root=root, manifest=manifest, users=users, prefs=prefs)


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


def tokenize_episode(
    episode: Episode,
    tokenizer,
    max_tokens: int | None = None,
    user_description: bool = False,
    *,
    bos: bool = True,
    truncate: str = "drop_oldest_shots",
    rejected_description: str = "shared",
) -> TokenizedEpisode:
    """Render and tokenize one episode so that its packed block (prompt + chosen + rejected) fits in
    `max_tokens`. The responses are never cut. `truncate`:
    - "drop_oldest_shots" (DESIGN.md): drop whole shots, oldest first; the target question is never cut, and
      an episode that does not fit even with zero shots is an FspoError naming it.
    - "keep_start" (the released code's truncation mode): keep the prompt's first tokens, cutting its end
      (the target question first, then the newest shots), as the released `keep_start` keeps a prompt's first
      `max_prompt_length` tokens; here as many as leave room for both responses.
    `bos`: the prompt starts with the tokenizer's bos (the released loader adds no special tokens)."""
    if truncate not in TRUNCATE:
        raise FspoError(f"truncate must be {' or '.join(TRUNCATE)}, got {truncate!r}")
    chosen_text, rejected_text = target_texts(episode, user_description, rejected_description)
    chosen = tokenizer.encode(chosen_text) + [tokenizer.eos_id]
    rejected = tokenizer.encode(rejected_text) + [tokenizer.eos_id]
    head = [tokenizer.bos_id] if bos else []
    shots = list(episode.shots)
    cut = 0
    while True:
        prompt = head + tokenizer.encode(render_prompt(shots, episode.target.question, user_description))
        total = len(prompt) + len(chosen) + len(rejected)
        if max_tokens is None or total <= max_tokens:
            break
        if truncate == "keep_start":
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


def tokenize_episodes(
    episodes: Sequence[Episode],
    tokenizer,
    max_tokens: int | None = None,
    user_description: bool = False,
    *,
    bos: bool = True,
    truncate: str = "drop_oldest_shots",
    rejected_description: str = "shared",
) -> list[TokenizedEpisode]:
    """`tokenize_episode` for each episode; every episode that cannot fit is reported in one FspoError.

    All texts are first encoded in one batch (fast tokenizers run it in parallel); only episodes over the
    budget go through `tokenize_episode`.
    """
    options = {"bos": bos, "truncate": truncate, "rejected_description": rejected_description}
    if truncate not in TRUNCATE:
        raise FspoError(f"truncate must be {' or '.join(TRUNCATE)}, got {truncate!r}")
    targets = [target_texts(ep, user_description, rejected_description) for ep in episodes]
    texts = [render_prompt(ep.shots, ep.target.question, user_description) for ep in episodes]
    texts += [c for c, _ in targets] + [r for _, r in targets]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
    head = [tokenizer.bos_id] if bos else []
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
            out.append(tokenize_episode(ep, tokenizer, max_tokens, user_description, **options))
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
