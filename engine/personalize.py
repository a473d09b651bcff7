"""What a personalised model says to a user: the few-shot prompt, the user description it infers from the
shots, and its response. Shared by `generate --out`, evaluation with inferred descriptions and winrates.

The user-description option (FSPO's user-description chain of thought) trains targets of the form
"## User Description\\n{description}\\n## Preferred Response \\n{response}\\n". At evaluation time the
description must come from the shots, as the paper evaluates it: the model first writes it (greedy, up to
the response header), then answers after it. `description` names where it comes from:

    "none"       no description (runs trained without the option)
    "generated"  the model's own, inferred from the shots (the default for description runs)
    "oracle"     the user's true description from users.jsonl, given to the model: an upper bound, and
                 labelled "oracle" wherever it is reported

Only "oracle" ever reads `User.description`: `hide_descriptions` clears it from episodes first in every
other mode, so nothing downstream can condition on it by accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fspo_engine.engine.distributed import pick_device
from fspo_engine.engine.episodes import Episode, render_prompt, render_response
from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.generate import generate_batch, turn_stop_ids
from fspo_engine.engine.model import load_model
from fspo_engine.engine.tokenizer import check_ids_fit, load_tokenizer

DESCRIPTION_MODES = ("none", "generated", "oracle")
DESCRIPTION_HEADER = "## User Description\n"
RESPONSE_HEADER = "## Preferred Response \n"


def default_description_mode(user_description: bool) -> str:
    """What a run is evaluated with by default: its own inferred description if it trained with them."""
    return "generated" if user_description else "none"


def check_description_mode(mode: str) -> str:
    if mode not in DESCRIPTION_MODES:
        raise FspoError(f"--description: expected one of {', '.join(DESCRIPTION_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Prompt:
    """What the model continues: `ids` exactly as fed ([bos] + tok(few-shot prompt) + tok(header)), and
    `text`, the same without bos (the text those pieces were encoded from; what `generate --out` records)."""

    text: str
    ids: list[int]


def hide_descriptions(episodes: Sequence[Episode]) -> list[Episode]:
    """The episodes without their users' true descriptions (every mode but "oracle" starts here)."""
    return [dataclasses.replace(ep, description="") for ep in episodes]


@dataclass
class Generator:
    """A loaded model and its tokenizer, with the decoding settings shared by every call."""

    model: object
    tokenizer: object
    stop_ids: tuple[int, ...]
    max_tokens: int = 8192  # prompt + generated tokens; the oldest shots are dropped to fit
    max_new_tokens: int = 256
    max_description_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    bos: bool = True
    where: str = "the model"  # the model directory, for errors

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _prompt(self, shots, question: str, user_description: bool, budget: int, header: str) -> tuple[Prompt, int]:
        """The few-shot prompt followed by `header` (where the generation starts), dropping the oldest shots
        until `budget` tokens remain for the generation; -> (prompt, shots kept)."""
        shots = list(shots)
        head = [self.tokenizer.bos_id] if self.bos else []
        while True:
            text = render_prompt(shots, question, user_description)
            ids = head + self.tokenizer.encode(text)
            if len(ids) + budget <= self.max_tokens:
                # Encoded apart, as training encodes the prompt and the target apart.
                return Prompt(text + header, ids + self.tokenizer.encode(header)), len(shots)
            if not shots:
                raise FspoError(f"the zero-shot prompt ({len(ids)} tokens) plus {budget} generated tokens does "
                                f"not fit the budget of {self.max_tokens} tokens")
            shots.pop(0)

    def _run(self, prompts: list[Prompt], max_new: int, stop_strings=(), on_done=None) -> list:
        """Continue every prompt -> one `engine.generate.Generation` per prompt (`text` and `finish_reason`
        are what callers read). engine/remote.py's RemoteGenerator sends them to a server instead."""
        ids = [p.ids for p in prompts]
        check_ids_fit(self.tokenizer, self.model.config.vocab_size, self.where, ids)
        return generate_batch(self.model, ids, max_new_tokens=max_new, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop_ids=self.stop_ids, stop_strings=stop_strings,
                              decode=self.decode, on_done=on_done)

    def describe(self, episodes: Sequence[Episode], on_done: Callable | None = None) -> list[str]:
        """The user description the model infers from each episode's shots (greedy unless sampling was
        asked for), generated after the description task line and cut at the response header."""
        budget = self.max_description_tokens + self.max_new_tokens
        prompts = [self._prompt(ep.shots, ep.target.question, True, budget, DESCRIPTION_HEADER)[0] for ep in episodes]
        outs = self._run(prompts, self.max_description_tokens, stop_strings=(RESPONSE_HEADER.strip(),),
                         on_done=on_done)
        return [" ".join(o.text.split()) for o in outs]

    def respond(self, episodes: Sequence[Episode], descriptions: Sequence[str | None],
                on_done: Callable | None = None) -> list[dict]:
        """Each episode's response to its target question after its shots (and after the given description,
        when there is one): one dict per episode with `response`, `finish_reason`, `shots_used` and `prompt`
        (the text the response continued, bos not shown)."""
        prompts, kept = [], []
        for ep, desc in zip(episodes, descriptions):
            budget = self.max_new_tokens + (self.max_description_tokens if desc is not None else 0)
            # The response's prefix exactly as training renders it (render_response), minus the response.
            prefix = render_response("", desc)[: -len("\n")]
            prompt, n = self._prompt(ep.shots, ep.target.question, desc is not None, budget, prefix)
            prompts.append(prompt)
            kept.append(n)
        outs = self._run(prompts, self.max_new_tokens, on_done=on_done)
        return [{"response": o.text.strip(), "finish_reason": o.finish_reason, "shots_used": n, "prompt": p.text}
                for o, n, p in zip(outs, kept, prompts)]


def load_generator(model_dir, device=None, split_special_tokens: bool = True, **settings) -> Generator:
    """A Generator over the model in `model_dir` (HF format), on `device` (bf16 on CUDA, fp32 elsewhere);
    `split_special_tokens` as the run trained (data.split_special_tokens)."""
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_dir, split_special_tokens=split_special_tokens)
    model = load_model(model_dir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev).eval()
    return Generator(model, tokenizer, turn_stop_ids(model_dir, tokenizer.eos_id, model.config.eos_token_id),
                     where=str(model_dir), **settings)


def answer(gen: Generator, episodes: Sequence[Episode], description: str,
           on_done: Callable | None = None) -> list[dict]:
    """Responses to every episode's target question with `description` mode "none", "generated" (describe
    first, then respond after that description) or "oracle" (respond after the true description). Episodes
    of non-oracle modes must come through `hide_descriptions`."""
    check_description_mode(description)
    if description == "oracle":
        descs = [ep.description for ep in episodes]
    elif description == "generated":
        if any(ep.description for ep in episodes):
            raise ValueError("answer(description='generated'): episodes still carry true descriptions")
        descs = gen.describe(episodes, on_done=None)
    else:
        descs = [None] * len(episodes)
    out = gen.respond(episodes, descs, on_done=on_done)
    for rec, desc in zip(out, descs):
        rec["description"] = desc
    return out


__all__ = ["DESCRIPTION_MODES", "Generator", "Prompt", "answer", "check_description_mode", "default_description_mode",
           "hide_descriptions", "load_generator"]
