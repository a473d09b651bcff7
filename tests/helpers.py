"""Shared test helpers: tiny random HF Llama directories (with a tokenizer), tiny preference datasets and the
`fspo-engine` command line.

    model_dir = make_tiny_model_dir(tmp_path / "model", vocab_size=320, tie=False, seed=0)
    data_dir = write_dataset(tmp_path / "data", *synthetic_records(n_users=4, prefs_per_user=6))
    data_dir = write_fixture(tmp_path / "data")          # the trainer tests' learnable dataset
    res = cli("train", "--data", str(data_dir), "--out", str(run), *SMALL)

Everything is built offline from fixed seeds; a model directory takes ~1-2 s (sentencepiece training).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

WORDS = (
    "the a user prefers short long answers with examples code python rust bullet points formal casual tone "
    "explain why because first then finally summary detail concise verbose friendly technical history science "
    "cooking travel music budget plan steps list table question response preferred ## # : , . ! ?"
).split()


def random_text(rng: random.Random, n_words: tuple[int, int] = (3, 20)) -> str:
    """Words from a small vocabulary, with the odd newline, markdown marker and non-ASCII character."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(*n_words))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), "\n- ")
    if rng.random() < 0.2:
        words.append(rng.choice(["café", "naïve", "東京", "🙂", "\t"]))
    return " ".join(words)


def synthetic_records(
    n_users: int = 4,
    prefs_per_user: int | list[int] = 6,
    seed: int = 0,
    test_users: int = 1,
    n_words: tuple[int, int] = (3, 20),
) -> tuple[list[dict], list[dict]]:
    """(users, prefs) records in the dataset contract's shape. `prefs_per_user` may differ per user.
    The last `test_users` users are in the test split."""
    rng = random.Random(seed)
    counts = prefs_per_user if isinstance(prefs_per_user, list) else [prefs_per_user] * n_users
    users, prefs = [], []
    for u in range(n_users):
        uid = f"u{u:03d}"
        users.append(
            {
                "user_id": uid,
                "domain": rng.choice(["cooking", "travel", "code"]),
                "split": "test" if u >= n_users - test_users else "train",
                "description": f"The user likes {rng.choice(WORDS)} and {rng.choice(WORDS)} answers.",
                "traits": {"tone": rng.choice(["formal", "casual"])},
            }
        )
        for k in range(counts[u]):
            prefs.append(
                {
                    "pref_id": f"{uid}-p{k:03d}",
                    "user_id": uid,
                    "question": random_text(rng, n_words) + "?",
                    "chosen": random_text(rng, n_words),
                    "rejected": random_text(rng, n_words),
                }
            )
    return users, prefs


def write_jsonl(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_dataset(path, users: list[dict], prefs: list[dict], manifest: dict | None = None) -> Path:
    """Write a dataset directory (manifest.json, users.jsonl, prefs.jsonl) from records."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {
            "format": "fspo-prefs/1",
            "domains": sorted({u["domain"] for u in users if isinstance(u, dict) and "domain" in u}),
            "seed": 0,
            "generator": {"backend": "tests"},
            "counts": {"users": len(users), "prefs": len(prefs)},
        }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    write_jsonl(path / "users.jsonl", users)
    write_jsonl(path / "prefs.jsonl", prefs)
    return path


def write_fixture(root, users=16, prefs_per_user=8, seed=0, everyone_upbeat=False) -> Path:
    """A small dataset with one clear trait: half the users prefer upbeat replies, half gloomy ones
    (or, with `everyone_upbeat`, a preference learnable without reading the shots)."""
    r = random.Random(seed)
    up, down = "great lovely superb bright happy".split(), "awful dull poor grey sad".split()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    us, ps = [], []
    for u in range(users):
        likes_up = everyone_upbeat or u % 2 == 0
        us.append({"user_id": f"u{u:02d}", "domain": "reviews", "split": "test" if u >= users - 4 else "train",
                   "description": f"prefers {'upbeat' if likes_up else 'gloomy'} replies",
                   "traits": {"tone": "upbeat" if likes_up else "gloomy"}})
        for k in range(prefs_per_user):
            a = " ".join(r.choice(up) for _ in range(3))
            b = " ".join(r.choice(down) for _ in range(3))
            c, d = (a, b) if likes_up else (b, a)
            ps.append({"pref_id": f"u{u:02d}-{k}", "user_id": f"u{u:02d}", "question": f"how was item {k}?",
                       "chosen": c, "rejected": d})
    (root / "manifest.json").write_text(json.dumps({"format": "fspo-prefs/1", "domains": ["reviews"], "seed": seed,
                                                    "generator": {}, "counts": {"users": users, "prefs": len(ps)}}))
    (root / "users.jsonl").write_text("".join(json.dumps(x) + "\n" for x in us))
    (root / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ps))
    return root


# A from-scratch model small enough for CPU tests, on `write_fixture`'s data.
SMALL = ["--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=2", "--set", "model.vocab_size=400",
         "--set", "batch.episodes=6", "--set", "data.max_tokens=512", "--shots", "1-3",
         "--set", "run.progress=false"]


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    """`fspo-engine ARGS...` in a subprocess (one thread: results as on any machine's single core)."""
    return subprocess.run([sys.executable, "-m", "fspo_engine.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def cli_in_process(*args) -> SimpleNamespace:
    """`fspo-engine ARGS...` in this process (a subprocess would spend seconds importing torch): returncode,
    stdout, stderr."""
    from click.testing import CliRunner

    from fspo_engine.cli.main import cli as main

    res = CliRunner().invoke(main, list(map(str, args)))
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released): a server that refuses connections."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def tokenizer_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Texts covering the episode format's markers, for training a tiny tokenizer."""
    from fspo_engine.engine.dataset import Preference
    from fspo_engine.engine.episodes import render_prompt, render_response

    rng = random.Random(seed)
    texts = [random_text(rng, (5, 40)) for _ in range(n)]
    shots = [Preference(f"p{i}", "u", random_text(rng), random_text(rng), random_text(rng)) for i in range(3)]
    texts += [
        render_prompt(shots, random_text(rng)),
        render_prompt([], "why?"),
        render_prompt(shots, "why?", user_description=True),
        render_response("ok", "The user likes x."),
    ] * 5
    return texts


def make_tiny_model_dir(
    path,
    vocab_size: int = 320,
    tie: bool = False,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 112,
    init_std: float = 0.1,
    tokenizer: bool = True,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random `transformers.LlamaForCausalLM` saved in HF format (safetensors) in `dtype`, with a tokenizer
    trained on `tokenizer_corpus()` (its vocabulary is at most `vocab_size`, the model's).

    `init_std` is larger than HF's 0.02 so that attention and the output distribution are far from
    uniform: a masking or position bug then changes log-probs by far more than any tolerance.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # norms away from 1 so their weights matter too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    if tokenizer:
        from fspo_engine.engine.tokenizer import train_tokenizer

        train_tokenizer(tokenizer_corpus(seed), vocab_size, path)
    return path


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|eot_id|>", "</s>")  # bos, eos, and one more special token


def char_tokenizer_dir(path) -> Path:
    """An HF tokenizer directory with one token per printable character (a BPE without merges) and Llama-3-style
    special tokens (`LLAMA3_SPECIALS`: ids 1-3; 0 is <unk>): what a special token's text in a dataset turns into
    is then plain to see. Built in milliseconds, no training."""
    import string

    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{t: i for i, t in enumerate(LLAMA3_SPECIALS, 1)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(sorted(set(string.printable)))})
    rust = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    rust.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token=LLAMA3_SPECIALS[0],
                                 eos_token=LLAMA3_SPECIALS[1], additional_special_tokens=[LLAMA3_SPECIALS[2]])
    hf.save_pretrained(path)
    return Path(path)


def random_hf_llama(path, seed: int = 0, std: float = 0.08, **config):
    """A random `transformers.LlamaForCausalLM` (fp32, eval) built from `config` (LlamaConfig keys) and saved
    at `path`: weights N(0, std), norm weights 1 + N(0, 0.2) so that they are tested too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    hf.save_pretrained(path)
    return hf


def hf_model(model_dir):
    """The directory's model as `transformers.LlamaForCausalLM`, fp32, eager attention (the test oracle)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_response_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """sum_j log p(response_j | prompt, response_<j) from one plain forward over prompt + response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (P + L, V)
    logp = torch.log_softmax(logits, dim=-1)
    P, L = len(prompt_ids), len(response_ids)
    rows = torch.arange(P - 1, P + L - 1)
    return float(logp[rows, torch.tensor(response_ids)].sum())


def compile_for_sm90(script: str, argsets: list[tuple[str, ...]]) -> list[str]:
    """Run a Triton ahead-of-time compile `script` (sm_90, no GPU needed) once per argument set, in parallel
    processes without TRITON_INTERPRET; returns each stdout. Skips when this triton cannot compile AOT."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in argsets]  # fmt: skip
    outputs = [proc.communicate() for proc in procs]  # wait for all before any skip or failure
    for args, proc, (_, err) in zip(argsets, procs, outputs):
        if "ModuleNotFoundError" in err or "ImportError" in err:
            pytest.skip(f"triton AOT compile unavailable: {err.strip().splitlines()[-1]}")
        assert proc.returncode == 0, f"{args}: {err[-3000:]}"
    return [out for out, _ in outputs]
