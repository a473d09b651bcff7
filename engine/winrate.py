"""Winrates of generated responses, the way the FSPO paper reports personalization.

For every (test user, question) the model answers after N of the user's labelled preferences; a baseline
answers the same question; a judge that knows the user decides which answer the user prefers. Baselines:

    zero-shot            the same model without shots (the paper's unpersonalized baseline)
    oracle-description   the same model, same shots, answering after the user's TRUE description
    DIR                  another model or run (e.g. the Pref-FT stage, a base Llama), same shots

Every pair is judged in both orders (data_gen/labeler.py `judge_both_orders`, the code gen-data labels
with): a verdict that follows the position rather than the content is a tie, as is a tie in either
order; a tie counts half a win. `ci95` resamples users (engine/intervals.py: a user's answers stand or fall
together); it covers another draw of users, not another training seed. Judges:

    template   datasets made by the template generator: the generator's own scoring rule of the user's
               traits, applied to what `domain.read_attrs` reads in each response (offline, exact)
    openai     any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp), through the project's
               one LLM client (data_gen/client.py: json_schema replies, reply cache, retries, key from the
               environment), asked exactly as gen-data's labeler asks

Either side's answers may come from a completions server instead of this process (a `Side` with a
`server`, engine/remote.py): the same prompts, so a paper-size table runs on vLLM.

The judge's reply cache, the remote generations' reply cache and the answers cache make a killed run
resume without re-asking answered pairs or regenerating answers. Same seeds, same results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fspo_engine.data_gen.atomic import write_text_atomic
from fspo_engine.data_gen.bayes import models_for
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.labeler import Decision, judge_both_orders, judge_messages, parse_verdict
from fspo_engine.data_gen.prompts import JUDGE_SCHEMA
from fspo_engine.engine.episodes import Dataset, Episode, load_dataset, sample_episodes
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.evaluate import description_accuracy
from fspo_engine.engine.intervals import CI95_METHOD, cluster_ci95
from fspo_engine.engine.metrics import save_figure
from fspo_engine.engine.personalize import answer, default_description_mode, hide_descriptions, load_generator
from fspo_engine.engine.remote import Server, load_remote_generator
from fspo_engine.engine.rundir import load_run

BASELINES = ("zero-shot", "oracle-description")
JUDGES = ("template", "openai")


@dataclass(frozen=True)
class Side:
    """One set of answers: whose, after how many shots, with which description mode."""

    name: str  # "model", or the baseline's name
    model_dir: Path
    shots: int
    description: str  # "none" | "generated" | "oracle"
    bos: bool = True  # the prompt starts with bos, as the run trained (data.bos)
    server: Server | None = None  # generate on this completions server (engine/remote.py), else in-process
    split_special_tokens: bool = True  # a special token's text in the data is plain text (data.split_special_tokens)


def plan_sides(model: str, baseline: str, shots: int, description: str | None) -> tuple[Side, Side]:
    """(the model's side, the baseline's side) for `eval --winrate`."""
    run = load_run(model)
    policy_dir, bos = run.policy, run.config.data.bos
    trained_with = run.config.data.user_description
    mode = description or default_description_mode(trained_with)
    ours = Side("model", policy_dir, shots, mode, bos, split_special_tokens=run.config.data.split_special_tokens)
    if baseline == "zero-shot":
        return ours, dataclasses.replace(ours, name="zero-shot", shots=0)
    if baseline == "oracle-description":
        if not trained_with:
            raise FspoError(f"--baseline oracle-description: {model} did not train with user descriptions "
                            "(data.user_description), so it cannot answer after one")
        if mode == "oracle":
            raise FspoError("--baseline oracle-description against --description oracle compares a model with itself")
        return ours, dataclasses.replace(ours, name="oracle-description", description="oracle")
    other = load_run(baseline)
    return ours, Side(str(baseline), other.policy, shots, default_description_mode(other.config.data.user_description),
                      other.config.data.bos, split_special_tokens=other.config.data.split_special_tokens)


def sample_items(dataset: Dataset, split: str, shots: int, seed: int, users: list[str] | None = None,
                 per_user: int | None = None) -> list[Episode]:
    """The (user, question) items: each chosen user's preferences as targets (all, or `per_user` of them),
    with `shots` of the user's other preferences as context (epoch 0 of the episode sampler)."""
    if users is not None:
        unknown = [u for u in users if u not in dataset.users]
        if unknown:
            raise FspoError(f"--users: no user {unknown[0]!r} in {dataset.root / 'users.jsonl'}")
        wrong = [u for u in users if dataset.users[u].split != split]
        if wrong:
            raise FspoError(f"--users: {wrong[0]!r} is a {dataset.users[wrong[0]].split} user, not {split}")
        empty = [u for u in users if not dataset.prefs.get(u)]
        if empty:
            raise FspoError(f"--users: {empty[0]!r} has no preferences in {dataset.root / 'prefs.jsonl'}")
    items = sample_episodes(dataset, split, shots, seed=seed, epoch=0, episodes_per_user=per_user)
    if users is not None:
        keep = set(users)
        items = [ep for ep in items if ep.user_id in keep]
    if not items:
        raise FspoError(f"{dataset.root}: no {split} users with preferences to answer for")
    return items


def side_answers(side: Side, items: list[Episode], cache_dir: Path | None, *, device=None, progress=True,
                 **settings) -> list[dict]:
    """`answer` for every item from `side`'s point of view, cached under `cache_dir` by everything that
    decides the answers (model files, items, settings, the served model's name): a resumed run does not
    generate them again. A side with a `server` generates there, its replies cached one by one under
    `cache_dir / "generate"` (a killed run re-asks only what was in flight)."""
    from tqdm.auto import tqdm

    # The newest `side.shots` of each item's shots; all of them when the user has fewer.
    eps = [dataclasses.replace(ep, shots=ep.shots[max(0, len(ep.shots) - side.shots):] if side.shots else ())
           for ep in items]
    if side.description != "oracle":
        eps = hide_descriptions(eps)
    key = _answers_key(side, eps, settings)
    path = cache_dir / f"answers-{key[:24]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key and len(cached.get("answers", [])) == len(eps):
                return cached["answers"]
        except (OSError, ValueError):
            pass  # a damaged cache file: generate again
    if side.server is None:
        gen = load_generator(side.model_dir, device=device, bos=side.bos,
                             split_special_tokens=side.split_special_tokens, **settings)
    else:
        gen = load_remote_generator(side.model_dir, side.server, None if cache_dir is None else cache_dir / "generate",
                                    bos=side.bos, split_special_tokens=side.split_special_tokens, **settings)
    with tqdm(total=len(eps), desc=f"generate ({side.name})", unit="answer", leave=False,
              disable=None if progress else True) as bar:
        out = answer(gen, eps, side.description, on_done=bar.update)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, "answers": out}, ensure_ascii=False))
    return out


def _answers_key(side: Side, eps: list[Episode], settings: dict) -> str:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in side.model_dir.iterdir() if p.is_file())
    blob = {"model": str(side.model_dir.resolve()), "files": files, "description": side.description, "bos": side.bos,
            "items": [[ep.episode_id, [s.pref_id for s in ep.shots], ep.description] for ep in eps],
            "settings": settings}
    if not side.split_special_tokens:  # only when not the default: older caches keep their keys
        blob["split_special_tokens"] = False
    if side.server is not None:  # not the URL: any server of the same model gives the same answers
        blob["served_model"] = side.server.model
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# --- judges ------------------------------------------------------------------------------------------
class TemplateJudge:
    """The template generator's own rule: the user's score of the attributes each response carries."""

    name = "template"

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.models = models_for(dataset.manifest)
        if not self.models:
            raise FspoError(f"--judge template: {dataset.root} was not made by the template generator "
                            "(manifest generator.backend); use --judge openai")

    async def verdict(self, user, question: str, a: str, b: str) -> str:
        domain = self.models[user.domain].domain
        sa = domain.score(user.traits, domain.read_attrs(a))
        sb = domain.score(user.traits, domain.read_attrs(b))
        return "A" if sa > sb else "B" if sb > sa else "tie"

    async def aclose(self):
        pass


class ChatJudge:
    """An LLM judge on an OpenAI-compatible server, shown the user's description (as gen-data's labeler)."""

    name = "openai"

    def __init__(self, url: str | None, model: str, api_key_env: str, cache_dir: Path | None,
                 concurrency: int = 16, timeout_s: float = 60.0, max_retries: int = 5):
        from fspo_engine.data_gen.client import LLMClient

        try:
            import openai  # noqa: F401
        except ImportError:
            raise FspoError("--judge openai needs the openai package: pip install 'fspo-engine[llm]'") from None
        try:
            self.client = LLMClient(model=model, base_urls=url, api_key_env=api_key_env, concurrency=concurrency,
                                    timeout_s=timeout_s, max_retries=max_retries, cache_dir=cache_dir)
        except DataGenError as exc:
            raise FspoError(str(exc)) from None
        self.model = model

    async def verdict(self, user, question: str, a: str, b: str) -> str:
        # The request gen-data's labeler sends (data_gen/labeler.py Judge.pair): the same schema and settings.
        try:
            return await self.client.chat_json(judge_messages(user.description, question, a, b), stage="judge",
                                               schema=JUDGE_SCHEMA, schema_name="judge_verdict",
                                               check=parse_verdict, temperature=0.0, max_tokens=200)
        finally:
            # Committed as each verdict arrives (the cache batches a second's worth otherwise): a killed run
            # re-asks only what was in flight. One SQLite commit is cheap beside a judge's reply.
            self.client.flush()

    async def aclose(self):
        await self.client.aclose()


async def _judge_all(judge, dataset: Dataset, items: list[Episode], ours: list[dict], theirs: list[dict],
                     on_done=None) -> list[Decision]:
    async def one(ep, x, y):
        user = dataset.users[ep.user_id]
        decision = await judge_both_orders(lambda a, b: judge.verdict(user, ep.target.question, a, b), x, y)
        if on_done is not None:
            on_done(1)
        return decision

    tasks = [asyncio.ensure_future(one(ep, x["response"], y["response"])) for ep, x, y in zip(items, ours, theirs)]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:  # a dead server fails the first request: stop the others, report that one
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        await judge.aclose()


def judge_pairs(judge, dataset, items, ours, theirs, progress=True) -> list[Decision]:
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=f"judge ({judge.name})", unit="pair", leave=False,
              disable=None if progress else True) as bar:
        try:
            return asyncio.run(_judge_all(judge, dataset, items, ours, theirs, on_done=bar.update))
        except DataGenError as exc:  # the server refused, was down, or kept answering garbage bodies
            raise FspoError(f"--judge {judge.name}: {exc}") from None


# --- the whole comparison ---------------------------------------------------------------------------
def run_winrate(model: str, data: str, *, baseline: str, judge: str, shots: int = 8, split: str = "test",
                seed: int = 0, users: list[str] | None = None, per_user: int | None = None,
                description: str | None = None, judge_url: str | None = None, judge_model: str | None = None,
                judge_api_key_env: str = "OPENAI_API_KEY", judge_concurrency: int = 16, judge_retries: int = 5,
                cache_dir: Path | None = None, device=None, progress: bool = True,
                generator: Server | None = None, baseline_generator: Server | None = None,
                **generation) -> tuple[dict, list[dict]]:
    """Generate both sides' answers, judge every pair both ways, and sum up: -> (report, per-pair records).
    `generation`: Generator settings (max_new_tokens, temperature, top_p, max_tokens, ...); the seed is
    both the episode sampler's and the token sampler's. `generator`: the model's answers come from this
    completions server; `baseline_generator`: the baseline's (default: `generator` when the baseline is the
    same model, zero-shot or oracle-description; else the baseline runs in this process)."""
    if judge not in JUDGES:
        raise FspoError(f"--judge: expected one of {', '.join(JUDGES)}, got {judge!r}")
    dataset = load_dataset(data)
    ours_side, their_side = plan_sides(model, baseline, shots, description)
    if baseline_generator is None and their_side.model_dir == ours_side.model_dir:
        baseline_generator = generator
    ours_side = dataclasses.replace(ours_side, server=generator)
    their_side = dataclasses.replace(their_side, server=baseline_generator)
    if judge == "template":
        the_judge = TemplateJudge(dataset)
    else:
        if not judge_model:
            raise FspoError("--judge openai needs --judge-model NAME (and --judge-url URL unless OPENAI_BASE_URL is set)")
        the_judge = ChatJudge(judge_url, judge_model, judge_api_key_env,
                              None if cache_dir is None else cache_dir / "judge", concurrency=judge_concurrency,
                              max_retries=judge_retries)
    items = sample_items(dataset, split, shots, seed, users, per_user)
    settings = {**generation, "seed": seed}
    ours = side_answers(ours_side, items, cache_dir, device=device, progress=progress, **settings)
    theirs = side_answers(their_side, items, cache_dir, device=device, progress=progress, **settings)
    decisions = judge_pairs(the_judge, dataset, items, ours, theirs, progress=progress)
    report = summarize(decisions, [dataset.users[ep.user_id].domain for ep in items], [ep.user_id for ep in items],
                       seed)
    report.update({
        "model": str(ours_side.model_dir), "baseline": their_side.name, "baseline_model": str(their_side.model_dir),
        "baseline_shots": their_side.shots, "baseline_description": their_side.description,
        "judge": judge if judge == "template" else f"openai:{judge_model}", "shots": shots,
        "generator": _generator_name(ours_side), "baseline_generator": _generator_name(their_side),
        "description": ours_side.description, "split": split, "seed": seed, "data": str(dataset.root),
    })
    models = models_for(dataset.manifest)
    if ours_side.description == "generated" and models:
        inferred = [dataclasses.replace(ep, description=a["description"]) for ep, a in zip(items, ours)]
        report["description_accuracy"], report["description_accuracy_ci95"] = description_accuracy(
            dataset, inferred, models, seed=seed)
    records = [{"user_id": ep.user_id, "domain": dataset.users[ep.user_id].domain, "pref_id": ep.target.pref_id,
                "question": ep.target.question, "model": x, "baseline": y, "votes": d.votes, "verdict": d.kind}
               for ep, x, y, d in zip(items, ours, theirs, decisions)]
    return report, records


def _generator_name(side: Side) -> str:
    return "local" if side.server is None else f"openai:{side.server.model}"


# --- the numbers ------------------------------------------------------------------------------------
def tally(decisions: list[Decision], users: list[str] | None = None, seed: int = 0) -> dict:
    """winrate (ties count half), ci95, wins/ties/losses/n; order flips are ties, malformed are left out.
    `users`: each decision's user, the bootstrap's clusters (engine/intervals.py); without them every
    decision is its own cluster."""
    users = list(range(len(decisions))) if users is None else users
    kinds = [d.kind for d in decisions]
    wins, losses = kinds.count("x"), kinds.count("y")
    ties = kinds.count("tie") + kinds.count("flip")
    n = wins + ties + losses
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    value = {"x": 1.0, "y": 0.0, "tie": 0.5, "flip": 0.5}
    judged = [(value[k], u) for k, u in zip(kinds, users) if k in value]
    ci = cluster_ci95([v for v, _ in judged], [u for _, u in judged], seed=seed)
    return {"winrate": rate, "ci95": ci, "wins": wins, "ties": ties, "losses": losses, "n": n,
            "users": len({u for _, u in judged}), "order_flips": kinds.count("flip"),
            "malformed": kinds.count("malformed")}


def summarize(decisions: list[Decision], domains: list[str], users: list[str] | None = None, seed: int = 0) -> dict:
    users = list(range(len(decisions))) if users is None else users
    by_domain = defaultdict(list)
    for d, dom, u in zip(decisions, domains, users):
        by_domain[dom].append((d, u))
    out = tally(decisions, users, seed)
    if out["n"] == 0:
        raise FspoError(f"the judge gave no usable verdict ({out['malformed']} malformed replies of "
                        f"{len(decisions)} pairs)")
    out["ci95_method"] = CI95_METHOD
    out["per_domain"] = {dom: tally([d for d, _ in pairs], [u for _, u in pairs], seed)
                         for dom, pairs in sorted(by_domain.items())}
    return out


def write_winrate(report: dict, out_json: Path, records: list[dict] | None = None) -> list[Path]:
    """`out_json`, its bar chart (`.png`) and, given the judged pairs, `.pairs.jsonl` beside it; the paths."""
    out_json = Path(out_json)
    write_text_atomic(out_json, json.dumps(report, indent=2, ensure_ascii=False))
    written = [out_json, out_json.with_suffix(".png")]
    plot_winrate(report, written[1])
    if records is not None:
        written.append(out_json.with_suffix(".pairs.jsonl"))
        write_text_atomic(written[2], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return written


def plot_winrate(report: dict, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all", report)] + list(report["per_domain"].items())
    labels = [f"{name}\n(n={r['n']})" for name, r in rows]
    rates = [r["winrate"] for _, r in rows]
    err = [[max(r["winrate"] - r["ci95"][0], 0.0) for _, r in rows],
           [max(r["ci95"][1] - r["winrate"], 0.0) for _, r in rows]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(rows), 3.6))
    ax.bar(range(len(rows)), rates, yerr=err, capsize=4, color=["#3b6ea5"] + ["#8fb3d9"] * (len(rows) - 1))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("winrate (ties = 1/2)\n95% CI, users resampled")
    ax.set_title(f"{report['shots']}-shot model vs {report['baseline']} ({report['judge']} judge)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=110)


__all__ = ["BASELINES", "JUDGES", "ChatJudge", "Server", "Side", "TemplateJudge", "judge_pairs", "plan_sides",
           "run_winrate", "sample_items", "side_answers", "summarize", "tally",
           "write_winrate"]
